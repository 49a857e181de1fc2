"""Karabo type ids and the tables that map them to Python and numpy.

The numbers are the wire ids of Karabo's binary Hash format (``Types.hh``).
``_types.pxd`` repeats them as a C enum for the compiled codec; a test checks
that both agree.
"""

from enum import IntEnum

import numpy as np

__all__ = ["HashType", "Encoding"]


class HashType(IntEnum):
    """Type ids of Karabo's binary Hash format."""

    BOOL = 0
    VECTOR_BOOL = 1
    CHAR = 2
    VECTOR_CHAR = 3
    INT8 = 4
    VECTOR_INT8 = 5
    UINT8 = 6
    VECTOR_UINT8 = 7
    INT16 = 8
    VECTOR_INT16 = 9
    UINT16 = 10
    VECTOR_UINT16 = 11
    INT32 = 12
    VECTOR_INT32 = 13
    UINT32 = 14
    VECTOR_UINT32 = 15
    INT64 = 16
    VECTOR_INT64 = 17
    UINT64 = 18
    VECTOR_UINT64 = 19
    FLOAT = 20
    VECTOR_FLOAT = 21
    DOUBLE = 22
    VECTOR_DOUBLE = 23
    COMPLEX_FLOAT = 24
    VECTOR_COMPLEX_FLOAT = 25
    COMPLEX_DOUBLE = 26
    VECTOR_COMPLEX_DOUBLE = 27
    STRING = 28
    VECTOR_STRING = 29
    HASH = 30
    VECTOR_HASH = 31
    SCHEMA = 32
    NONE = 35
    VECTOR_NONE = 36
    BYTE_ARRAY = 37
    HASH_POINTER = 42
    VECTOR_HASH_POINTER = 43


class Encoding(IntEnum):
    """Pixel encodings of Karabo's ImageData (``ImageData.hh``)."""

    UNDEFINED = -1
    GRAY = 0
    RGB = 1
    RGBA = 2
    BGR = 3
    BGRA = 4
    BAYER_RG = 5
    BAYER_BG = 6
    BAYER_GR = 7
    BAYER_GB = 8
    YUV444 = 9
    YUV422_YUYV = 10
    YUV422_UYVY = 11
    JPEG = 12


#: Internal node kinds that are not wire ids: a numpy array written as an
#: NDArray node, an ImageData written as its HASH node.
NDARRAY = 1000
IMAGEDATA = 1001

#: Types that are valid on the wire (ids 33, 34 and 38-41 are not).
WIRE_TYPES = frozenset(int(t) for t in HashType)

#: Little-endian numpy dtypes of the scalar and vector numeric types.
SCALAR_DTYPE = {
    HashType.BOOL: np.dtype("?"),
    HashType.INT8: np.dtype("i1"),
    HashType.UINT8: np.dtype("u1"),
    HashType.INT16: np.dtype("<i2"),
    HashType.UINT16: np.dtype("<u2"),
    HashType.INT32: np.dtype("<i4"),
    HashType.UINT32: np.dtype("<u4"),
    HashType.INT64: np.dtype("<i8"),
    HashType.UINT64: np.dtype("<u8"),
    HashType.FLOAT: np.dtype("<f4"),
    HashType.DOUBLE: np.dtype("<f8"),
    HashType.COMPLEX_FLOAT: np.dtype("<c8"),
    HashType.COMPLEX_DOUBLE: np.dtype("<c16"),
}
SCALAR_DTYPE = {int(k): v for k, v in SCALAR_DTYPE.items()}

#: VECTOR_X -> dtype of its elements (VECTOR_CHAR is bytes, not an array).
VECTOR_DTYPE = {t + 1: dt for t, dt in SCALAR_DTYPE.items()}

#: Integer ranges of the integer types.
INT_RANGE = {
    int(HashType.INT8): (-(2**7), 2**7 - 1),
    int(HashType.UINT8): (0, 2**8 - 1),
    int(HashType.INT16): (-(2**15), 2**15 - 1),
    int(HashType.UINT16): (0, 2**16 - 1),
    int(HashType.INT32): (-(2**31), 2**31 - 1),
    int(HashType.UINT32): (0, 2**32 - 1),
    int(HashType.INT64): (-(2**63), 2**63 - 1),
    int(HashType.UINT64): (0, 2**64 - 1),
}

#: NDArray element type id -> numpy dtype kind+size (byte order added later).
NDARRAY_DTYPE = {
    int(HashType.BOOL): np.dtype("?"),
    int(HashType.INT8): np.dtype("i1"),
    int(HashType.UINT8): np.dtype("u1"),
    int(HashType.INT16): np.dtype("<i2"),
    int(HashType.UINT16): np.dtype("<u2"),
    int(HashType.INT32): np.dtype("<i4"),
    int(HashType.UINT32): np.dtype("<u4"),
    int(HashType.INT64): np.dtype("<i8"),
    int(HashType.UINT64): np.dtype("<u8"),
    int(HashType.FLOAT): np.dtype("<f4"),
    int(HashType.DOUBLE): np.dtype("<f8"),
    int(HashType.COMPLEX_FLOAT): np.dtype("<c8"),
    int(HashType.COMPLEX_DOUBLE): np.dtype("<c16"),
}

#: numpy (kind, itemsize) -> scalar type id.
_KIND_SIZE_TYPE = {(dt.kind, dt.itemsize): t for t, dt in SCALAR_DTYPE.items()}


def dtype_type(dtype):
    """Return the scalar type id for a numpy dtype, or None if Karabo has none."""
    return _KIND_SIZE_TYPE.get((dtype.kind, dtype.itemsize))


def type_name(type_id):
    """Name of a type id for messages (``'UINT16'``, or the bare number)."""
    try:
        return HashType(type_id).name
    except ValueError:
        if type_id == NDARRAY:
            return "NDArray"
        if type_id == IMAGEDATA:
            return "ImageData"
        return str(type_id)


def int_type(lo, hi):
    """The first of INT32, UINT32, INT64, UINT64 that holds ``lo..hi`` (karabind's rule).

    Returns None when no 64-bit type holds the range.
    """
    if lo >= -(2**31) and hi < 2**31:
        return int(HashType.INT32)
    if lo >= 0 and hi < 2**32:
        return int(HashType.UINT32)
    if lo >= -(2**63) and hi < 2**63:
        return int(HashType.INT64)
    if lo >= 0 and hi < 2**64:
        return int(HashType.UINT64)
    return None
