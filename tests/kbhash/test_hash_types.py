"""Type ids: the compiled enum equals the Python one; Python -> Karabo type rules."""

import numpy as np
import pytest

import kbhash
from kbhash import Hash, HashType, infer_type
from kbhash._types import IMAGEDATA, NDARRAY

try:
    from kbhash import _codec
except ImportError:
    _codec = None


def test_compiled_enum_equals_hashtype():
    assert _codec is not None, "kbhash._codec is not built"
    assert _codec.TYPE_IDS == {t.name: int(t) for t in HashType}


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, HashType.BOOL),
        (np.bool_(True), HashType.BOOL),
        (2**31 - 1, HashType.INT32),
        (-(2**31), HashType.INT32),
        (2**32 - 1, HashType.UINT32),
        (-(2**63), HashType.INT64),
        (2**64 - 1, HashType.UINT64),
        (0.5, HashType.DOUBLE),
        (1j, HashType.COMPLEX_DOUBLE),
        (np.complex64(1j), HashType.COMPLEX_FLOAT),
        ("s", HashType.STRING),
        (b"b", HashType.VECTOR_CHAR),
        (bytearray(b"b"), HashType.VECTOR_CHAR),
        (memoryview(b"b"), HashType.BYTE_ARRAY),
        (None, HashType.NONE),
        (np.int8(1), HashType.INT8),
        (np.uint64(1), HashType.UINT64),
        (np.float32(1), HashType.FLOAT),
        ([None], HashType.VECTOR_NONE),
        ([Hash()], HashType.VECTOR_HASH),
        ([{"a": 1}], HashType.VECTOR_HASH),
        ([1j], HashType.VECTOR_COMPLEX_DOUBLE),
        ([np.uint16(1)], HashType.VECTOR_UINT16),
        ({"a": 1}, HashType.HASH),
        (kbhash.Schema("r"), HashType.SCHEMA),
    ],
)
def test_inference(value, expected):
    assert infer_type(value) == expected


def test_inference_of_arrays_and_images():
    assert infer_type(np.zeros(3)) == NDARRAY  # even 1-D, as karabind does
    assert infer_type(kbhash.ImageData(np.zeros((2, 2), np.uint8))) == IMAGEDATA


def test_uninferable_values():
    for v in (object(), 2**64, [object()], [1, 2**64], np.array(["a"]), np.datetime64(1, "s")):
        with pytest.raises(kbhash.EncodeError):
            infer_type(v)


def test_vectors_from_lists_and_arrays(codec):
    h = Hash()
    h.set("a", [1, 2, 3], type=HashType.VECTOR_UINT8)
    h.set("b", np.array([1.5, 2.5]), type=HashType.VECTOR_FLOAT)
    h.set("c", np.array([1, 2], dtype=">i4"), type=HashType.VECTOR_INT32)
    h.set("d", b"\x01\x02", type=HashType.VECTOR_UINT8)
    back = codec.decode(codec.encode_bytes(h))
    assert back["a"].dtype == np.uint8 and back["a"].tolist() == [1, 2, 3]
    assert back["b"].dtype == np.float32 and back["b"].tolist() == [1.5, 2.5]
    assert back["c"].dtype == np.dtype("<i4") and back["c"].tolist() == [1, 2]
    assert back["d"].tolist() == [1, 2]
    with pytest.raises(kbhash.EncodeError, match="needs a 1-D array"):
        h2 = Hash()
        h2.set("m", np.zeros((2, 2)), type=HashType.VECTOR_DOUBLE)
        codec.encode(h2)


def test_non_contiguous_arrays_are_written_in_c_order(codec):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4).T  # Fortran-ordered view
    back = codec.decode(codec.encode_bytes(Hash("a", arr)))["a"]
    np.testing.assert_array_equal(back, arr)
