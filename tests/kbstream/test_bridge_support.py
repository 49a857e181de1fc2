"""Helpers shared by the bridge tests: example trains and deep comparison."""

import math
import struct

import numpy as np

SRC_A = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
SRC_B = "SPB_IRDA_JF4M/MDL/POWER"


def example_train():
    """The train of tests/data/bridge_frames.json.

    See docs/wire/karabo-bridge-protocol.md, section 14.
    """
    data = {
        SRC_A: {
            "data.adc": np.arange(12, dtype=np.uint16).reshape(1, 3, 4),
            "data.frameNumber": np.array([7], dtype=np.uint64),
            "data.memoryCell": np.array([0], dtype=np.uint8),
        },
        SRC_B: {
            "voltage.value": 12.5,
            "voltage.timestamp": 1700000000123456789,
            "port": 4,
            "name": "PSU",
            "enabled": True,
            "ranges": [1, 2, 3],
        },
    }
    meta = {
        s: {
            "source": s,
            "timestamp": 1700000000.25,
            "timestamp.sec": "1700000000",
            "timestamp.frac": "250000000000000000",
            "timestamp.tid": 1234567890,
        }
        for s in data
    }
    return data, meta


def rich_train(tid=1000):
    """A train with many value kinds, arrays of several dtypes and orders."""
    rng = np.random.default_rng(tid)
    data = {
        "DET/A:daqOutput": {
            "data.adc": rng.integers(0, 60000, (2, 4, 8), dtype=np.uint16),
            "data.gain": np.asfortranarray(rng.integers(0, 3, (3, 5), dtype=np.uint8)),
            "data.mask": np.zeros((4,), dtype=bool),
            "data.f32": rng.random((3,), dtype=np.float32),
            "data.be": np.arange(3, dtype=">u2"),
            "data.scalar0d": np.array(3.5),
            "data.empty": np.zeros((0, 3), dtype=np.int32),
            "header.pulseCount": 64,
            "header.neg": -5,
            "header.big": 2**64 - 1,
            "header.min": -(2**63),
            "header.f": 0.1,
            "header.np_f32": np.float32(1.5),
            "header.np_u64": np.uint64(2**63 + 1),
            "header.s": "é" * 40,
            "header.b": b"\x00\xff" * 200,
            "header.none": None,
            "header.t": True,
            "header.list": [1, "a", [2.5, None], {"k": b"v"}],
            "header.dict": {"x": 1},
        },
        "MOTOR/X": {"actualPosition.value": 1.25, "actualPosition.timestamp": 17 * 10**17},
    }
    meta = {
        s: {"source": s, "timestamp.tid": tid, "timestamp": 1.7e9, "timestamp.sec": "1700000000",
            "timestamp.frac": "0" * 18}
        for s in data
    }
    return data, meta


def canon(v):
    """A comparable form of decoded values (arrays by dtype/shape/bytes, NaN-safe floats)."""
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    if isinstance(v, np.generic):
        return ("np", v.dtype.str, v.tobytes())
    if isinstance(v, float):
        return ("f", struct.pack(">d", v)) if math.isnan(v) else v
    if isinstance(v, dict):
        return {k: canon(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [canon(x) for x in v]
    return v


def expected_plain(v):
    """What a value becomes after a 2.2 round trip (numpy scalars -> Python)."""
    if isinstance(v, np.ndarray):
        return v.copy(order="C")
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return [expected_plain(x) for x in v]
    if isinstance(v, list):
        return [expected_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: expected_plain(x) for k, x in v.items()}
    return v


def hexdiff(expected: bytes, actual: bytes, width=16):
    """A readable hex diff of two byte strings (first differing row and context)."""
    lines = [f"expected {len(expected)} bytes, got {len(actual)} bytes"]
    n = max(len(expected), len(actual))
    for off in range(0, n, width):
        e = expected[off : off + width]
        a = actual[off : off + width]
        mark = "  " if e == a else "!!"
        lines.append(f"{mark} {off:06x}  exp {e.hex(' '):<{3 * width}}  got {a.hex(' ')}")
    return "\n".join(lines)


def assert_bytes_equal(expected, actual, what=""):
    expected = bytes(expected)
    actual = memoryview(actual).tobytes()
    if expected != actual:
        raise AssertionError(f"{what} differs:\n{hexdiff(expected, actual)}")


# ---- self-tests of the helpers (the other bridge tests rely on them) -------------------


def test_hexdiff_marks_the_differing_row():
    out = hexdiff(b"\x00" * 20, b"\x00" * 17 + b"\x01\x00\x00")
    rows = out.splitlines()
    assert rows[0] == "expected 20 bytes, got 20 bytes"
    assert rows[1].startswith("   000000")
    assert rows[2].startswith("!! 000010")


def test_assert_bytes_equal_raises_with_hex():
    import pytest

    with pytest.raises(AssertionError, match="!! 000000"):
        assert_bytes_equal(b"ab", b"ac", "frame")


def test_canon_compares_arrays_by_value_and_type():
    a = np.arange(3, dtype=np.uint16)
    assert canon({"a": a}) == canon({"a": a.copy()})
    assert canon({"a": a}) != canon({"a": a.astype(np.uint32)})
    assert canon(float("nan")) == canon(float("nan"))
