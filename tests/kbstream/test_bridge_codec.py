"""Codec tests: golden bytes, round trips, peer parity, zero-copy, limits.  Every test runs
on the compiled codec and on the pure twin (``impl`` fixture)."""

import json
import sys
import tracemalloc

import msgpack
import numpy as np
import pytest
import zmq

from test_bridge_support import (
    SRC_A,
    SRC_B,
    assert_bytes_equal,
    canon,
    example_train,
    expected_plain,
    rich_train,
)

import kbstream
from kbstream import errors

kb = pytest.importorskip("karabo_bridge")


@pytest.fixture(scope="module")
def vectors(request):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2].parent / "shared" / "vectors" / "bridge_frames.json"
    doc = json.loads(path.read_text())
    return {v["name"]: v for v in doc["vectors"]}


# ---- golden vectors --------------------------------------------------------------------


def test_golden_2_2(impl, vectors):
    data, meta = example_train()
    frames = impl.serialize(data, meta)
    golden = vectors["A_2.2"]["frames"]
    assert len(frames) == len(golden) == 10
    for f, g in zip(frames, golden):
        assert_bytes_equal(bytes.fromhex(g["hex"]), f, f"frame {g['index']} ({g['role']})")


def test_golden_1_0(impl, vectors):
    data, meta = example_train()
    frames = impl.serialize(data, meta, protocol_version="1.0")
    assert len(frames) == 1 and isinstance(frames[0], bytes)
    assert_bytes_equal(bytes.fromhex(vectors["C_1.0"]["frames"][0]["hex"]), frames[0], "1.0")


def test_golden_2_2_extra_data_style(impl, vectors):
    """Vector B: metadata from data[src]['metadata'] plus dummy timestamps."""
    data, _ = example_train()
    src = {SRC_A: dict(data[SRC_A], metadata={"source": SRC_A, "timestamp.tid": 1234567890})}
    frames = impl.serialize(src, dummy_timestamps=True)
    golden = vectors["B_2.2_extra_data_style"]["frames"]
    # the payload keeps the 'metadata' entry, byte for byte
    assert_bytes_equal(bytes.fromhex(golden[1]["hex"]), frames[1], "payload")
    hdr = msgpack.unpackb(bytes(frames[0]))
    assert list(hdr["metadata"]) == list(golden[0]["decoded"]["metadata"])
    assert len(frames[0]) == golden[0]["length"]
    ts = hdr["metadata"]
    assert ts["timestamp.sec"] + "." + ts["timestamp.frac"].rstrip("0") == repr(ts["timestamp"]).rstrip("0")
    assert len(ts["timestamp.frac"]) == 18


def test_golden_decode_2_2_and_1_0(impl, vectors):
    data, meta = example_train()
    for name in ("A_2.2", "C_1.0"):
        frames = [bytes.fromhex(f["hex"]) for f in vectors[name]["frames"]]
        d, m = impl.deserialize(frames)
        assert m == meta
        exp = {s: dict(v, metadata=meta[s]) if name == "C_1.0" else v for s, v in data.items()}
        assert canon(d) == canon(exp)


@pytest.mark.parametrize("name", ["D_2.0", "D_2.1"])
def test_decode_historical_returns_metadata(impl, vectors, name):
    frames = [bytes.fromhex(f["hex"]) for f in vectors[name]["frames"]]
    d, m = impl.deserialize(frames)
    _, meta = example_train()
    assert m == {SRC_A: meta[SRC_A]}
    # data unchanged, as karabo_bridge returns it
    peer_d, peer_m = kb.deserialize(frames)
    assert d == peer_d
    assert peer_m == {SRC_A: {}}, "the peer returns empty metadata for 2.0/2.1"


def test_golden_decode_zmtp_reply_frames(impl, vectors):
    """The REP reply of the ZMTP capture, cut into frames, decodes like vector A."""
    path = None  # noqa: F841 - documentation: zmtp units 3.. are the frames of A_2.2
    doc_units = vectors  # the zmtp section is not a vector; A_2.2 frames are the same bytes
    frames = [bytes.fromhex(f["hex"]) for f in doc_units["A_2.2"]["frames"]]
    d, m = impl.deserialize([zmq.Frame(f) for f in frames])
    assert d[SRC_A]["data.adc"].tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]]


# ---- parity with karabo_bridge ----------------------------------------------------------


@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_bytes_identical_with_peer(impl, version):
    data, meta = rich_train()
    data["DET/A:daqOutput"].pop("header.np_u64") if version == "1.0" else None
    ours = impl.serialize(data, meta, protocol_version=version)
    theirs = kb.serialize(data, meta, protocol_version=version)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_bytes_equal(bytes(b), a, f"frame {i}")


@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_peer_decodes_ours_and_we_decode_peer(impl, version):
    data, meta = rich_train()
    d1, m1 = kb.deserialize(impl.serialize(data, meta, protocol_version=version))
    d2, m2 = impl.deserialize(kb.serialize(data, meta, protocol_version=version))
    assert m1 == m2
    assert canon(d1) == canon(d2)


def test_metadata_from_data_and_default(impl):
    data = {"a": {"x": 1, "metadata": {"source": "a", "timestamp.tid": 5}}, "b": {"y": 2}}
    ours = impl.serialize(data)
    assert [bytes(f) for f in ours] == [bytes(f) for f in kb.serialize(data)]
    d, m = impl.deserialize(ours)
    assert m == {"a": {"source": "a", "timestamp.tid": 5}, "b": {}}
    assert d["a"]["metadata"] == {"source": "a", "timestamp.tid": 5}


def test_missing_source_metadata_falls_back(impl):
    """Divergence: the peer raises KeyError when metadata lacks a source."""
    data = {"a": {"x": 1}, "b": {"y": 2}}
    with pytest.raises(KeyError):
        kb.serialize(data, {"a": {"source": "a"}})
    _, m = impl.deserialize(impl.serialize(data, {"a": {"source": "a"}}))
    assert m == {"a": {"source": "a"}, "b": {}}


def test_np_bool_scalar_encoded_as_bool(impl):
    """Divergence: karabo_bridge 0.7.0 cannot serialize np.bool_ in 2.2 (real behaviour)."""
    data = {"s": {"flag": np.bool_(True), "nested": [np.bool_(False), np.int16(-3)]}}
    with pytest.raises(TypeError):
        kb.serialize(data)
    d, _ = impl.deserialize(impl.serialize(data))
    assert d == {"s": {"flag": True, "nested": [False, -3]}}
    assert type(d["s"]["flag"]) is bool


def test_1_0_numpy_scalars_like_msgpack_numpy(impl):
    data = {"s": {"f32": np.float32(1.5), "b": np.bool_(True), "i": np.int64(-2), "f64": np.float64(2.5)}}
    ours = impl.serialize(data, protocol_version="1.0")
    assert_bytes_equal(kb.serialize(data, protocol_version="1.0")[0], ours[0])
    d, _ = impl.deserialize(ours)
    assert type(d["s"]["f32"]) is np.float32 and d["s"]["f32"] == 1.5
    assert type(d["s"]["b"]) is np.bool_ and d["s"]["b"]
    assert type(d["s"]["f64"]) is float


def test_dummy_timestamps_only_where_missing(impl):
    data = {"a": {"x": 1}, "b": {"y": 2}}
    meta = {"a": {"source": "a", "timestamp.tid": 9}, "b": {"timestamp": 1.0, "timestamp.tid": 3}}
    for version in ("2.2", "1.0"):
        _, m = impl.deserialize(impl.serialize(data, meta, version, dummy_timestamps=True))
        assert list(m["a"]) == ["source", "timestamp.tid", "timestamp", "timestamp.sec", "timestamp.frac"]
        assert m["b"] == {"timestamp": 1.0, "timestamp.tid": 3}
        assert m["a"]["timestamp.sec"].isdigit() and len(m["a"]["timestamp.frac"]) == 18
    assert meta["a"] == {"source": "a", "timestamp.tid": 9}, "input metadata not modified"


def test_unknown_protocol_version(impl):
    with pytest.raises(ValueError, match=r"^Unknown protocol version 2.1$"):
        impl.serialize({}, protocol_version="2.1")


# ---- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_round_trip_rich(impl, version):
    data, meta = rich_train()
    d, m = impl.deserialize(impl.serialize(data, meta, protocol_version=version))
    assert m == meta
    exp = expected_plain(data)
    if version == "1.0":
        # 1.0 keeps numpy scalars (msgpack_numpy) and the metadata inside each source
        for s, props in data.items():
            for k, v in props.items():
                if isinstance(v, np.generic) and not isinstance(v, float):
                    exp[s][k] = v
            exp[s]["metadata"] = meta[s]
    assert canon(d) == canon(exp)


def test_2_2_frame_layout(impl):
    """Sources sorted, arrays in insertion order after their source's msgpack pair."""
    data = {"z": {"b": np.zeros(2), "x": 1, "a": np.ones(1)}, "a": {"y": 2}}
    frames = impl.serialize(data)
    hdrs = [msgpack.unpackb(bytes(frames[i])) for i in range(0, len(frames), 2)]
    assert [(h["source"], h["content"], h.get("path")) for h in hdrs] == [
        ("a", "msgpack", None), ("z", "msgpack", None), ("z", "array", "b"), ("z", "array", "a")]


def test_empty_train_and_source(impl):
    assert impl.serialize({}) == []
    assert impl.serialize({}, protocol_version="1.0") == [b"\x80"]
    d, m = impl.deserialize(impl.serialize({"s": {}}))
    assert d == {"s": {}} and m == {"s": {}}


# ---- zero copy ---------------------------------------------------------------------------


def test_2_2_array_frames_share_memory(impl):
    a = np.arange(1 << 16, dtype=np.uint32).reshape(256, 256)
    frames = impl.serialize({"s": {"a": a}})
    assert np.shares_memory(np.frombuffer(frames[3], np.uint8), a)
    assert bytes(frames[3]) == a.tobytes()


def test_2_2_fortran_array_is_copied_to_c_order(impl):
    a = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    frames = impl.serialize({"s": {"a": a}})
    assert bytes(frames[3]) == np.ascontiguousarray(a).tobytes()


def test_datetime_arrays_travel(impl):
    a = np.arange(3).astype("datetime64[ns]")
    d, _ = impl.deserialize(impl.serialize({"s": {"t": a}}))
    np.testing.assert_array_equal(d["s"]["t"], a)


def test_2_2_decoded_arrays_are_views(impl):
    data, meta = example_train()
    frames = [zmq.Frame(bytes(f)) for f in impl.serialize(data, meta)]
    d, _ = impl.deserialize(frames)
    adc = d[SRC_A]["data.adc"]
    assert adc.flags.writeable, "views on zmq.Frame are writeable, like the peer"
    assert np.shares_memory(adc, np.frombuffer(frames[3].buffer, np.uint8))
    d2, _ = impl.deserialize([bytes(f) for f in impl.serialize(data, meta)])
    assert not d2[SRC_A]["data.adc"].flags.writeable


def test_1_0_decoded_arrays_are_views(impl):
    a = np.arange(1000, dtype=np.float64)
    frame = impl.serialize({"s": {"a": a}}, protocol_version="1.0")[0]
    d, _ = impl.deserialize([frame])
    out = d["s"]["a"]
    np.testing.assert_array_equal(out, a)
    assert np.shares_memory(out, np.frombuffer(frame, np.uint8))


def test_1_0_encode_copies_each_array_once(impl):
    a = np.ones(8 << 20, dtype=np.uint8)
    impl.serialize({"s": {"a": a[:10]}}, protocol_version="1.0")  # warm up
    tracemalloc.start()
    try:
        frame = impl.serialize({"s": {"a": a}}, protocol_version="1.0")[0]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frame) < a.nbytes + 200
    assert peak < a.nbytes * 1.25, f"peak {peak} bytes for an {a.nbytes}-byte array"


def test_decode_accepts_any_buffer(impl):
    data, meta = example_train()
    frames = [bytes(f) for f in impl.serialize(data, meta)]
    for conv in (bytearray, memoryview, zmq.Frame, lambda b: np.frombuffer(b, np.uint8)):
        d, m = impl.deserialize([conv(f) for f in frames])
        assert m == meta and d[SRC_A]["data.adc"].shape == (1, 3, 4)


def test_decode_refuses_non_buffers(impl):
    with pytest.raises(TypeError, match=r"^frame 0: expected a bytes-like object, got int$"):
        impl.deserialize([5, b"\x80"])


# ---- msgpack layer --------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    None, True, False, 0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
    0.0, -1.5, float("inf"), "", "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65536,
    b"", b"x" * 255, b"x" * 256, b"x" * 65536, [], list(range(15)), list(range(16)),
    list(range(65536)), {}, {str(i): i for i in range(15)}, {str(i): i for i in range(16)},
    {str(i): i for i in range(65536)}, (1, 2), bytearray(b"ab"), memoryview(b"cd"),
])
def test_packb_matches_msgpack(impl, value):
    assert_bytes_equal(msgpack.packb(value, use_bin_type=True), impl.packb(value))
    back = impl.unpackb(impl.packb(value))
    assert back == msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


@pytest.mark.parametrize("value, exc, message", [
    (2**64, errors.EncodeOverflowError, r"^integer 18446744073709551616 is out of msgpack's range$"),
    (-(2**63) - 1, errors.EncodeOverflowError, r"^integer -9223372036854775809 is out of msgpack's range$"),
    ("\ud800", errors.EncodeError, r"^cannot encode a str with lone surrogates as UTF-8$"),
    (object(), errors.EncodeError, r"^cannot serialize object of type object$"),
    (np.datetime64(1, "s"), errors.EncodeError, r"^cannot serialize object of type numpy.datetime64$"),
    ([np.zeros(2)], errors.EncodeError, r"^cannot serialize object of type numpy.ndarray$"),
])
def test_packb_errors(impl, value, exc, message):
    with pytest.raises(exc, match=message):
        impl.packb(value)
    assert issubclass(exc, TypeError)


def test_depth_limits_both_sides(impl):
    def nest(n):
        v = 1
        for _ in range(n):
            v = [v]
        return v

    ok = impl.packb(nest(impl.MAX_DEPTH))
    assert impl.unpackb(ok) == nest(impl.MAX_DEPTH)
    with pytest.raises(errors.EncodeError, match=r"^nesting deeper than 256 levels$"):
        impl.packb(nest(impl.MAX_DEPTH + 1))
    deep = b"\x91" * (impl.MAX_DEPTH + 1) + b"\x01"
    with pytest.raises(errors.ProtocolError, match=r"^frame 0: msgpack nesting deeper than 256 at offset 256$"):
        impl.unpackb(deep)


def test_unpackb_truncated_every_prefix(impl):
    data, meta = rich_train()
    for frame in impl.serialize(data, meta)[:2]:
        frame = bytes(frame)
        for n in range(len(frame)):
            with pytest.raises(errors.TruncatedFrameError):
                impl.unpackb(frame[:n])


@pytest.mark.parametrize("blob, exc, message", [
    (b"\xc1", errors.ProtocolError, r"^frame 0: invalid msgpack byte 0xc1 at offset 0$"),
    (b"\xd4\x01\x00", errors.ProtocolError, r"^frame 0: unsupported msgpack ext type \(byte 0xd4\) at offset 0$"),
    (b"\xa1\xff", errors.ProtocolError, r"^frame 0: invalid UTF-8 in msgpack str at offset 0$"),
    (b"\x81\x01\x02", errors.ProtocolError, r"^frame 0: msgpack map key at offset 1 is int, not str or bytes$"),
    (b"\x01\x02", errors.ProtocolError, r"^frame 0: 1 bytes of extra data after the msgpack value, at offset 1$"),
    (b"\xdd\xff\xff\xff\xff", errors.TruncatedFrameError, r"^frame 0: msgpack array at offset 0 declares 4294967295 items, only 0 bytes left$"),
    (b"\xc6\xff\xff\xff\xff", errors.TruncatedFrameError, r"^frame 0: msgpack data truncated at offset 0: 4294967295 bytes needed, 0 left$"),
    (b"", errors.TruncatedFrameError, r"^frame 0: msgpack data truncated at offset 0: 1 bytes needed, 0 left$"),
])
def test_unpackb_errors(impl, blob, exc, message):
    with pytest.raises(exc, match=message):
        impl.unpackb(blob)


# ---- compiled and pure agree -----------------------------------------------------------


def test_compiled_and_pure_identical_bytes():
    from kbstream.bridge import _codec, _pure

    data, meta = rich_train()
    for version in ("2.2", "1.0"):
        if version == "1.0":
            data["DET/A:daqOutput"].pop("header.np_u64", None)
        a = [bytes(f) for f in _codec.serialize(data, meta, version)]
        b = [bytes(f) for f in _pure.serialize(data, meta, version)]
        assert a == b
        assert canon(_codec.deserialize(b)) == canon(_pure.deserialize(a))


def test_backend_and_public_names():
    import os

    expected = "pure" if os.environ.get("KB_IMPL") == "pure" else "cython"
    assert kbstream.backend == expected
    for name in kbstream.__all__:
        assert hasattr(kbstream, name), name
    assert kbstream.serialize.__module__ == "kbstream.bridge.codec"
    d, m = kbstream.deserialize(kbstream.serialize(*example_train()))
    assert m[SRC_A]["timestamp.tid"] == 1234567890


def test_errors_subclass_builtins():
    assert issubclass(errors.ProtocolError, ValueError)
    assert issubclass(errors.EncodeError, TypeError)
    assert issubclass(errors.ChannelTimeout, TimeoutError)
    assert issubclass(errors.EncodeOverflowError, OverflowError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.KbStreamError)


def test_1_0_large_frames_recycle_memory():
    """Compiled codec: 1.0 frames >= 1 MiB are Buffers whose memory is reused once freed,
    and never while a decoded view still needs it."""
    from kbstream.bridge import _codec

    a = np.arange(1 << 19, dtype=np.uint32)  # 2 MiB
    train = {"s": {"a": a}}

    def addr(frame):
        return np.frombuffer(frame, np.uint8).__array_interface__["data"][0]

    _codec.release_pool()
    f1 = _codec.serialize(train, protocol_version="1.0")[0]
    assert isinstance(f1, _codec.Buffer) and len(f1) == len(bytes(f1)) > a.nbytes
    assert memoryview(f1).readonly and repr(f1) == f"<kbstream Buffer of {len(f1)} bytes>"
    assert bytes(f1) == bytes(kb.serialize(train, protocol_version="1.0")[0])
    first = addr(f1)
    del f1
    f2 = _codec.serialize(train, protocol_version="1.0")[0]
    assert addr(f2) == first, "the freed block is reused"
    d, _ = _codec.deserialize([f2])
    del f2
    f3 = _codec.serialize({"s": {"a": a[::-1].copy()}}, protocol_version="1.0")[0]
    assert addr(f3) != first, "a block with live views is not reused"
    np.testing.assert_array_equal(d["s"]["a"], a)
    _codec.release_pool()
    # the pool itself: a freed frame's block is kept (not handed back to the allocator)
    g = _codec.serialize(train, protocol_version="1.0")[0]
    del g
    assert _codec.release_pool() == 1
    assert _codec.release_pool() == 0
