"""The decode object limit: a bound on the objects one decode creates per input byte.

Objects are Hashes (VECTOR_HASH elements, Schema parameters and the Hash an
NDArray or ImageData is read as included), attribute sets (a node's attributes,
when it has any) and array views (numeric vectors, BYTE_ARRAY).  Both codecs
count them the same way and raise the same LimitError at the same offset; the
hostile archives that made a decode take 50-80 times their size in memory now
fail with bounded memory (measured in a child process).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kbhash
from conftest import load_hash_vectors
from hostile import BOOL, HASH, ONE_BOOL_ATTR, VECTOR_HASH, VECTOR_UINT8, key, node, u32, vector_of_hashes
from kbhash import DecodeError, HashType, LimitError

HERE = Path(__file__).resolve().parent
VECTORS = {v["name"]: bytes.fromhex(v["hex"]) for v in load_hash_vectors()}
STRING = int(HashType.STRING)
BYTE_ARRAY = int(HashType.BYTE_ARRAY)
VECTOR_INT32 = int(HashType.VECTOR_INT32)


def limit_message(limit, nbytes, off):
    return rf"^decode limit: more than {limit} objects \(Hashes, attribute sets, arrays\) in {nbytes} input bytes, at offset {off}$"


@pytest.fixture
def default_rule():
    """Put the default rule back after a test that changes it."""
    old = kbhash.set_object_limit()
    yield
    kbhash.set_object_limit(*old)


def test_limit_error_is_a_decode_error():
    assert issubclass(LimitError, DecodeError) and issubclass(LimitError, ValueError)
    assert "LimitError" in kbhash.__all__ and kbhash.errors.__all__.count("LimitError") == 1
    e = LimitError("x", 7, 9)
    assert (e.offset, e.limit) == (7, 9)
    for name in ("object_limit", "set_object_limit", "DEFAULT_MIN_OBJECTS", "DEFAULT_BYTES_PER_OBJECT"):
        assert name in kbhash.__all__


def test_default_rule():
    assert (kbhash.DEFAULT_MIN_OBJECTS, kbhash.DEFAULT_BYTES_PER_OBJECT) == (4096, 16)
    assert kbhash.object_limit(0) == 4096
    assert kbhash.object_limit(16 * 4096 + 15) == 4096
    assert kbhash.object_limit(16 * 4097) == 4097
    assert kbhash.object_limit(10**9) == 10**9 // 16
    assert kbhash.object_limit(10**9, 5) == 5


# ---- both sides of the limit, per kind of object, on both codecs ---------------------------

def _kinds():
    """(name, archive, objects it creates, offset of the last object)."""
    k = 5
    vec = vector_of_hashes(k)  # top Hash + k elements; the count is at offset 14
    children = u32(k) + b"".join(node(key(i), HASH, u32(0)) for i in range(k))
    attributed = u32(k) + b"".join(node(key(i), BOOL, b"\x01", ONE_BOOL_ATTR) for i in range(k))
    arrays = u32(k) + b"".join(node(key(i), VECTOR_UINT8, u32(0)) for i in range(k))
    blobs = u32(k) + b"".join(node(key(i), BYTE_ARRAY, u32(1) + b"x") for i in range(k))
    vec_attr = u32(1) + b"\x01a" + u32(VECTOR_INT32) + u32(2) + u32(7) + u32(8)
    array_attribute = u32(1) + node(b"\x01n", BOOL, b"\x01", vec_attr)
    return [
        # the elements are counted at once, at the VECTOR_HASH count
        ("vector of empty Hashes", vec, 1 + k, 14),
        ("empty HASH children", children, 1 + k, 4 + 16 * (k - 1) + 12),
        ("attribute sets", attributed, 1 + k, 4 + 20 * (k - 1) + 8),
        ("numeric vectors", arrays, 1 + k, 4 + 16 * (k - 1) + 12),
        ("byte arrays", blobs, 1 + k, 4 + 17 * (k - 1) + 12),
        # Hash, attribute set, then the VECTOR_INT32 attribute value
        ("an array attribute", array_attribute, 3, 4 + 2 + 4 + 4 + 2 + 4),
        # Hash, attribute set (__classId), the Hash of the NDArray, data, shape
        ("NDArray (TV3)", VECTORS["TV3"], 5, None),
        ("ImageData (TV7)", VECTORS["TV7"], 10, None),
        ("Schema (TV6)", VECTORS["TV6"], 4, None),
        ("timestamp attributes (TV8)", VECTORS["TV8"], 2, None),
    ]


@pytest.mark.parametrize("name, data, count, off", _kinds(), ids=[k[0] for k in _kinds()])
def test_exactly_at_the_limit_passes_one_more_raises(codec, name, data, count, off):
    h = codec.decode(data, max_objects=count)
    assert kbhash.encode_bytes(h) == data
    with pytest.raises(LimitError) as info:
        codec.decode(data, max_objects=count - 1)
    assert info.value.limit == count - 1
    if off is not None:
        assert info.value.offset == off
        assert info.match(limit_message(count - 1, len(data), off))
    h2, used = codec.decode_prefix(data + b"tail", max_objects=count)
    assert used == len(data) and h2 == h
    with pytest.raises(LimitError):
        codec.decode_prefix(data + b"tail", max_objects=count - 1)


def test_the_limit_counts_every_buffer(codec):
    """A split archive is judged by all its bytes, and counts the same objects."""
    data = VECTORS["TV3"]
    bufs = kbhash.encode(kbhash.decode(data))
    assert len(bufs) == 3
    assert codec.decode(bufs, max_objects=5) == codec.decode(data)
    with pytest.raises(LimitError, match=limit_message(4, len(data), r"\d+")):
        codec.decode(bufs, max_objects=4)


def test_default_limit_floor_both_sides(codec):
    """Small archives may always create DEFAULT_MIN_OBJECTS objects (the top Hash is one)."""
    floor = kbhash.DEFAULT_MIN_OBJECTS
    ok = vector_of_hashes(floor - 1)
    assert kbhash.object_limit(len(ok)) == floor
    assert len(codec.decode(ok)["v"]) == floor - 1
    bad = vector_of_hashes(floor)
    with pytest.raises(LimitError, match=limit_message(floor, len(bad), 14)):
        codec.decode(bad)


def test_default_limit_per_byte_both_sides(codec):
    """Above the floor: nbytes // 16 objects; a padding string (no object) buys room."""
    n = 2 * kbhash.DEFAULT_MIN_OBJECTS  # empty Hashes in the vector, plus the top Hash

    def archive(elements, pad):
        vec = node(b"\x01v", VECTOR_HASH, u32(elements) + u32(0) * elements)
        return u32(2) + vec + node(b"\x01s", STRING, u32(pad) + b"p" * pad)

    base = len(archive(n, 0))
    ok = archive(n, 16 * (n + 1) - base)  # exactly n + 1 objects allowed, n + 1 made
    assert len(ok) == 16 * (n + 1) and kbhash.object_limit(len(ok)) == n + 1
    assert len(codec.decode(ok)["v"]) == n
    bad = archive(n + 1, 16 * (n + 1) - base - 4)  # same size, one more Hash
    assert len(bad) == len(ok)
    with pytest.raises(LimitError, match=limit_message(n + 1, len(bad), 14)):
        codec.decode(bad)
    assert len(codec.decode(bad, max_objects=n + 2)["v"]) == n + 1


def test_set_object_limit_changes_the_default_of_both_codecs(codec, default_rule):
    data = VECTORS["TV2"]  # 4 objects
    assert kbhash.set_object_limit(3, 1000) == (4096, 16)
    assert kbhash.object_limit(len(data)) == 3
    with pytest.raises(LimitError, match=limit_message(3, 77, r"\d+")):
        codec.decode(data)
    assert codec.decode(data, max_objects=4) == kbhash.decode(data, max_objects=4)
    assert kbhash.set_object_limit(bytes_per_object=1) == (3, 1000)
    assert kbhash.object_limit(77) == 77
    assert codec.decode(data) is not None
    assert kbhash.set_object_limit(kbhash.DEFAULT_MIN_OBJECTS, kbhash.DEFAULT_BYTES_PER_OBJECT) == (3, 1)
    assert kbhash.object_limit(10**6) == 10**6 // 16


@pytest.mark.parametrize(
    "value, error, message",
    [
        (-1, ValueError, "max_objects must be at least 0, not -1"),
        (1.5, TypeError, "max_objects must be an int, not float"),
        (True, TypeError, "max_objects must be an int, not bool"),
        ("9", TypeError, "max_objects must be an int, not str"),
    ],
)
def test_bad_max_objects(codec, value, error, message):
    with pytest.raises(error, match=f"^{message}$"):
        codec.decode(VECTORS["TV1"], max_objects=value)
    with pytest.raises(error, match=f"^{message}$"):
        codec.decode_prefix(VECTORS["TV1"], max_objects=value)


def test_bad_rule(default_rule):
    with pytest.raises(ValueError, match="bytes_per_object"):
        kbhash.set_object_limit(bytes_per_object=0)
    with pytest.raises(ValueError, match="min_objects"):
        kbhash.set_object_limit(min_objects=-1)
    with pytest.raises(TypeError, match="min_objects"):
        kbhash.set_object_limit(min_objects=2.0)
    assert kbhash.set_object_limit() == (4096, 16)
    assert kbhash.decode(VECTORS["TV1"], max_objects=10**30)["a"] == 1  # no limit in practice


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_golden_vectors_take_more_than_16_bytes_per_object(codec, name):
    """Karabo's archives create at least 18 bytes per object (the smallest, TV1, is one Hash)."""
    data = VECTORS[name]
    n = 1
    while True:  # the fewest objects that decode
        try:
            codec.decode(data, max_objects=n)
            break
        except LimitError:
            n += 1
    assert len(data) >= 18 * n
    assert n < kbhash.object_limit(len(data))


# ---- hostile archives: typed error, memory bounded (child process) --------------------------

#: Memory a rejected archive may take while it is decoded, as a multiple of its size
#: (docs/safety-kbhash.md, section 6: at most ~37x traced for these shapes with the limit,
#: 28-82x before it, and no error).
MAX_AMPLIFICATION = 40


def measure(impl, shape, n):
    out = subprocess.run(
        [sys.executable, str(HERE / "hostile.py"), impl, shape, str(n)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "shape, n",
    [
        ("empty_hashes_in_a_vector", 1_000_000),  # the 3.8 MiB archive of the report
        ("empty_hashes_as_children", 100_000),
        ("vectors_of_64_empty_hashes", 100_000),
        ("hashes_holding_an_empty_hash", 100_000),
        ("hashes_holding_an_attributed_bool", 100_000),
        ("hashes_holding_an_attributed_vector", 100_000),
    ],
)
@pytest.mark.parametrize("impl", ["_codec", "_pure"])
def test_hostile_archives_raise_with_bounded_memory(impl, shape, n):
    got = measure(impl, shape, n)
    assert got["raised"] is not None and got["raised"][0] == "LimitError", got
    limit = kbhash.object_limit(got["size"])
    assert got["raised"][1].startswith(f"decode limit: more than {limit} objects")
    assert got["peak"] <= MAX_AMPLIFICATION * got["size"], (got["peak"] / got["size"], got)


def test_report_sizes():
    """The headline archive is what the report measured: 1 M empty Hashes in 3.8 MiB."""
    from hostile import empty_hashes_in_a_vector

    data = empty_hashes_in_a_vector(1_000_000)
    assert 3.8 <= len(data) / 2**20 < 3.9
    with pytest.raises(LimitError) as info:
        kbhash.decode(data)
    assert info.value.offset == 14 and info.value.limit == len(data) // 16
