# cython: freethreading_compatible = False
"""Karabo Hash binary format ("Bin" serializer), compiled implementation.

The format is described in ``kbhash._pure``, the pure-Python twin of this
module and the oracle it is tested against: both expose ``encode``,
``encode_bytes`` and ``decode`` with the same results, exceptions and messages.

Ownership and lifetime
----------------------
``encode`` returns ``[bytes, payload, bytes, ..., bytes]``: the payloads are
memoryviews on the arrays (or byte buffers) of the Hash, not copies, so the
arrays must stay unchanged until the buffers are sent.  ``decode`` holds a
buffer view on every input buffer only while decoding; the arrays it returns
are ``numpy.frombuffer`` views that reference the input objects and keep them
alive.  Everything off the fast paths (unusual values, explicit-type checks,
NDArray/ImageData assembly) goes through ``kbhash._values``, ``kbhash._nodes``
and ``kbhash._infer``, shared with the pure codec, so both agree by construction.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_ANY_CONTIGUOUS
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport isfinite, fabs
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memcmp

from kbhash._types cimport *
from kbhash._wire cimport rd_u16, rd_u32, rd_u64, rd_f32, rd_f64, wr_u32, wr_u64, wr_f32, wr_f64

import numpy as np

from kbhash import _nodes as N
from kbhash import _values as V
from kbhash._infer import infer_type
from kbhash._types import HashType, VECTOR_DTYPE, WIRE_TYPES
from kbhash.errors import DecodeError, EncodeError, TruncatedError, UnknownTypeError
from kbhash.hash import Hash
from kbhash.special import ImageData, Schema

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    Py_ssize_t PyDict_GET_SIZE(object d)   # a macro: no call, no checks

__all__ = ["encode", "encode_bytes", "decode", "decode_prefix", "MAX_DEPTH"]

MAX_DEPTH = V.MAX_DEPTH
cdef int _MAX_DEPTH = V.MAX_DEPTH
# The decode limit rule in force, [min_objects, bytes_per_object]: the very list
# kbhash.set_object_limit changes in place, read once per decode.
cdef list _OBJECT_RULE = V.OBJECT_RULE

#: The C enum as a dict, for the consistency test with HashType.
TYPE_IDS = {
    "BOOL": T_BOOL, "VECTOR_BOOL": T_VECTOR_BOOL, "CHAR": T_CHAR, "VECTOR_CHAR": T_VECTOR_CHAR,
    "INT8": T_INT8, "VECTOR_INT8": T_VECTOR_INT8, "UINT8": T_UINT8, "VECTOR_UINT8": T_VECTOR_UINT8,
    "INT16": T_INT16, "VECTOR_INT16": T_VECTOR_INT16, "UINT16": T_UINT16, "VECTOR_UINT16": T_VECTOR_UINT16,
    "INT32": T_INT32, "VECTOR_INT32": T_VECTOR_INT32, "UINT32": T_UINT32, "VECTOR_UINT32": T_VECTOR_UINT32,
    "INT64": T_INT64, "VECTOR_INT64": T_VECTOR_INT64, "UINT64": T_UINT64, "VECTOR_UINT64": T_VECTOR_UINT64,
    "FLOAT": T_FLOAT, "VECTOR_FLOAT": T_VECTOR_FLOAT, "DOUBLE": T_DOUBLE, "VECTOR_DOUBLE": T_VECTOR_DOUBLE,
    "COMPLEX_FLOAT": T_COMPLEX_FLOAT, "VECTOR_COMPLEX_FLOAT": T_VECTOR_COMPLEX_FLOAT,
    "COMPLEX_DOUBLE": T_COMPLEX_DOUBLE, "VECTOR_COMPLEX_DOUBLE": T_VECTOR_COMPLEX_DOUBLE,
    "STRING": T_STRING, "VECTOR_STRING": T_VECTOR_STRING, "HASH": T_HASH, "VECTOR_HASH": T_VECTOR_HASH,
    "SCHEMA": T_SCHEMA, "NONE": T_NONE, "VECTOR_NONE": T_VECTOR_NONE, "BYTE_ARRAY": T_BYTE_ARRAY,
    "HASH_POINTER": T_HASH_POINTER, "VECTOR_HASH_POINTER": T_VECTOR_HASH_POINTER,
}

cdef dict _TYPE_NAME = {int(t): t.name for t in HashType}
cdef frozenset _WIRE_TYPES = frozenset(WIRE_TYPES)
# the same set as a C table (the check runs once per node); every id fits it
DEF _WIRE_TABLE_SIZE = 64
cdef bint _wire_table[_WIRE_TABLE_SIZE]
assert max(_WIRE_TYPES) < _WIRE_TABLE_SIZE and min(_WIRE_TYPES) >= 0
for _wt in range(_WIRE_TABLE_SIZE):
    _wire_table[_wt] = _wt in _WIRE_TYPES
cdef dict _VECTOR_DTYPE = dict(VECTOR_DTYPE)
cdef object _frombuffer = np.frombuffer
cdef object _ndarray = np.ndarray
cdef object _infer_type = infer_type
cdef object _HashNew = Hash.__new__
cdef float _FLT_MAX_F = 3.4028234663852886e38
cdef bytes _NDARRAY_ATTR = b"\x09__classId" + bytes([T_STRING, 0, 0, 0, 7, 0, 0, 0]) + b"NDArray"
cdef bytes _IMAGEDATA_ATTR = b"\x09__classId" + bytes([T_STRING, 0, 0, 0, 9, 0, 0, 0]) + b"ImageData"
cdef bytes _EMPTY = b""

# Valid wire type ids (index < 44), as a C table.
cdef char _VALID[44]
for _i in range(44):
    _VALID[_i] = 1 if _i in WIRE_TYPES else 0

# Decoded keys are mostly the same few names over and over ("unit", "sec",
# "data", ...).  A small direct-mapped cache of str objects, looked up by the
# key's bytes, avoids creating (and hashing) a new str for each of them; a str
# from the cache already carries its hash, which makes the dict inserts cheaper
# too.  Only ASCII keys of up to 64 bytes are cached.  The cache is only
# touched with the GIL held.
cdef enum:
    _KEY_CACHE_SIZE = 1024
cdef object _key_cache = [None] * _KEY_CACHE_SIZE


cdef inline str _cached_key(const unsigned char* q, Py_ssize_t n):
    cdef uint32_t h = 2166136261U
    cdef Py_ssize_t k
    cdef const char* s
    cdef Py_ssize_t sn
    if n > 64:
        return None
    for k in range(n):
        if q[k] >= 0x80:
            return None
        h = (h ^ q[k]) * 16777619U
    cdef Py_ssize_t slot = h & (_KEY_CACHE_SIZE - 1)
    cdef object cand = (<list>_key_cache)[slot]
    if cand is not None:
        s = PyUnicode_AsUTF8AndSize(cand, &sn)
        if sn == n and memcmp(s, q, n) == 0:
            return <str>cand
    key = PyUnicode_DecodeUTF8(<const char*>q, n, NULL)
    hash(key)
    (<list>_key_cache)[slot] = key
    return key


# Size in bytes of the fixed-size scalar types (0 = not a fixed-size scalar).
cdef int _scalar_size(int t) noexcept:
    if t == T_BOOL or t == T_CHAR or t == T_INT8 or t == T_UINT8:
        return 1
    if t == T_INT16 or t == T_UINT16:
        return 2
    if t == T_INT32 or t == T_UINT32 or t == T_FLOAT:
        return 4
    if t == T_INT64 or t == T_UINT64 or t == T_DOUBLE or t == T_COMPLEX_FLOAT:
        return 8
    if t == T_COMPLEX_DOUBLE:
        return 16
    return 0


# ====================================================================== encode

cdef class _Writer:
    """Growable byte buffer plus the list of finished chunks."""
    cdef unsigned char* buf
    cdef Py_ssize_t n
    cdef Py_ssize_t cap
    cdef list chunks

    def __cinit__(self):
        self.cap = 4096
        self.n = 0
        self.buf = <unsigned char*>PyMem_Malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()
        self.chunks = []

    def __dealloc__(self):
        PyMem_Free(self.buf)

    cdef inline unsigned char* reserve(self, Py_ssize_t k) except NULL:
        cdef Py_ssize_t need = self.n + k
        cdef Py_ssize_t cap
        cdef unsigned char* nb
        if need > self.cap:
            cap = self.cap * 2
            while cap < need:
                cap *= 2
            nb = <unsigned char*>PyMem_Realloc(self.buf, cap)
            if nb == NULL:
                raise MemoryError()
            self.buf = nb
            self.cap = cap
        cdef unsigned char* p = self.buf + self.n
        self.n = need
        return p

    cdef inline int put(self, const void* src, Py_ssize_t k) except -1:
        cdef unsigned char* p
        cdef const unsigned char* q
        cdef Py_ssize_t i
        if k > 16:
            memcpy(self.reserve(k), src, k)
        elif k:
            # keys, short strings and scalars: a byte loop beats a call to memcpy
            p = self.reserve(k)
            q = <const unsigned char*>src
            for i in range(k):
                p[i] = q[i]
        return 0

    cdef inline int u32(self, uint32_t v) except -1:
        wr_u32(self.reserve(4), v)
        return 0

    cdef inline int byte(self, unsigned char v) except -1:
        self.reserve(1)[0] = v
        return 0

    cdef int payload(self, object mv) except -1:
        self.chunks.append(PyBytes_FromStringAndSize(<char*>self.buf, self.n))
        self.chunks.append(mv)
        self.n = 0
        return 0

    cdef list finish(self):
        self.chunks.append(PyBytes_FromStringAndSize(<char*>self.buf, self.n))
        return self.chunks


cdef int _key(_Writer w, object key) except -1:
    cdef Py_ssize_t n
    cdef const char* s
    if type(key) is str and PyUnicode_IS_COMPACT_ASCII(key):
        # the common case: an ASCII key is its own UTF-8, no conversion call
        n = PyUnicode_GET_LENGTH(key)
        s = <const char*>PyUnicode_DATA(key)
    elif not isinstance(key, str):
        raise EncodeError(f"Hash keys must be str, not {type(key).__name__}")
    else:
        try:
            s = PyUnicode_AsUTF8AndSize(key, &n)
        except UnicodeEncodeError:
            raise EncodeError(f"key {key!r} is not valid UTF-8") from None
    if n > 255:
        raise EncodeError(f"key {key[:40]!r}... is longer than 255 bytes")
    cdef unsigned char* p = w.reserve(1 + n)
    p[0] = <unsigned char>n
    memcpy(p + 1, s, n)
    return 0


cdef int _count(_Writer w, Py_ssize_t n, object key) except -1:
    if <uint64_t>n > 0xFFFFFFFFU:
        raise EncodeError(f"{key!r}: {n} elements or bytes do not fit the u32 size field")
    w.u32(<uint32_t>n)
    return 0


cdef int _fast_type(object value) except -2:
    """Inferred type for the common exact types; -1 means: ask infer_type."""
    cdef type cls = type(value)
    cdef int overflow = 0
    cdef long long v
    if cls is float:
        return T_DOUBLE
    if cls is int:
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0:
            if -2147483648 <= v <= 2147483647:
                return T_INT32
            if 0 <= v <= 4294967295:
                return T_UINT32
            return T_INT64
        return -1
    if cls is bool:
        return T_BOOL
    if cls is str:
        return T_STRING
    if cls is Hash:
        return T_HASH
    if cls is list:
        return _fast_list_type(<list>value)
    if value is None:
        return T_NONE
    return -1


cdef int _fast_list_type(list value) except -2:
    """karabind's vector type for a list of exact bools/ints/floats/strs; -1: ask infer_type."""
    cdef Py_ssize_t n = len(value), k
    cdef int overflow = 0
    cdef long long v, lo = 0, hi = 0
    if n == 0:
        return T_VECTOR_STRING
    cdef type c = type(value[0])
    if c is bool:
        return T_VECTOR_BOOL
    if c is float:
        return T_VECTOR_DOUBLE
    if c is str:
        return T_VECTOR_STRING
    if c is int:
        for k in range(n):
            x = value[k]
            if type(x) is not int:
                return -1
            v = PyLong_AsLongLongAndOverflow(x, &overflow)
            if overflow:
                return -1
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        if lo >= -2147483648 and hi <= 2147483647:
            return T_VECTOR_INT32
        if lo >= 0 and hi <= 4294967295:
            return T_VECTOR_UINT32
        return T_VECTOR_INT64
    return -1


cdef bint _int_in_range(long long v, int t) noexcept:
    if t == T_INT8:
        return -128 <= v <= 127
    if t == T_UINT8:
        return 0 <= v <= 255
    if t == T_INT16:
        return -32768 <= v <= 32767
    if t == T_UINT16:
        return 0 <= v <= 65535
    if t == T_INT32:
        return -2147483648 <= v <= 2147483647
    if t == T_UINT32:
        return 0 <= v <= 4294967295
    if t == T_INT64:
        return True
    return v >= 0


cdef inline void _wr_sized(unsigned char* p, unsigned long long u, int size) noexcept:
    if size == 1:
        p[0] = <unsigned char>(u & 0xff)
    elif size == 2:
        p[0] = <unsigned char>(u & 0xff)
        p[1] = <unsigned char>((u >> 8) & 0xff)
    elif size == 4:
        wr_u32(p, <uint32_t>(u & 0xffffffffU))
    else:
        wr_u64(p, <uint64_t>u)


cdef int _write_list_fast(_Writer w, list value, int t) except -1:
    """Write a list vector in C when every element is plain; 0 = not done (nothing written)."""
    cdef Py_ssize_t n = len(value), k, sn
    cdef int et = t - 1, size, overflow = 0
    cdef long long v
    cdef double d
    cdef unsigned char* p
    cdef const char* s
    if n > 0xFFFFFFFF:
        return 0
    if T_INT8 <= et <= T_UINT64 and et % 2 == 0:
        for k in range(n):
            x = value[k]
            if type(x) is not int:
                return 0
            v = PyLong_AsLongLongAndOverflow(x, &overflow)
            if overflow or not _int_in_range(v, et):
                return 0
        size = _scalar_size(et)
        w.u32(<uint32_t>n)
        p = w.reserve(size * n)
        for k in range(n):
            v = PyLong_AsLongLongAndOverflow(value[k], &overflow)
            _wr_sized(p + size * k, <unsigned long long>v, size)
        return 1
    if et == T_DOUBLE or et == T_FLOAT:
        for k in range(n):
            x = value[k]
            if type(x) is not float:
                return 0
            if et == T_FLOAT and isfinite(<double>x) and fabs(<double>x) > _FLT_MAX_F:
                return 0
        w.u32(<uint32_t>n)
        if et == T_DOUBLE:
            p = w.reserve(8 * n)
            for k in range(n):
                wr_f64(p + 8 * k, <double>value[k])
        else:
            p = w.reserve(4 * n)
            for k in range(n):
                wr_f32(p + 4 * k, <float><double>value[k])
        return 1
    if et == T_BOOL:
        for k in range(n):
            x = value[k]
            if x is not True and x is not False:
                return 0
        w.u32(<uint32_t>n)
        p = w.reserve(n)
        for k in range(n):
            p[k] = 1 if value[k] is True else 0
        return 1
    if t == T_VECTOR_STRING:
        for k in range(n):
            x = value[k]
            if type(x) is not str:
                return 0
            try:
                PyUnicode_AsUTF8AndSize(x, &sn)
            except UnicodeEncodeError:
                return 0
        w.u32(<uint32_t>n)
        for k in range(n):
            s = PyUnicode_AsUTF8AndSize(value[k], &sn)
            w.u32(<uint32_t>sn)
            w.put(s, sn)
        return 1
    return 0


cdef int _write_hash(_Writer w, object h, int depth) except -1:
    if depth > _MAX_DEPTH:
        raise EncodeError(f"Hash nested deeper than {MAX_DEPTH} levels")
    if not isinstance(h, Hash):
        h = N.as_hash(h, "", T_HASH)
    cdef dict vals = h._v
    cdef dict types = h._t
    cdef dict attrs = h._a
    cdef dict atypes = h._at
    cdef object t, a
    cdef int ti
    w.u32(<uint32_t>PyDict_GET_SIZE(vals))
    cdef bint has_types = types is not None and PyDict_GET_SIZE(types) != 0
    cdef bint has_attrs = attrs is not None and PyDict_GET_SIZE(attrs) != 0
    for key, value in vals.items():
        t = types.get(key) if has_types else None
        if t is None:
            ti = _fast_type(value)
            if ti == -1:
                ti = _infer_type(value)
        else:
            ti = t
        a = attrs.get(key) if has_attrs else None
        _write_node(w, key, value, ti, a,
                    atypes.get(key) if a is not None and PyDict_GET_SIZE(a) != 0 else None,
                    depth)
    return 0


cdef int _write_node(_Writer w, object key, object value, int t, dict avals, dict atypes,
                     int depth) except -1:
    _key(w, key)
    if t == T_NDARRAY:
        if not isinstance(value, _ndarray):
            raise EncodeError(f"{key!r}: NDArray needs a numpy array")
        w.u32(T_HASH)
        _write_attrs(w, avals, atypes, _NDARRAY_ATTR, depth)
        _write_ndarray(w, value)
    elif t == T_IMAGEDATA:
        if not isinstance(value, ImageData):
            raise EncodeError(f"{key!r}: not an ImageData")
        w.u32(T_HASH)
        _write_attrs(w, avals, atypes, _IMAGEDATA_ATTR, depth)
        children = N.imagedata_children(value)
        w.u32(<uint32_t>len(children))
        for k, v, ct in children:
            _write_node(w, k, v, T_NDARRAY if ct is None else ct, None, None, depth + 1)
    else:
        if not (0 <= t < _WIRE_TABLE_SIZE and _wire_table[t]):
            raise EncodeError(f"{key!r}: {t} is not a Karabo type id")
        w.u32(<uint32_t>t)
        _write_attrs(w, avals, atypes, _EMPTY, depth)
        _write_value(w, key, value, t, depth)
    return 0


cdef int _write_attrs(_Writer w, dict avals, dict atypes, bytes prefix, int depth) except -1:
    cdef bint has_prefix = len(prefix) != 0
    cdef Py_ssize_t n = 1 if has_prefix else 0
    cdef int ti
    cdef Py_ssize_t na = PyDict_GET_SIZE(avals) if avals is not None else 0
    cdef bint has_types = atypes is not None and PyDict_GET_SIZE(atypes) != 0
    if na:
        n += na
        if has_prefix and "__classId" in avals:
            n -= 1
    w.u32(<uint32_t>n)
    w.put(<const char*>prefix, len(prefix))
    if not na:
        return 0
    for name, value in avals.items():
        if has_prefix and name == "__classId":
            continue
        t = atypes.get(name) if has_types else None
        if t is None:
            ti = _fast_type(value)
            if ti == -1:
                ti = _infer_type(value)
        else:
            ti = t
        if ti == T_NDARRAY or ti == T_IMAGEDATA:
            raise EncodeError(f"attribute {name!r}: arrays and images cannot be attributes")
        _key(w, name)
        w.u32(<uint32_t>ti)
        _write_value(w, name, value, ti, depth)
    return 0


cdef int _write_ndarray(_Writer w, object value) except -1:
    arr, et, shape, big = V.ndarray_parts(value)
    cdef object mv
    cdef Py_ssize_t i, nd = len(shape)
    cdef unsigned char* p
    w.u32(4)
    _key(w, "data")
    w.u32(T_BYTE_ARRAY)
    w.u32(0)
    if arr.size:
        mv = memoryview(arr).cast("B")
    else:
        mv = memoryview(_EMPTY)
    if len(mv) > 0xFFFFFFFF:
        raise EncodeError("NDArray data is larger than 4 GiB")
    w.u32(<uint32_t>len(mv))
    w.payload(mv)
    _key(w, "type")
    w.u32(T_INT32)
    w.u32(0)
    w.u32(<uint32_t><int32_t>et)
    _key(w, "shape")
    w.u32(T_VECTOR_UINT64)
    w.u32(0)
    w.u32(<uint32_t>nd)
    p = w.reserve(8 * nd)
    for i in range(nd):
        wr_u64(p + 8 * i, <uint64_t>shape[i])
    _key(w, "isBigEndian")
    w.u32(T_BOOL)
    w.u32(0)
    w.byte(1 if big else 0)
    return 0


cdef int _write_int(_Writer w, object key, object value, int t) except -1:
    cdef int overflow = 0
    cdef long long v = 0
    cdef unsigned long long u
    cdef bint fast = False
    if type(value) is int:
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        fast = overflow == 0 and _int_in_range(v, t)
    if not fast:
        pv = V.check_int(value, t, key)
        if pv < 0:
            v = pv
        else:
            u = pv
            v = <long long>u
    cdef int size = _scalar_size(t)
    _wr_sized(w.reserve(size), <unsigned long long>v, size)
    return 0


cdef int _write_value(_Writer w, object key, object value, int t, int depth) except -1:
    cdef Py_ssize_t n
    cdef const char* s
    cdef double d
    cdef unsigned char* p
    if T_INT8 <= t <= T_UINT64 and (t % 2) == 0:
        return _write_int(w, key, value, t)
    if t == T_DOUBLE:
        d = value if type(value) is float else V.check_float(value, t, key)
        wr_f64(w.reserve(8), d)
    elif t == T_FLOAT:
        if type(value) is float and (not isfinite(value) or fabs(value) <= _FLT_MAX_F):
            d = value
        else:
            d = V.check_float(value, t, key)
        wr_f32(w.reserve(4), <float>d)
    elif t == T_BOOL:
        if value is True:
            w.byte(1)
        elif value is False:
            w.byte(0)
        else:
            w.byte(1 if V.check_bool(value, key) else 0)
    elif t == T_STRING:
        if type(value) is str:
            try:
                s = PyUnicode_AsUTF8AndSize(value, &n)
            except UnicodeEncodeError:
                V.encode_str(value, key)  # raises the EncodeError
                raise
            _count(w, n, key)
            w.put(s, n)
        else:
            b = V.encode_str(value, key)
            _count(w, len(b), key)
            w.put(<const char*>b, len(b))
    elif type(value) is list and (t == T_VECTOR_STRING or t in _VECTOR_DTYPE) and _write_list_fast(w, <list>value, t):
        pass
    elif t in _VECTOR_DTYPE:
        dt = _VECTOR_DTYPE[t]
        if type(value) is _ndarray and value.ndim == 1 and value.dtype == dt and value.flags.c_contiguous:
            arr = value  # a decoded vector going out again: no conversion
        else:
            arr = V.vector_array(value, t, key)
        _count(w, arr.size, key)
        if arr.size:
            _put_buffer(w, arr)
    elif t == T_HASH or t == T_HASH_POINTER:
        _write_hash(w, value if type(value) is Hash else N.as_hash(value, key, t), depth + 1)
    elif t == T_VECTOR_HASH or t == T_VECTOR_HASH_POINTER:
        hashes = N.hash_list(value, key, t)
        _count(w, len(hashes), key)
        for h in hashes:
            _write_hash(w, h, depth + 1)
    elif t == T_VECTOR_STRING:
        items = V.string_list(value, key)
        _count(w, len(items), key)
        for b in items:
            _count(w, len(b), key)
            w.put(<const char*>b, len(b))
    elif t == T_CHAR:
        w.byte(<unsigned char>V.check_char(value, key))
    elif t == T_VECTOR_CHAR:
        mv = V.byte_buffer(value, key, t)
        _count(w, len(mv), key)
        _put_buffer(w, mv)
    elif t == T_BYTE_ARRAY:
        mv = V.byte_buffer(value, key, t)
        _count(w, len(mv), key)
        w.payload(mv)
    elif t == T_COMPLEX_FLOAT or t == T_COMPLEX_DOUBLE:
        c = V.check_complex(value, t, key)
        if t == T_COMPLEX_FLOAT:
            p = w.reserve(8)
            wr_f32(p, <float>c.real)
            wr_f32(p + 4, <float>c.imag)
        else:
            p = w.reserve(16)
            wr_f64(p, c.real)
            wr_f64(p + 8, c.imag)
    elif t == T_NONE:
        if value is not None:
            raise EncodeError(f"{key!r}: NONE needs the value None")
        w.u32(0)
    elif t == T_VECTOR_NONE:
        n = V.none_count(value, key)
        _count(w, n, key)
        p = w.reserve(4 * n)
        for i in range(4 * n):
            p[i] = 0
    elif t == T_SCHEMA:
        if not isinstance(value, Schema):
            raise EncodeError(f"{key!r}: SCHEMA needs a Schema")
        sub = _Writer()
        _key(sub, value.root_name)
        _write_hash(sub, N.as_hash(value.parameters, key, t), depth + 1)
        body = _join(sub.finish())
        _count(w, len(body), key)
        w.put(<const char*>body, len(body))
    else:  # pragma: no cover - every wire type is handled above
        raise EncodeError(f"{key!r}: cannot write type {t}")
    return 0


cdef int _put_buffer(_Writer w, object obj) except -1:
    cdef Py_buffer view
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    try:
        w.put(view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef bytes _join(list chunks):
    """One bytes object from chunks: exact size first, then one copy of each."""
    cdef Py_ssize_t total = 0, pos = 0
    cdef Py_buffer view
    cdef list views = []
    for c in chunks:
        total += len(memoryview(c).cast("B")) if not isinstance(c, bytes) else len(<bytes>c)
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* dst = PyBytes_AS_STRING(out)
    for c in chunks:
        PyObject_GetBuffer(c, &view, PyBUF_SIMPLE)
        try:
            if view.len:
                with nogil:
                    memcpy(dst + pos, view.buf, view.len)
            pos += view.len
        finally:
            PyBuffer_Release(&view)
    return out


def encode(h):
    """Encode a Hash as a list of buffers, split as Karabo's BufferSet splits it.

    Returns ``[bytes, payload, bytes, payload, ..., bytes]``: odd positions are
    the BYTE_ARRAY payloads (NDArray data) as memoryviews on the arrays' own
    memory (no copy); even positions the bytes around them.  Their
    concatenation is the archive.  Keep the arrays unchanged until sent.
    """
    cdef _Writer w = _Writer()
    _write_hash(w, h, 0)
    return w.finish()


def encode_bytes(h):
    """Encode a Hash into one ``bytes`` object (payloads copied once)."""
    return _join(encode(h))


# ====================================================================== decode

cdef class _Reader:
    """Reads across a list of buffers; a value never spans two of them."""
    cdef Py_buffer* views
    cdef list mvs
    cdef Py_ssize_t nseg
    cdef Py_ssize_t nheld
    cdef Py_ssize_t i
    cdef Py_ssize_t pos
    cdef Py_ssize_t base
    cdef Py_ssize_t left
    cdef const unsigned char* p
    cdef Py_ssize_t seglen
    cdef dict attr_types
    cdef Py_ssize_t total
    cdef Py_ssize_t limit
    cdef Py_ssize_t budget

    def __cinit__(self):
        self.views = NULL
        self.nheld = 0

    def __dealloc__(self):
        cdef Py_ssize_t k
        if self.views != NULL:
            for k in range(self.nheld):
                PyBuffer_Release(&self.views[k])
            PyMem_Free(self.views)

    cdef int open(self, list mvs, object max_objects) except -1:
        cdef Py_ssize_t k, total = 0, floor, per
        self.mvs = mvs
        self.nseg = len(mvs)
        self.views = <Py_buffer*>PyMem_Malloc(sizeof(Py_buffer) * self.nseg)
        if self.views == NULL:
            raise MemoryError()
        for k in range(self.nseg):
            PyObject_GetBuffer(mvs[k], &self.views[k], PyBUF_SIMPLE)
            self.nheld += 1
            total += self.views[k].len
        self.i = 0
        self.pos = 0
        self.base = 0
        self.left = total
        self.total = total
        self.p = <const unsigned char*>self.views[0].buf
        self.seglen = self.views[0].len
        if max_objects is None:  # V.object_limit's rule, without the call
            floor = _OBJECT_RULE[0]
            per = _OBJECT_RULE[1]
            self.limit = total // per
            if self.limit < floor:
                self.limit = floor
        else:
            self.limit = V.object_limit(total, max_objects)
        self.budget = self.limit
        return 0

    cdef inline int charge(self, Py_ssize_t off) except -1:
        """Count one more object (Hash, attribute set, array) starting at ``off``."""
        self.budget -= 1
        if self.budget < 0:
            raise V.limit_error(self.limit, self.total, off)
        return 0

    cdef inline Py_ssize_t offset(self) noexcept:
        return self.base + self.pos

    cdef inline void advance(self) noexcept:
        while self.pos == self.seglen and self.i + 1 < self.nseg:
            self.base += self.seglen
            self.i += 1
            self.pos = 0
            self.p = <const unsigned char*>self.views[self.i].buf
            self.seglen = self.views[self.i].len

    cdef const unsigned char* take(self, Py_ssize_t n, what) except NULL:
        """Pointer to the next n bytes (inside the current buffer)."""
        if self.pos == self.seglen:
            self.advance()
        if n > self.left:
            raise TruncatedError(
                f"truncated: {what} needs {n} bytes at offset {self.offset()}, {self.left} left",
                self.offset())
        if self.pos + n > self.seglen:
            raise DecodeError(f"{what} at offset {self.offset()} spans a buffer boundary", self.offset())
        cdef const unsigned char* q = self.p + self.pos
        self.pos += n
        self.left -= n
        return q

    cdef inline uint32_t u32(self, what) except? 0xFFFFFFFF:
        # fast path: 4 bytes available in the current buffer
        cdef const unsigned char* q
        if self.pos + 4 <= self.seglen:
            q = self.p + self.pos
            self.pos += 4
            self.left -= 4
            return rd_u32(q)
        return rd_u32(self.take(4, what))

    cdef Py_ssize_t count(self, what, Py_ssize_t min_size) except -1:
        cdef Py_ssize_t off = self.offset()
        cdef Py_ssize_t n = self.u32(what)
        if n * min_size > self.left:
            raise TruncatedError(
                f"truncated: {what} declares {n} elements at offset {off}, only {self.left} bytes left", off)
        return n

    cdef str key(self):
        cdef Py_ssize_t off = self.offset()
        cdef Py_ssize_t n = self.take(1, "key length")[0]
        cdef const unsigned char* q = self.take(n, "key")
        cdef str cached = _cached_key(q, n)
        if cached is not None:
            return cached
        try:
            return PyUnicode_DecodeUTF8(<const char*>q, n, NULL)
        except UnicodeDecodeError:
            raise DecodeError(f"key at offset {off} is not valid UTF-8", off) from None

    cdef int type_id(self) except -1:
        cdef Py_ssize_t off = self.offset()
        cdef uint32_t t = self.u32("type id")
        if t > 43 or not _VALID[t]:
            raise UnknownTypeError(f"unknown type id {t} at offset {off}", off, t)
        return <int>t

    cdef object view(self, Py_ssize_t start, Py_ssize_t n):
        """memoryview on bytes [start, start+n) of the current buffer."""
        return self.mvs[self.i][start:start + n]


cdef str _read_str(_Reader r, what):
    cdef Py_ssize_t off = r.offset()
    cdef Py_ssize_t n = r.count(what, 1)
    cdef const unsigned char* q = r.take(n, what)
    cdef str cached = _cached_key(q, n)  # short strings repeat too (units, states)
    if cached is not None:
        return cached
    try:
        return PyUnicode_DecodeUTF8(<const char*>q, n, NULL)
    except UnicodeDecodeError:
        raise DecodeError(f"{what} at offset {off} is not valid UTF-8", off) from None


cdef object _read_hash(_Reader r, int depth):
    if depth > _MAX_DEPTH:
        raise DecodeError(f"Hash nested deeper than {MAX_DEPTH} levels at offset {r.offset()}", r.offset())
    r.charge(r.offset())
    cdef Py_ssize_t n = r.count("Hash node count", 10)
    cdef Py_ssize_t k, off, voff
    cdef dict vals = {}
    cdef dict types = {}
    cdef dict attrs = {}
    cdef dict attr_types = {}
    cdef dict avals, atypes
    cdef int t
    cdef object value, key, cls
    h = _HashNew(Hash)
    for k in range(n):
        off = r.offset()
        key = r.key()
        if key in vals:
            raise DecodeError(f"duplicate key {key!r} at offset {off}", off)
        t = r.type_id()
        avals = _read_attrs(r, depth)
        atypes = r.attr_types
        voff = r.offset()
        value = _read_value(r, t, depth)
        if avals is not None:
            if t == T_HASH:
                cls = avals.get("__classId")
                if cls is not None and atypes.get("__classId") == T_STRING \
                        and (cls == "NDArray" or cls == "ImageData"):
                    if cls == "NDArray":
                        value = V.make_ndarray(value, voff)
                        del avals["__classId"], atypes["__classId"]
                        t = -1
                    else:
                        img = N.make_imagedata(value)
                        if img is not None:
                            value = img
                            del avals["__classId"], atypes["__classId"]
                            t = -1
            if avals:
                attrs[key] = avals
                attr_types[key] = atypes
        vals[key] = value
        if t >= 0:
            types[key] = t
    h._v = vals
    h._t = types
    h._a = attrs
    h._at = attr_types
    return h


cdef dict _read_attrs(_Reader r, int depth):
    """The attribute values (None if there are none); their types go to r.attr_types."""
    cdef Py_ssize_t off = r.offset()
    cdef Py_ssize_t n = r.count("attribute count", 6)
    if n == 0:
        return None
    r.charge(off)
    cdef Py_ssize_t k
    cdef dict vals = {}
    cdef dict types = {}
    cdef int t
    for k in range(n):
        off = r.offset()
        name = r.key()
        if name in vals:
            raise DecodeError(f"duplicate attribute {name!r} at offset {off}", off)
        t = r.type_id()
        vals[name] = _read_value(r, t, depth)
        types[name] = t
    r.attr_types = types
    return vals


cdef object _read_value(_Reader r, int t, int depth):
    cdef const unsigned char* q
    cdef Py_ssize_t off, n, k, start, itemsize
    cdef uint32_t u
    if t == T_INT32:
        return <int32_t>r.u32("INT32")
    if t == T_UINT32:
        return r.u32("UINT32")
    if t == T_DOUBLE:
        return rd_f64(r.take(8, "DOUBLE"))
    if t == T_STRING:
        return _read_str(r, "STRING")
    if t == T_BOOL:
        off = r.offset()
        q = r.take(1, "BOOL")
        if q[0] > 1:
            raise DecodeError(f"BOOL value {q[0]} at offset {off} is not 0 or 1", off)
        return q[0] == 1
    if t == T_INT64:
        return PyLong_FromLongLong(<int64_t>rd_u64(r.take(8, "INT64")))
    if t == T_UINT64:
        return PyLong_FromUnsignedLongLong(rd_u64(r.take(8, "UINT64")))
    if t == T_HASH or t == T_HASH_POINTER:
        return _read_hash(r, depth + 1)
    if t == T_INT8:
        return <int8_t>r.take(1, "INT8")[0]
    if t == T_UINT8:
        return r.take(1, "UINT8")[0]
    if t == T_INT16:
        return <int16_t>rd_u16(r.take(2, "INT16"))
    if t == T_UINT16:
        return rd_u16(r.take(2, "UINT16"))
    if t == T_FLOAT:
        return <double>rd_f32(r.take(4, "FLOAT"))
    dt = _VECTOR_DTYPE.get(t)
    if dt is not None:
        name = _TYPE_NAME[t]
        itemsize = dt.itemsize
        off = r.offset()
        n = r.count(name, itemsize)
        r.charge(off)
        q = r.take(n * itemsize, name)
        start = q - r.p
        arr = _frombuffer(r.mvs[r.i], dt, n, start)
        if t == T_VECTOR_BOOL:
            for k in range(n):
                if q[k] > 1:
                    raise DecodeError(f"VECTOR_BOOL at offset {off} has an element that is not 0 or 1", off)
        return arr
    if t == T_VECTOR_HASH or t == T_VECTOR_HASH_POINTER:
        off = r.offset()
        n = r.count(_TYPE_NAME[t], 4)
        if n > r.budget:  # every element is a Hash: fail before making any
            raise V.limit_error(r.limit, r.total, off)
        return [_read_hash(r, depth + 1) for k in range(n)]
    if t == T_VECTOR_STRING:
        n = r.count("VECTOR_STRING", 4)
        return [_read_str(r, "VECTOR_STRING element") for k in range(n)]
    if t == T_CHAR:
        return chr(r.take(1, "CHAR")[0])
    if t == T_VECTOR_CHAR:
        n = r.count("VECTOR_CHAR", 1)
        q = r.take(n, "VECTOR_CHAR")
        return PyBytes_FromStringAndSize(<const char*>q, n)
    if t == T_BYTE_ARRAY:
        off = r.offset()
        n = r.count("BYTE_ARRAY", 1)
        r.charge(off)
        q = r.take(n, "BYTE_ARRAY")
        return r.view(q - r.p, n)
    if t == T_COMPLEX_FLOAT:
        q = r.take(8, "COMPLEX_FLOAT")
        return complex(<double>rd_f32(q), <double>rd_f32(q + 4))
    if t == T_COMPLEX_DOUBLE:
        q = r.take(16, "COMPLEX_DOUBLE")
        return complex(rd_f64(q), rd_f64(q + 8))
    if t == T_NONE:
        off = r.offset()
        u = r.u32("NONE")
        if u != 0:
            raise DecodeError(f"NONE value at offset {off} is {u}, not 0", off)
        return None
    if t == T_VECTOR_NONE:
        n = r.count("VECTOR_NONE", 4)
        for k in range(n):
            off = r.offset()
            if r.u32("VECTOR_NONE element") != 0:
                raise DecodeError(f"VECTOR_NONE element at offset {off} is not 0", off)
        return [None] * n
    if t == T_SCHEMA:
        off = r.offset()
        n = r.count("SCHEMA", 1)
        end = r.offset() + n
        root = r.key()
        params = _read_hash(r, depth + 1)
        if r.offset() != end:
            raise DecodeError(
                f"SCHEMA at offset {off} declares {n} bytes but its content has {r.offset() - off - 4}", off)
        return Schema(root, params)
    raise UnknownTypeError(f"unknown type id {t} at offset {r.offset()}", r.offset(), t)  # pragma: no cover


cdef list _segments(data):
    cdef list parts
    if isinstance(data, (list, tuple)):
        parts = list(data)
        if not parts:
            raise DecodeError("no buffers to decode", 0)
    else:
        parts = [data]
    cdef list segs = []
    for p in parts:
        if type(p) is bytes:
            segs.append(memoryview(p))
            continue
        try:
            mv = memoryview(p)
        except TypeError:
            raise TypeError(f"decode needs bytes-like buffers, not {type(p).__name__}") from None
        if not mv.c_contiguous:
            raise ValueError("decode needs C-contiguous buffers")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        segs.append(mv)
    return segs


def decode(data, *, copy=False, max_objects=None):
    """Decode one archive from a buffer or from a list of buffers.

    Same contract as ``kbhash._pure.decode``: arrays are numpy views on the
    input (``copy=True`` copies the input once first), BYTE_ARRAY values
    memoryviews on it; errors are DecodeError (ValueError) subclasses naming
    the offset, LimitError beyond ``max_objects`` objects (None: the rule of
    ``kbhash.object_limit``).
    """
    if copy:
        chunks = data if isinstance(data, (list, tuple)) else [data]
        data = bytearray(_join([memoryview(c).cast("B") for c in chunks]))
    cdef _Reader r = _Reader()
    r.open(_segments(data), max_objects)
    h = _read_hash(r, 0)
    r.advance()
    if r.left:
        raise DecodeError(f"{r.left} bytes of trailing data at offset {r.offset()}", r.offset())
    return h


def decode_prefix(data, *, max_objects=None):
    """Decode the archive at the start of ``data``; return ``(Hash, bytes consumed)``.

    Same contract as ``kbhash._pure.decode_prefix``: trailing data is left alone
    (and counts in the default object limit).
    """
    cdef _Reader r = _Reader()
    r.open(_segments(data), max_objects)
    h = _read_hash(r, 0)
    return h, r.offset()
