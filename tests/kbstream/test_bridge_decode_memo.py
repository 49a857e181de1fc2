"""The compiled decoder remembers array headers and each source's payload keys between
messages.  Whatever it remembered, every message must decode exactly as a fresh decoder
(the pure twin, which remembers nothing) decodes it."""

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kbstream import errors
from kbstream.bridge import _codec, _pure


def _frames(header, payload, arrays=()):
    out = [msgpack.packb(header), msgpack.packb(payload)]
    for hdr, raw in arrays:
        out += [msgpack.packb(hdr), raw]
    return out


def _same(a, b):
    """Equal train dicts, arrays compared by dtype, shape and values."""
    assert list(a) == list(b)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _same(x, y)
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
        else:
            assert type(x) is type(y) and x == y, key


def _check(frames):
    """Decode with the compiled codec (twice: cold and warm) and the pure twin."""
    expected = _pure.deserialize(frames)
    for _ in range(2):
        got = _codec.deserialize(frames)
        _same(got[0], expected[0])
        _same(got[1], expected[1])
    return expected


def test_payload_keys_that_differ_from_the_last_train_are_decoded_as_sent():
    src = "memo/keys:output"
    hdr = {"source": src, "content": "msgpack", "metadata": {"source": src, "tid": 1}}
    _check(_frames(hdr, {"a.x": 1, "a.y": 2, "a.z": 3}))
    # same lengths, different bytes; fewer keys; more keys; reordered keys
    cases = [
        {"a.x": 1, "b.y": 2, "a.z": 3},
        {"a.x": 1, "a.y": 2},
        {"a.x": 1, "a.y": 2, "a.z": 3, "a.w": 4},
        {"a.z": 3, "a.x": 1, "a.y": 2},
        {},
        # a non-ASCII key of the same byte length as an ASCII one ("é" is 2 bytes)
        {"a.x": 1, "é.": 2, "a.z": 3},
        {"a.x": 1, "a.y": 2, "a.z": 3},
    ]
    for payload in cases:
        data, meta = _check(_frames(hdr, payload))
        assert data[src] == payload
        assert meta[src] == {"source": src, "tid": 1}


def test_bytes_key_in_place_of_a_remembered_str_key():
    src = "memo/bytes:output"
    hdr = {"source": src, "content": "msgpack", "metadata": {"source": src}}
    _check(_frames(hdr, {"k1": 1, "k2": 2}))
    frames = [msgpack.packb(hdr), msgpack.packb({"k1": 1, b"k2": 2}, use_bin_type=True)]
    data, _ = _check(frames)
    assert data[src] == {"k1": 1, b"k2": 2}


def test_metadata_keys_that_differ_between_sources():
    a = {"source": "A", "content": "msgpack", "metadata": {"source": "A", "timestamp.tid": 5}}
    b = {"source": "B", "content": "msgpack", "metadata": {"origin": "B", "timestamp.sec": "7"}}
    frames = _frames(a, {"v": 1}) + _frames(b, {"v": 2})
    _, meta = _check(frames)
    assert meta == {"A": {"source": "A", "timestamp.tid": 5},
                    "B": {"origin": "B", "timestamp.sec": "7"}}


def test_remembered_array_header_with_a_frame_of_the_wrong_size_still_fails():
    src = "memo/array:output"
    hdr = {"source": src, "content": "msgpack", "metadata": {"source": src}}
    ahdr = {"source": src, "content": "array", "path": "data.adc", "dtype": "uint16",
            "shape": [2, 3]}
    good = _frames(hdr, {"x": 1}, [(ahdr, np.arange(6, dtype=np.uint16).tobytes())])
    data, _ = _check(good)
    assert data[src]["data.adc"].tolist() == [[0, 1, 2], [3, 4, 5]]
    bad = _frames(hdr, {"x": 1}, [(ahdr, bytes(10))])
    with pytest.raises(errors.ShapeMismatchError, match="carries 10 bytes"):
        _codec.deserialize(bad)
    # an array header remembered for one source never serves an array of another source
    # that has not sent its msgpack part
    other = [msgpack.packb(ahdr), np.arange(6, dtype=np.uint16).tobytes()]
    with pytest.raises(errors.ProtocolError, match="comes before its msgpack part"):
        _codec.deserialize(other + good[:2])


def test_array_header_changes_dtype_and_shape_between_trains():
    src = "memo/dtype:output"
    hdr = {"source": src, "content": "msgpack", "metadata": {"source": src}}
    for dtype, shape in [("uint16", [2, 3]), ("float32", [3, 2]), ("uint16", [6]),
                         ("<i8", [1, 6]), ("uint16", [2, 3])]:
        arr = np.arange(6).astype(dtype).reshape(shape)
        ahdr = {"source": src, "content": "array", "path": "d", "dtype": dtype,
                "shape": shape}
        data, _ = _check(_frames(hdr, {}, [(ahdr, arr.tobytes())]))
        got = data[src]["d"]
        assert got.dtype == np.dtype(dtype) and got.shape == tuple(shape)
        assert np.array_equal(got, arr)


@pytest.mark.parametrize("kind", ["zmq", "bytes"])
def test_arrays_on_fixed_frames_are_views_with_the_frame_as_base(kind):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    frames = _codec.serialize({"s": {"a": arr}})
    frames = [zmq.Frame(bytes(f)) if kind == "zmq" else bytes(f) for f in frames]
    data, _ = _codec.deserialize(frames)
    got = data["s"]["a"]
    assert got.base is frames[-1]
    assert got.flags.c_contiguous and got.flags.aligned
    # a zmq.Frame's memory is writable, bytes are not: same as numpy.ndarray(buffer=...)
    assert got.flags.writeable is (kind == "zmq")
    assert np.array_equal(got, arr)
    del frames
    assert np.array_equal(got, arr)   # the array keeps its frame alive


_keys = st.sampled_from(["a", "b", "ab", "é", "header.value", "header.valuf", "x" * 40])
_payloads = st.dictionaries(_keys, st.integers(-5, 5) | st.text(max_size=3), max_size=6)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["S1", "S2"]), _payloads), min_size=1, max_size=8))
def test_any_sequence_of_payloads_decodes_as_a_fresh_decoder_would(seq):
    for src, payload in seq:
        hdr = {"source": src, "content": "msgpack", "metadata": {"source": src}}
        data, _ = _check(_frames(hdr, payload))
        assert data[src] == payload


def test_remembered_non_ascii_key_does_not_accept_invalid_utf8():
    """A remembered "é" (one character, stored as the byte e9) must not match the invalid
    UTF-8 key b"\\xe9": that key is an error, as for a fresh decoder."""
    src = "memo/utf8:output"
    hdr = msgpack.packb({"source": src, "content": "msgpack", "metadata": {"source": src}})
    _check([hdr, msgpack.packb({"é": 1})])
    _check([hdr, msgpack.packb({"é": 1})])
    bad = [hdr, b"\x81\xa1\xe9\x01"]   # {<str of the single byte e9>: 1}
    for decode in (_pure.deserialize, _codec.deserialize):
        with pytest.raises(errors.ProtocolError, match="invalid UTF-8"):
            decode(bad)


@pytest.mark.parametrize("where", ["payload", "metadata"])
def test_remembered_bytes_key_is_never_read_as_a_str(where):
    """A template can hold a bytes key (a msgpack bin key of an earlier train).  It must not
    be looked at as a str: the str check of a bytes object can pass, and its "characters"
    then lie past the bytes' contents.  The next key is made of exactly the bytes such a
    confused compare would read, so a confused decoder returns the old bytes key."""
    import ctypes
    import sys

    src = f"memo/binkey-{where}:output"
    key = b"a" * 16
    header = {"source": src, "content": "msgpack"}

    def frames(mapping_bytes):
        if where == "payload":
            return [msgpack.packb(header), mapping_bytes]
        # the header map with a third key, metadata = the given map
        hdr = b"\x83" + msgpack.packb(header)[1:] + b"\xa8metadata" + mapping_bytes
        return [hdr, msgpack.packb({"v": 1})]

    first = frames(msgpack.packb({key: 1}, use_bin_type=True))
    _check(first)                                   # remembers the bytes key
    d, m = _codec.deserialize(first)
    held = next(iter(d[src] if where == "payload" else m[src]))
    assert held == key
    # the 16 bytes a str view of ``held`` would compare (header size of a compact str)
    shadow = ctypes.string_at(id(held) + sys.getsizeof("") - 1, 16)
    second = frames(b"\x81" + bytes([0xA0 | 16]) + shadow + b"\x02")
    try:
        expected = _pure.deserialize(second)
    except errors.ProtocolError as e:
        with pytest.raises(type(e)):
            _codec.deserialize(second)
        return
    got = _codec.deserialize(second)
    target = got[0][src] if where == "payload" else got[1][src]
    want = expected[0][src] if where == "payload" else expected[1][src]
    assert target == want
    assert all(type(k) is str for k in target)


def test_dict_subclasses_are_encoded_through_their_own_items():
    """An OrderedDict after move_to_end, or a dict subclass with its own items(), is encoded
    as its items() says, as the pure twin does (not in the underlying dict's order)."""
    import collections

    od = collections.OrderedDict([("a", 1), ("x", np.arange(2.0)), ("b", 2),
                                  ("y", np.arange(3, dtype=np.uint8))])
    od.move_to_end("a")
    od.move_to_end("x")

    class Hiding(dict):
        def items(self):
            return [(k, v) for k, v in super().items() if not k.startswith("_")]

    for props in (od, Hiding(a=1, _hidden=2)):
        for version in ("2.2", "1.0"):
            ours = [bytes(f) for f in _codec.serialize({"s": props}, protocol_version=version)]
            ref = [bytes(f) for f in _pure.serialize({"s": props}, protocol_version=version)]
            assert ours == ref, (type(props).__name__, version)


# ---- remembered values: a payload's scalars that repeat from the source's last train ----

def _payload_frames(src, payload):
    hdr = {"source": src, "content": "msgpack", "metadata": {"source": src}}
    return [msgpack.packb(hdr), msgpack.packb(payload, use_bin_type=True)]


_scalars = (st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.booleans()
            | st.none() | st.text(max_size=4) | st.binary(max_size=4)
            | st.sampled_from(["", "x" * 300, b"y" * 300, 1, 1.0, True, 0, 0.0, -0.0]))
_values = _scalars | st.lists(_scalars, max_size=2) | st.dictionaries(
    st.sampled_from(["p", "q"]), _scalars, max_size=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({k: _values for k in ("k0", "k1", "k2", "k3")}),
                min_size=2, max_size=10))
def test_trains_with_the_same_keys_and_changing_values_decode_as_sent(trains):
    """Same keys every train (the template's fast path), values changing in type, length and
    bytes (1 and True and 1.0, 0.0 and -0.0, long strings that are never remembered)."""
    src = "memo/values:output"
    for payload in trains:
        data, _ = _check(_payload_frames(src, payload))
        assert data[src] == payload


def test_changed_values_of_every_kind_between_trains():
    src = "memo/kinds:output"
    base = {"tid": 10_000_000_000, "f": 0.25, "s": "value", "b": b"\x00\x01", "n": None,
            "t": True, "big": 2**64 - 1, "neg": -5, "u": "é"}
    trains = [dict(base) for _ in range(3)]
    trains += [dict(base, tid=10_000_000_001 + k) for k in range(3)]   # one key changes
    trains += [dict(base, s="other value"),       # longer: later keys move in the frame
               dict(base, s="v"),                  # shorter
               dict(base, f=1, t=1, n=0),          # same value, other type
               dict(base, b="\x00\x01"),          # str in place of bytes of the same text
               dict(base, f=float("inf")),
               dict(base, neg=[1, 2]), dict(base), dict(base, neg={"x": 1}), dict(base)]
    for payload in trains:
        frames = _payload_frames(src, payload)
        data, _ = _check(frames)
        got = data[src]
        assert got == payload
        assert [type(v) for v in got.values()] == [type(v) for v in payload.values()]


def test_nan_and_signed_zero_are_kept_bit_for_bit():
    src = "memo/nan:output"
    for v in [float("nan"), float("nan"), -0.0, 0.0, -0.0, float("-nan")]:
        frames = _payload_frames(src, {"x": v, "y": 1})
        got = _codec.deserialize(frames)[0][src]["x"]
        assert np.float64(got).tobytes() == np.float64(v).tobytes()


def test_mutating_what_was_returned_never_changes_a_later_train():
    src = "memo/mutate:output"
    payload = {"a": 1, "lst": [1, 2], "m": {"x": 1}, "s": "text"}
    frames = _payload_frames(src, payload)
    for _ in range(3):
        data, _ = _codec.deserialize(frames)
        got = data[src]
        assert got == payload
        got["lst"].append(3)
        got["m"]["y"] = 2
        got["a"] = "changed"
        del got["s"]
        got["new"] = 0
    first = _codec.deserialize(frames)[0][src]
    second = _codec.deserialize(frames)[0][src]
    assert first == second == payload
    assert first is not second
    assert first["lst"] is not second["lst"] and first["m"] is not second["m"]


def test_many_long_values_beyond_what_a_template_keeps():
    """More remembered bytes than one template keeps (16 KiB): the rest is decoded."""
    src = "memo/long:output"
    payload = {f"key{i:03d}": "v" * 200 + str(i) for i in range(200)}
    for k in range(4):
        changed = dict(payload, key199=f"changed {k}", key000=k)
        for p in (payload, changed, payload):
            data, _ = _check(_payload_frames(src, p))
            assert data[src] == p


def test_sources_with_many_keys_and_a_changing_train_id():
    """More keys than fit the decoder's stack scratch; one value changes every train."""
    src = "memo/many:output"
    for tid in range(5):
        payload = {f"k{i}": i * 1.5 for i in range(300)}
        payload["k150"] = tid
        data, _ = _check(_payload_frames(src, payload))
        assert data[src] == payload


def test_threads_decoding_one_source_with_different_values():
    import threading

    src = "memo/threads:output"
    variants = [{"a": i, "b": f"s{i % 3}", "c": [i], "d": i * 0.5} for i in range(6)]
    messages = [(_payload_frames(src, p), p) for p in variants]
    errors_seen = []

    def work(offset):
        try:
            for j in range(3000):
                frames, want = messages[(j * (offset + 1) + offset) % len(messages)]
                got = _codec.deserialize(frames)[0][src]
                if got != want:
                    errors_seen.append((got, want))
                    return
        except Exception as e:   # a failure in a thread must reach the test
            errors_seen.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors_seen == []


def test_repeated_scalars_are_shared_and_changed_ones_are_not():
    """What the template is for: a scalar whose bytes repeat is the object decoded before
    (no new float or int); a changed one is new; a list never is."""
    src = "memo/shared:output"
    base = {"f": 0.25, "big": 10_000_000_000, "lst": [1.5], "s": "x" * 20}
    decoded = [_codec.deserialize(_payload_frames(src, dict(base, tid=t)))[0][src]
               for t in (1000, 1000, 1000, 1001, 1002)]
    last = decoded[-1]
    assert all(d["f"] is last["f"] and d["big"] is last["big"] for d in decoded[1:])
    assert decoded[3]["tid"] is not decoded[4]["tid"]
    assert len({id(d["lst"]) for d in decoded}) == len(decoded)
    assert all(d == dict(base, tid=t) for d, t in zip(decoded, (1000, 1000, 1000, 1001, 1002)))


def _outcome(decode, frames):
    try:
        return "ok", decode(frames)
    except Exception as e:  # noqa: BLE001 - type and message are what is compared
        return type(e), str(e)


_WARM = {"tid": 10_000_000_000, "f": 0.5, "s": "text", "lst": [1, 2], "n": None, "b": b"ab"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert"]),
                          st.integers(0, 10**6), st.binary(min_size=1, max_size=4)),
                min_size=1, max_size=3))
def test_damaged_payload_after_warm_trains_fails_as_a_fresh_decoder_does(ops):
    """Two good trains make a template that remembers values; then a damaged payload of
    the same source must give the same result, or the same error and message, as the pure
    twin (which remembers nothing)."""
    src = "memo/damaged:output"
    good = _payload_frames(src, _WARM)
    for _ in range(2):
        _codec.deserialize(good)
    payload = bytearray(good[1])
    for op, pos, blob in ops:
        pos %= len(payload) + 1
        if op == "flip" and pos < len(payload):
            payload[pos] = blob[0]
        elif op == "truncate":
            del payload[pos:]
        else:
            payload[pos:pos] = blob
    frames = [good[0], bytes(payload)]
    got, want = _outcome(_codec.deserialize, frames), _outcome(_pure.deserialize, frames)
    if want[0] == "ok":
        assert got[0] == "ok"
        _same(got[1][0], want[1][0])
    else:
        assert got == want
