"""Karabo Hash binary format ("Bin" serializer), pure-Python implementation.

This module is the executable specification of the format and the oracle the
compiled codec (``_codec.pyx``) is tested against: same functions, same
results, same exceptions and messages.

Format summary (all integers little-endian, no header, no padding)::

    Hash   := u32 count, Node * count
    Node   := Key, u32 type, Attrs, Value(type)
    Attrs  := u32 count, (Key, u32 type, Value(type)) * count
    Key    := u8 length, UTF-8 bytes

Values: BOOL/CHAR/INT8/UINT8 1 byte, (U)INT16 2, (U)INT32 4, (U)INT64 8,
FLOAT 4, DOUBLE 8, COMPLEX_* two floats; STRING and VECTOR_CHAR u32 byte
count + bytes; numeric vectors u32 count + elements; VECTOR_STRING u32 count +
(u32 length + bytes) each; HASH a nested Hash (its attributes come before its
content); VECTOR_HASH u32 count + Hashes; SCHEMA u32 length + (u8 length +
root name + Hash); NONE u32 0; VECTOR_NONE u32 count + u32 0 each;
BYTE_ARRAY u32 length + bytes; HASH_POINTER / VECTOR_HASH_POINTER as HASH /
VECTOR_HASH.  An NDArray is a HASH node with attribute ``__classId="NDArray"``
and children data (BYTE_ARRAY), type (INT32), shape (VECTOR_UINT64),
isBigEndian (BOOL); an ImageData a HASH node with ``__classId="ImageData"``.

Multi-buffer form (Karabo's BufferSet): ``encode`` cuts the archive after the
length field of every BYTE_ARRAY and after its payload, so the list alternates
ordinary bytes and payloads (``[bytes, payload, bytes, ..., bytes]``); payloads
are the arrays' own memory.  ``decode`` accepts that list as well as one
buffer, and returns arrays as views on the input.
"""

import struct

import numpy as np

from . import _nodes as N
from . import _values as V
from ._infer import infer_type
from ._types import IMAGEDATA, NDARRAY, VECTOR_DTYPE, WIRE_TYPES, HashType
from .errors import DecodeError, EncodeError, TruncatedError, UnknownTypeError
from .hash import Hash
from .special import ImageData, Schema

__all__ = ["encode", "encode_bytes", "decode", "decode_prefix", "MAX_DEPTH"]

T = HashType
MAX_DEPTH = V.MAX_DEPTH

_U32 = struct.Struct("<I")
_SCALAR_STRUCT = {
    int(T.INT8): struct.Struct("<b"),
    int(T.UINT8): struct.Struct("<B"),
    int(T.INT16): struct.Struct("<h"),
    int(T.UINT16): struct.Struct("<H"),
    int(T.INT32): struct.Struct("<i"),
    int(T.UINT32): struct.Struct("<I"),
    int(T.INT64): struct.Struct("<q"),
    int(T.UINT64): struct.Struct("<Q"),
    int(T.FLOAT): struct.Struct("<f"),
    int(T.DOUBLE): struct.Struct("<d"),
}
_COMPLEX_STRUCT = {int(T.COMPLEX_FLOAT): struct.Struct("<ff"), int(T.COMPLEX_DOUBLE): struct.Struct("<dd")}
_NDARRAY_ATTR = b"\x09__classId" + _U32.pack(T.STRING) + _U32.pack(7) + b"NDArray"
_IMAGEDATA_ATTR = b"\x09__classId" + _U32.pack(T.STRING) + _U32.pack(9) + b"ImageData"


# ---------------------------------------------------------------- encoding


class _Writer:
    __slots__ = ("cur", "chunks")

    def __init__(self):
        self.cur = bytearray()
        self.chunks = []

    def payload(self, mv):
        self.chunks.append(bytes(self.cur))
        self.chunks.append(mv)
        self.cur = bytearray()

    def finish(self):
        self.chunks.append(bytes(self.cur))
        return self.chunks


def _key(out, key):
    if not isinstance(key, str):
        raise EncodeError(f"Hash keys must be str, not {type(key).__name__}")
    try:
        b = key.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(f"key {key!r} is not valid UTF-8") from None
    if len(b) > 255:
        raise EncodeError(f"key {key[:40]!r}... is longer than 255 bytes")
    out.append(len(b))
    out += b


def _write_hash(w, h, depth):
    if depth > MAX_DEPTH:
        raise EncodeError(f"Hash nested deeper than {MAX_DEPTH} levels")
    if not isinstance(h, Hash):
        h = N.as_hash(h, "", int(T.HASH))
    w.cur += _U32.pack(len(h._v))
    types = h._t
    attrs = h._a
    atypes = h._at
    for key, value in h._v.items():
        t = types.get(key)
        if t is None:
            t = infer_type(value)
        a = attrs.get(key)
        _write_node(w, key, value, int(t), (a, atypes.get(key)) if a else None, depth)


def _write_node(w, key, value, t, attrs, depth):
    """Write one node; ``attrs`` is None or (values dict, explicit types dict)."""
    out = w.cur
    _key(out, key)
    if t == NDARRAY:
        if not isinstance(value, np.ndarray):
            raise EncodeError(f"{key!r}: NDArray needs a numpy array")
        out += _U32.pack(T.HASH)
        _write_attrs(w, attrs, _NDARRAY_ATTR, depth)
        _write_ndarray(w, value, depth)
    elif t == IMAGEDATA:
        if not isinstance(value, ImageData):
            raise EncodeError(f"{key!r}: not an ImageData")
        out += _U32.pack(T.HASH)
        _write_attrs(w, attrs, _IMAGEDATA_ATTR, depth)
        children = N.imagedata_children(value)
        w.cur += _U32.pack(len(children))
        for k, v, ct in children:
            _write_node(w, k, v, NDARRAY if ct is None else ct, None, depth + 1)
    else:
        if t not in WIRE_TYPES:
            raise EncodeError(f"{key!r}: {t} is not a Karabo type id")
        out += _U32.pack(t)
        _write_attrs(w, attrs, b"", depth)
        _write_value(w, key, value, t, depth)


def _write_attrs(w, attrs, prefix, depth):
    n = 1 if prefix else 0
    items = []
    if attrs:
        avals, atypes = attrs
        atypes = atypes or {}
        for name, value in avals.items():
            if prefix and name == "__classId":
                continue
            items.append((name, value, atypes.get(name)))
    w.cur += _U32.pack(n + len(items))
    w.cur += prefix
    for name, value, t in items:
        if t is None:
            t = infer_type(value)
        if t == NDARRAY or t == IMAGEDATA:
            raise EncodeError(f"attribute {name!r}: arrays and images cannot be attributes")
        _key(w.cur, name)
        w.cur += _U32.pack(t)
        _write_value(w, name, value, int(t), depth)


def _write_ndarray(w, value, depth):
    arr, et, shape, big = V.ndarray_parts(value)
    out = w.cur
    out += _U32.pack(4)
    # data
    _key(out, "data")
    out += _U32.pack(T.BYTE_ARRAY) + _U32.pack(0)
    mv = memoryview(arr).cast("B") if arr.size else memoryview(b"")
    if len(mv) > 0xFFFFFFFF:
        raise EncodeError("NDArray data is larger than 4 GiB")
    out += _U32.pack(len(mv))
    w.payload(mv)
    out = w.cur
    _key(out, "type")
    out += _U32.pack(T.INT32) + _U32.pack(0) + struct.pack("<i", et)
    _key(out, "shape")
    out += _U32.pack(T.VECTOR_UINT64) + _U32.pack(0) + _U32.pack(len(shape))
    out += struct.pack(f"<{len(shape)}Q", *shape)
    _key(out, "isBigEndian")
    out += _U32.pack(T.BOOL) + _U32.pack(0) + (b"\x01" if big else b"\x00")


def _count(n, key):
    if n > 0xFFFFFFFF:
        raise EncodeError(f"{key!r}: {n} elements or bytes do not fit the u32 size field")
    return _U32.pack(n)


def _write_value(w, key, value, t, depth):
    out = w.cur
    s = _SCALAR_STRUCT.get(t)
    if s is not None:
        if t >= T.FLOAT:
            out += s.pack(V.check_float(value, t, key))
        else:
            out += s.pack(V.check_int(value, t, key))
    elif t == T.BOOL:
        out.append(1 if V.check_bool(value, key) else 0)
    elif t == T.STRING:
        b = V.encode_str(value, key)
        out += _count(len(b), key)
        out += b
    elif t in VECTOR_DTYPE:
        arr = V.vector_array(value, t, key)
        out += _count(arr.size, key)
        out += memoryview(arr).cast("B") if arr.size else b""
    elif t == T.HASH or t == T.HASH_POINTER:
        _write_hash(w, N.as_hash(value, key, t), depth + 1)
    elif t == T.VECTOR_HASH or t == T.VECTOR_HASH_POINTER:
        hashes = N.hash_list(value, key, t)
        out += _count(len(hashes), key)
        for h in hashes:
            _write_hash(w, h, depth + 1)
    elif t == T.VECTOR_STRING:
        items = V.string_list(value, key)
        out += _count(len(items), key)
        for b in items:
            out += _count(len(b), key)
            out += b
    elif t == T.CHAR:
        out.append(V.check_char(value, key))
    elif t == T.VECTOR_CHAR:
        mv = V.byte_buffer(value, key, t)
        out += _count(len(mv), key)
        out += mv
    elif t == T.BYTE_ARRAY:
        mv = V.byte_buffer(value, key, t)
        out += _count(len(mv), key)
        w.payload(mv)
    elif t in _COMPLEX_STRUCT:
        c = V.check_complex(value, t, key)
        out += _COMPLEX_STRUCT[t].pack(c.real, c.imag)
    elif t == T.NONE:
        if value is not None:
            raise EncodeError(f"{key!r}: NONE needs the value None")
        out += _U32.pack(0)
    elif t == T.VECTOR_NONE:
        n = V.none_count(value, key)
        out += _count(n, key)
        out += b"\x00\x00\x00\x00" * n
    elif t == T.SCHEMA:
        if not isinstance(value, Schema):
            raise EncodeError(f"{key!r}: SCHEMA needs a Schema")
        sub = _Writer()
        _key(sub.cur, value.root_name)
        _write_hash(sub, N.as_hash(value.parameters, key, t), depth + 1)
        body = b"".join(sub.finish())
        out += _count(len(body), key)
        out += body
    else:  # pragma: no cover - every wire type is handled above
        raise EncodeError(f"{key!r}: cannot write type {t}")


def encode(h):
    """Encode a Hash as a list of buffers, split as Karabo's BufferSet splits it.

    Returns
    -------
    list
        ``[bytes, payload, bytes, payload, ..., bytes]``: odd positions are the
        BYTE_ARRAY payloads (NDArray data), as memoryviews on the arrays' own
        memory (no copy); even positions are the bytes around them.  Their
        concatenation is the archive.  Keep the arrays unchanged until the
        buffers have been sent.
    """
    w = _Writer()
    _write_hash(w, h, 0)
    return w.finish()


def encode_bytes(h):
    """Encode a Hash into one ``bytes`` object (payloads copied once)."""
    return b"".join(encode(h))


# ---------------------------------------------------------------- decoding


def _segments(data):
    if isinstance(data, (list, tuple)):
        parts = list(data)
        if not parts:
            raise DecodeError("no buffers to decode", 0)
    else:
        parts = [data]
    segs = []
    for p in parts:
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


class _Reader:
    """Reads across a list of segments; a value never spans two of them."""

    __slots__ = ("segs", "i", "pos", "base", "left", "total", "limit", "budget")

    def __init__(self, segs, max_objects):
        self.segs = segs
        self.i = 0
        self.pos = 0
        self.base = 0
        self.total = sum(len(s) for s in segs)
        self.left = self.total
        self.limit = V.object_limit(self.total, max_objects)
        self.budget = self.limit

    def charge(self, off):
        """Count one more object (Hash, attribute set, array) starting at ``off``."""
        self.budget -= 1
        if self.budget < 0:
            raise V.limit_error(self.limit, self.total, off)

    @property
    def offset(self):
        return self.base + self.pos

    def _advance(self):
        segs = self.segs
        while self.pos == len(segs[self.i]) and self.i + 1 < len(segs):
            self.base += len(segs[self.i])
            self.i += 1
            self.pos = 0

    def take(self, n, what):
        """Return (memoryview segment, start) of the next ``n`` bytes."""
        self._advance()
        seg = self.segs[self.i]
        if n > self.left:
            raise TruncatedError(
                f"truncated: {what} needs {n} bytes at offset {self.offset}, {self.left} left", self.offset
            )
        if self.pos + n > len(seg):
            raise DecodeError(f"{what} at offset {self.offset} spans a buffer boundary", self.offset)
        start = self.pos
        self.pos += n
        self.left -= n
        return seg, start

    def u32(self, what):
        seg, p = self.take(4, what)
        return _U32.unpack_from(seg, p)[0]

    def count(self, what, min_size):
        """A u32 element count, checked against the bytes left (min_size per element)."""
        off = self.offset
        n = self.u32(what)
        if n * min_size > self.left:
            raise TruncatedError(
                f"truncated: {what} declares {n} elements at offset {off}, only {self.left} bytes left", off
            )
        return n

    def key(self):
        off = self.offset
        seg, p = self.take(1, "key length")
        n = seg[p]
        seg, p = self.take(n, "key")
        try:
            return str(seg[p : p + n], "utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"key at offset {off} is not valid UTF-8", off) from None

    def type_id(self):
        off = self.offset
        t = self.u32("type id")
        if t not in WIRE_TYPES:
            raise UnknownTypeError(f"unknown type id {t} at offset {off}", off, t)
        return t


def _read_str(r, what):
    off = r.offset
    n = r.count(what, 1)
    seg, p = r.take(n, what)
    try:
        return str(seg[p : p + n], "utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"{what} at offset {off} is not valid UTF-8", off) from None


def _read_hash(r, depth):
    if depth > MAX_DEPTH:
        raise DecodeError(f"Hash nested deeper than {MAX_DEPTH} levels at offset {r.offset}", r.offset)
    r.charge(r.offset)
    n = r.count("Hash node count", 10)
    h = Hash.__new__(Hash)
    vals = {}
    types = {}
    attrs = {}
    attr_types = {}
    for _ in range(n):
        off = r.offset
        key = r.key()
        if key in vals:
            raise DecodeError(f"duplicate key {key!r} at offset {off}", off)
        t = r.type_id()
        a = _read_attrs(r, depth)
        voff = r.offset
        value = _read_value(r, t, depth)
        if a is not None:
            avals, atypes = a
            cls = avals.get("__classId")
            if t == T.HASH and atypes.get("__classId") == T.STRING and cls in ("NDArray", "ImageData"):
                if cls == "NDArray":
                    value = V.make_ndarray(value, voff)
                    del avals["__classId"], atypes["__classId"]
                    t = None
                else:
                    img = N.make_imagedata(value)
                    if img is not None:
                        value = img
                        del avals["__classId"], atypes["__classId"]
                        t = None
            if avals:
                attrs[key] = avals
                attr_types[key] = atypes
        vals[key] = value
        if t is not None:
            types[key] = t
    h._v = vals
    h._t = types
    h._a = attrs
    h._at = attr_types
    return h


def _read_attrs(r, depth):
    off = r.offset
    n = r.count("attribute count", 6)
    if n == 0:
        return None
    r.charge(off)
    vals = {}
    types = {}
    for _ in range(n):
        off = r.offset
        name = r.key()
        if name in vals:
            raise DecodeError(f"duplicate attribute {name!r} at offset {off}", off)
        t = r.type_id()
        vals[name] = _read_value(r, t, depth)
        types[name] = t
    return vals, types


def _read_value(r, t, depth):
    if t == T.BOOL:
        off = r.offset
        seg, p = r.take(1, "BOOL")
        b = seg[p]
        if b > 1:
            raise DecodeError(f"BOOL value {b} at offset {off} is not 0 or 1", off)
        return b == 1
    s = _SCALAR_STRUCT.get(t)
    if s is not None:
        seg, p = r.take(s.size, type_name_(t))
        return s.unpack_from(seg, p)[0]
    if t in VECTOR_DTYPE:
        dt = VECTOR_DTYPE[t]
        off = r.offset
        n = r.count(type_name_(t), dt.itemsize)
        r.charge(off)
        seg, p = r.take(n * dt.itemsize, type_name_(t))
        arr = np.frombuffer(seg, dtype=dt, count=n, offset=p)
        if t == T.VECTOR_BOOL and n and arr.view(np.uint8).max() > 1:
            raise DecodeError(f"VECTOR_BOOL at offset {off} has an element that is not 0 or 1", off)
        return arr
    if t == T.STRING:
        return _read_str(r, "STRING")
    if t == T.HASH or t == T.HASH_POINTER:
        return _read_hash(r, depth + 1)
    if t == T.VECTOR_HASH or t == T.VECTOR_HASH_POINTER:
        off = r.offset
        n = r.count(type_name_(t), 4)
        if n > r.budget:  # every element is a Hash: fail before making any
            raise V.limit_error(r.limit, r.total, off)
        return [_read_hash(r, depth + 1) for _ in range(n)]
    if t == T.VECTOR_STRING:
        n = r.count("VECTOR_STRING", 4)
        return [_read_str(r, "VECTOR_STRING element") for _ in range(n)]
    if t == T.CHAR:
        seg, p = r.take(1, "CHAR")
        return chr(seg[p])
    if t == T.VECTOR_CHAR:
        n = r.count("VECTOR_CHAR", 1)
        seg, p = r.take(n, "VECTOR_CHAR")
        return bytes(seg[p : p + n])
    if t == T.BYTE_ARRAY:
        off = r.offset
        n = r.count("BYTE_ARRAY", 1)
        r.charge(off)
        seg, p = r.take(n, "BYTE_ARRAY")
        return seg[p : p + n]
    if t in _COMPLEX_STRUCT:
        s = _COMPLEX_STRUCT[t]
        seg, p = r.take(s.size, type_name_(t))
        re, im = s.unpack_from(seg, p)
        return complex(re, im)
    if t == T.NONE:
        off = r.offset
        v = r.u32("NONE")
        if v != 0:
            raise DecodeError(f"NONE value at offset {off} is {v}, not 0", off)
        return None
    if t == T.VECTOR_NONE:
        off = r.offset
        n = r.count("VECTOR_NONE", 4)
        for _ in range(n):
            eoff = r.offset
            if r.u32("VECTOR_NONE element") != 0:
                raise DecodeError(f"VECTOR_NONE element at offset {eoff} is not 0", eoff)
        return [None] * n
    if t == T.SCHEMA:
        off = r.offset
        n = r.count("SCHEMA", 1)
        end = r.offset + n
        root = r.key()
        params = _read_hash(r, depth + 1)
        if r.offset != end:
            raise DecodeError(f"SCHEMA at offset {off} declares {n} bytes but its content has {r.offset - off - 4}", off)
        return Schema(root, params)
    raise UnknownTypeError(f"unknown type id {t} at offset {r.offset}", r.offset, t)  # pragma: no cover


def type_name_(t):
    return HashType(t).name


def decode(data, *, copy=False, max_objects=None):
    """Decode one archive from a buffer or from a list of buffers.

    Parameters
    ----------
    data : bytes-like or list of bytes-like
        One C-contiguous buffer (bytes, bytearray, memoryview, zmq.Frame,
        numpy array, ...), or the list produced by :func:`encode` (or any split
        of the archive that does not cut through a single value).
    copy : bool
        If true, arrays and byte arrays are copied out of the input instead of
        being views on it.
    max_objects : int, optional
        The most objects (Hashes, attribute sets, arrays) the decode may
        create.  None (the default) allows ``max(4096, nbytes // 16)`` for
        ``nbytes`` input bytes, or the rule :func:`kbhash.set_object_limit`
        set (docs/safety-kbhash.md).

    Returns
    -------
    Hash
        Numeric vectors and NDArrays are numpy views on ``data`` (read-only
        when the input is read-only) and keep it alive; BYTE_ARRAY values are
        memoryviews on it.

    Raises
    ------
    DecodeError
        (a ValueError) with the offset of the problem; TruncatedError when the
        data ends early, UnknownTypeError for unknown type ids, LimitError when
        the archive would create more than ``max_objects`` objects.
    """
    if copy:
        data = b"".join(bytes(memoryview(p).cast("B")) for p in (data if isinstance(data, (list, tuple)) else [data]))
        data = bytearray(data)
    r = _Reader(_segments(data), max_objects)
    h = _read_hash(r, 0)
    r._advance()
    if r.left:
        raise DecodeError(f"{r.left} bytes of trailing data at offset {r.offset}", r.offset)
    return h


def decode_prefix(data, *, max_objects=None):
    """Decode the archive at the start of ``data``; return ``(Hash, bytes consumed)``.

    For payloads that carry several archives back to back (Karabo's broker
    messages: header Hash then body Hash).  Same errors as :func:`decode`;
    trailing data is left alone.  The default object limit counts all the
    bytes of ``data``, trailing ones included.
    """
    r = _Reader(_segments(data), max_objects)
    h = _read_hash(r, 0)
    return h, r.offset
