"""Hostile archives for the decode-limit tests: valid or nearly valid archives that
ask the decoder for many objects per input byte.

Each builder takes the number of repeated units and returns the archive bytes.
Keys that must be distinct within one Hash are three ASCII bytes.  Run as a
script (``python hostile.py CODEC SHAPE N``) it decodes one archive with
tracemalloc on and prints a JSON line: what was raised and the peak of traced
memory, so a test can measure a decode in a fresh process.
"""

import json
import struct
import sys

HASH, VECTOR_HASH, BOOL, VECTOR_UINT8 = 30, 31, 0, 7


def u32(n):
    return struct.pack("<I", n)


def key(i):
    """A three-byte ASCII key, distinct for i < 2**21."""
    return bytes([3, i & 127, (i >> 7) & 127, (i >> 14) & 127])


def node(k, t, value, attrs=b"\0\0\0\0"):
    return k + u32(t) + attrs + value


ONE_BOOL_ATTR = u32(1) + b"\x01a" + u32(BOOL) + b"\x01"


def vector_of_hashes(n, element=u32(0)):
    """One VECTOR_HASH node ``v`` with n copies of ``element`` (default: an empty Hash)."""
    return u32(1) + node(b"\x01v", VECTOR_HASH, u32(n) + element * n)


def empty_hashes_in_a_vector(n):
    """n empty Hashes, 4 bytes each: 1 M of them are 3.8 MiB."""
    return vector_of_hashes(n)


def empty_hashes_as_children(n):
    """A Hash of n empty HASH children, 16 bytes each."""
    return u32(n) + b"".join(node(key(i), HASH, u32(0)) for i in range(n))


def vectors_of_64_empty_hashes(n):
    """n // 64 VECTOR_HASH nodes of 64 empty Hashes each: no single count is large."""
    m = n // 64
    return u32(m) + b"".join(node(key(i), VECTOR_HASH, u32(64) + u32(0) * 64) for i in range(m))


def hashes_holding_an_empty_hash(n):
    """n Hashes of one empty HASH child each, 17 bytes per element."""
    return vector_of_hashes(n, u32(1) + node(b"\x00", HASH, u32(0)))


def hashes_holding_an_attributed_bool(n):
    """n Hashes of one BOOL node with one attribute, 21 bytes per element."""
    return vector_of_hashes(n, u32(1) + node(b"\x00", BOOL, b"\x01", ONE_BOOL_ATTR))


def hashes_holding_an_attributed_vector(n):
    """n Hashes of one empty VECTOR_UINT8 node with one attribute, 24 bytes per element."""
    return vector_of_hashes(n, u32(1) + node(b"\x00", VECTOR_UINT8, u32(0), ONE_BOOL_ATTR))


SHAPES = {
    f.__name__: f
    for f in (
        empty_hashes_in_a_vector,
        empty_hashes_as_children,
        vectors_of_64_empty_hashes,
        hashes_holding_an_empty_hash,
        hashes_holding_an_attributed_bool,
        hashes_holding_an_attributed_vector,
    )
}


def measure(codec_name, shape, n):
    import importlib
    import tracemalloc

    codec = importlib.import_module(f"kbhash.{codec_name}")
    data = SHAPES[shape](n)
    tracemalloc.start()
    try:
        codec.decode(data)
        raised = None
    except Exception as e:  # reported to the test, which checks the class
        raised = [type(e).__name__, str(e), getattr(e, "offset", None)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"size": len(data), "peak": peak, "raised": raised}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
