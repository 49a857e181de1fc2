"""Karabo pipeline TCP wire format: framing, hello/update, data and end-of-stream headers.

Pure functions, no sockets.  Every Hash goes through kbhash's compiled codec.

Framing (all sizes u32 little-endian)::

    input -> output (control):  u32 N | Hash archive (N bytes)           hello, update
    output -> input (data):     u32 H | header archive (H bytes) | u32 B | body (B bytes)

The data header lists, per item, its metadata (``sourceInfo``), its BufferSet
split (``_bufferSetLayout_``: sizes + types) and its archive size
(``byteSizes``); the body is the items' archives back to back.  An end of
stream is a header with ``endOfStream=true`` and an empty body.

kbstream extension: an input may add ``kbCreditWindow`` (UINT32) to its hello.
A kbstream output then lets that many messages be in flight on the
connection; Karabo's output ignores unknown hello keys and keeps its one
message in flight, and one ``update`` per received message is exactly what a
Karabo input sends too, so both directions stay compatible.

Every hello value is checked by :func:`parse_hello` (type and range; an output cuts
``maxQueueLength`` to :data:`MAX_QUEUE_LENGTH` and ``kbCreditWindow`` to
:data:`MAX_CREDIT_WINDOW`), so a peer can neither crash an output with a value of the
wrong type nor make it reserve what it likes.
"""

import numbers
import struct

import kbhash
from kbhash import Hash, HashTemplate, HashType, Timestamp

from ..errors import EncodeError
from .errors import PipelineProtocolError

__all__ = [
    "ChannelMetaData",
    "hello",
    "update",
    "data_message",
    "eos_message",
    "parse_control",
    "parse_hello",
    "parse_header",
    "Hello",
    "MAX_CONTROL_SIZE",
    "MAX_HEADER_SIZE",
]

T = HashType
U32 = struct.Struct("<I")

_UINT32 = int(T.UINT32)

# The Hashes the wire layer builds, their keys and types fixed once.
# Control frames: the start of every one, and hello's fixed part.
_CONTROL = HashTemplate([("reason", None), ("instanceId", None)])
_HELLO = HashTemplate([("reason", None), ("instanceId", None), ("memoryLocation", None), ("dataDistribution", None),
                       ("onSlowness", None), ("maxQueueLength", T.UINT32)])
# Data messages: item metadata, BufferSet layout, header; end of stream.
_META = HashTemplate([("source", None),
                      ("timestamp", None, [("sec", T.UINT64), ("frac", T.UINT64), ("tid", T.UINT64)])])
_LAYOUT = HashTemplate([("sizes", T.VECTOR_UINT32), ("types", T.VECTOR_INT32)])
_HEADER = HashTemplate([("sourceInfo", T.VECTOR_HASH), ("_bufferSetLayout_", T.VECTOR_HASH), ("nData", T.UINT32),
                        ("byteSizes", T.VECTOR_UINT32)])
_EOS = HashTemplate([("endOfStream", None), ("_bufferSetLayout_", T.VECTOR_HASH), ("nData", T.UINT32),
                     ("byteSizes", T.VECTOR_UINT32)])
# kbstream's shared-memory path (kbstream.pipeline.shm): an input's offer (the hello's
# kbShmFd node) and the reference to a body in a slot (the data header's kbShmFd node).
_SHM_OFFER = HashTemplate([("socket", None), ("key", None)])
_SHM_REF = HashTemplate([("slot", T.UINT32), ("gen", T.UINT64), ("size", T.UINT64)])
_SHM_REF_KEYS = ("slot", "gen", "size")

#: Largest control frame (hello/update) accepted; real ones are < 300 bytes.
MAX_CONTROL_SIZE = 64 * 1024
#: Largest data header accepted (a header grows with the number of items).
MAX_HEADER_SIZE = 64 * 1024 * 1024
#: Largest number of buffers one message may declare.
MAX_BUFFERS = 1 << 20
#: Bytes a data header may have beyond what its items need (a Karabo header has < 200).
HEADER_ROOM = 4096
#: Bytes a data header may have per item, besides 4 per character of its source and 16
#: per buffer (a Karabo header has about 180).
HEADER_ROOM_PER_ITEM = 1024
#: Largest ``maxQueueLength`` an output honours (a larger request is cut to it).
MAX_QUEUE_LENGTH = 10_000
#: Largest ``kbCreditWindow`` an output honours (a larger request is cut to it).
MAX_CREDIT_WINDOW = 64
#: Longest ``instanceId`` (characters) a hello may carry; Karabo ids are far shorter.
MAX_ID_LENGTH = 1024

ON_SLOWNESS = ("drop", "queueDrop", "wait")
DISTRIBUTION = ("copy", "shared")


class ChannelMetaData:
    """Metadata of one pipeline item: its source and its timestamp (with train id).

    Parameters
    ----------
    source : str
        Source name; Karabo's default is the output's id ``"<instance>:<channel>"``.
    timestamp : kbhash.Timestamp, optional
        Defaults to now with train id 0.
    """

    __slots__ = ("source", "timestamp")

    def __init__(self, source, timestamp=None):
        self.source = source
        self.timestamp = Timestamp.now() if timestamp is None else timestamp

    @property
    def tid(self):
        return self.timestamp.tid

    def to_hash(self):
        """The wire form: ``{source: STRING, timestamp: BOOL true [sec, frac, tid]}``."""
        ts = self.timestamp
        return _META.build({"source": self.source, "timestamp": True},
                           {"timestamp": {"sec": ts.sec, "frac": ts.frac, "tid": ts.tid}})

    @classmethod
    def from_hash(cls, h):
        source = h.get("source", "")
        if not isinstance(source, str):
            raise PipelineProtocolError("item metadata has a non-string source")
        try:
            ts = h.get_timestamp("timestamp")
        except KeyError:
            ts = Timestamp(0, 0, 0)
        except (TypeError, ValueError) as e:
            raise PipelineProtocolError(f"item metadata has a malformed timestamp: {e}") from None
        return cls(source, ts)

    @classmethod
    def coerce(cls, meta, default_source):
        """Accept ChannelMetaData, a dict/Hash with source/timestamp/tid, a Timestamp or None."""
        if isinstance(meta, ChannelMetaData):
            return meta
        if meta is None:
            return cls(default_source)
        if isinstance(meta, Timestamp):
            return cls(default_source, meta)
        if isinstance(meta, Hash):
            return cls.from_hash(meta)
        if isinstance(meta, dict):
            ts = meta.get("timestamp")
            tid = int(meta.get("tid", meta.get("trainId", 0)))
            if ts is None:
                ts = Timestamp.now(tid)
            elif not isinstance(ts, Timestamp):
                ts = Timestamp.from_time(float(ts), tid)
            elif "tid" in meta or "trainId" in meta:
                ts = Timestamp(ts.sec, ts.frac, tid)
            return cls(meta.get("source", default_source), ts)
        raise EncodeError(f"metadata must be ChannelMetaData, a dict, a Hash or a Timestamp, not {type(meta).__name__}")

    def __eq__(self, other):
        if not isinstance(other, ChannelMetaData):
            return NotImplemented
        return self.source == other.source and self.timestamp == other.timestamp

    __hash__ = None

    def __repr__(self):
        return f"ChannelMetaData({self.source!r}, {self.timestamp!r})"


def _frame(h):
    data = kbhash.encode_bytes(h)
    return U32.pack(len(data)) + data


def hello(instance_id, data_distribution="copy", on_slowness="drop", max_queue_length=2,
          memory_location="remote", credit_window=1, shm_offer=None):
    """The framed hello an input sends first (keys in Karabo's order, extensions last).

    ``shm_offer``: ``(socket name, key)`` of a same-host input's shared-memory offer."""
    h = _HELLO.build({"reason": "hello", "instanceId": instance_id, "memoryLocation": memory_location,
                      "dataDistribution": data_distribution, "onSlowness": on_slowness,
                      "maxQueueLength": int(max_queue_length)})
    if credit_window > 1:
        h.set_typed((("kbCreditWindow", int(credit_window), _UINT32),))
    if shm_offer:
        h.set_typed((("kbShmFd", _SHM_OFFER.build({"socket": shm_offer[0], "key": shm_offer[1]}), None),))
    return _frame(h)


def control(reason, instance_id, **fields):
    """A framed kbstream control frame (kbRelease); Karabo outputs never get one."""
    h = _CONTROL.build({"reason": reason, "instanceId": instance_id})
    h.set_typed([(k, v, _UINT32 if isinstance(v, int) and not isinstance(v, bool) else None)
                 for k, v in fields.items()])
    return _frame(h)


def update(instance_id):
    """The framed update (one credit) an input sends."""
    return _frame(_CONTROL.build({"reason": "update", "instanceId": instance_id}))


def _u32_vector(values):
    return list(values)


def data_message(items):
    """Buffers of one data message for ``items`` = [(data Hash, ChannelMetaData), ...].

    Returns a list of buffers for ``socket.sendmsg``: the framed header first,
    then the items' archives as kbhash.encode returned them (array payloads are
    the arrays' own memory).  The header's ``_bufferSetLayout_`` etc. describe
    the body; :meth:`Message.via_shm` moves that body into a shared-memory slot.
    """
    source_info = []
    layouts = []
    byte_sizes = []
    body = []
    for data, meta in items:
        bufs = kbhash.encode(data)
        sizes = [memoryview(b).nbytes for b in bufs]
        layouts.append(_LAYOUT.build({"sizes": sizes, "types": [i % 2 for i in range(len(bufs))]}))
        byte_sizes.append(sum(sizes))
        source_info.append(meta.to_hash())
        body.extend(bufs)
    header = _HEADER.build({"sourceInfo": source_info, "_bufferSetLayout_": layouts, "nData": len(items),
                            "byteSizes": byte_sizes})
    total = sum(byte_sizes)
    if total > 0xFFFFFFFF:
        raise PipelineProtocolError(f"message body of {total} bytes does not fit the u32 size field")
    return Message(header, [b for b in body if memoryview(b).nbytes], total)


class Message(list):
    """The buffers of a data message (a list, ready for sendmsg) plus what builds them."""

    def __init__(self, header, body, body_size):
        hb = kbhash.encode_bytes(header)
        super().__init__([U32.pack(len(hb)) + hb + U32.pack(body_size)] + body)
        self.header = header
        self.body = body
        self.body_size = body_size

    def copied(self):
        """The same message with its own copy of the body (the one copy of the items'
        buffers), for a message that outlives the arrays it was made from."""
        m = Message.__new__(Message)
        body = [bytes(memoryview(b).cast("B")) for b in self.body]
        list.__init__(m, [self[0]] + body)
        m.header, m.body, m.body_size = self.header, body, self.body_size
        return m

    def via_shm(self, slot, gen):
        """The same message with its body in shared-memory slot ``slot`` (generation ``gen``)."""
        ref = _SHM_REF.build({"slot": int(slot), "gen": int(gen), "size": self.body_size})
        h = Hash(self.header)
        h.set_typed((("kbShmFd", ref, None),))
        hb = kbhash.encode_bytes(h)
        return [U32.pack(len(hb)) + hb + U32.pack(0)]


def eos_message():
    """The framed end-of-stream message (Karabo C++ form, empty body)."""
    header = _EOS.build({"endOfStream": True, "_bufferSetLayout_": [], "nData": 0, "byteSizes": []})
    hb = kbhash.encode_bytes(header)
    return U32.pack(len(hb)) + hb + U32.pack(0)


def parse_control(data):
    """(reason, Hash) of a control frame's archive; raises PipelineProtocolError."""
    try:
        h = kbhash.decode(data)
    except kbhash.DecodeError as e:
        raise PipelineProtocolError(f"control frame is not a Hash archive: {e}") from None
    reason = h.get("reason")
    if not isinstance(reason, str):
        raise PipelineProtocolError("control frame without a 'reason'")
    return reason, h


class Hello:
    """A validated hello (see :func:`parse_hello`).

    Attributes
    ----------
    instance_id, data_distribution, on_slowness, memory_location : str
    max_queue_length : int
        In ``[1, MAX_QUEUE_LENGTH]``.
    credit_window : int
        In ``[1, MAX_CREDIT_WINDOW]``.

    A shared-memory offer (``kbShmFd``) is checked by :func:`kbstream.pipeline.shm.connect_input`.
    """

    __slots__ = ("instance_id", "data_distribution", "on_slowness", "memory_location", "max_queue_length",
                 "credit_window")


def _hello_choice(h, key, default, allowed):
    value = h.get(key, default)
    if not isinstance(value, str) or value not in allowed:
        raise PipelineProtocolError(f"hello has {key}={value!r}: not one of {allowed}")
    return value


def _hello_count(h, key, default, cap):
    value = h.get(key, default)
    # an integer of any width; not a bool, a float (inf, nan, 2.5) or a string
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise PipelineProtocolError(f"hello has a {key} of type {type(value).__name__}, not an integer")
    value = int(value)
    if value < 0:
        raise PipelineProtocolError(f"hello has a negative {key} ({value})")
    return min(max(1, value), cap)


def parse_hello(h):
    """Check every value of a hello (a decoded control Hash); returns a :class:`Hello`.

    Types and choices must be what Karabo sends (PipelineProtocolError otherwise);
    ``maxQueueLength`` and ``kbCreditWindow`` are integers >= 0, where 0 counts as 1 and
    values above :data:`MAX_QUEUE_LENGTH` / :data:`MAX_CREDIT_WINDOW` are cut to them.
    """
    out = Hello()
    iid = h.get("instanceId")
    if not isinstance(iid, str) or not iid:
        raise PipelineProtocolError("hello without instanceId")
    if len(iid) > MAX_ID_LENGTH:
        raise PipelineProtocolError(f"hello has an instanceId of {len(iid)} characters")
    out.instance_id = iid
    out.data_distribution = _hello_choice(h, "dataDistribution", "copy", DISTRIBUTION)
    out.on_slowness = _hello_choice(h, "onSlowness", "drop", ON_SLOWNESS)
    out.memory_location = _hello_choice(h, "memoryLocation", "remote", ("remote", "local"))
    out.max_queue_length = _hello_count(h, "maxQueueLength", 2, MAX_QUEUE_LENGTH)
    out.credit_window = _hello_count(h, "kbCreditWindow", 1, MAX_CREDIT_WINDOW)
    return out


class MessageHeader:
    """A validated data header.

    Attributes
    ----------
    eos : bool
        End of stream.
    metas : list of ChannelMetaData
    buffers : list of list of int
        Per item, the sizes of the buffers to receive (BufferSet split when the
        sender gave one, else one buffer per item).
    body_size : int
    """

    __slots__ = ("eos", "metas", "buffers", "body_size", "shm")


def _sizes(value, what):
    """A list of non-negative ints from a decoded size vector, or PipelineProtocolError."""
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        raise PipelineProtocolError(f"{what} is not a vector of sizes") from None
    if any(v < 0 or v > 0xFFFFFFFF for v in out) or isinstance(value, (str, bytes)):
        raise PipelineProtocolError(f"{what} has sizes out of range")
    return out


def parse_header(data, body_size):
    """Validate a data header against the declared body size.

    Raises PipelineProtocolError when keys are missing or mistyped, when the
    per-item sizes disagree with each other or with the body size, when counts
    are absurd, or when the header is far larger than its items need.
    """
    try:
        h = kbhash.decode(data)
    except kbhash.DecodeError as e:
        raise PipelineProtocolError(f"data header is not a Hash archive: {e}") from None
    m = MessageHeader()
    m.shm = None
    if "kbShm" in h:
        raise PipelineProtocolError("a shared-memory reference by file name (kbShm) is never accepted")
    shm = h.get("kbShmFd")
    if shm is not None:
        if body_size != 0 or not isinstance(shm, Hash) or any(type(shm.get(k)) is not int for k in _SHM_REF_KEYS) \
                or not 0 <= shm["slot"] < 2**32 or not 0 < shm["gen"] < 2**64 \
                or not 0 <= shm["size"] <= 0xFFFFFFFF:
            raise PipelineProtocolError("malformed kbShmFd reference")
        m.shm = (shm["slot"], shm["gen"], shm["size"])
        body_size = shm["size"]
    eos = h.get("endOfStream", False)
    if not isinstance(eos, bool):
        raise PipelineProtocolError("endOfStream is not a BOOL")
    m.eos = eos
    if "channelId" in h or "chunkId" in h:
        raise PipelineProtocolError("'local' (same-process) messages are not supported")
    info = h.get("sourceInfo", [])
    if not isinstance(info, list) or not all(isinstance(x, Hash) for x in info):
        raise PipelineProtocolError("sourceInfo is not a VECTOR_HASH")
    byte_sizes = h.get("byteSizes")
    if byte_sizes is not None:
        byte_sizes = _sizes(byte_sizes, "byteSizes")
    layout = h.get("_bufferSetLayout_")
    buffers = []
    if layout is not None and not isinstance(layout, list):
        raise PipelineProtocolError("_bufferSetLayout_ is not a VECTOR_HASH")
    if layout:
        if len(layout) != len(info):
            raise PipelineProtocolError(f"_bufferSetLayout_ has {len(layout)} entries for {len(info)} items")
        for i, lay in enumerate(layout):
            if not isinstance(lay, Hash) or "sizes" not in lay:
                raise PipelineProtocolError(f"_bufferSetLayout_[{i}] has no sizes")
            buffers.append(_sizes(lay["sizes"], f"_bufferSetLayout_[{i}].sizes"))
        if byte_sizes:
            if len(byte_sizes) != len(info) or any(b != sum(s) for b, s in zip(byte_sizes, buffers)):
                raise PipelineProtocolError("byteSizes disagree with _bufferSetLayout_")
    elif byte_sizes:
        if len(byte_sizes) != len(info):
            raise PipelineProtocolError(f"byteSizes has {len(byte_sizes)} entries for {len(info)} items")
        buffers = [[b] for b in byte_sizes]
    elif info:
        raise PipelineProtocolError("data header has items but neither _bufferSetLayout_ nor byteSizes")
    nbuf = sum(len(b) for b in buffers)
    if nbuf > MAX_BUFFERS:
        raise PipelineProtocolError(f"message declares {nbuf} buffers")
    total = sum(sum(b) for b in buffers)
    if total != body_size:
        raise PipelineProtocolError(f"item sizes add up to {total} bytes but the body has {body_size}")
    m.metas = [ChannelMetaData.from_hash(x) for x in info]
    # A header holds its items' metadata and sizes.  One much larger than they need hides
    # something else (millions of empty Hashes: 4 bytes each on the wire, hundreds in
    # memory); it is refused, whatever it decoded into.
    room = HEADER_ROOM + sum(HEADER_ROOM_PER_ITEM + 4 * len(meta.source) + 16 * len(sizes)
                             for meta, sizes in zip(m.metas, buffers))
    if len(data) > room:
        raise PipelineProtocolError(f"data header of {len(data)} bytes for {len(info)} items: "
                                    f"more than {room} bytes they can need")
    m.buffers = buffers
    m.body_size = body_size
    return m
