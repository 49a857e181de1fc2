"""Bad input: typed errors with pinned messages, on both implementations, plus fuzzing of the
compiled decoder against the pure twin (same result or same exception type)."""

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_bridge_support import canon, example_train, rich_train

from kbstream import errors
from kbstream.bridge import _codec, _pure


def mp(obj):
    return msgpack.packb(obj, use_bin_type=True)


def hdr(source="s", **kw):
    return mp({"source": source, "content": "msgpack", "metadata": {}, **kw})


def arr_hdr(dtype="uint16", shape=(2,), path="a", source="s", content="array"):
    return mp({"source": source, "content": content, "path": path, "dtype": dtype, "shape": list(shape)})


OK_PAIR = [hdr(), mp({"x": 1})]

CASES = [
    ("empty", [], errors.ProtocolError, r"^empty message: no frames$"),
    ("odd", OK_PAIR + [arr_hdr()], errors.ProtocolError,
     r"^odd number of frames \(3\): a 2\.x message is made of \(header, payload\) pairs$"),
    ("header not msgpack", [b"\xc1", b"\x80"], errors.ProtocolError,
     r"^frame 0: invalid msgpack byte 0xc1 at offset 0$"),
    ("header not a map", [mp([1]), b"\x80"], errors.ProtocolError,
     r"^frame 0: header is not a msgpack map$"),
    ("header truncated", [hdr()[:-3], b"\x80"], errors.TruncatedFrameError,
     r"^frame 0: msgpack data truncated at offset \d+: \d+ bytes needed, \d+ left$"),
    ("no source", [mp({"content": "msgpack"}), b"\x80"], errors.ProtocolError,
     r"^frame 0: header has no 'source'$"),
    ("source not str", [mp({"source": 1, "content": "msgpack"}), b"\x80"], errors.ProtocolError,
     r"^frame 0: header 'source' is int$"),
    ("no content", [mp({"source": "s"}), b"\x80"], errors.ProtocolError,
     r"^frame 0: header has no 'content'$"),
    ("unknown content", [mp({"source": "s", "content": "pickle.DEFAULT_PROTOCOL"}), b"x"],
     errors.UnknownContentError, r"^frame 0: unknown content 'pickle.DEFAULT_PROTOCOL'$"),
    ("payload not a map", [hdr(), mp([1])], errors.ProtocolError,
     r"^frame 1: payload is not a msgpack map$"),
    ("payload extra bytes", [hdr(), b"\x80\x00"], errors.ProtocolError,
     r"^frame 1: 1 bytes of extra data after the msgpack value, at offset 1$"),
    ("metadata not a map", [hdr(metadata=3), b"\x80"], errors.ProtocolError,
     r"^frame 0: header 'metadata' is not a map$"),
    ("array first", [arr_hdr(), b"\x00" * 4], errors.ProtocolError,
     r"^frame 0: array for source 's' comes before its msgpack part$"),
    ("no path", OK_PAIR + [mp({"source": "s", "content": "array", "dtype": "u1", "shape": [1]}), b"x"],
     errors.ProtocolError, r"^frame 2: header has no 'path'$"),
    ("object dtype", OK_PAIR + [arr_hdr("object", (1,)), b"\x00" * 8], errors.UnsupportedDtypeError,
     r"^frame 2: dtype 'object' cannot be built from raw bytes$"),
    ("O dtype", OK_PAIR + [arr_hdr("|O", (1,)), b"\x00" * 8], errors.UnsupportedDtypeError,
     r"^frame 2: dtype '\|O' cannot be built from raw bytes$"),
    ("structured dtype", OK_PAIR + [arr_hdr("u1,u1", (1,)), b"\x00" * 2], errors.UnsupportedDtypeError,
     r"^frame 2: dtype 'u1,u1' cannot be built from raw bytes$"),
    ("empty dtype", OK_PAIR + [arr_hdr("S0", (1,)), b""], errors.UnsupportedDtypeError,
     r"^frame 2: dtype 'S0' cannot be built from raw bytes$"),
    ("unknown dtype", OK_PAIR + [arr_hdr("nonsense", (1,)), b"\x00"], errors.UnsupportedDtypeError,
     r"^frame 2: unknown dtype 'nonsense'$"),
    ("dtype not str", OK_PAIR + [arr_hdr(5, (1,)), b"\x00"], errors.ProtocolError,
     r"^frame 2: header 'dtype' is int$"),
    ("shape too short", OK_PAIR + [arr_hdr("uint16", (2, 2)), b"\x00" * 6], errors.ShapeMismatchError,
     r"^frame 3: array 'a' declares shape \[2, 2\] of <u2 \(8 bytes\) but carries 6 bytes$"),
    ("shape too long", OK_PAIR + [arr_hdr("uint16", (2,)), b"\x00" * 6], errors.ShapeMismatchError,
     r"^frame 3: array 'a' declares shape \[2\] of <u2 \(4 bytes\) but carries 6 bytes$"),
    ("absurd shape", OK_PAIR + [arr_hdr("uint16", (2**62, 2**62)), b"\x00" * 8], errors.ShapeMismatchError,
     r"^frame 3: array 'a' declares shape \[4611686018427387904, 4611686018427387904\] of <u2 "
     r"\(42535295865117307932921825928971026432 bytes\) but carries 8 bytes$"),
    ("uint64 shape", OK_PAIR + [arr_hdr("uint8", (2**64 - 1, 0)), b""], errors.ShapeMismatchError,
     r"^frame 3: array 'a' declares shape \[18446744073709551615, 0\] of \|u1, too large for numpy$"),
    ("huge empty shape", OK_PAIR + [arr_hdr("uint16", (2**62, 0)), b""], errors.ShapeMismatchError,
     r"^frame 3: array 'a' declares shape \[4611686018427387904, 0\] of <u2, too large for numpy$"),
    ("largest empty shape", OK_PAIR + [arr_hdr("uint8", (2**62, 0)), b""], None, None),
    ("negative shape", OK_PAIR + [arr_hdr("uint16", (-1,)), b""], errors.ShapeMismatchError,
     r"^frame 2: shape must be a list of at most 64 ints, got \[-1\]$"),
    ("too many dims", OK_PAIR + [arr_hdr("uint8", (1,) * 65), b"\x00"], errors.ShapeMismatchError,
     r"^frame 2: shape must be a list of at most 64 ints, got \[1(, 1){64}\]$"),
    ("shape not a list", OK_PAIR + [mp({"source": "s", "content": "array", "path": "a", "dtype": "u1", "shape": 3}), b"x"],
     errors.ShapeMismatchError, r"^frame 2: shape must be a list of at most 64 ints, got 3$"),
    ("bool in shape", OK_PAIR + [arr_hdr("uint8", (True,)), b"x"], errors.ShapeMismatchError,
     r"^frame 2: shape must be a list of at most 64 ints, got \[True\]$"),
    ("server error", [b"Error: bad request b'nxt'"], errors.ServerError,
     r"^server replied \"Error: bad request b'nxt'\"$"),
    ("1.0 not a map", [mp([1, 2])], errors.ProtocolError,
     r"^frame 0: a protocol 1\.0 message must be a msgpack map$"),
    ("1.0 source not a map", [mp({"s": 1})], errors.ProtocolError,
     r"^frame 0: protocol 1\.0 source 's' is int, not a map$"),
    ("1.0 pickled array", [mp({"s": {"a": {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [1], b"data": b"x"}}})],
     errors.UnsupportedDtypeError, r"^frame 0: msgpack_numpy kind b'O' \(object or structured dtype\) is not supported$"),
    ("1.0 bad array size", [mp({"s": {"a": {b"nd": True, b"type": "<u2", b"kind": b"", b"shape": [3], b"data": b"xx"}}})],
     errors.ShapeMismatchError, r"^frame 0: numpy array declares shape \[3\] of <u2 \(6 bytes\) but carries 2 bytes$"),
    ("1.0 malformed numpy", [mp({"s": {"a": {b"nd": 1, b"type": "<u2", b"data": b"xx"}}})],
     errors.ProtocolError, r"^frame 0: malformed msgpack_numpy map at offset \d+$"),
]


@pytest.mark.parametrize("name, frames, exc, message", CASES, ids=[c[0] for c in CASES])
def test_bad_messages(impl, name, frames, exc, message):
    if exc is None:
        d, _ = impl.deserialize(frames)
        assert d["s"]["a"].shape == (2**62, 0)
        return
    with pytest.raises(exc, match=message) as info:
        impl.deserialize(frames)
    assert isinstance(info.value, ValueError)


def test_error_attributes(impl):
    with pytest.raises(errors.UnknownContentError) as info:
        impl.deserialize([mp({"source": "s", "content": "ImageData"}), b""])
    assert (info.value.frame_index, info.value.content) == (0, "ImageData")
    with pytest.raises(errors.UnsupportedDtypeError) as info:
        impl.deserialize(OK_PAIR + [arr_hdr("object", (1,)), b"\x00" * 8])
    assert (info.value.frame_index, info.value.dtype) == (2, "object")
    with pytest.raises(errors.TruncatedFrameError) as info:
        impl.deserialize([hdr()[:10], b"\x80"])
    assert info.value.frame_index == 0 and info.value.offset == 10


def test_peer_behaviour_on_bad_input():
    """What karabo_bridge 0.7.0 really does with the same bad input.

    See docs/wire/karabo-bridge-protocol.md, section 13.
    """
    kb = pytest.importorskip("karabo_bridge")
    # odd frame count: the trailing frame is silently dropped
    d, _ = kb.deserialize(OK_PAIR + [arr_hdr()])
    assert d == {"s": {"x": 1}}
    # the peer does no size check of its own (section 13 of that doc): numpy's reshape
    # catches a mismatch, with an untyped ValueError (and an odd byte count fails in
    # frombuffer)
    with pytest.raises(ValueError, match="cannot reshape array of size 3 into shape"):
        kb.deserialize(OK_PAIR + [arr_hdr("uint16", (2,)), b"\x00" * 6])
    with pytest.raises(ValueError, match="buffer size must be a multiple of element size"):
        kb.deserialize(OK_PAIR + [arr_hdr("uint16", (2,)), b"\x00" * 5])
    with pytest.raises(KeyError):
        kb.deserialize([arr_hdr(), b"\x00" * 4])
    with pytest.raises(RuntimeError):
        kb.deserialize([mp({"source": "s", "content": "x"}), b""])


@pytest.mark.parametrize("value, message", [
    (np.array([object()]), r"^cannot serialize array 'a' of source 's': dtype object \(kind 'O'\) has no raw byte representation$"),
    (np.zeros(2, "u1,u1"), r"^cannot serialize array 'a' of source 's': dtype \[\('f0', 'u1'\), \('f1', 'u1'\)\] \(kind 'V'\) has no raw byte representation$"),
])
def test_encode_refuses_object_and_structured_arrays(impl, value, message):
    with pytest.raises(errors.EncodeError, match=message):
        impl.serialize({"s": {"a": value}})
    with pytest.raises(errors.EncodeError, match=r"^cannot serialize array: dtype"):
        impl.serialize({"s": {"a": value}}, protocol_version="1.0")


def test_encode_refuses_non_dict_source(impl):
    with pytest.raises(errors.EncodeError, match=r"^source 's': expected a dict, got list$"):
        impl.serialize({"s": [1]})


# ---- fuzzing: compiled vs pure on mutated valid messages ------------------------------


def _valid_messages():
    msgs = []
    for version in ("2.2", "1.0"):
        for data, meta in (example_train(), rich_train()):
            msgs.append([bytes(f) for f in _pure.serialize(data, meta, version)])
    return msgs


VALID = _valid_messages()


def _outcome(mod, frames):
    try:
        return "ok", canon(mod.deserialize(frames))
    except Exception as e:  # noqa: BLE001 - the type is the result compared
        return "error", type(e)


@st.composite
def mutated(draw):
    frames = list(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "drop", "dup", "swap"]))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if not frames:
            break
        f = bytearray(frames[i])
        if op == "flip" and f:
            pos = draw(st.integers(0, len(f) - 1))
            f[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            f = f[: draw(st.integers(0, len(f)))]
        elif op == "insert":
            pos = draw(st.integers(0, len(f)))
            f[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif op == "drop":
            frames.pop(i)
            continue
        elif op == "dup":
            frames.insert(i, bytes(f))
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
            continue
        frames[i] = bytes(f)
    return frames


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_compiled_matches_pure(frames):
    compiled = _outcome(_codec, frames)
    pure = _outcome(_pure, frames)
    assert compiled == pure
    if compiled[0] == "error":
        assert issubclass(compiled[1], errors.ProtocolError), compiled[1]


def _outcome_limited(mod, frames, limit):
    try:
        return "ok", canon(mod.deserialize(frames, max_containers=limit))
    except errors.ProtocolError as e:  # the whole error is the result compared
        return "error", type(e), str(e), e.frame_index, e.offset


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.integers(0, 48))
def test_fuzz_container_limit_compiled_matches_pure(frames, limit):
    """Mutated messages under a small container budget: the same result, or the same
    error with the same message, frame and offset."""
    _codec.deserialize(VALID[0])      # the compiled decoder remembers a train
    assert _outcome_limited(_codec, frames, limit) == _outcome_limited(_pure, frames, limit)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(blob):
    for frames in ([blob], [blob, blob]):
        compiled = _outcome(_codec, frames)
        assert compiled == _outcome(_pure, frames)
        if compiled[0] == "error":
            assert issubclass(compiled[1], errors.ProtocolError), compiled[1]


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_packb_unpackb_match_msgpack(value):
    ref = msgpack.packb(value, use_bin_type=True)
    for mod in (_codec, _pure):
        assert mod.packb(value) == ref
        assert mod.unpackb(ref) == msgpack.unpackb(ref, raw=False)
