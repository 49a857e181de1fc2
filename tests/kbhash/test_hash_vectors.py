"""Golden tests: archives made by Karabo's C++ serializer (TV1-TV8)."""

import numpy as np
import pytest

import kbhash
from conftest import load_hash_vectors
from hashcontent import content_to_hash, hash_to_content

VECTORS = load_hash_vectors()
IDS = [v["name"] for v in VECTORS]


def hexdiff(got, want):
    """First differing offset and the bytes around it, for readable failures."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            break
    else:
        i = min(len(got), len(want))
    lo = max(0, i - 8)
    return f"first difference at byte {i} (len {len(got)} vs {len(want)}):\n got  {got[lo:i + 16].hex()}\n want {want[lo:i + 16].hex()}"


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_decode_then_encode_is_identical(codec, vec):
    data = bytes.fromhex(vec["hex"])
    h = codec.decode(data)
    out = codec.encode_bytes(h)
    assert out == data, hexdiff(out, data)


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_decoded_content_matches_karabo(codec, vec):
    h = codec.decode(bytes.fromhex(vec["hex"]))
    assert hash_to_content(h) == vec["content"]


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_built_from_content_encodes_identically(codec, vec):
    data = bytes.fromhex(vec["hex"])
    out = codec.encode_bytes(content_to_hash(vec["content"]))
    assert out == data, hexdiff(out, data)


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_bufferset_layout_matches_karabo(codec, vec):
    data = bytes.fromhex(vec["hex"])
    bufs = codec.encode(codec.decode(data))
    sizes, types = kbhash.bufferset_layout(bufs)
    assert sizes == vec["bufferset_layout"]["sizes"]
    assert types == vec["bufferset_layout"]["types"]
    assert b"".join(bytes(b) for b in bufs) == data


@pytest.mark.parametrize("vec", VECTORS, ids=IDS)
def test_decode_from_bufferset_pieces(codec, vec):
    data = bytes.fromhex(vec["hex"])
    sizes = vec["bufferset_layout"]["sizes"]
    pieces, pos = [], 0
    for s in sizes:
        pieces.append(bytearray(data[pos:pos + s]))
        pos += s
    assert codec.decode(pieces) == codec.decode(data)


def test_tv3_ndarray_is_a_view_on_the_input(codec):
    vec = next(v for v in VECTORS if v["name"] == "TV3")
    buf = bytearray.fromhex(vec["hex"])
    h = codec.decode(buf)
    arr = h["x"]
    assert arr.dtype == np.uint16 and arr.shape == (2, 3)
    np.testing.assert_array_equal(arr, np.arange(6, dtype=np.uint16).reshape(2, 3))
    assert np.shares_memory(arr, np.frombuffer(buf, np.uint8))
    buf[60] = 0x2A  # first payload byte: the view sees the change
    assert arr[0, 0] == 0x2A


def test_tv7_imagedata_fields(codec):
    vec = next(v for v in VECTORS if v["name"] == "TV7")
    img = codec.decode(bytes.fromhex(vec["hex"]))["img"]
    assert isinstance(img, kbhash.ImageData)
    assert img.pixels.dtype == np.uint8 and img.pixels.shape == (2, 3)
    assert img.encoding == kbhash.Encoding.GRAY
    assert img.dims == [2, 3] and img.bitsPerPixel == 8
    assert img.roiOffsets == [0, 0] and img.binning == [1, 1]
    assert img.rotation == 0 and img.flipX is False and img.flipY is False
    # An ImageData built from the same pixels with defaults is the same archive.
    rebuilt = kbhash.Hash("img", kbhash.ImageData(np.arange(6, dtype=np.uint8).reshape(2, 3)))
    assert codec.encode_bytes(rebuilt) == bytes.fromhex(vec["hex"])


def test_tv8_timestamp(codec):
    vec = next(v for v in VECTORS if v["name"] == "TV8")
    h = codec.decode(bytes.fromhex(vec["hex"]))
    ts = h.get_timestamp("timestamp")
    attrs = {a["key"]: a["value"] for a in vec["content"][1]["attrs"]}
    assert (ts.sec, ts.frac, ts.tid) == (attrs["sec"], attrs["frac"], attrs["tid"])
    rebuilt = kbhash.Hash("source", h["source"], "timestamp", True)
    rebuilt.set_timestamp("timestamp", ts)
    assert codec.encode_bytes(rebuilt) == bytes.fromhex(vec["hex"])


def test_tv6_schema(codec):
    vec = next(v for v in VECTORS if v["name"] == "TV6")
    s = codec.decode(bytes.fromhex(vec["hex"]))["s"]
    assert isinstance(s, kbhash.Schema)
    assert s.root_name == "MyRoot"
    assert s.parameters.get_attribute("x", "valueType") == "INT32"
    assert s.parameters.get_attribute_type("x", "accessMode") == kbhash.HashType.INT32


def test_decode_prefix_reads_archives_back_to_back(codec):
    """Broker messages carry a header archive immediately followed by a body archive."""
    a = bytes.fromhex(VECTORS[0]["hex"])
    b = bytes.fromhex(VECTORS[1]["hex"])
    h1, n1 = codec.decode_prefix(a + b)
    assert n1 == len(a) and h1 == codec.decode(a)
    h2, n2 = codec.decode_prefix(memoryview(a + b)[n1:])
    assert n2 == len(b) and h2 == codec.decode(b)
    with pytest.raises(kbhash.TruncatedError):
        codec.decode_prefix(a[:-1])
