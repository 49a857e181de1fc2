"""Exceptions of kbstream, shared by the compiled codec, its pure-Python twin and the sockets.

Every class also subclasses the builtin that callers of ``karabo_bridge`` already catch, so
code written against the peer keeps working: decoding problems are ``ValueError``s,
unencodable values ``TypeError``s, receive timeouts ``TimeoutError``s.

Hierarchy::

    KbStreamError
    +-- ProtocolError (ValueError)          a message does not follow the bridge protocol
    |   +-- TruncatedError                  a msgpack frame ends inside a value
    |   +-- UnknownContentError             header 'content' is not 'msgpack' / 'array'
    |   +-- UnsupportedDtypeError           object, structured, zero-size or unknown dtype
    |   +-- ShapeMismatchError              prod(shape) * itemsize != frame length, bad shape
    |   +-- ServerError                     the server answered 'Error: ...' (bad request)
    +-- EncodeError (TypeError)             a value cannot be put on the wire
    |   +-- EncodeOverflowError (OverflowError)   int outside [-2**63, 2**64)
    +-- ChannelTimeout (TimeoutError)       nothing received within the timeout
    +-- ServerStateError (RuntimeError)     start() twice, feed() after stop(), ...

The codec raises these with the same messages in both implementations; the tests pin them.
"""

__all__ = [
    "KbStreamError",
    "ProtocolError",
    "TruncatedError",
    "UnknownContentError",
    "UnsupportedDtypeError",
    "ShapeMismatchError",
    "ServerError",
    "EncodeError",
    "EncodeOverflowError",
    "ChannelTimeout",
    "ServerStateError",
]


class KbStreamError(Exception):
    """Base class of every error raised by kbstream."""


class ProtocolError(KbStreamError, ValueError):
    """A received message does not follow the Karabo Bridge protocol.

    Attributes
    ----------
    frame_index : int or None
        Index of the offending frame in the multipart message.
    offset : int or None
        Byte offset inside that frame, when known.
    """

    def __init__(self, message, frame_index=None, offset=None):
        super().__init__(message)
        self.frame_index = frame_index
        self.offset = offset


class TruncatedError(ProtocolError):
    """A msgpack frame ends before the value it announces."""


class UnknownContentError(ProtocolError):
    """A 2.x header announces a ``content`` other than ``'msgpack'`` or ``'array'``.

    Pickled content of old servers is refused on purpose: unpickling network data
    executes code.
    """

    def __init__(self, message, frame_index=None, offset=None, content=None):
        super().__init__(message, frame_index, offset)
        self.content = content


class UnsupportedDtypeError(ProtocolError):
    """An array header names an object, structured, empty or unknown dtype."""

    def __init__(self, message, frame_index=None, offset=None, dtype=None):
        super().__init__(message, frame_index, offset)
        self.dtype = dtype


class ShapeMismatchError(ProtocolError):
    """An array's declared shape and dtype do not match the bytes that carry it."""


class ServerError(ProtocolError):
    """The server replied with an error text instead of a train.

    ``karabo_bridge`` REP servers answer any request other than ``next`` with the single
    frame ``Error: bad request <request>``.
    """


class EncodeError(KbStreamError, TypeError):
    """A value cannot be serialized (``karabo_bridge`` raises ``TypeError`` here too)."""


class EncodeOverflowError(EncodeError, OverflowError):
    """An integer does not fit msgpack's int64 / uint64 range."""


class ChannelTimeout(KbStreamError, TimeoutError):
    """No message arrived within the receive timeout.

    Attributes
    ----------
    endpoint : str
        The endpoint the socket was waiting on.
    timeout : float or None
        The timeout in seconds.
    """

    def __init__(self, message, endpoint=None, timeout=None):
        super().__init__(message)
        self.endpoint = endpoint
        self.timeout = timeout


class ServerStateError(KbStreamError, RuntimeError):
    """A server method was called in the wrong state (e.g. ``start()`` twice)."""
