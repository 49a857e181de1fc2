"""Type inference: the Karabo type a Python value is written as when none was given.

Depends only on ``_types`` and ``errors``.  kbhash's own value classes
(:class:`~kbhash.Hash`, :class:`~kbhash.ImageData`, :class:`~kbhash.Schema`)
derive from :class:`KaraboValue` and name their kind in ``_karabo_type``, so
the rules recognise them without importing the module that defines them (which
itself uses these rules for ``get_type`` and for comparisons).

The rules follow Karabo's C++ binding (karabind, ``castPyToAny``):
bool -> BOOL; int -> the first of INT32, UINT32, INT64, UINT64 that holds it;
float -> DOUBLE; complex -> COMPLEX_DOUBLE; str -> STRING; bytes and
bytearray -> VECTOR_CHAR; None -> NONE; numpy scalars -> their own type; any
numpy array -> NDArray; list -> by its first element (ints: the widest type any
element needs), empty list -> VECTOR_STRING; Hash or dict -> HASH; Schema ->
SCHEMA; ImageData -> ImageData.  Extensions where karabind refuses: memoryview
-> BYTE_ARRAY (as karabo.native does), np.bool_ -> BOOL, np.complex64 ->
COMPLEX_FLOAT.
"""

from collections.abc import Mapping

import numpy as np

from ._types import NDARRAY, NDARRAY_DTYPE, VECTOR_DTYPE, HashType, dtype_type, int_type
from .errors import EncodeError

__all__ = ["KaraboValue", "infer_type", "NDARRAY_TYPE"]

T = HashType
_HASH = int(T.HASH)

#: Little-endian numpy dtype -> NDArray element type id.  Single-byte dtypes
#: compare equal whatever their byte-order character.
NDARRAY_TYPE = {dt: t for t, dt in NDARRAY_DTYPE.items()}


class KaraboValue:
    """Base of the value classes kbhash writes as one fixed kind of node.

    ``_karabo_type`` is that kind: a wire type id (``HASH``, ``SCHEMA``) or an
    internal kind (``IMAGEDATA``).
    """

    __slots__ = ()
    _karabo_type = None


def infer_type(value):
    """Karabo type id a value is written as when no type was given.

    Parameters
    ----------
    value : object
        Any value a Hash node or attribute may hold.

    Returns
    -------
    int
        A wire type id, or one of the internal kinds ``NDARRAY`` / ``IMAGEDATA``
        (both written as HASH nodes).

    Raises
    ------
    kbhash.EncodeError
        For values Karabo has no type for.
    """
    if value is None:
        return int(T.NONE)
    cls = type(value)
    if cls is bool:
        return int(T.BOOL)
    if cls is int or (isinstance(value, int) and not isinstance(value, bool)):
        t = int_type(value, value)
        if t is None:
            raise EncodeError(f"integer {value} does not fit in 64 bits")
        return t
    if cls is float:
        return int(T.DOUBLE)
    if cls is str:
        return int(T.STRING)
    if isinstance(value, np.ndarray):
        if value.dtype.newbyteorder("<") not in NDARRAY_TYPE:
            raise EncodeError(f"numpy dtype {value.dtype} has no Karabo NDArray type")
        return NDARRAY
    if isinstance(value, KaraboValue):
        return value._karabo_type
    if isinstance(value, Mapping):
        return _HASH
    if isinstance(value, (list, tuple)):
        return _infer_list(value)
    if isinstance(value, np.generic):
        if isinstance(value, np.bool_):
            return int(T.BOOL)
        t = dtype_type(value.dtype)
        if t is None:
            raise EncodeError(f"numpy scalar of dtype {value.dtype} has no Karabo type")
        return t
    if isinstance(value, (bool, np.bool_)):
        return int(T.BOOL)
    if isinstance(value, float):
        return int(T.DOUBLE)
    if isinstance(value, complex):
        return int(T.COMPLEX_DOUBLE)
    if isinstance(value, str):
        return int(T.STRING)
    if isinstance(value, (bytes, bytearray)):
        return int(T.VECTOR_CHAR)
    if isinstance(value, memoryview):
        return int(T.BYTE_ARRAY)
    raise EncodeError(f"no Karabo type for a value of type {type(value).__name__}")


def _infer_list(value):
    if not value:
        return int(T.VECTOR_STRING)
    first = value[0]
    if isinstance(first, (bool, np.bool_)):
        return int(T.VECTOR_BOOL)
    if isinstance(first, int):
        lo = hi = 0
        for v in value:
            if isinstance(v, int) and not isinstance(v, bool):
                lo = min(lo, v)
                hi = max(hi, v)
        t = int_type(lo, hi)
        if t is None:
            raise EncodeError("list of integers that do not fit in 64 bits")
        return t + 1
    if isinstance(first, float):
        return int(T.VECTOR_DOUBLE)
    if isinstance(first, complex):
        return int(T.VECTOR_COMPLEX_DOUBLE)
    if isinstance(first, str):
        return int(T.VECTOR_STRING)
    if (isinstance(first, KaraboValue) and first._karabo_type == _HASH) or isinstance(first, Mapping):
        return int(T.VECTOR_HASH)
    if first is None:
        return int(T.VECTOR_NONE)
    if isinstance(first, np.generic):
        t = infer_type(first)
        if t in VECTOR_DTYPE or t + 1 in VECTOR_DTYPE:
            return t + 1
    raise EncodeError(f"no Karabo vector type for a list of {type(first).__name__}")
