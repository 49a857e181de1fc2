# cython: language_level=3
"""Karabo Bridge codec, compiled: train dict <-> list of ZeroMQ frames.  No sockets here.

Wire format (``docs/wire/karabo-bridge-protocol.md``).  The executable spec is the pure twin
``_pure.py``, which this module must match in results, exception types and messages; both
provide ``_rules.PUBLIC_API`` and import only ``_rules`` and ``kbstream.errors`` (never
each other, never zmq):

* **2.2**: (header, payload) frame pairs.  Per source, sorted by name: header map
  ``{source, content: 'msgpack', metadata}`` + payload map of the non-array values; per
  numpy array, in insertion order: header ``{source, content: 'array', path, dtype:
  str(dtype), shape}`` + the array's own memory as a flat ``memoryview`` (zero-copy).
* **1.0**: one msgpack frame ``{source: {..., 'metadata': {...}}}`` with msgpack_numpy maps
  (bin keys ``nd, type, kind, shape, data``); built in one preallocated ``bytes`` object of
  the exact size, so every array is copied exactly once.
* **2.0 / 2.1**: decode only; metadata recovered from the payload into ``meta``.

msgpack is written and read by the small C-level writer and reader below, with the choices
of msgpack-python ``Packer(use_bin_type=True)`` / ``unpackb(raw=False)`` (bytes identical to
``karabo_bridge.serialize``).  The reader checks the bytes left before every read and before
trusting a container size; decoded arrays are ``numpy.ndarray`` views on the frames (the
frame stays alive as the array's base).  Errors are the classes of ``kbstream.errors``.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Copy, PyDict_SetItem
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from cpython.long cimport PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy
from libc.stdlib cimport free, malloc
from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdint cimport INT64_MAX

cdef extern from *:
    Py_ssize_t PY_SSIZE_T_MAX

# Helpers off the hot paths (errors, protocol 2.0/2.1 metadata, dummy timestamps, dtype
# parsing on a cache miss) and the limits come from the neutral rules module, shared with
# the pure twin, so both give the same messages.
from ._rules import (
    PUBLIC_API,  # noqa: E402
    ENCODE_VERSIONS,
    MAX_CONTAINERS,
    MAX_DEPTH,
    MAX_NDIM,
    amplification_error,
    check_nbytes,
    container_limit,
    header_field,
    make_dummy_timestamps,
    meta_from_payload,
    shape_count,
    type_name,
    wire_dtype,
)

import sys as _sys

import numpy as np

from ..errors import (
    EncodeError,
    EncodeOverflowError,
    ProtocolError,
    ServerError,
    TruncatedFrameError,
    UnknownContentError,
    UnsupportedDtypeError,
)

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    long long PyLong_AsLongLongAndOverflow(object, int*) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object) except? -1
    double PyFloat_AS_DOUBLE(object)
    object PyMemoryView_FromObject(object)
    Py_buffer* PyMemoryView_GET_BUFFER(object)
    int PyBuffer_IsContiguous(const Py_buffer*, char)
    object PyFloat_FromDouble(double)
    bint PyMemoryView_Check(object)
    object _PyDict_NewPresized(Py_ssize_t)
    bint PyUnicode_IS_COMPACT_ASCII(PyObject*)
    bint PyUnicode_CheckExact(PyObject*)
    Py_ssize_t PyUnicode_GET_LENGTH(PyObject*)
    void* PyUnicode_DATA(PyObject*)
    void Py_XDECREF(PyObject*)

__all__ = list(PUBLIC_API)

DEF C_MAX_DEPTH = 256
if MAX_DEPTH != C_MAX_DEPTH:   # pragma: no cover - a build out of step with _rules
    raise ImportError("kbstream.bridge._codec was built for another MAX_DEPTH: rebuild it")
cdef str _ARRAY_KINDS = "biufcSUmM"
cdef Py_ssize_t _MAX_CONTAINERS = MAX_CONTAINERS

cdef bytes _ERROR_PREFIX = b"Error: "
cdef Py_ssize_t _COPY_NOGIL = 1 << 16

cdef type _ndarray = np.ndarray
cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # steals the reference to descr (also on failure); commented out in numpy's .pxd
    ctypedef struct _Descr "PyArray_Descr":
        pass
    object PyArray_NewFromDescr(PyTypeObject* subtype, _Descr* descr, int nd,
                                cnp.npy_intp* dims, cnp.npy_intp* strides, void* data,
                                int flags, PyObject* obj)
cdef object _np_scalar = (np.bool_, np.number)
cdef object _np_bool = np.bool_
cdef object _np_generic = np.generic
cdef object _uint8 = np.uint8
cdef object _frombuffer = np.frombuffer
# zmq.Frame memory can neither move nor be freed while the frame lives, like bytes.  The
# codec never imports zmq: frames of that type exist only once pyzmq is loaded, so the
# class is looked up in sys.modules when a message is decoded (bytes until then).
cdef type _ZmqFrame = bytes


cdef inline int _find_zmq_frame() except -1:
    global _ZmqFrame
    if _ZmqFrame is bytes:
        zmq = _sys.modules.get("zmq")
        if zmq is not None:
            frame_type = getattr(zmq, "Frame", None)
            if isinstance(frame_type, type):
                _ZmqFrame = frame_type
    return 0


cdef object _view(shape, dt, frame, Py_ssize_t offset, Py_ssize_t count):
    """An array on ``frame`` that keeps it alive *and* exported.

    ``numpy.ndarray(shape, dtype, buffer)`` releases the buffer at once and only keeps
    the exporting object, so a bytearray or mmap frame could be resized or closed under
    the array.  ``numpy.frombuffer`` on a memoryview keeps the export (a resize then
    raises BufferError).  The memory of ``bytes`` and of a ``zmq.Frame`` can neither move
    nor be freed while the object lives, so for them no export is kept (_fixed_view).
    """
    cdef Py_buffer view
    if _fixed_frame(frame, shape):
        PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
        try:
            return _fixed_view(<tuple>shape, dt, frame, &view, offset, count)
        finally:
            PyBuffer_Release(&view)
    return _frombuffer(memoryview(frame), dt, count, offset).reshape(shape)


cdef inline bint _fixed_frame(frame, shape):
    """bytes and zmq.Frame memory can neither move nor be freed while the object lives."""
    cdef type t = type(frame)
    return (t is bytes or t is _ZmqFrame) and type(shape) is tuple


cdef object _fixed_view(tuple shape, dt, frame, const Py_buffer* view, Py_ssize_t offset,
                        Py_ssize_t count):
    """The array on ``view`` (borrowed from a bytes or zmq.Frame ``frame``), made with
    numpy's C API, with ``frame`` as its base: what ``numpy.ndarray(shape, dt, frame)``
    does, without the argument parsing."""
    cdef cnp.npy_intp dims[32]
    cdef int nd = <int>len(shape), j, flags
    if nd > 32:   # numpy 1.x's limit; numpy raises its own error
        return _ndarray(shape, dt, frame, offset)
    for j in range(nd):
        dims[j] = <cnp.npy_intp>shape[j]
    flags = cnp.NPY_ARRAY_C_CONTIGUOUS
    if not view.readonly:
        flags |= cnp.NPY_ARRAY_WRITEABLE
    Py_INCREF(dt)   # PyArray_NewFromDescr steals a reference to the dtype
    arr = PyArray_NewFromDescr(<PyTypeObject*>_ndarray, <_Descr*>dt, nd, dims,
                               NULL, <char*>view.buf + offset, flags, NULL)
    cnp.set_array_base(<cnp.ndarray>arr, frame)
    return arr


cdef object _ascontiguousarray = np.ascontiguousarray
cdef dict _dtype_cache = {}


# ---------------------------------------------------------------------------------------
# helpers (same messages as _pure)

cdef dict _wire_dtypes = {}   # np.dtype -> packed str(dtype), for dtypes that may be sent


cdef object _last_dt = None      # the last dtype packed, and its packed name: numpy's
cdef bytes _last_dtb = None      # builtin dtypes are singletons, so identity hits


cdef bytes _wire_dtype(dt, key, src):
    """Packed ``str(dtype)`` of a sendable dtype; EncodeError for object / structured."""
    global _last_dt, _last_dtb
    if dt is _last_dt:
        return _last_dtb
    b = _wire_dtypes.get(dt)
    if b is not None:
        _last_dtb = <bytes>b
        _last_dt = dt
        return <bytes>b
    kind = dt.kind
    if kind not in _ARRAY_KINDS or dt.hasobject:
        what = "array" if key is None else f"array {key!r} of source {src!r}"
        raise EncodeError(
            f"cannot serialize {what}: dtype {dt} (kind {kind!r}) has no raw "
            f"byte representation"
        )
    b = packb(str(dt))
    if len(_wire_dtypes) < 256:
        _wire_dtypes[dt] = b
    return <bytes>b


cdef int w_shape(Writer* w, cnp.ndarray arr) except -1:
    """The shape as a msgpack array of ints: the bytes ``w_obj(arr.shape)`` writes."""
    cdef int nd = cnp.PyArray_NDIM(arr), j
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(arr)
    w_array_header(w, nd)
    for j in range(nd):
        w_ll(w, dims[j])
    return 0


cdef tuple _array_frame(arr):
    """(C-contiguous array, zero-copy frame on it) for an array whose dtype was checked
    by _wire_dtype."""
    try:
        mv = PyMemoryView_FromObject(arr)
    except ValueError:
        # datetime64 / timedelta64 do not export a buffer format: view the bytes
        if not arr.flags.c_contiguous:
            arr = _ascontiguousarray(arr)
        return arr, memoryview(arr.reshape(-1).view(_uint8))
    if not PyBuffer_IsContiguous(PyMemoryView_GET_BUFFER(mv), b'C'):
        arr = _ascontiguousarray(arr)
        mv = PyMemoryView_FromObject(arr)
    return arr, mv


cdef object _dtype(name, Py_ssize_t index):
    """numpy dtype of a wire dtype name: a hit in the compiled cache, else the twin's
    validating parser (the same checks and messages by construction)."""
    dt = _dtype_cache.get(name) if type(name) is str or type(name) is bytes else None
    if dt is not None:
        return dt
    dt = wire_dtype(name, index)
    if len(_dtype_cache) < 256:
        _dtype_cache[name] = dt
    return dt


cdef tuple _shape_c(shape, Py_ssize_t index, Py_ssize_t* count):
    """Fast path of shape_count: tuple shape, *count = number of items or -1 if it does
    not fit a Py_ssize_t (then the frame length check fails)."""
    cdef Py_ssize_t n, j, c = 1
    cdef long long d
    cdef int overflow
    if type(shape) is not list or len(<list>shape) > MAX_NDIM:
        t, _ = shape_count(shape, index)   # raises unless a tuple
        count[0] = -1
        return t
    n = len(<list>shape)
    for j in range(n):
        v = (<list>shape)[j]
        if type(v) is not int:
            return shape_count(shape, index)[0]   # raises
        d = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow < 0 or (overflow == 0 and d < 0):
            return shape_count(shape, index)[0]   # raises
        if overflow > 0 or c < 0:
            c = -1
        elif d != 0 and c > PY_SSIZE_T_MAX // d:
            c = -1
        else:
            c *= <Py_ssize_t>d
    # a zero dimension after an overflowing one makes the product 0 again
    if c < 0:
        for j in range(n):
            if (<list>shape)[j] == 0:
                c = 0
    count[0] = c
    return tuple(<list>shape)


# ---------------------------------------------------------------------------------------
# msgpack writer: a growable C buffer owned by one call (never shared between threads)

cdef struct Writer:
    char* buf
    Py_ssize_t len
    Py_ssize_t cap


cdef int w_init(Writer* w, Py_ssize_t cap) except -1:
    w.buf = <char*>PyMem_Malloc(cap)
    if w.buf == NULL:
        raise MemoryError()
    w.len = 0
    w.cap = cap
    return 0


cdef void w_free(Writer* w) noexcept:
    PyMem_Free(w.buf)
    w.buf = NULL


cdef int w_grow(Writer* w, Py_ssize_t n) except -1:
    cdef Py_ssize_t cap = w.cap * 2
    if cap < w.len + n:
        cap = w.len + n
    cdef char* nb = <char*>PyMem_Realloc(w.buf, cap)
    if nb == NULL:
        raise MemoryError()
    w.buf = nb
    w.cap = cap
    return 0


cdef inline int w_raw(Writer* w, const void* p, Py_ssize_t n) except -1:
    if w.len + n > w.cap:
        w_grow(w, n)
    memcpy(w.buf + w.len, p, n)
    w.len += n
    return 0


cdef inline int w_lit(Writer* w, bytes b) except -1:
    return w_raw(w, PyBytes_AS_STRING(b), len(b))


cdef inline int w_byte(Writer* w, uint8_t b) except -1:
    if w.len + 1 > w.cap:
        w_grow(w, 1)
    w.buf[w.len] = <char>b
    w.len += 1
    return 0


cdef inline int w_be(Writer* w, uint8_t code, uint64_t v, int n) except -1:
    """code byte followed by the n low bytes of v, big-endian."""
    cdef int i
    if w.len + 1 + n > w.cap:
        w_grow(w, 1 + n)
    cdef uint8_t* p = <uint8_t*>(w.buf + w.len)
    p[0] = code
    for i in range(n):
        p[n - i] = <uint8_t>(v >> (8 * i))
    w.len += 1 + n
    return 0


cdef int w_size_header(Writer* w, uint64_t n, int fix_base, uint64_t fix_max,
                       int c8, int c16, int c32) except -1:
    if fix_base >= 0 and n <= fix_max:
        return w_byte(w, <uint8_t>(fix_base | n))
    if c8 >= 0 and n < 0x100:
        return w_be(w, <uint8_t>c8, n, 1)
    if n < 0x10000:
        return w_be(w, <uint8_t>c16, n, 2)
    if n < 0x100000000:
        return w_be(w, <uint8_t>c32, n, 4)
    raise EncodeError(f"object too long for msgpack ({n} elements or bytes)")


cdef inline int w_array_header(Writer* w, Py_ssize_t n) except -1:
    return w_size_header(w, n, 0x90, 15, -1, 0xDC, 0xDD)


cdef inline int w_map_header(Writer* w, Py_ssize_t n) except -1:
    return w_size_header(w, n, 0x80, 15, -1, 0xDE, 0xDF)


cdef inline int w_bin_header(Writer* w, Py_ssize_t n) except -1:
    return w_size_header(w, n, -1, 0, 0xC4, 0xC5, 0xC6)


cdef int w_ll(Writer* w, long long v) except -1:
    if v < 0:
        if v >= -32:
            return w_byte(w, <uint8_t>(v & 0xFF))
        if v >= -0x80:
            return w_be(w, 0xD0, <uint64_t>v, 1)
        if v >= -0x8000:
            return w_be(w, 0xD1, <uint64_t>v, 2)
        if v >= -0x80000000:
            return w_be(w, 0xD2, <uint64_t>v, 4)
        return w_be(w, 0xD3, <uint64_t>v, 8)
    return w_ull(w, <unsigned long long>v)


cdef int w_ull(Writer* w, unsigned long long v) except -1:
    if v < 0x80:
        return w_byte(w, <uint8_t>v)
    if v < 0x100:
        return w_be(w, 0xCC, v, 1)
    if v < 0x10000:
        return w_be(w, 0xCD, v, 2)
    if v < 0x100000000:
        return w_be(w, 0xCE, v, 4)
    return w_be(w, 0xCF, v, 8)


cdef int w_int(Writer* w, obj) except -1:
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(obj, &overflow)
    if overflow == 0:
        return w_ll(w, v)
    if overflow > 0:
        try:
            return w_ull(w, PyLong_AsUnsignedLongLong(obj))
        except OverflowError:
            pass
    raise EncodeOverflowError(f"integer {int(obj)} is out of msgpack's range")


cdef int w_double(Writer* w, double d) except -1:
    cdef uint64_t bits
    memcpy(&bits, &d, 8)
    return w_be(w, 0xCB, bits, 8)


cdef int w_str(Writer* w, obj) except -1:
    cdef Py_ssize_t n
    cdef const char* p
    if PyUnicode_IS_COMPACT_ASCII(<PyObject*>obj):
        # ASCII: the characters are the UTF-8 bytes
        n = PyUnicode_GET_LENGTH(<PyObject*>obj)
        p = <const char*>PyUnicode_DATA(<PyObject*>obj)
        if n <= 31 and w.len + 1 + n <= w.cap:
            w.buf[w.len] = <char>(0xA0 | n)
            memcpy(w.buf + w.len + 1, p, n)
            w.len += 1 + n
            return 0
        w_size_header(w, n, 0xA0, 31, 0xD9, 0xDA, 0xDB)
        return w_raw(w, p, n)
    try:
        p = PyUnicode_AsUTF8AndSize(obj, &n)
    except UnicodeEncodeError:
        raise EncodeError("cannot encode a str with lone surrogates as UTF-8") from None
    w_size_header(w, n, 0xA0, 31, 0xD9, 0xDA, 0xDB)
    return w_raw(w, p, n)


cdef int w_buffer_bin(Writer* w, obj) except -1:
    cdef Py_buffer view
    PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
    try:
        w_bin_header(w, view.len)
        w_raw(w, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef class _Chunks:
    """Protocol 1.0 assembly: cut points in the writer and the array views between them."""
    cdef list cuts      # writer offsets
    cdef list arrays    # flat byte memoryviews, one after each cut

    def __cinit__(self):
        self.cuts = []
        self.arrays = []


cdef int w_numpy_map(Writer* w, obj, _Chunks chunks) except -1:
    """msgpack_numpy's representation (protocol 1.0) of an array or a numpy scalar."""
    cdef Py_ssize_t d
    if isinstance(obj, _ndarray):
        _wire_dtype(<object>cnp.PyArray_DESCR(<cnp.ndarray>obj), None, None)
        arr, frame = _array_frame(obj)
        w_lit(w, b"\x85\xc4\x02nd\xc3\xc4\x04type")
        w_str(w, arr.dtype.str)
        w_lit(w, b"\xc4\x04kind\xc4\x00\xc4\x05shape")
        shape = arr.shape
        w_array_header(w, len(shape))
        for d in shape:
            w_ll(w, d)
        w_lit(w, b"\xc4\x04data")
        w_bin_header(w, arr.nbytes)
        # the array bytes are copied once, straight into the final frame
        chunks.cuts.append(w.len)
        chunks.arrays.append(frame)
    else:
        w_lit(w, b"\x83\xc4\x02nd\xc2\xc4\x04type")
        w_str(w, obj.dtype.str)
        w_lit(w, b"\xc4\x04data")
        w_buffer_bin(w, np.asarray(obj).reshape(1).view(_uint8))
    return 0


cdef int w_obj(Writer* w, obj, bint v1, int depth, _Chunks chunks) except -1:
    cdef type t = type(obj)
    # exact types first (the common case), then the subclass checks in _pure's order
    if t is str:
        return w_str(w, obj)
    if t is int:
        return w_int(w, obj)
    if t is float:
        return w_double(w, PyFloat_AS_DOUBLE(obj))
    if obj is None:
        return w_byte(w, 0xC0)
    if obj is True:
        return w_byte(w, 0xC3)
    if obj is False:
        return w_byte(w, 0xC2)
    if t is tuple or t is list or isinstance(obj, (list, tuple)):   # no other type's subclass
        if depth >= C_MAX_DEPTH:
            raise EncodeError(f"nesting deeper than {MAX_DEPTH} levels")
        w_array_header(w, len(obj))
        for value in obj:
            w_obj(w, value, v1, depth + 1, chunks)
        return 0
    if isinstance(obj, int):
        return w_int(w, obj)
    if isinstance(obj, float):
        return w_double(w, PyFloat_AS_DOUBLE(obj))
    if isinstance(obj, (bytes, bytearray)):
        return w_buffer_bin(w, obj)
    if isinstance(obj, str):
        return w_str(w, obj)
    if PyMemoryView_Check(obj):
        if not obj.c_contiguous:
            raise EncodeError("cannot serialize a non-contiguous memoryview")
        return w_buffer_bin(w, obj)
    if isinstance(obj, dict):
        if depth >= C_MAX_DEPTH:
            raise EncodeError(f"nesting deeper than {MAX_DEPTH} levels")
        w_map_header(w, len(obj))
        # owned references: packing a key may run Python code that changes the dict
        # (the iteration then raises RuntimeError, as in the pure codec)
        for key, value in obj.items():
            w_obj(w, key, v1, depth + 1, chunks)
            w_obj(w, value, v1, depth + 1, chunks)
        return 0
    if isinstance(obj, _np_scalar):
        if v1:
            return w_numpy_map(w, obj, chunks)
        if isinstance(obj, _np_bool):
            return w_byte(w, 0xC3 if obj else 0xC2)
        item = obj.item()
        if isinstance(item, _np_generic):
            raise EncodeError(f"cannot serialize object of type {type_name(obj)}")
        return w_obj(w, item, v1, depth, chunks)
    if v1 and isinstance(obj, _ndarray):
        return w_numpy_map(w, obj, chunks)
    raise EncodeError(f"cannot serialize object of type {type_name(obj)}")


cdef inline bytes w_bytes(Writer* w, Py_ssize_t start):
    return PyBytes_FromStringAndSize(w.buf + start, w.len - start)


def packb(obj):
    """msgpack bytes of *obj*, as ``msgpack.packb(obj, use_bin_type=True)`` writes them.

    numpy scalars are converted with ``.item()``, ``np.bool_`` to bool; arrays are refused.
    """
    cdef Writer w
    w_init(&w, 256)
    try:
        w_obj(&w, obj, False, 0, None)
        return w_bytes(&w, 0)
    finally:
        w_free(&w)


# ---------------------------------------------------------------------------------------
# msgpack reader

cdef class _Bin:
    """A bin value inside a protocol 1.0 frame, kept as (offset, length) until its map is
    complete, so that a msgpack_numpy ``data`` field becomes a view instead of a copy."""
    cdef Py_ssize_t start
    cdef Py_ssize_t length


cdef struct Budget:
    # the msgpack containers (maps, arrays) one message may still decode into.  Every
    # dict or list made from the wire takes one, on every path (generic, templates,
    # header fast path, header memo), in the order and at the offsets of _pure; a path
    # that gives up and decodes again the general way gives back what it took first.
    # A frame's reader counts in its own ``left`` and hands it back when the frame is
    # done (r_done).
    Py_ssize_t left
    Py_ssize_t limit


cdef struct Reader:
    const uint8_t* buf
    Py_ssize_t pos
    Py_ssize_t end
    Py_ssize_t index
    bint v1
    Py_ssize_t left           # containers the message may still decode into
    Py_ssize_t mark           # r_payload_map: ``left`` to go back to if it starts again
    Budget* budget


cdef inline void r_init(Reader* r, const Py_buffer* view, Py_ssize_t index, bint v1,
                        Budget* budget) noexcept:
    """A reader at the start of ``view`` (frame ``index`` of the message)."""
    r.buf = <const uint8_t*>view.buf
    r.pos = 0
    r.end = view.len
    r.index = index
    r.v1 = v1
    r.left = budget.left
    r.budget = budget


cdef inline void r_done(Reader* r) noexcept:
    """Hand the reader's count back to the message's budget."""
    r.budget.left = r.left


cdef inline int r_count(Reader* r, Py_ssize_t at) except -1:
    """Take one container (the map or array at ``at``) from the message's budget."""
    r.left -= 1
    if r.left < 0:
        r_over_budget(r, at)
    return 0


cdef int r_over_budget(Reader* r, Py_ssize_t at) except -1:
    raise amplification_error(r.index, at, r.budget.limit)


cdef int r_truncated(Reader* r, Py_ssize_t n, Py_ssize_t at) except -1:
    raise TruncatedFrameError(
        f"frame {r.index}: msgpack data truncated at offset {at}: "
        f"{n} bytes needed, {r.end - r.pos} left",
        r.index,
        at,
    )


cdef inline int r_need(Reader* r, Py_ssize_t n, Py_ssize_t at) except -1:
    if r.end - r.pos < n:
        r_truncated(r, n, at)
    return 0


cdef inline uint64_t r_be(Reader* r, int n, Py_ssize_t at) except? 0xFFFFFFFFFFFFFFFF:
    """n big-endian bytes as an unsigned int, bounds checked."""
    cdef uint64_t v
    cdef const uint8_t* p = r.buf + r.pos
    if r.end - r.pos < n:
        r_truncated(r, n, at)
    # fixed-size forms: the compiler makes each a single load (+ byte swap)
    if n == 8:
        v = ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40)
             | (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16)
             | (<uint64_t>p[6] << 8) | <uint64_t>p[7])
    elif n == 4:
        v = ((<uint64_t>p[0] << 24) | (<uint64_t>p[1] << 16) | (<uint64_t>p[2] << 8)
             | <uint64_t>p[3])
    elif n == 2:
        v = (<uint64_t>p[0] << 8) | <uint64_t>p[1]
    else:
        v = p[0]
    r.pos += n
    return v


cdef int r_container_size(Reader* r, uint64_t n, int per_item, Py_ssize_t at,
                          str what) except -1:
    if n * per_item > <uint64_t>(r.end - r.pos):
        raise TruncatedFrameError(
            f"frame {r.index}: msgpack {what} at offset {at} declares {n} items, "
            f"only {r.end - r.pos} bytes left",
            r.index,
            at,
        )
    return 0


# Interning cache for short ASCII strings (keys repeat in every train): a direct-mapped
# table of str objects indexed by a hash of the raw bytes.  A hit returns the cached object
# (no allocation, and its hash is already computed for the dict insert).  Only touched with
# the GIL held and without calling back into Python, so it needs no lock.
DEF STR_CACHE_SIZE = 4096
DEF STR_CACHE_MAXLEN = 48
cdef PyObject* _str_cache[STR_CACHE_SIZE]


cdef inline uint64_t _bytes_hash(const uint8_t* src, Py_ssize_t n) noexcept:
    """A fast non-cryptographic hash of n bytes for the memo tables.  Each 8-byte word is
    multiplied independently (no chain of multiplies through the words), the last word
    overlapping the one before; one final mix."""
    cdef uint64_t h = <uint64_t>n * 0x9E3779B97F4A7C15u
    cdef uint64_t w
    cdef uint32_t u, v
    cdef Py_ssize_t j = 0
    if n >= 8:
        while j + 8 <= n:
            memcpy(&w, src + j, 8)
            h ^= (w + <uint64_t>j * 0x2545F4914F6CDD1Du) * 0xFF51AFD7ED558CCDu
            j += 8
        if j < n:
            memcpy(&w, src + n - 8, 8)
            h ^= (w ^ 0xC4CEB9FE1A85EC53u) * 0xFF51AFD7ED558CCDu
    elif n >= 4:                       # two 4-byte loads, overlapping
        memcpy(&u, src, 4)
        memcpy(&v, src + n - 4, 4)
        h ^= ((<uint64_t>u << 32) | v) * 0xFF51AFD7ED558CCDu
    else:
        w = 0
        while j < n:                   # no variable-size memcpy: it stalls the load
            w |= (<uint64_t>src[j]) << (8 * j)
            j += 1
        h ^= w * 0xFF51AFD7ED558CCDu
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53u
    return h >> 24


cdef inline bint _same_bytes(const uint8_t* a, const uint8_t* b, Py_ssize_t n) noexcept:
    """memcmp(a, b, n) == 0 for short n, inline (word compares, the last one overlapping)."""
    cdef uint64_t x, y
    cdef uint32_t u, v
    cdef Py_ssize_t j = 0
    if n >= 8:
        while j + 8 <= n:
            memcpy(&x, a + j, 8)
            memcpy(&y, b + j, 8)
            if x != y:
                return False
            j += 8
        if j < n:
            memcpy(&x, a + n - 8, 8)
            memcpy(&y, b + n - 8, 8)
            return x == y
        return True
    if n >= 4:
        memcpy(&u, a, 4)
        memcpy(&v, b, 4)
        if u != v:
            return False
        memcpy(&u, a + n - 4, 4)
        memcpy(&v, b + n - 4, 4)
        return u == v
    while j < n:
        if a[j] != b[j]:
            return False
        j += 1
    return True


cdef inline object r_text(Reader* r, Py_ssize_t n, Py_ssize_t at):
    """A msgpack str of n bytes; short ASCII ones come from the interning cache."""
    cdef const uint8_t* src = r.buf + r.pos
    cdef Py_ssize_t h = -1
    cdef PyObject* cached
    if r.end - r.pos < n:
        r_truncated(r, n, at)
    r.pos += n
    if n <= STR_CACHE_MAXLEN:
        h = <Py_ssize_t>(_bytes_hash(src, n) % STR_CACHE_SIZE)
        cached = _str_cache[h]
        if (cached != NULL and PyUnicode_GET_LENGTH(cached) == n
                and _same_bytes(<const uint8_t*>PyUnicode_DATA(cached), src, n)):
            return <object>cached
    return r_text_new(r, src, n, at, h)


cdef object r_text_new(Reader* r, const uint8_t* src, Py_ssize_t n, Py_ssize_t at,
                       Py_ssize_t h):
    """Decode a str that was not in the cache, and cache it if short and ASCII (h >= 0)."""
    try:
        s = PyUnicode_DecodeUTF8(<const char*>src, n, NULL)
    except UnicodeDecodeError:
        raise ProtocolError(
            f"frame {r.index}: invalid UTF-8 in msgpack str at offset {at}", r.index, at
        ) from None
    if h >= 0 and PyUnicode_IS_COMPACT_ASCII(<PyObject*>s):
        Py_INCREF(s)
        Py_XDECREF(_str_cache[h])
        _str_cache[h] = <PyObject*>s
    return s


cdef object r_binary(Reader* r, Py_ssize_t n, Py_ssize_t at):
    r_need(r, n, at)
    cdef Py_ssize_t p = r.pos
    r.pos = p + n
    cdef _Bin b
    if r.v1:
        b = _Bin.__new__(_Bin)
        b.start = p
        b.length = n
        return b
    return PyBytes_FromStringAndSize(<const char*>r.buf + p, n)


cdef int r_depth(Reader* r, int depth, Py_ssize_t at) except -1:
    if depth >= C_MAX_DEPTH:
        raise ProtocolError(
            f"frame {r.index}: msgpack nesting deeper than {MAX_DEPTH} at offset {at}",
            r.index,
            at,
        )
    return 0


cdef object r_value(Reader* r, int depth, object frame):
    cdef Py_ssize_t at = r.pos
    cdef uint8_t b
    cdef uint64_t bits
    cdef uint32_t bits32
    cdef double d
    cdef float f
    cdef int n
    if r.end - r.pos < 1:
        r_truncated(r, 1, at)
    b = r.buf[at]
    r.pos = at + 1
    if b <= 0x7F:
        return <long>b
    if b >= 0xE0:
        return <long>b - 0x100
    if b >= 0xA0 and b <= 0xBF:
        return r_text(r, b & 0x1F, at)
    if b >= 0x80 and b <= 0x8F:
        return r_map(r, b & 0x0F, depth, at, frame)
    if b >= 0x90 and b <= 0x9F:
        return r_array(r, b & 0x0F, depth, at, frame)
    if b == 0xC0:
        return None
    if b == 0xC2:
        return False
    if b == 0xC3:
        return True
    if b == 0xCA:
        bits32 = <uint32_t>r_be(r, 4, at)
        memcpy(&f, &bits32, 4)
        return PyFloat_FromDouble(f)
    if b == 0xCB:
        bits = r_be(r, 8, at)
        memcpy(&d, &bits, 8)
        return PyFloat_FromDouble(d)
    if b >= 0xCC and b <= 0xCF:
        return PyLong_FromUnsignedLongLong(r_be(r, 1 << (b - 0xCC), at))
    if b >= 0xD0 and b <= 0xD3:
        n = 1 << (b - 0xD0)
        bits = r_be(r, n, at)
        if n < 8 and (bits >> (8 * n - 1)) & 1:
            bits |= (<uint64_t>0xFFFFFFFFFFFFFFFF) << (8 * n)
        return PyLong_FromLongLong(<int64_t>bits)
    if b >= 0xD9 and b <= 0xDB:
        return r_text(r, <Py_ssize_t>r_be(r, 1 << (b - 0xD9), at), at)
    if b >= 0xC4 and b <= 0xC6:
        return r_binary(r, <Py_ssize_t>r_be(r, 1 << (b - 0xC4), at), at)
    if b == 0xDC or b == 0xDD:
        return r_array(r, r_be(r, 2 if b == 0xDC else 4, at), depth, at, frame)
    if b == 0xDE or b == 0xDF:
        return r_map(r, r_be(r, 2 if b == 0xDE else 4, at), depth, at, frame)
    if b == 0xC1:
        raise ProtocolError(
            f"frame {r.index}: invalid msgpack byte 0xc1 at offset {at}", r.index, at
        )
    raise ProtocolError(
        f"frame {r.index}: unsupported msgpack ext type (byte 0x{b:02x}) at offset {at}",
        r.index,
        at,
    )


cdef object r_materialize(Reader* r, _Bin b):
    return PyBytes_FromStringAndSize(<const char*>r.buf + b.start, b.length)


cdef object r_array(Reader* r, uint64_t n, int depth, Py_ssize_t at, object frame):
    r_depth(r, depth, at)
    r_container_size(r, n, 1, at, "array")
    r_count(r, at)
    cdef list out = PyList_New(<Py_ssize_t>n)
    cdef Py_ssize_t i
    for i in range(<Py_ssize_t>n):
        v = r_value(r, depth + 1, frame)
        if r.v1 and type(v) is _Bin:
            v = r_materialize(r, <_Bin>v)
        Py_INCREF(v)
        PyList_SET_ITEM(out, i, v)
    return out


cdef inline object r_map_key(Reader* r, int depth, object frame):
    """The key at ``r.pos`` of a map at nesting ``depth``: a str or bytes."""
    cdef Py_ssize_t kat = r.pos
    if kat < r.end and (r.buf[kat] & 0xE0) == 0xA0:     # fixstr: the usual key
        r.pos = kat + 1
        return r_text(r, r.buf[kat] & 0x1F, kat)
    k = r_value(r, depth + 1, frame)
    if r.v1 and type(k) is _Bin:
        k = r_materialize(r, <_Bin>k)
    if type(k) is not str and not isinstance(k, (str, bytes)):
        raise ProtocolError(
            f"frame {r.index}: msgpack map key at offset {kat} is "
            f"{type_name(k)}, not str or bytes",
            r.index,
            kat,
        )
    return k


cdef object r_map(Reader* r, uint64_t n, int depth, Py_ssize_t at, object frame):
    r_depth(r, depth, at)
    r_container_size(r, n, 2, at, "map")
    r_count(r, at)
    cdef dict out = _PyDict_NewPresized(<Py_ssize_t>n)
    cdef Py_ssize_t i
    for i in range(<Py_ssize_t>n):
        k = r_map_key(r, depth, frame)
        PyDict_SetItem(out, k, r_value(r, depth + 1, frame))
    if r.v1:
        if b"nd" in out:
            return r_numpy_value(r, out, at, frame)
        if b"complex" in out:
            return r_complex_value(r, out, at)
        for key, value in out.items():
            if type(value) is _Bin:
                out[key] = r_materialize(r, <_Bin>value)
    return out


cdef object r_numpy_value(Reader* r, dict m, Py_ssize_t at, object frame):
    """msgpack_numpy's map -> a view on the frame (array) or a numpy scalar."""
    nd = m[b"nd"]
    name = m.get(b"type")
    if type(name) is _Bin:
        name = r_materialize(r, <_Bin>name)
    data = m.get(b"data")
    if type(nd) is not bool or name is None or type(data) is not _Bin:
        raise ProtocolError(
            f"frame {r.index}: malformed msgpack_numpy map at offset {at}", r.index, at
        )
    kind = m.get(b"kind", b"")
    if type(kind) is _Bin:
        kind = r_materialize(r, <_Bin>kind)
    if not isinstance(kind, (bytes, str)):
        raise ProtocolError(
            f"frame {r.index}: malformed msgpack_numpy map at offset {at}", r.index, at
        )
    if kind != b"":
        raise UnsupportedDtypeError(
            f"frame {r.index}: msgpack_numpy kind {kind!r} (object or structured "
            f"dtype) is not supported",
            r.index,
            at,
            dtype=name,
        )
    dt = _dtype(name, r.index)
    cdef _Bin bd = <_Bin>data
    if nd:
        shape, count = shape_count(m.get(b"shape"), r.index)
        check_nbytes(shape, count, dt, bd.length, r.index, "numpy array")
        return _view(shape, dt, frame, bd.start, count)
    check_nbytes((), 1, dt, bd.length, r.index, "numpy scalar")
    return _frombuffer(frame, dt, 1, bd.start)[0]


cdef object r_complex_value(Reader* r, dict m, Py_ssize_t at):
    data = m.get(b"data")
    if isinstance(data, str):
        try:
            return complex(data)
        except ValueError:
            pass
    raise ProtocolError(
        f"frame {r.index}: malformed msgpack_numpy complex at offset {at}", r.index, at
    )


cdef object r_top(Reader* r, object frame):
    v = r_value(r, 0, frame)
    if r.v1 and type(v) is _Bin:
        v = r_materialize(r, <_Bin>v)
    r_check_end(r)
    return v


cdef int r_check_end(Reader* r) except -1:
    """The frame must hold exactly one msgpack value."""
    if r.pos != r.end:
        raise ProtocolError(
            f"frame {r.index}: {r.end - r.pos} bytes of extra data after the "
            f"msgpack value, at offset {r.pos}",
            r.index,
            r.pos,
        )
    return 0


# The payload map of a source has the same keys in the same order in every train.  The
# keys of the last payload of each source are remembered (_Tmpl: the keys as a tuple, and
# a dict of those keys with None values).  A payload whose keys all equal the template's,
# in order, is decoded into a copy of that dict (CPython copies a dict's key table in one
# go) whose values are then replaced: no hashing of keys, no dict growth or insertion.  At
# the first key that differs, the decode of that map starts again the general way, where
# each key is still compared with the template's key at the same position before the
# string cache is probed.  Only compact ASCII str entries are compared byte for byte, so a
# template can never produce a different key than decoding would.
#
# A payload template also remembers the last train's values that are immutable scalars
# (int, float, bool, None, and str or bytes whose key and value take at most SPAN_MAX
# bytes): ``proto`` holds them, ``raw`` the bytes each was decoded from (its key included),
# ``spans`` where.  A key/value pair whose bytes equal the remembered ones decodes to an
# equal value, so the copy of ``proto`` already holds the right object: nothing to decode,
# allocate or set.  Any other value is decoded and set.  Mutable values (lists, maps) are
# never shared: ``proto`` holds None for them and they are decoded every time.  A value
# seen to change (a train id) is not remembered again by that template, so the templates
# of a source are remade at most once per key while its keys stay the same.  A template
# is never changed once made; when values changed, the decode that saw them makes a new
# one and puts it in place of the old (so concurrent decodes of one source never see a
# half-made template).  ``raw`` is at most RAW_MAX bytes per source.
#
# Templates outlive the messages they were made from, so what they keep is bounded: a
# template costs an estimated TEMPLATE_KEY_COST bytes per key plus the keys' lengths; a
# map that would cost more than TEMPLATE_MAX gets no template (it is decoded the general
# way every time), and when all templates together would cost more than TEMPLATE_BUDGET
# (or there are TEMPLATE_SOURCES of them) they are all forgotten.  Without that, payloads
# of many short keys, one source per message, kept some 130 bytes per key for good.
DEF TEMPLATE_SOURCES = 1024
DEF TEMPLATE_KEY_COST = 128
DEF TEMPLATE_MAX = 4 << 20
DEF TEMPLATE_BUDGET = 64 << 20
DEF SPAN_MAX = 256
DEF RAW_MAX = 16384
DEF STACK_KEYS = 64
cdef dict _key_templates = {}
cdef Py_ssize_t _template_total = 0     # the cost of the templates in _key_templates
cdef object _meta_template = None


@cython.final
cdef class _Tmpl:
    cdef tuple keys
    cdef dict proto
    cdef bytes raw            # the remembered values' bytes; None: not made from a payload
                              # with value memory yet; empty: no value to remember
    cdef Py_ssize_t* spans    # per key: (offset in raw, length), length -1: not remembered
    cdef Py_ssize_t cost      # estimated bytes the template keeps alive (keys)

    def __dealloc__(self):
        PyMem_Free(self.spans)


cdef _Tmpl _make_template(dict m):
    """The template of map ``m``, or None if it would cost more than TEMPLATE_MAX."""
    cdef Py_ssize_t cost = TEMPLATE_KEY_COST * len(m)
    if cost > TEMPLATE_MAX:
        return None
    for k in m:
        cost += len(k)          # str or bytes
        if cost > TEMPLATE_MAX:
            return None
    cdef _Tmpl t = _Tmpl.__new__(_Tmpl)
    t.keys = tuple(m)
    t.proto = dict.fromkeys(t.keys)
    t.cost = cost
    return t


cdef int _put_template(object source, _Tmpl t) except -1:
    """Make ``t`` (None: none) the template of ``source``, within TEMPLATE_BUDGET."""
    global _template_total
    old = _key_templates.pop(source, None)
    if old is not None:
        _template_total -= (<_Tmpl>old).cost
    if t is None:
        return 0
    if (len(_key_templates) >= TEMPLATE_SOURCES
            or _template_total + t.cost > TEMPLATE_BUDGET):
        _key_templates.clear()
        _template_total = 0
    _key_templates[source] = t
    _template_total += t.cost
    return 0


cdef inline bint _shareable(object v):
    """An immutable scalar, which one decoded value may stand for in every train."""
    cdef type t = type(v)
    return (t is float or t is int or t is str or t is bool or t is bytes
            or v is None)


cdef object r_payload_reuse(Reader* r, Py_ssize_t n, object frame, _Tmpl t,
                            Py_ssize_t* cur, bint* changed):
    """Decode a payload map of ``n`` keys into a copy of template ``t`` (which has ``n``
    keys), taking the values whose bytes are the remembered ones from ``t``: the dict, or
    None at the first key that is not the template's (``r.pos`` is then somewhere inside
    the map).  ``cur`` receives, per key, (offset in the frame, length of key and value;
    -1 if the value is not to be remembered); ``*changed`` says whether a new template is
    due (``t`` remembered nothing yet, or one of its values changed).

    r_payload_map's copy-first loop is the same loop without the value memory; merged
    into one function with the memory optional, both paths measured 3-5 % slower."""
    cdef dict out = PyDict_Copy(t.proto)
    cdef Py_ssize_t i, kat, klen, ln
    cdef const Py_ssize_t* spans = t.spans
    cdef const uint8_t* raw = NULL
    cdef PyObject* cand
    cdef tuple keys = t.keys
    if t.raw is not None:
        raw = <const uint8_t*>PyBytes_AS_STRING(t.raw)
    for i in range(n):
        kat = r.pos
        cur[2 * i] = kat
        if raw != NULL:
            ln = spans[2 * i + 1]
            if ln > 0:
                if r.end - kat >= ln and memcmp(r.buf + kat, raw + spans[2 * i], ln) == 0:
                    r.pos = kat + ln
                    cur[2 * i + 1] = ln
                    continue
                changed[0] = True   # a remembered value changed: not remembered again
            cur[2 * i + 1] = -1
        cand = PyTuple_GET_ITEM(keys, i)
        if kat >= r.end or not _key_matches(r, kat, cand, &klen):
            return None
        r.pos = kat + 1 + klen
        v = r_value(r, 1, frame)
        PyDict_SetItem(out, <object>cand, v)
        if raw == NULL:
            changed[0] = True
            ln = r.pos - kat
            cur[2 * i + 1] = ln if ln <= SPAN_MAX and _shareable(v) else -1
    return out


cdef int _remember_values(object source, _Tmpl t, dict out, const uint8_t* buf,
                          Py_ssize_t* cur, Py_ssize_t n) except -1:
    """Put a template with the values of ``out`` (decoded from ``buf``; ``cur`` as
    r_payload_reuse filled it) in place of ``t``."""
    cdef Py_ssize_t i, total = 0, at = 0
    cdef _Tmpl nt = _Tmpl.__new__(_Tmpl)
    cdef char* dst
    nt.keys = t.keys
    nt.cost = t.cost
    for i in range(n):
        if cur[2 * i + 1] > 0:
            if total + cur[2 * i + 1] > RAW_MAX:
                cur[2 * i + 1] = -1
            else:
                total += cur[2 * i + 1]
    nt.spans = <Py_ssize_t*>PyMem_Malloc(2 * n * sizeof(Py_ssize_t))
    if nt.spans == NULL:
        raise MemoryError()
    nt.raw = PyBytes_FromStringAndSize(NULL, total)
    dst = PyBytes_AS_STRING(nt.raw)
    nt.proto = PyDict_Copy(out)
    for i in range(n):
        if cur[2 * i + 1] > 0:
            memcpy(dst + at, buf + cur[2 * i], cur[2 * i + 1])
            nt.spans[2 * i] = at
            nt.spans[2 * i + 1] = cur[2 * i + 1]
            at += cur[2 * i + 1]
        else:
            nt.spans[2 * i] = 0
            nt.spans[2 * i + 1] = -1
            PyDict_SetItem(nt.proto, <object>PyTuple_GET_ITEM(nt.keys, i), None)
    _put_template(source, nt)
    return 0


cdef inline bint _key_matches(Reader* r, Py_ssize_t kat, PyObject* cand, Py_ssize_t* klen):
    """Is the fixstr key at ``kat`` the compact ASCII str ``cand``? (*klen: its length)

    ``cand`` comes from a template and may be any key type (a bytes key of an earlier
    payload): only an exact ``str`` may be looked at as a unicode object."""
    cdef uint8_t b = r.buf[kat]
    if (b & 0xE0) != 0xA0:
        klen[0] = -1
        return False
    klen[0] = b & 0x1F
    return (r.end - kat - 1 >= klen[0] and PyUnicode_CheckExact(cand)
            and PyUnicode_IS_COMPACT_ASCII(cand)
            and PyUnicode_GET_LENGTH(cand) == klen[0]
            and _same_bytes(<const uint8_t*>PyUnicode_DATA(cand), r.buf + kat + 1, klen[0]))


cdef object r_payload_map(Reader* r, uint64_t n, int depth, object frame, object tmpl,
                          bint* missed, bint copy_first):
    cdef Py_ssize_t at = r.pos - 1 if depth else 0
    r_container_size(r, n, 2, at, "map")
    r_count(r, at)
    cdef dict out
    cdef Py_ssize_t i, kat, klen, nt = 0, start = r.pos
    r.mark = r.left     # in the reader, not a local: one more live value slows the loop
    cdef PyObject* cand
    cdef tuple keys = None
    if tmpl is not None:
        keys = (<_Tmpl>tmpl).keys
        nt = len(keys)
        if copy_first and nt == <Py_ssize_t>n and nt > 0:
            out = PyDict_Copy((<_Tmpl>tmpl).proto)
            for i in range(nt):
                kat = r.pos
                cand = PyTuple_GET_ITEM(keys, i)
                if kat >= r.end or not _key_matches(r, kat, cand, &klen):
                    break
                r.pos = kat + 1 + klen
                PyDict_SetItem(out, <object>cand, r_value(r, depth + 1, frame))
            else:
                return out
            r.pos = start      # a key differs: decode this map again, the general way
            r.left = r.mark
    out = _PyDict_NewPresized(<Py_ssize_t>n)
    for i in range(<Py_ssize_t>n):
        kat = r.pos
        if kat < r.end and i < nt:
            cand = PyTuple_GET_ITEM(keys, i)
            if _key_matches(r, kat, cand, &klen):
                r.pos = kat + 1 + klen
                PyDict_SetItem(out, <object>cand, r_value(r, depth + 1, frame))
                continue
        missed[0] = True
        k = r_map_key(r, depth, frame)
        PyDict_SetItem(out, k, r_value(r, depth + 1, frame))
    if <Py_ssize_t>n != nt:
        missed[0] = True
    return out


cdef object decode_payload(object frame, Py_ssize_t index, object source, Budget* budget):
    """decode_frame for a 2.x payload: a map decoded with the source's key template."""
    cdef Py_buffer view
    cdef Reader r
    cdef uint8_t b
    cdef uint64_t n
    cdef bint missed = False
    cdef Py_ssize_t start, left
    get_frame_buffer(frame, &view, index)
    try:
        r_init(&r, &view, index, False, budget)
        if r.end < 1:
            return r_top(&r, frame)         # raises TruncatedFrameError
        b = r.buf[0]
        if (b & 0xF0) == 0x80:
            n = b & 0x0F
            r.pos = 1
        elif b == 0xDE and r.end >= 3:
            n = (<uint64_t>r.buf[1] << 8) | r.buf[2]
            r.pos = 3
        else:
            return r_top(&r, frame)         # not a map: generic path (and its errors)
        tmpl = _key_templates.get(source)
        if (tmpl is not None and n > 0 and PyTuple_GET_SIZE((<_Tmpl>tmpl).keys) == <Py_ssize_t>n
                and ((<_Tmpl>tmpl).raw is None or PyBytes_GET_SIZE((<_Tmpl>tmpl).raw) > 0)):
            start = r.pos
            left = r.left
            out = _decode_reuse(&r, <Py_ssize_t>n, frame, <_Tmpl>tmpl, source)
            if out is not None:
                return out
            r.pos = start       # a key differs: decode the map again, the general way
            r.left = left
            missed = True
        out = r_payload_map(&r, n, 0, frame, tmpl, &missed, not missed)
        r_check_end(&r)
        if missed and n > 0:
            _put_template(source, _make_template(<dict>out))
        return out
    finally:
        r_done(&r)
        PyBuffer_Release(&view)


cdef object _decode_reuse(Reader* r, Py_ssize_t n, object frame, _Tmpl t, object source):
    """r_payload_reuse, then the end check, then the new template if values changed."""
    cdef Py_ssize_t stack[2 * STACK_KEYS]
    cdef Py_ssize_t* cur = stack
    cdef bint changed = False
    r_container_size(r, n, 2, 0, "map")    # the general path's first checks (same errors)
    r_count(r, 0)
    if n > STACK_KEYS:
        cur = <Py_ssize_t*>PyMem_Malloc(2 * n * sizeof(Py_ssize_t))
        if cur == NULL:
            raise MemoryError()
    try:
        out = r_payload_reuse(r, n, frame, t, cur, &changed)
        if out is None:
            return None
        r_check_end(r)
        if changed:
            _remember_values(source, t, <dict>out, r.buf, cur, n)
        return out
    finally:
        if cur != stack:
            PyMem_Free(cur)


cdef int get_frame_buffer(object frame, Py_buffer* view, Py_ssize_t index) except -1:
    """Borrow the bytes of any C-contiguous buffer (bytes, zmq.Frame, memoryview...)."""
    try:
        PyObject_GetBuffer(frame, view, PyBUF_SIMPLE)
    except TypeError:
        raise TypeError(
            f"frame {index}: expected a bytes-like object, got {type_name(frame)}"
        ) from None
    except (BufferError, ValueError):
        raise TypeError(f"frame {index}: buffer is not C-contiguous") from None
    return 0


cdef object decode_frame(object frame, Py_ssize_t index, bint v1, Budget* budget):
    """Decode the single msgpack value in one frame."""
    cdef Py_buffer view
    cdef Reader r
    get_frame_buffer(frame, &view, index)
    try:
        r_init(&r, &view, index, v1, budget)
        return r_top(&r, frame)
    finally:
        r_done(&r)
        PyBuffer_Release(&view)


def unpackb(buf, *, max_containers=None):
    """Decode one msgpack value that fills *buf* exactly (``raw=False``: str -> str, bin ->
    bytes).  Ext types are refused; map keys must be str or bytes; at most
    ``max_containers`` maps and arrays (default :data:`MAX_CONTAINERS`), else
    :class:`~kbstream.errors.AmplificationError`."""
    cdef Budget budget
    budget.limit = container_limit(max_containers)
    budget.left = budget.limit
    return decode_frame(buf, 0, False, &budget)


# ---------------------------------------------------------------------------------------
# protocol

cdef object _source_meta(object metadata, object src, object props, object ts):
    m = None
    if metadata is not None:
        m = (<dict>metadata).get(src) if type(metadata) is dict else metadata.get(src)
    if m is None:
        m = (<dict>props).get("metadata", {}) if type(props) is dict else props.get(
            "metadata", {})
    if ts is not None and "timestamp" not in m:
        m = dict(m)
        m.update(ts)
    elif type(m) is not dict:
        m = dict(m)
    return m


# Protocol 1.0 frames of 1 MiB and more live in memory recycled through a small pool: a
# fresh multi-MiB allocation is an mmap whose page faults cost more than the copy itself
# (134 MB JF4M train: ~75 ms fresh, ~20 ms warm).  A block goes back to the pool when its
# Buffer is deallocated, i.e. when zmq has sent it and nobody holds a view on it; at most
# POOL_SLOTS blocks are kept.  Smaller frames are plain bytes.
DEF POOL_SLOTS = 2
DEF POOL_MIN = 1 << 20
cdef char* _pool_ptr[POOL_SLOTS]
cdef Py_ssize_t _pool_cap[POOL_SLOTS]


cdef char* _pool_take(Py_ssize_t n, Py_ssize_t* cap) except NULL:
    cdef int i, best = -1
    for i in range(POOL_SLOTS):
        if _pool_ptr[i] != NULL and n <= _pool_cap[i] <= 2 * n:
            if best < 0 or _pool_cap[i] < _pool_cap[best]:
                best = i
    cdef char* p
    if best >= 0:
        p = _pool_ptr[best]
        cap[0] = _pool_cap[best]
        _pool_ptr[best] = NULL
        return p
    p = <char*>malloc(n)
    if p == NULL:
        raise MemoryError()
    cap[0] = n
    return p


cdef int _pool_next = 0


cdef void _pool_give(char* p, Py_ssize_t cap) noexcept:
    """Keep a freed block; when the pool is full the oldest kept block is freed."""
    global _pool_next
    cdef int i
    for i in range(POOL_SLOTS):
        if _pool_ptr[i] == NULL:
            _pool_ptr[i] = p
            _pool_cap[i] = cap
            return
    i = _pool_next
    _pool_next = (_pool_next + 1) % POOL_SLOTS
    free(_pool_ptr[i])
    _pool_ptr[i] = p
    _pool_cap[i] = cap


def release_pool():
    """Free the recycled protocol 1.0 frame memory (it is otherwise kept for reuse);
    returns the number of blocks freed."""
    cdef int i, freed = 0
    for i in range(POOL_SLOTS):
        if _pool_ptr[i] != NULL:
            free(_pool_ptr[i])
            _pool_ptr[i] = NULL
            freed += 1
    return freed


@cython.final
cdef class Buffer:
    """A read-only bytes-like protocol 1.0 frame whose memory is recycled when freed.

    Supports the buffer protocol (``bytes(buf)``, ``memoryview(buf)``,
    ``send_multipart([buf], copy=False)``, ``np.frombuffer``) and ``len()``.
    """
    cdef char* data
    cdef Py_ssize_t size
    cdef Py_ssize_t cap

    def __dealloc__(self):
        if self.data != NULL:
            _pool_give(self.data, self.cap)
            self.data = NULL

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.size, 1, flags)

    def __len__(self):
        return self.size

    def __repr__(self):
        return f"<kbstream Buffer of {self.size} bytes>"


cdef object _assemble_v1(Writer* w, _Chunks chunks):
    """One frame of the exact size: writer pieces interleaved with array bytes."""
    cdef Py_ssize_t total = w.len
    cdef Py_ssize_t i, n = len(chunks.arrays), prev = 0, cut
    cdef Py_buffer view
    cdef Buffer buf
    cdef bytes out
    cdef char* dst
    for a in chunks.arrays:
        total += PyMemoryView_GET_BUFFER(a).len
    if total >= POOL_MIN:
        buf = Buffer.__new__(Buffer)
        buf.data = _pool_take(total, &buf.cap)
        buf.size = total
        dst = buf.data
        result = buf
    else:
        out = PyBytes_FromStringAndSize(NULL, total)
        dst = PyBytes_AS_STRING(out)
        result = out
    for i in range(n):
        cut = chunks.cuts[i]
        memcpy(dst, w.buf + prev, cut - prev)
        dst += cut - prev
        prev = cut
        PyObject_GetBuffer(chunks.arrays[i], &view, PyBUF_SIMPLE)
        try:
            if view.len >= _COPY_NOGIL:
                with nogil:
                    memcpy(dst, view.buf, view.len)
            else:
                memcpy(dst, view.buf, view.len)
            dst += view.len
        finally:
            PyBuffer_Release(&view)
    memcpy(dst, w.buf + prev, w.len - prev)
    return result


def serialize(data, metadata=None, protocol_version="2.2", dummy_timestamps=False):
    """Encode one train as a list of frames (see the module docstring for the format).

    Parameters
    ----------
    data : dict
        ``{source: {flat key: value}}``; values are msgpack-able Python objects, numpy
        scalars or numpy arrays.
    metadata : dict, optional
        ``{source: {...}}``; default (and for sources it lacks): each source's own
        ``'metadata'`` entry, else ``{}``.
    protocol_version : {'2.2', '1.0'}
    dummy_timestamps : bool
        Add ``timestamp``, ``timestamp.sec``, ``timestamp.frac`` from the current time to
        the metadata of sources that have no ``timestamp``.

    Returns
    -------
    list
        2.2: ``bytes`` headers and payloads, ``memoryview`` array frames sharing the
        arrays' memory (ready for ``send_multipart(frames, copy=False)``).  1.0: one
        ``bytes`` frame holding exactly one copy of each array.
    """
    if protocol_version != "2.2" and protocol_version != "1.0":
        raise ValueError(f"Unknown protocol version {protocol_version}")
    ts = make_dummy_timestamps() if dummy_timestamps else None
    cdef Writer w
    cdef _Chunks chunks
    cdef list frames, arrays
    cdef Py_ssize_t start, end, nmain, i
    cdef type vt
    if protocol_version == "1.0":
        train = {}
        for src, props in data.items():
            if not isinstance(props, dict):
                raise EncodeError(f"source {src!r}: expected a dict, got {type_name(props)}")
            d = dict(props)
            d["metadata"] = _source_meta(metadata, src, props, ts)
            train[src] = d
        chunks = _Chunks()
        w_init(&w, 4096)
        try:
            w_obj(&w, train, True, 0, chunks)
            return [_assemble_v1(&w, chunks)]
        finally:
            w_free(&w)

    frames = []
    w_init(&w, 1024)
    try:
        for src in (sorted(data) if len(data) > 1 else list(data)):
            props = data[src]
            if not isinstance(props, dict):
                raise EncodeError(f"source {src!r}: expected a dict, got {type_name(props)}")
            # header
            w.len = 0
            w_lit(&w, b"\x83\xa6source")
            w_obj(&w, src, False, 1, None)
            w_lit(&w, b"\xa7content\xa7msgpack\xa8metadata")
            w_obj(&w, _source_meta(metadata, src, props, ts), False, 1, None)
            frames.append(w_bytes(&w, 0))
            # payload: non-array values; the map header is written last, in front of the
            # entries, once their number is known (5 bytes are kept free for it)
            arrays = []
            nmain = 0
            w.len = 5
            # a dict subclass (OrderedDict after move_to_end, an overridden items()) is
            # walked through its own items(), as in _pure
            # Errors in _pure's order: an array's dtype is checked where the array comes in
            # the iteration, the other values are packed after it (their first error is
            # raised once every array has been checked).
            value_error = None
            for key, value in ((<dict>props).items() if type(props) is dict
                               else props.items()):
                vt = type(value)
                if vt is _ndarray or (vt is not float and vt is not int and vt is not str
                                           and vt is not bool and isinstance(value, _ndarray)):
                    arrays.append(key)
                    arrays.append(value)
                    arrays.append(_wire_dtype(<object>cnp.PyArray_DESCR(<cnp.ndarray>value),
                                              key, src))
                elif value_error is None:
                    try:
                        w_obj(&w, key, False, 1, None)
                        w_obj(&w, value, False, 1, None)
                    except EncodeError as e:
                        value_error = e
                    nmain += 1
            if value_error is not None:
                raise value_error
            end = w.len
            if nmain <= 15:
                start = 4
            elif nmain < 0x10000:
                start = 2
            else:
                start = 0
            w.len = start
            w_map_header(&w, nmain)
            w.len = end
            frames.append(w_bytes(&w, start))
            for i in range(0, len(arrays), 3):
                key = arrays[i]
                dtb = arrays[i + 2]
                arr, frame = _array_frame(arrays[i + 1])
                w.len = 0
                w_lit(&w, b"\x85\xa6source")
                w_obj(&w, src, False, 1, None)
                w_lit(&w, b"\xa7content\xa5array\xa4path")
                w_obj(&w, key, False, 1, None)
                w_lit(&w, b"\xa5dtype")
                w_lit(&w, dtb)
                w_lit(&w, b"\xa5shape")
                w_shape(&w, <cnp.ndarray>arr)
                frames.append(w_bytes(&w, 0))
                frames.append(frame)
    finally:
        w_free(&w)
    return frames


cdef tuple _deserialize_v1(frame, Budget* budget):
    cdef Py_buffer view
    get_frame_buffer(frame, &view, 0)
    try:
        if view.len >= 7 and memcmp(view.buf, <const char*>_ERROR_PREFIX, 7) == 0:
            text = (<const char*>view.buf)[:view.len].decode("utf-8", "replace")
            raise ServerError(f"server replied {text!r}", 0)
    finally:
        PyBuffer_Release(&view)
    train = decode_frame(frame, 0, True, budget)
    if not isinstance(train, dict):
        raise ProtocolError("frame 0: a protocol 1.0 message must be a msgpack map", 0)
    meta = {}
    for src, props in train.items():
        if not isinstance(props, dict):
            raise ProtocolError(
                f"frame 0: protocol 1.0 source {src!r} is {type_name(props)}, not a map", 0
            )
        m = props.get("metadata", {})
        if not isinstance(m, dict):
            raise ProtocolError(f"frame 0: metadata of source {src!r} is not a map", 0)
        meta[src] = m
    return train, meta



# ---------------------------------------------------------------------------------------
# fast path for the 2.x headers karabo_bridge writes: a fixmap with fixstr keys among
# source, content, metadata, path, dtype, shape.  It builds no dict.  On anything else,
# valid or not, it gives up (returns 0) and the generic path decodes the frame, so every
# error is raised by the generic path with the same message as in _pure.

cdef class _Hdr:
    cdef object source
    cdef object metadata
    cdef object path
    cdef object dtype
    cdef object shape
    cdef int content          # 1 msgpack, 2 array
    cdef Py_ssize_t count     # items of the shape, -1 if it overflows


cdef inline bint _key_is(const uint8_t* p, Py_ssize_t n, const char* name, Py_ssize_t m):
    return n == m and memcmp(p, name, m) == 0


cdef int _fast_header(const Py_buffer* view, object frame, Py_ssize_t index, _Hdr h,
                      Budget* budget) except -1:
    """Parse the header in ``view`` (borrowed from ``frame`` by the caller).  Takes the
    header's containers from ``budget`` only when it succeeds; when it gives up, the
    generic path decodes the header (and raises any error)."""
    global _meta_template
    cdef Reader r
    cdef const uint8_t* p
    cdef Py_ssize_t nkeys, k, klen, j, nd
    cdef uint8_t b
    cdef int seen = 0, bit
    cdef uint64_t d
    cdef Py_ssize_t c
    cdef int ok = 0
    cdef bint missed
    r_init(&r, view, index, False, budget)
    if r.end < 1 or (r.buf[0] & 0xF0) != 0x80:
        return 0
    nkeys = r.buf[0] & 0x0F
    r.pos = 1
    if nkeys * 2 > r.end - r.pos or r.left < 1:
        return 0
    r.left -= 1               # the header map
    h.metadata = None
    h.path = None
    h.dtype = None
    h.shape = None
    h.content = 0
    for k in range(nkeys):
        if r.pos >= r.end:
            return 0
        b = r.buf[r.pos]
        if (b & 0xE0) != 0xA0:
            return 0
        klen = b & 0x1F
        if r.end - r.pos - 1 < klen + 1:
            return 0
        p = r.buf + r.pos + 1
        r.pos += 1 + klen
        b = r.buf[r.pos]       # first byte of the value (bounds checked above)
        if _key_is(p, klen, "source", 6):
            bit = 1
            if (b & 0xE0) != 0xA0 and b != 0xD9:
                return 0
        elif _key_is(p, klen, "content", 7):
            bit = 2
            if (b & 0xE0) != 0xA0:
                return 0
        elif _key_is(p, klen, "metadata", 8):
            bit = 4
            if (b & 0xF0) != 0x80 and b != 0xDE and b != 0xDF:
                return 0
        elif _key_is(p, klen, "path", 4):
            bit = 8
            if (b & 0xE0) != 0xA0 and b != 0xD9:
                return 0
        elif _key_is(p, klen, "dtype", 5):
            bit = 16
            if (b & 0xE0) != 0xA0:
                return 0
        elif _key_is(p, klen, "shape", 5):
            bit = 32
            if (b & 0xF0) != 0x90:
                return 0
        else:
            return 0
        if seen & bit:
            return 0
        seen |= bit
        if bit == 2:
            klen = b & 0x1F
            if r.end - r.pos - 1 < klen:
                return 0
            p = r.buf + r.pos + 1
            if _key_is(p, klen, "msgpack", 7):
                h.content = 1
            elif _key_is(p, klen, "array", 5):
                h.content = 2
            else:
                return 0
            r.pos += 1 + klen
        elif bit == 32:
            nd = b & 0x0F
            if r.left < 1:
                return 0
            r.left -= 1           # the shape array
            r.pos += 1
            shape = PyTuple_New(nd)
            c = 1
            for j in range(nd):
                if r.pos >= r.end:
                    return 0
                b = r.buf[r.pos]
                if b <= 0x7F:
                    d = b
                    r.pos += 1
                elif b >= 0xCC and b <= 0xCF:
                    r.pos += 1
                    if r.end - r.pos < (1 << (b - 0xCC)):
                        return 0
                    d = r_be(&r, 1 << (b - 0xCC), r.pos)
                    if d >= (<uint64_t>1 << 62):
                        return 0
                else:
                    return 0
                v = PyLong_FromUnsignedLongLong(d)
                Py_INCREF(v)
                PyTuple_SET_ITEM(shape, j, v)
                if c >= 0:
                    if d != 0 and <uint64_t>c > <uint64_t>PY_SSIZE_T_MAX // d:
                        c = -1
                    else:
                        c *= <Py_ssize_t>d
            if c < 0:
                return 0
            h.shape = shape
            h.count = c
        else:
            try:
                if bit == 4 and (b & 0xF0) == 0x80:
                    # metadata: the same keys for every source and train
                    r.pos += 1
                    missed = False
                    v = r_payload_map(&r, b & 0x0F, 1, frame, _meta_template, &missed, True)
                    if missed:
                        _meta_template = _make_template(v)
                else:
                    v = r_value(&r, 1, frame)
            except ProtocolError:
                return 0
            if bit == 1:
                h.source = v
            elif bit == 4:
                h.metadata = v
            elif bit == 8:
                h.path = v
            else:
                h.dtype = v
    if r.pos != r.end or not (seen & 1) or not (seen & 2):
        return 0
    if h.content == 1:
        ok = (seen & ~7) == 0
    else:
        ok = seen == (1 | 2 | 8 | 16 | 32)
    if ok:
        r_done(&r)
    return ok


# Array headers repeat byte for byte in every train (same source, path, dtype, shape), so
# the parsed result of a valid one is remembered in a small direct-mapped table keyed by
# its bytes.  Entries hold only immutable objects (str, np.dtype, tuple); a hit is checked
# by length and memcmp, so a different header can never be served a stale entry.  Touched
# only with the GIL held and without calling back into Python: no lock needed.
DEF HDR_MEMO_SIZE = 256
DEF HDR_MEMO_MAXLEN = 512


@cython.final
cdef class _ArrHdr:
    cdef bytes raw
    cdef object source
    cdef object path
    cdef object dt
    cdef object shape
    cdef Py_ssize_t count


cdef list _hdr_memo = [None] * HDR_MEMO_SIZE


cdef _ArrHdr _memo_find(const Py_buffer* view, Py_ssize_t* slot):
    """The remembered array header equal to the bytes of ``view``, or None (*slot: where
    it goes, -1 if it is not to be remembered)."""
    cdef _ArrHdr e
    slot[0] = -1
    # an array header is a map of 5 (source, content, path, dtype, shape); msgpack
    # headers (2 or 3 keys) carry per-train metadata and are never remembered
    if (view.len > HDR_MEMO_MAXLEN or view.len == 0
            or (<const uint8_t*>view.buf)[0] != 0x85):
        return None
    slot[0] = <Py_ssize_t>(_bytes_hash(<const uint8_t*>view.buf, view.len) % HDR_MEMO_SIZE)
    o = _hdr_memo[slot[0]]
    if o is None:
        return None
    e = <_ArrHdr>o
    if (PyBytes_GET_SIZE(e.raw) == view.len
            and memcmp(PyBytes_AS_STRING(e.raw), view.buf, view.len) == 0):
        return e
    return None


cdef int _memo_store(object frame, Py_ssize_t slot, _Hdr h, dt) except -1:
    if slot < 0:
        return 0
    cdef _ArrHdr e = _ArrHdr.__new__(_ArrHdr)
    e.raw = bytes(frame)
    e.source = h.source
    e.path = h.path
    e.dt = dt
    e.shape = h.shape
    e.count = h.count
    _hdr_memo[slot] = e
    return 0


cdef object _props_of(dict data, object source, Py_ssize_t i):
    props = data.get(source)
    if props is None:
        raise ProtocolError(
            f"frame {i}: array for source {source!r} comes before its msgpack part", i
        )
    return props


cdef int _add_array(dict props, object path, object dt, object shape, Py_ssize_t count,
                    object frame, Py_ssize_t i) except -1:
    """props[path] = view of frame i + 1 (validated against dtype and shape)."""
    cdef Py_buffer view
    cdef Py_ssize_t nbytes, itemsize, items
    cdef bint fixed = _fixed_frame(frame, shape)
    get_frame_buffer(frame, &view, i + 1)
    try:
        nbytes = view.len
        itemsize = (<cnp.dtype>dt).itemsize   # C field, not a getattr
        items = nbytes // itemsize
        if count <= 0 or count > items or count * itemsize != nbytes:
            check_nbytes(shape, shape_count(shape, i)[1], dt, nbytes, i + 1,
                          f"array {path!r}")
        if fixed:
            props[path] = _fixed_view(<tuple>shape, dt, frame, &view, 0, items)
    finally:
        PyBuffer_Release(&view)
    if not fixed:   # exported while the array lives (see _view)
        props[path] = _frombuffer(memoryview(frame), dt, items, 0).reshape(shape)
    return 0


def deserialize(frames, *, max_containers=None):
    """Decode one message (list of frames) into ``(data, meta)``, both keyed by source.

    Accepts protocol 1.0 (one frame) and 2.0 / 2.1 / 2.2 (header / payload pairs).  Frames
    may be ``zmq.Frame``, ``bytes``, ``bytearray``, ``memoryview`` or any C-contiguous
    buffer.  Arrays are views on the frames (no copy); they keep the frames alive.  Every
    call returns new dicts and lists; an immutable scalar (int, float, str, bytes) that
    repeats from a source's previous train may be the object returned then.

    ``karabo_bridge.deserialize``'s signature, plus one keyword: ``max_containers``
    bounds the msgpack maps and arrays decoded from the whole message (every frame,
    every depth); None: :data:`MAX_CONTAINERS` (1 << 20, some 200 MiB of dicts at most;
    ``karabo_bridge`` has no such bound; ``docs/safety-bridge.md``).  2.0 / 2.1 metadata
    is returned in ``meta`` (the peer returns it empty) and also left in ``data``.

    Raises
    ------
    ProtocolError
        (a ``ValueError``) and its subclasses for every malformed message;
        :class:`~kbstream.errors.AmplificationError` for one container too many.
    TypeError
        if a frame is not a contiguous buffer.
    """
    cdef Budget budget
    if max_containers is None:
        budget.limit = _MAX_CONTAINERS
    else:
        budget.limit = container_limit(max_containers)
    budget.left = budget.limit
    _find_zmq_frame()
    if type(frames) is not list:
        frames = list(frames)
    cdef list fl = <list>frames
    cdef Py_ssize_t n = len(fl), i
    cdef dict data, meta, hdr, payload
    cdef Py_buffer view
    cdef Py_ssize_t count
    if n == 0:
        raise ProtocolError("empty message: no frames")
    if n == 1:
        return _deserialize_v1(fl[0], &budget)
    if n % 2:
        raise ProtocolError(
            f"odd number of frames ({n}): a 2.x message is made of (header, payload) pairs"
        )
    data = {}
    meta = {}
    cdef _Hdr fh = _Hdr.__new__(_Hdr)
    cdef _ArrHdr ah
    cdef Py_ssize_t slot
    cdef bint fast
    for i in range(0, n, 2):
        get_frame_buffer(fl[i], &view, i)
        try:
            ah = _memo_find(&view, &slot)
            if ah is not None and budget.left >= 2:
                budget.left -= 2         # the header map and its shape array
                fast = False
            else:
                ah = None                # (too few left: the paths below raise)
                fast = _fast_header(&view, fl[i], i, fh, &budget)
        finally:
            PyBuffer_Release(&view)
        if ah is not None:
            _add_array(_props_of(data, ah.source, i), ah.path, ah.dt, ah.shape, ah.count,
                       fl[i + 1], i)
            continue
        if fast:
            source = fh.source
            if fh.content == 1:
                p = decode_payload(fl[i + 1], i + 1, source, &budget)
                if type(p) is not dict:
                    raise ProtocolError(f"frame {i + 1}: payload is not a msgpack map", i + 1)
                m = fh.metadata
                if m is None:
                    m = meta_from_payload(<dict>p)
                data[source] = p
                meta[source] = m
            else:
                props = _props_of(data, source, i)
                dt = _dtype(fh.dtype, i)
                _add_array(props, fh.path, dt, fh.shape, fh.count, fl[i + 1], i)
                _memo_store(fl[i], slot, fh, dt)   # source and path are str (fixstr/str8)
            continue
        h = decode_frame(fl[i], i, False, &budget)
        if type(h) is not dict:
            raise ProtocolError(f"frame {i}: header is not a msgpack map", i)
        hdr = <dict>h
        source = header_field(hdr, "source", i, str)
        content = header_field(hdr, "content", i, (str, bytes))
        if content == "msgpack":
            p = decode_frame(fl[i + 1], i + 1, False, &budget)
            if type(p) is not dict:
                raise ProtocolError(f"frame {i + 1}: payload is not a msgpack map", i + 1)
            payload = <dict>p
            if "metadata" in hdr:
                m = hdr["metadata"]
                if type(m) is not dict:
                    raise ProtocolError(f"frame {i}: header 'metadata' is not a map", i)
            else:
                m = meta_from_payload(payload)
            data[source] = payload
            meta[source] = m
        elif content == "array":
            props = _props_of(data, source, i)
            path = header_field(hdr, "path", i, str)
            dt = _dtype(header_field(hdr, "dtype", i, (str, bytes)), i)
            shape = _shape_c(hdr.get("shape"), i, &count)
            _add_array(props, path, dt, shape, count, fl[i + 1], i)
        else:
            raise UnknownContentError(
                f"frame {i}: unknown content {content!r}", i, content=content
            )
    return data, meta
