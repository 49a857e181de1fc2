"""kbhash input: a Hash source is flattened the way the live bridge presents it."""

import numpy as np
import pytest

import kbstream

kbhash = pytest.importorskip("kbhash")


def make_source():
    h = kbhash.Hash()
    h["data.adc"] = np.arange(6, dtype=np.uint16).reshape(2, 3)
    h["data.image"] = kbhash.ImageData(np.arange(20, dtype=np.uint8).reshape(4, 5))
    h["header.pulseCount"] = 3
    h["header.name"] = "JNGFR01"
    h.set_timestamp("header.pulseCount", kbhash.Timestamp(1700000000, 250000000000000000, 1234))
    h.set_timestamp("header.name", kbhash.Timestamp(1700000000, 0, 1233))
    return h


def test_flatten_hash_keys_and_metadata():
    values, meta = kbstream.flatten_hash(make_source())
    assert list(values) == [
        "data.adc", "data.image.data", "data.image.encoding", "data.image.dimensions",
        "data.image.bitsPerPixel", "data.image.ROIOffsets", "data.image.binning",
        "data.image.rotation", "data.image.flipX", "data.image.flipY",
        "header.pulseCount", "header.name",
    ]
    assert values["data.image.data"].shape == (4, 5)
    assert values["data.image.encoding"] == 0 and values["data.image.dimensions"] == [4, 5]
    assert values["data.image.bitsPerPixel"] == 8
    assert meta == {"timestamp": 1700000000.25, "timestamp.sec": "1700000000",
                    "timestamp.frac": "250000000000000000", "timestamp.tid": 1234}


def test_flatten_hash_refuses_other_types():
    with pytest.raises(TypeError, match=r"^expected a dict or kbhash.Hash source, got list$"):
        kbstream.flatten_hash([1])


@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_hash_source_serializes_like_flat_dict(version):
    h = make_source()
    frames = kbstream.serialize({"DET/JF:daqOutput": h, "plain": {"x": 1}}, protocol_version=version)
    data, meta = kbstream.deserialize(frames)
    d = data["DET/JF:daqOutput"]
    assert d["data.adc"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert d["data.image.data"].dtype == np.uint8 and d["data.image.dimensions"] == [4, 5]
    assert meta["DET/JF:daqOutput"]["timestamp.tid"] == 1234
    assert meta["DET/JF:daqOutput"]["source"] == "DET/JF:daqOutput"
    assert data["plain"]["x"] == 1 and meta["plain"] == {}
    if version == "2.2":
        assert "metadata" not in d, "the Hash's timestamp goes to the header only"
    # karabo_bridge reads the same message
    kb = pytest.importorskip("karabo_bridge")
    kd, km = kb.deserialize(frames)
    assert km == meta


def test_hash_source_with_explicit_metadata():
    frames = kbstream.serialize({"s": make_source()}, {"s": {"timestamp.tid": 9}})
    _, meta = kbstream.deserialize(frames)
    assert meta == {"s": {"timestamp.tid": 9}}
