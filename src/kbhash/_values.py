"""Plain value rules shared by both codecs: value checks on encode, NDArray parts,
the decode limits (nesting depth, objects per input byte).

Both the compiled codec and the pure-Python twin call these functions for
everything off their fast paths, so the two cannot disagree on which values a
type accepts.  This module depends only on ``_types``, ``_infer`` and
``errors``: type inference is in ``_infer``, and the rules that build or take
apart Hashes and ImageData (HASH/VECTOR_HASH values, the ImageData node) are
in ``_nodes``.
"""

import math
import operator
import struct
import sys

import numpy as np

from ._infer import NDARRAY_TYPE
from ._types import INT_RANGE, NDARRAY_DTYPE, VECTOR_DTYPE, HashType, type_name
from .errors import DecodeError, EncodeError, LimitError

T = HashType
_FLT_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]

#: Nesting limit of encoder and decoder (a Hash inside a Hash counts one level).
MAX_DEPTH = 100

# ---------------------------------------------------------------- decode limit
#
# A decode may create at most max(min_objects, nbytes // bytes_per_object)
# objects, nbytes being all the input bytes handed to the call.  Objects are
# the things that cost a few hundred bytes of memory each however few bytes
# of input they take: every Hash (the top level, nested ones, VECTOR_HASH
# elements, the parameters of a Schema, the Hash an NDArray or ImageData is
# read as), every node's attribute set when it has attributes, and every array
# view (numeric vectors, BYTE_ARRAY).  Everything else a decode makes costs at
# most ~16 times its input bytes, so this bounds the memory a hostile archive
# can take to a fixed multiple of its size.  docs/safety-kbhash.md has the
# measurements behind the two numbers.

#: Objects every decode may create whatever the input size.
DEFAULT_MIN_OBJECTS = 4096
#: Input bytes per object above that floor (the smallest non-empty Hash is 14 bytes).
DEFAULT_BYTES_PER_OBJECT = 16

# The rule in force, [min_objects, bytes_per_object].  The compiled codec keeps
# a reference to this very list, so it is changed in place, never replaced.
OBJECT_RULE = [DEFAULT_MIN_OBJECTS, DEFAULT_BYTES_PER_OBJECT]


def _count_arg(value, name, minimum):
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {v}")
    return min(v, sys.maxsize)


def object_limit(nbytes, max_objects=None):
    """The number of objects a decode of ``nbytes`` input bytes may create.

    ``max_objects`` (an int >= 0) is returned as is; None applies the rule in
    force, ``max(min_objects, nbytes // bytes_per_object)``.
    """
    if max_objects is None:
        floor, per = OBJECT_RULE
        return max(floor, nbytes // per)
    return _count_arg(max_objects, "max_objects", 0)


def set_object_limit(min_objects=None, bytes_per_object=None):
    """Change the decode limit rule for every later decode that passes no ``max_objects``.

    Arguments left at None keep their value.  Returns the rule that was in
    force before, as ``(min_objects, bytes_per_object)``, so it can be put
    back.  ``set_object_limit(DEFAULT_MIN_OBJECTS, DEFAULT_BYTES_PER_OBJECT)``
    restores the defaults.
    """
    old = tuple(OBJECT_RULE)
    floor = old[0] if min_objects is None else _count_arg(min_objects, "min_objects", 0)
    per = old[1] if bytes_per_object is None else _count_arg(bytes_per_object, "bytes_per_object", 1)
    OBJECT_RULE[0] = floor
    OBJECT_RULE[1] = per
    return old


def limit_error(limit, nbytes, off):
    """The LimitError of a decode of ``nbytes`` bytes that passed ``limit`` objects at ``off``."""
    return LimitError(
        f"decode limit: more than {limit} objects (Hashes, attribute sets, arrays) "
        f"in {nbytes} input bytes, at offset {off}",
        off,
        limit,
    )


def ndarray_parts(arr):
    """(C-contiguous array, element type id, shape, big-endian flag) of an NDArray value.

    The array is returned as is when it is C-contiguous (no copy), otherwise as
    a C-ordered copy.
    """
    dt = arr.dtype
    t = NDARRAY_TYPE.get(dt.newbyteorder("<"))
    if t is None:
        raise EncodeError(f"numpy dtype {dt} has no Karabo NDArray type")
    big = dt.byteorder == ">" or (dt.byteorder == "=" and not _LITTLE)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr, t, [int(n) for n in arr.shape], big


_LITTLE = np.little_endian


def check_int(value, t, key):
    """``value`` as a Python int in the range of integer type ``t``."""
    if isinstance(value, (float, np.floating, complex, str, bytes)):
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} {value!r} as {type_name(t)}")
    try:
        v = operator.index(value)
    except TypeError:
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as {type_name(t)}") from None
    lo, hi = INT_RANGE[t]
    if not lo <= v <= hi:
        raise EncodeError(f"{key!r}: {v} is out of range for {type_name(t)}")
    return v


def check_bool(value, key):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    raise EncodeError(f"{key!r}: cannot write {value!r} as BOOL")


def check_float(value, t, key):
    if isinstance(value, (str, bytes, complex, np.complexfloating)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as {type_name(t)}")
    v = float(value)
    if t == T.FLOAT and math.isfinite(v) and abs(v) > _FLT_MAX:
        # Values that round to the largest float32 are fine, larger ones are not.
        if abs(v) >= 2.0**128 - 2.0**103:
            raise EncodeError(f"{key!r}: {v} is out of range for FLOAT")
    return v


def check_complex(value, t, key):
    if isinstance(value, (str, bytes)) or not isinstance(value, (int, float, complex, np.number)):
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as {type_name(t)}")
    v = complex(value)
    if t == T.COMPLEX_FLOAT:
        check_float(v.real, T.FLOAT, key)
        check_float(v.imag, T.FLOAT, key)
    return v


def check_char(value, key):
    """A CHAR value as an int 0..255: str or bytes of length 1, or an int."""
    if isinstance(value, str) and len(value) == 1 and ord(value) < 256:
        return ord(value)
    if isinstance(value, (bytes, bytearray)) and len(value) == 1:
        return value[0]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < 256:
        return int(value)
    raise EncodeError(f"{key!r}: cannot write {value!r} as CHAR")


def encode_str(value, key):
    if not isinstance(value, str):
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as STRING")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EncodeError(f"{key!r}: string is not valid UTF-8 ({e.reason})") from None


def vector_array(value, t, key):
    """A numeric vector value as a 1-D C-contiguous little-endian array of type ``t``."""
    dt = VECTOR_DTYPE[t]
    if isinstance(value, np.ndarray):
        if value.ndim > 1:
            raise EncodeError(f"{key!r}: {type_name(t)} needs a 1-D array, got shape {value.shape}")
        if value.dtype == dt:
            return np.ascontiguousarray(value)
        src = value
    elif isinstance(value, (list, tuple)):
        src = value
    elif isinstance(value, (bytes, bytearray, memoryview)) and t in (T.VECTOR_INT8, T.VECTOR_UINT8):
        return np.frombuffer(value, dtype=dt)
    else:
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as {type_name(t)}")
    try:
        if dt.kind == "b":
            out = np.array([check_bool(v, key) for v in src], dtype=dt)
        elif dt.kind in "iu":
            out = np.array([check_int(v, t - 1, key) for v in src], dtype=dt)
        elif dt.kind == "f":
            out = np.array([check_float(v, t - 1, key) for v in src], dtype=dt)
        else:
            out = np.array([check_complex(v, t - 1, key) for v in src], dtype=dt)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, EncodeError):
            raise
        raise EncodeError(f"{key!r}: cannot write the values as {type_name(t)}: {e}") from None
    return out.reshape(-1)


def string_list(value, key):
    if not isinstance(value, (list, tuple)):
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as VECTOR_STRING")
    return [encode_str(v, key) for v in value]


def none_count(value, key):
    if not isinstance(value, (list, tuple)) or any(v is not None for v in value):
        raise EncodeError(f"{key!r}: VECTOR_NONE needs a list of None")
    return len(value)


def byte_buffer(value, key, t):
    """A bytes-like value as a flat unsigned-byte memoryview (no copy)."""
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
    try:
        mv = memoryview(value)
    except TypeError:
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as {type_name(t)}") from None
    if not mv.c_contiguous:
        raise EncodeError(f"{key!r}: {type_name(t)} needs a contiguous buffer")
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


_NDARRAY_KEYS = {"data": int(T.BYTE_ARRAY), "type": int(T.INT32), "shape": int(T.VECTOR_UINT64), "isBigEndian": int(T.BOOL)}


def make_ndarray(h, off):
    """The numpy array of a decoded ``__classId="NDArray"`` Hash (a view on its data).

    Raises DecodeError (naming ``off``, the offset of the node's content) when
    the children are not exactly data/type/shape[/isBigEndian] with their
    types, the element type is unknown, or shape x itemsize != data length.
    """
    v = h._v
    for k in v:
        want = _NDARRAY_KEYS.get(k)
        if want is None:
            raise DecodeError(f"NDArray at offset {off} has an unexpected child {k!r}", off)
        if h._t.get(k) != want:
            raise DecodeError(f"NDArray at offset {off}: {k!r} has the wrong type", off)
    if "data" not in v or "type" not in v or "shape" not in v:
        raise DecodeError(f"NDArray at offset {off} lacks data, type or shape", off)
    et = v["type"]
    dt = NDARRAY_DTYPE.get(et)
    if dt is None:
        raise DecodeError(f"NDArray at offset {off} has unsupported element type {et}", off)
    if v.get("isBigEndian", False):
        dt = dt.newbyteorder(">")
    data = v["data"]
    shape = [int(d) for d in v["shape"]]
    n = 1
    for d in shape:
        n *= d
    if n * dt.itemsize != len(data):
        raise DecodeError(
            f"NDArray at offset {off}: shape {tuple(shape)} x {dt.itemsize} bytes != {len(data)} data bytes", off
        )
    try:
        return np.frombuffer(data, dtype=dt).reshape(shape)
    except (ValueError, OverflowError) as e:
        raise DecodeError(f"NDArray at offset {off}: shape {tuple(shape)} not supported ({e})", off) from None
