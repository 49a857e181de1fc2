"""Bad input: every malformed archive gives a typed error naming the offset.

Never a crash, a hang, or an allocation out of proportion to the input.
"""

import struct
import tracemalloc

import numpy as np
import pytest

import kbhash
from conftest import load_hash_vectors
from kbhash import DecodeError, EncodeError, Hash, HashType, TruncatedError, UnknownTypeError

VECTORS = {v["name"]: bytes.fromhex(v["hex"]) for v in load_hash_vectors()}


def u32(n):
    return struct.pack("<I", n)


def node(key, t, value, attrs=b"\0\0\0\0"):
    k = key.encode()
    return bytes([len(k)]) + k + u32(t) + attrs + value


def archive(*nodes):
    return u32(len(nodes)) + b"".join(nodes)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_every_prefix_is_truncated(codec, name):
    data = VECTORS[name]
    for cut in range(len(data)):
        with pytest.raises(TruncatedError) as info:
            codec.decode(data[:cut])
        assert isinstance(info.value, ValueError)
        assert 0 <= info.value.offset <= cut


def test_truncated_message_names_offset(codec):
    with pytest.raises(TruncatedError, match=r"^truncated: INT32 needs 4 bytes at offset 14, 2 left$"):
        codec.decode(VECTORS["TV1"][:16])


def test_trailing_bytes(codec):
    with pytest.raises(DecodeError, match=r"^1 bytes of trailing data at offset 18$"):
        codec.decode(VECTORS["TV1"] + b"\0")


def test_unknown_type_id(codec):
    for t in (33, 34, 38, 41, 44, 58, 1000, 2**32 - 1):
        data = archive(node("a", t, b""))
        with pytest.raises(UnknownTypeError, match=rf"^unknown type id {t} at offset 6$") as info:
            codec.decode(data)
        assert info.value.type_code == t and info.value.offset == 6


def test_unknown_type_id_in_attribute(codec):
    attrs = u32(1) + b"\x01u" + u32(99)
    with pytest.raises(UnknownTypeError, match=r"^unknown type id 99 at offset 16$"):
        codec.decode(archive(node("a", HashType.INT32, u32(1), attrs)))


def test_none_must_be_zero(codec):
    assert codec.decode(archive(node("n", HashType.NONE, u32(0))))["n"] is None
    with pytest.raises(DecodeError, match=r"^NONE value at offset 14 is 7, not 0$"):
        codec.decode(archive(node("n", HashType.NONE, u32(7))))


def test_vector_none_elements_must_be_zero(codec):
    with pytest.raises(DecodeError, match=r"^VECTOR_NONE element at offset 22 is not 0$"):
        codec.decode(archive(node("n", HashType.VECTOR_NONE, u32(2) + u32(0) + u32(1))))


def test_bool_must_be_0_or_1(codec):
    with pytest.raises(DecodeError, match=r"^BOOL value 2 at offset 14 is not 0 or 1$"):
        codec.decode(archive(node("b", HashType.BOOL, b"\x02")))
    with pytest.raises(DecodeError, match=r"^VECTOR_BOOL at offset 14 has an element that is not 0 or 1$"):
        codec.decode(archive(node("b", HashType.VECTOR_BOOL, u32(2) + b"\x01\x05")))


def test_length_prefix_beyond_data(codec):
    with pytest.raises(TruncatedError, match=r"^truncated: STRING declares 100 elements at offset 14, only 3 bytes left$"):
        codec.decode(archive(node("s", HashType.STRING, u32(100) + b"abc")))
    with pytest.raises(TruncatedError, match=r"^truncated: BYTE_ARRAY declares 9 elements at offset 14, only 8 bytes left$"):
        codec.decode(archive(node("s", HashType.BYTE_ARRAY, u32(9) + b"12345678")))


@pytest.mark.parametrize(
    "t, what",
    [
        (HashType.VECTOR_STRING, "VECTOR_STRING"),
        (HashType.VECTOR_HASH, "VECTOR_HASH"),
        (HashType.VECTOR_NONE, "VECTOR_NONE"),
        (HashType.VECTOR_UINT64, "VECTOR_UINT64"),
        (HashType.VECTOR_CHAR, "VECTOR_CHAR"),
    ],
)
def test_absurd_counts_fail_before_allocating(codec, t, what):
    data = archive(node("v", t, u32(0xFFFFFFFF)))
    tracemalloc.start()
    try:
        with pytest.raises(TruncatedError, match=rf"^truncated: {what} declares 4294967295 elements at offset 14"):
            codec.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_absurd_node_count(codec):
    with pytest.raises(TruncatedError, match=r"^truncated: Hash node count declares 4294967295 elements at offset 0"):
        codec.decode(u32(0xFFFFFFFF) + b"\0" * 20)


def test_allocation_stays_proportional_to_input(codec):
    # 10,000 VECTOR_NONE elements are 40 kB of input: the list may take ~2x that, no more.
    data = archive(node("v", HashType.VECTOR_NONE, u32(10_000) + b"\0" * 40_000))
    tracemalloc.start()
    try:
        h = codec.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(h["v"]) == 10_000
    assert peak < 4 * len(data) + 64 * 1024


def test_invalid_utf8(codec):
    with pytest.raises(DecodeError, match=r"^key at offset 4 is not valid UTF-8$"):
        codec.decode(archive(b"\x02\xff\xfe" + u32(HashType.BOOL) + u32(0) + b"\x01"))
    with pytest.raises(DecodeError, match=r"^STRING at offset 14 is not valid UTF-8$"):
        codec.decode(archive(node("s", HashType.STRING, u32(2) + b"\xc3\x28")))
    with pytest.raises(DecodeError, match=r"^VECTOR_STRING element at offset 18 is not valid UTF-8$"):
        codec.decode(archive(node("s", HashType.VECTOR_STRING, u32(1) + u32(1) + b"\x80")))


def test_duplicate_keys_are_rejected_not_dropped(codec):
    one = node("a", HashType.INT32, u32(1))
    with pytest.raises(DecodeError, match=r"^duplicate key 'a' at offset 18$"):
        codec.decode(archive(one, one))


def _nested(levels):
    """An archive of ``levels`` Hashes nested inside the top-level one."""
    return (u32(1) + b"\x01h" + u32(HashType.HASH) + u32(0)) * levels + u32(0)


def test_nesting_limit_both_sides(codec):
    limit = kbhash.MAX_DEPTH
    h = codec.decode(_nested(limit))
    assert "h." * (limit - 1) + "h" in h
    with pytest.raises(DecodeError, match=rf"^Hash nested deeper than {limit} levels at offset \d+$"):
        codec.decode(_nested(limit + 1))


def test_deep_nesting_far_past_the_limit(codec):
    with pytest.raises(DecodeError):
        codec.decode(_nested(100_000))


def test_encoder_nesting_limit(codec):
    h = Hash()
    cur = h
    for _ in range(kbhash.MAX_DEPTH + 1):
        nxt = Hash()
        cur["h"] = nxt
        cur = nxt
    with pytest.raises(EncodeError, match=r"nested deeper"):
        codec.encode(h)
    cyclic = Hash()
    cyclic["self"] = cyclic
    with pytest.raises(EncodeError, match=r"nested deeper"):
        codec.encode(cyclic)


def _ndarray_node(data, et, shape, extra=b"", big=False):
    children = [
        node("data", HashType.BYTE_ARRAY, u32(len(data)) + data),
        node("type", HashType.INT32, struct.pack("<i", et)),
        node("shape", HashType.VECTOR_UINT64, u32(len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)),
        node("isBigEndian", HashType.BOOL, b"\x01" if big else b"\x00"),
    ]
    attrs = u32(1) + b"\x09__classId" + u32(HashType.STRING) + u32(7) + b"NDArray"
    return node("x", HashType.HASH, u32(len(children) + bool(extra)) + b"".join(children) + extra, attrs)


def test_ndarray_length_must_match_shape(codec):
    ok = archive(_ndarray_node(b"\0" * 12, HashType.UINT16, [2, 3]))
    assert codec.decode(ok)["x"].shape == (2, 3)
    bad = archive(_ndarray_node(b"\0" * 10, HashType.UINT16, [2, 3]))
    with pytest.raises(DecodeError, match=r"^NDArray at offset 39: shape \(2, 3\) x 2 bytes != 10 data bytes$"):
        codec.decode(bad)


def test_ndarray_absurd_shape(codec):
    bad = archive(_ndarray_node(b"", HashType.UINT8, [2**63, 2**63, 0]))
    with pytest.raises(DecodeError, match=r"^NDArray at offset 39: shape .* not supported"):
        codec.decode(bad)
    bad = archive(_ndarray_node(b"\0" * 4, HashType.UINT8, [2**40, 2**40]))
    with pytest.raises(DecodeError, match=r"!= 4 data bytes$"):
        codec.decode(bad)


def test_ndarray_unknown_element_type_and_children(codec):
    with pytest.raises(DecodeError, match=r"^NDArray at offset 39 has unsupported element type 28$"):
        codec.decode(archive(_ndarray_node(b"", HashType.STRING, [0])))
    extra = node("zzz", HashType.INT32, u32(0))
    with pytest.raises(DecodeError, match=r"^NDArray at offset 39 has an unexpected child 'zzz'$"):
        codec.decode(archive(_ndarray_node(b"", HashType.UINT8, [0], extra=extra)))


def test_big_endian_ndarray_is_honoured(codec):
    data = np.arange(3, dtype=">u2").tobytes()
    arr = codec.decode(archive(_ndarray_node(data, HashType.UINT16, [3], big=True)))["x"]
    assert arr.dtype == np.dtype(">u2")
    assert arr.tolist() == [0, 1, 2]
    # and it goes out again with the flag set and the bytes untouched
    out = codec.encode_bytes(Hash("x", arr))
    assert out == archive(_ndarray_node(data, HashType.UINT16, [3], big=True))


def test_buffer_split_inside_a_value(codec):
    data = VECTORS["TV1"]
    with pytest.raises(DecodeError, match=r"^INT32 at offset 14 spans a buffer boundary$"):
        codec.decode([data[:15], data[15:]])


def test_decode_rejects_non_buffers_and_strided_memory(codec):
    with pytest.raises(TypeError, match=r"^decode needs bytes-like buffers, not int$"):
        codec.decode(5)
    with pytest.raises(ValueError, match=r"^decode needs C-contiguous buffers$"):
        codec.decode(np.frombuffer(VECTORS["TV1"] * 2, np.uint8)[::2])
    with pytest.raises(DecodeError, match=r"^no buffers to decode$"):
        codec.decode([])


@pytest.mark.parametrize(
    "value, t, message",
    [
        (300, HashType.UINT8, r"^'v': 300 is out of range for UINT8$"),
        (-1, HashType.UINT64, r"^'v': -1 is out of range for UINT64$"),
        (2**64, HashType.UINT64, r"out of range"),
        (1.5, HashType.INT32, r"^'v': cannot write float 1.5 as INT32$"),
        ("x", HashType.DOUBLE, r"^'v': cannot write str as DOUBLE$"),
        (1e39, HashType.FLOAT, r"^'v': 1e\+39 is out of range for FLOAT$"),
        (5, HashType.BOOL, r"^'v': cannot write 5 as BOOL$"),
        ([1, 2**40], HashType.VECTOR_INT32, r"out of range for INT32"),
        ([1, "a"], HashType.VECTOR_STRING, r"cannot write int as STRING"),
        (1, HashType.NONE, r"^'v': NONE needs the value None$"),
        ("\ud800", HashType.STRING, r"^'v': string is not valid UTF-8"),
        (object(), HashType.BYTE_ARRAY, r"cannot write object as BYTE_ARRAY"),
    ],
)
def test_encode_value_errors(codec, value, t, message):
    h = Hash()
    h.set("v", value, type=t)
    with pytest.raises(EncodeError, match=message):
        codec.encode(h)


def test_encode_inference_errors(codec):
    with pytest.raises(EncodeError, match=r"^integer 18446744073709551616 does not fit in 64 bits$"):
        codec.encode(Hash("v", 2**64))
    with pytest.raises(EncodeError, match=r"no Karabo type for a value of type object"):
        codec.encode(Hash("v", object()))
    with pytest.raises(EncodeError, match=r"has no Karabo NDArray type"):
        codec.encode(Hash("v", np.array(["a"])))
    h = Hash("v", 1)
    h.set_attribute("v", "arr", np.zeros(3))
    with pytest.raises(EncodeError, match=r"^attribute 'arr': arrays and images cannot be attributes$"):
        codec.encode(h)


def test_encode_key_errors(codec):
    h = Hash()
    h._v["k" * 256] = 1  # bypass the container's own check
    with pytest.raises(EncodeError, match=r"is longer than 255 bytes$"):
        codec.encode(h)
    h = Hash()
    h._v["\udc80"] = 1
    with pytest.raises(EncodeError, match=r"is not valid UTF-8$"):
        codec.encode(h)
    h = Hash()
    h._v[5] = 1
    with pytest.raises(EncodeError, match=r"^Hash keys must be str, not int$"):
        codec.encode(h)
