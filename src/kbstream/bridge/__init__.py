"""The Karabo Bridge protocol over ZeroMQ: codec, the one sender, servers, client.

Rooms, each with one job (arrows point down)::

    server.py   ServerInThread, ZMQStreamer: trains fed from the caller's thread
    client.py   Client: REQ / SUB / PULL receiver
    sender.py   the one sender loop every kbstream bridge server uses (also the replay):
                endpoint rules, socket options, REP / PUB / PUSH behaviour, frame tracking
    codec.py    serialize / deserialize / flatten_hash; compiled or pure implementation
    _codec.pyx  the compiled codec         } both import only _rules and kbstream.errors,
    _pure.py    its pure-Python twin       } provide _rules.PUBLIC_API; no sockets, no zmq
    _rules.py   limits, shared checks and messages, the timestamp metadata builder
    _memory.py  keep_large_buffers: the receive-side allocator setting
    stacking.py ModuleStacker: detector modules stacked into one source (replay, matcher)

The codec names are loaded with the package; the socket names (servers, client, sender)
on first use, so code that only encodes or decodes never loads zmq.

Wire format: ``docs/wire/karabo-bridge-protocol.md``.
"""

from .._lazy import lazy

from ._memory import keep_large_buffers
from ._rules import source_metadata, timestamp_fields
from .codec import (
    ENCODE_VERSIONS,
    MAX_CONTAINERS,
    backend,
    deserialize,
    flatten_hash,
    serialize,
)

#: socket names, loaded on first use: name -> module
_LAZY = {
    "Client": "client",
    "ServerInThread": "server",
    "ZMQStreamer": "server",
    "Sender": "sender",
    "parse_endpoint": "sender",
    "SOCKET_TYPES": "sender",
}

__all__ = [
    "serialize",
    "deserialize",
    "flatten_hash",
    "source_metadata",
    "timestamp_fields",
    "Client",
    "ServerInThread",
    "ZMQStreamer",
    "Sender",
    "parse_endpoint",
    "keep_large_buffers",
    "backend",
    "ENCODE_VERSIONS",
    "MAX_CONTAINERS",
    "SOCKET_TYPES",
]

__getattr__, __dir__ = lazy(__name__, _LAZY, __all__)
