"""Karabo Bridge codec in pure Python: the twin of the compiled ``kbstream.bridge._codec``.

This module is the executable specification and the test oracle of the compiled codec:
same names (``_rules.PUBLIC_API``), signatures, results, exception types and messages.
Both import only the neutral ``_rules`` module and :mod:`kbstream.errors`.

Wire format (``docs/wire/karabo-bridge-protocol.md``):

* **2.2** (``serialize`` default): an even number of ZeroMQ frames, read as (header, payload)
  pairs.  Per source, sources sorted by name: a header map ``{source, content: 'msgpack',
  metadata}`` and a payload map of every non-array value; then per numpy array value, in
  insertion order, a header ``{source, content: 'array', path, dtype: str(dtype), shape}``
  and the raw C-order bytes of the array as its own frame (zero-copy: a ``memoryview`` on
  the array).
* **1.0**: one msgpack frame ``{source: {key: value, ..., 'metadata': {...}}}``; arrays and
  numpy scalars as msgpack_numpy maps with bin keys ``nd, type, kind, shape, data``.
* **2.0 / 2.1** (decode only): 2.x framing without header metadata; the metadata lives in the
  payload, nested under ``metadata`` (2.0) or flattened with a ``metadata.`` prefix (2.1).
  It is returned in ``meta`` and also left in ``data`` as ``karabo_bridge`` does.

msgpack is written and read here (not through the ``msgpack`` package) with the choices of
msgpack-python's ``Packer(use_bin_type=True)`` / ``unpackb(raw=False)``, so the bytes are
identical to ``karabo_bridge.serialize``.  Decoding never trusts a length: every read is
checked against the bytes left, container sizes against the bytes that could hold them,
``prod(shape) * itemsize`` against the frame length.  Decoded arrays are views on the
received frames (writeable when the frame is, e.g. a ``zmq.Frame``; read-only for ``bytes``).

Deliberate differences from ``karabo_bridge`` 0.7.0 (documented in ``kbstream``):
``np.bool_`` scalars are sent as msgpack booleans in 2.2 (the peer raises ``TypeError``);
numpy scalars nested in lists are converted too; object and structured arrays are refused
when encoding (the peer sends pointers or pickles); an odd frame count, an array before its
source's msgpack part, a shape that does not match the frame, pickled content and unknown
``content`` raise :mod:`kbstream.errors` exceptions instead of being dropped or raising
``KeyError`` / ``RuntimeError``; a missing ``metadata[src]`` falls back to the source's own
``metadata`` entry instead of raising ``KeyError``; one message decodes into at most
``max_containers`` msgpack maps and arrays (:class:`~kbstream.errors.AmplificationError`,
``docs/safety-bridge.md``), where the peer has no bound.
"""

import struct

import numpy as np

from ..errors import (
    EncodeError,
    EncodeOverflowError,
    ProtocolError,
    ServerError,
    ShapeMismatchError,
    TruncatedFrameError,
    UnknownContentError,
    UnsupportedDtypeError,
)

from ._rules import (
    PUBLIC_API,
    ARRAY_KINDS,
    ENCODE_VERSIONS,
    ERROR_PREFIX,
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

__all__ = list(PUBLIC_API)

_pack_d = struct.Struct(">d").pack
_unpack_d = struct.Struct(">d").unpack_from
_unpack_f = struct.Struct(">f").unpack_from


def _array_for_wire(arr, what):
    """Check an array can be sent as raw bytes; return it C-contiguous."""
    kind = arr.dtype.kind
    if kind not in ARRAY_KINDS or arr.dtype.hasobject:
        raise EncodeError(
            f"cannot serialize {what}: dtype {arr.dtype} (kind {kind!r}) has no raw "
            f"byte representation"
        )
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def _raw_view(arr):
    """A memoryview on a C-contiguous array's memory (no copy), as the peer's ``arr.data``."""
    try:
        return memoryview(arr)
    except ValueError:
        # datetime64 / timedelta64 do not export a buffer format: view the bytes
        return memoryview(arr.reshape(-1).view(np.uint8))


def _frame_view(frame, index):
    """A flat byte memoryview on any C-contiguous buffer (bytes, zmq.Frame, ndarray...)."""
    try:
        mv = memoryview(frame)
    except TypeError:
        raise TypeError(
            f"frame {index}: expected a bytes-like object, got {type_name(frame)}"
        ) from None
    if not mv.c_contiguous:
        raise TypeError(f"frame {index}: buffer is not C-contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B") if mv.nbytes else memoryview(b"")
    return mv


def _view(shape, dt, buf, offset, count):
    """An array on ``buf`` that keeps the export alive (see the compiled codec's _view)."""
    if type(buf) is bytes:
        return np.ndarray(shape, dt, buf, offset)
    return np.frombuffer(buf if isinstance(buf, memoryview) else memoryview(buf), dt, count, offset).reshape(shape)


# --------------------------------------------------------------------------------------
# msgpack writer


def _pack_uint_header(out, n, fix_base, fix_max, c8, c16, c32):
    if n <= fix_max and fix_base is not None:
        out.append(fix_base | n)
    elif c8 is not None and n < 0x100:
        out.append(c8)
        out.append(n)
    elif n < 0x10000:
        out.append(c16)
        out += n.to_bytes(2, "big")
    elif n < 0x100000000:
        out.append(c32)
        out += n.to_bytes(4, "big")
    else:
        raise EncodeError(f"object too long for msgpack ({n} elements or bytes)")


def _pack_int(out, v):
    if v < 0:
        if v >= -32:
            out.append(v & 0xFF)
        elif v >= -0x80:
            out.append(0xD0)
            out += v.to_bytes(1, "big", signed=True)
        elif v >= -0x8000:
            out.append(0xD1)
            out += v.to_bytes(2, "big", signed=True)
        elif v >= -0x80000000:
            out.append(0xD2)
            out += v.to_bytes(4, "big", signed=True)
        elif v >= -0x8000000000000000:
            out.append(0xD3)
            out += v.to_bytes(8, "big", signed=True)
        else:
            raise EncodeOverflowError(f"integer {v} is out of msgpack's range")
    elif v < 0x80:
        out.append(v)
    elif v < 0x100:
        out.append(0xCC)
        out.append(v)
    elif v < 0x10000:
        out.append(0xCD)
        out += v.to_bytes(2, "big")
    elif v < 0x100000000:
        out.append(0xCE)
        out += v.to_bytes(4, "big")
    elif v < 0x10000000000000000:
        out.append(0xCF)
        out += v.to_bytes(8, "big")
    else:
        raise EncodeOverflowError(f"integer {v} is out of msgpack's range")


def _pack_str(out, s):
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError("cannot encode a str with lone surrogates as UTF-8") from None
    _pack_uint_header(out, len(b), 0xA0, 31, 0xD9, 0xDA, 0xDB)
    out += b


def _pack_bin(out, b):
    n = len(b) if not isinstance(b, memoryview) else b.nbytes
    _pack_uint_header(out, n, None, -1, 0xC4, 0xC5, 0xC6)
    out += b


def _pack_numpy_map(out, obj, v1, chunks):
    """msgpack_numpy's representation (protocol 1.0) of an array or a numpy scalar."""
    if isinstance(obj, np.ndarray):
        arr = _array_for_wire(obj, "array")
        out += b"\x85\xc4\x02nd\xc3\xc4\x04type"
        _pack_str(out, arr.dtype.str)
        out += b"\xc4\x04kind\xc4\x00\xc4\x05shape"
        _pack_uint_header(out, arr.ndim, 0x90, 15, None, 0xDC, 0xDD)
        for d in arr.shape:
            _pack_int(out, d)
        out += b"\xc4\x04data"
        _pack_uint_header(out, arr.nbytes, None, -1, 0xC4, 0xC5, 0xC6)
        # the array bytes are appended once, by the caller, as their own chunk
        chunks.append(bytes(out))
        chunks.append(_raw_view(arr))
        out.clear()
    else:
        out += b"\x83\xc4\x02nd\xc2\xc4\x04type"
        _pack_str(out, obj.dtype.str)
        out += b"\xc4\x04data"
        _pack_bin(out, memoryview(np.asarray(obj).reshape(1).view(np.uint8)))


def _pack(out, obj, v1, depth, chunks):
    if obj is None:
        out.append(0xC0)
    elif obj is True:
        out.append(0xC3)
    elif obj is False:
        out.append(0xC2)
    elif isinstance(obj, int):
        _pack_int(out, int.__index__(obj))
    elif isinstance(obj, float):
        out.append(0xCB)
        out += _pack_d(obj)
    elif isinstance(obj, (bytes, bytearray)):
        _pack_bin(out, obj)
    elif isinstance(obj, str):
        _pack_str(out, obj)
    elif isinstance(obj, memoryview):
        if not obj.c_contiguous:
            raise EncodeError("cannot serialize a non-contiguous memoryview")
        if obj.nbytes == 0:
            _pack_bin(out, b"")
        else:
            _pack_bin(out, obj.cast("B") if obj.format != "B" or obj.ndim != 1 else obj)
    elif isinstance(obj, dict):
        if depth >= MAX_DEPTH:
            raise EncodeError(f"nesting deeper than {MAX_DEPTH} levels")
        _pack_uint_header(out, len(obj), 0x80, 15, None, 0xDE, 0xDF)
        for k, v in obj.items():
            _pack(out, k, v1, depth + 1, chunks)
            _pack(out, v, v1, depth + 1, chunks)
    elif isinstance(obj, (list, tuple)):
        if depth >= MAX_DEPTH:
            raise EncodeError(f"nesting deeper than {MAX_DEPTH} levels")
        _pack_uint_header(out, len(obj), 0x90, 15, None, 0xDC, 0xDD)
        for v in obj:
            _pack(out, v, v1, depth + 1, chunks)
    elif isinstance(obj, (np.bool_, np.number)):
        if v1:
            _pack_numpy_map(out, obj, v1, chunks)
        elif isinstance(obj, np.bool_):
            out.append(0xC3 if obj else 0xC2)
        else:
            item = obj.item()
            if isinstance(item, np.generic):
                raise EncodeError(f"cannot serialize object of type {type_name(obj)}")
            _pack(out, item, v1, depth, chunks)
    elif v1 and isinstance(obj, np.ndarray):
        _pack_numpy_map(out, obj, v1, chunks)
    else:
        raise EncodeError(f"cannot serialize object of type {type_name(obj)}")


def packb(obj):
    """msgpack bytes of *obj*, as ``msgpack.packb(obj, use_bin_type=True)`` writes them.

    numpy scalars are converted with ``.item()``, ``np.bool_`` to bool; arrays are refused.
    """
    out = bytearray()
    _pack(out, obj, False, 0, None)
    return bytes(out)


# --------------------------------------------------------------------------------------
# msgpack reader


class _Bin:
    """A bin value inside a protocol 1.0 frame, kept as (offset, length) until its map is
    complete, so that a msgpack_numpy ``data`` field becomes a view instead of a copy."""

    __slots__ = ("start", "length")

    def __init__(self, start, length):
        self.start = start
        self.length = length


class _Budget:
    """The msgpack containers one message may still decode into (shared by the readers of
    its frames)."""

    __slots__ = ("left", "limit")

    def __init__(self, limit):
        self.left = limit
        self.limit = limit


class _Reader:
    __slots__ = ("buf", "pos", "end", "index", "v1", "budget")

    def __init__(self, buf, index, budget, v1=False):
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.index = index
        self.v1 = v1
        self.budget = budget

    def need(self, n, at):
        if self.end - self.pos < n:
            raise TruncatedFrameError(
                f"frame {self.index}: msgpack data truncated at offset {at}: "
                f"{n} bytes needed, {self.end - self.pos} left",
                self.index,
                at,
            )

    def take_uint(self, n, at):
        self.need(n, at)
        p = self.pos
        self.pos = p + n
        return int.from_bytes(self.buf[p : p + n], "big")

    def container_size(self, n, per_item, at, what):
        """Check a container's declared size against the bytes left, then take it from
        the message's container budget."""
        if n * per_item > self.end - self.pos:
            raise TruncatedFrameError(
                f"frame {self.index}: msgpack {what} at offset {at} declares {n} items, "
                f"only {self.end - self.pos} bytes left",
                self.index,
                at,
            )
        budget = self.budget
        budget.left -= 1
        if budget.left < 0:
            raise amplification_error(self.index, at, budget.limit)

    def text(self, n, at):
        self.need(n, at)
        p = self.pos
        self.pos = p + n
        try:
            return str(self.buf[p : p + n], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(
                f"frame {self.index}: invalid UTF-8 in msgpack str at offset {at}",
                self.index,
                at,
            ) from None

    def binary(self, n, at):
        self.need(n, at)
        p = self.pos
        self.pos = p + n
        if self.v1:
            return _Bin(p, n)
        return bytes(self.buf[p : p + n])

    def value(self, depth):
        at = self.pos
        self.need(1, at)
        b = self.buf[at]
        self.pos = at + 1
        if b <= 0x7F:
            return b
        if b >= 0xE0:
            return b - 0x100
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F, at)
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth, at)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth, at)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b == 0xCA:
            self.need(4, at)
            v = _unpack_f(self.buf, self.pos)[0]
            self.pos += 4
            return v
        if b == 0xCB:
            self.need(8, at)
            v = _unpack_d(self.buf, self.pos)[0]
            self.pos += 8
            return v
        if 0xCC <= b <= 0xCF:
            return self.take_uint(1 << (b - 0xCC), at)
        if 0xD0 <= b <= 0xD3:
            n = 1 << (b - 0xD0)
            self.need(n, at)
            p = self.pos
            self.pos = p + n
            return int.from_bytes(self.buf[p : p + n], "big", signed=True)
        if 0xD9 <= b <= 0xDB:
            return self.text(self.take_uint(1 << (b - 0xD9), at), at)
        if 0xC4 <= b <= 0xC6:
            return self.binary(self.take_uint(1 << (b - 0xC4), at), at)
        if b == 0xDC or b == 0xDD:
            return self.array(self.take_uint(2 if b == 0xDC else 4, at), depth, at)
        if b == 0xDE or b == 0xDF:
            return self.map(self.take_uint(2 if b == 0xDE else 4, at), depth, at)
        if b == 0xC1:
            raise ProtocolError(
                f"frame {self.index}: invalid msgpack byte 0xc1 at offset {at}", self.index, at
            )
        raise ProtocolError(
            f"frame {self.index}: unsupported msgpack ext type (byte 0x{b:02x}) at offset {at}",
            self.index,
            at,
        )

    def _depth(self, depth, at):
        if depth >= MAX_DEPTH:
            raise ProtocolError(
                f"frame {self.index}: msgpack nesting deeper than {MAX_DEPTH} at offset {at}",
                self.index,
                at,
            )

    def array(self, n, depth, at):
        self._depth(depth, at)
        self.container_size(n, 1, at, "array")
        out = []
        for _ in range(n):
            out.append(self.value(depth + 1))
        if self.v1:
            for i, v in enumerate(out):
                if type(v) is _Bin:
                    out[i] = self.materialize(v)
        return out

    def map(self, n, depth, at):
        self._depth(depth, at)
        self.container_size(n, 2, at, "map")
        out = {}
        for _ in range(n):
            kat = self.pos
            k = self.value(depth + 1)
            if type(k) is _Bin:
                k = self.materialize(k)
            if not isinstance(k, (str, bytes)):
                raise ProtocolError(
                    f"frame {self.index}: msgpack map key at offset {kat} is "
                    f"{type_name(k)}, not str or bytes",
                    self.index,
                    kat,
                )
            out[k] = self.value(depth + 1)
        if self.v1:
            if b"nd" in out:
                return self.numpy_value(out, at)
            if b"complex" in out:
                return self.complex_value(out, at)
            for k, v in out.items():
                if type(v) is _Bin:
                    out[k] = self.materialize(v)
        return out

    def materialize(self, b):
        return bytes(self.buf[b.start : b.start + b.length])

    def numpy_value(self, m, at):
        """msgpack_numpy's map -> a view on the frame (array) or a numpy scalar."""
        nd = m[b"nd"]
        name = m.get(b"type")
        if type(name) is _Bin:
            name = self.materialize(name)
        data = m.get(b"data")
        if type(nd) is not bool or name is None or type(data) is not _Bin:
            raise ProtocolError(
                f"frame {self.index}: malformed msgpack_numpy map at offset {at}",
                self.index,
                at,
            )
        kind = m.get(b"kind", b"")
        if type(kind) is _Bin:
            kind = self.materialize(kind)
        if not isinstance(kind, (bytes, str)):
            raise ProtocolError(
                f"frame {self.index}: malformed msgpack_numpy map at offset {at}", self.index, at
            )
        if kind != b"":
            raise UnsupportedDtypeError(
                f"frame {self.index}: msgpack_numpy kind {kind!r} (object or structured "
                f"dtype) is not supported",
                self.index,
                at,
                dtype=name,
            )
        dt = wire_dtype(name, self.index)
        if nd:
            shape, count = shape_count(m.get(b"shape"), self.index)
            check_nbytes(shape, count, dt, data.length, self.index, "numpy array")
            return _view(shape, dt, self.buf, data.start, count)
        check_nbytes((), 1, dt, data.length, self.index, "numpy scalar")
        return np.frombuffer(self.buf, dt, 1, data.start)[0]

    def complex_value(self, m, at):
        data = m.get(b"data")
        if isinstance(data, str):
            try:
                return complex(data)
            except ValueError:
                pass
        raise ProtocolError(
            f"frame {self.index}: malformed msgpack_numpy complex at offset {at}",
            self.index,
            at,
        )

    def top(self):
        v = self.value(0)
        if type(v) is _Bin:
            v = self.materialize(v)
        if self.pos != self.end:
            raise ProtocolError(
                f"frame {self.index}: {self.end - self.pos} bytes of extra data after the "
                f"msgpack value, at offset {self.pos}",
                self.index,
                self.pos,
            )
        return v


def unpackb(buf, *, max_containers=None):
    """Decode one msgpack value that fills *buf* exactly (``raw=False``: str -> str, bin ->
    bytes).  Ext types are refused; map keys must be str or bytes; at most
    ``max_containers`` maps and arrays (default :data:`MAX_CONTAINERS`), else
    :class:`~kbstream.errors.AmplificationError`."""
    budget = _Budget(container_limit(max_containers))
    return _Reader(_frame_view(buf, 0), 0, budget).top()


# --------------------------------------------------------------------------------------
# protocol


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
    if protocol_version not in ENCODE_VERSIONS:
        raise ValueError(f"Unknown protocol version {protocol_version}")
    ts = make_dummy_timestamps() if dummy_timestamps else None

    def source_meta(src, props):
        m = None
        if metadata is not None:
            m = metadata.get(src)
        if m is None:
            m = props.get("metadata", {})
        m = dict(m)
        if ts is not None and "timestamp" not in m:
            m.update(ts)
        return m

    if protocol_version == "1.0":
        train = {}
        for src, props in data.items():
            if not isinstance(props, dict):
                raise EncodeError(f"source {src!r}: expected a dict, got {type_name(props)}")
            d = dict(props)
            d["metadata"] = source_meta(src, props)
            train[src] = d
        out = bytearray()
        chunks = []
        _pack(out, train, True, 0, chunks)
        chunks.append(bytes(out))
        # exactly one copy of every array: the join
        return [b"".join(chunks)]

    frames = []
    for src in sorted(data):
        props = data[src]
        if not isinstance(props, dict):
            raise EncodeError(f"source {src!r}: expected a dict, got {type_name(props)}")
        header = bytearray(b"\x83\xa6source")
        _pack(header, src, False, 1, None)
        header += b"\xa7content\xa7msgpack\xa8metadata"
        _pack(header, source_meta(src, props), False, 1, None)
        main = {}
        arrays = []
        for key, value in props.items():
            if isinstance(value, np.ndarray):
                arrays.append((key, _array_for_wire(value, f"array {key!r} of source {src!r}")))
            else:
                main[key] = value
        frames.append(bytes(header))
        frames.append(packb(main))
        for key, arr in arrays:
            h = bytearray(b"\x85\xa6source")
            _pack(h, src, False, 1, None)
            h += b"\xa7content\xa5array\xa4path"
            _pack(h, key, False, 1, None)
            h += b"\xa5dtype"
            _pack_str(h, str(arr.dtype))
            h += b"\xa5shape"
            _pack(h, arr.shape, False, 1, None)
            frames.append(bytes(h))
            frames.append(_raw_view(arr))
    return frames


def deserialize(frames, *, max_containers=None):
    """Decode one message (list of frames) into ``(data, meta)``, both keyed by source.

    Accepts protocol 1.0 (one frame) and 2.0 / 2.1 / 2.2 (header / payload pairs).  Frames
    may be ``zmq.Frame``, ``bytes``, ``bytearray``, ``memoryview`` or any C-contiguous
    buffer.  Arrays are views on the frames (no copy); they keep the frames alive.

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
    budget = _Budget(container_limit(max_containers))
    frames = list(frames)
    n = len(frames)
    if n == 0:
        raise ProtocolError("empty message: no frames")
    if n == 1:
        buf = _frame_view(frames[0], 0)
        if bytes(buf[: len(ERROR_PREFIX)]) == ERROR_PREFIX:
            text = str(buf, "utf-8", "replace")
            raise ServerError(f"server replied {text!r}", 0)
        train = _Reader(buf, 0, budget, v1=True).top()
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
    if n % 2:
        raise ProtocolError(
            f"odd number of frames ({n}): a 2.x message is made of (header, payload) pairs"
        )
    data = {}
    meta = {}
    for i in range(0, n, 2):
        hdr = _Reader(_frame_view(frames[i], i), i, budget).top()
        if not isinstance(hdr, dict):
            raise ProtocolError(f"frame {i}: header is not a msgpack map", i)
        source = header_field(hdr, "source", i, str)
        content = header_field(hdr, "content", i, (str, bytes))
        if content == "msgpack":
            payload = _Reader(_frame_view(frames[i + 1], i + 1), i + 1, budget).top()
            if not isinstance(payload, dict):
                raise ProtocolError(f"frame {i + 1}: payload is not a msgpack map", i + 1)
            if "metadata" in hdr:
                m = hdr["metadata"]
                if not isinstance(m, dict):
                    raise ProtocolError(f"frame {i}: header 'metadata' is not a map", i)
            else:
                m = meta_from_payload(payload)
            data[source] = payload
            meta[source] = m
        elif content == "array":
            props = data.get(source)
            if props is None:
                raise ProtocolError(
                    f"frame {i}: array for source {source!r} comes before its msgpack part", i
                )
            path = header_field(hdr, "path", i, str)
            dt = wire_dtype(header_field(hdr, "dtype", i, (str, bytes)), i)
            shape, count = shape_count(hdr.get("shape"), i)
            buf = _frame_view(frames[i + 1], i + 1)
            check_nbytes(shape, count, dt, len(buf), i + 1, f"array {path!r}")
            props[path] = _view(shape, dt, buf, 0, count)
        else:
            raise UnknownContentError(
                f"frame {i}: unknown content {content!r}", i, content=content
            )
    return data, meta


def release_pool():
    """The compiled codec recycles large protocol 1.0 frame buffers; this twin keeps none,
    so there is nothing to free: returns 0."""
    return 0
