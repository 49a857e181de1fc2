"""Every exception kbstream raises, in one tree under :class:`KbStreamError`.

This module is neutral: it imports nothing (no zmq, no codec), so the compiled codecs,
their pure-Python twins, the sockets and every subpackage can share it.

Every class also subclasses the builtin that callers of the peers already catch, so code
written against ``karabo_bridge`` or ``extra_data`` keeps working: malformed input is a
``ValueError``, unencodable values ``TypeError``, timeouts ``TimeoutError``, a wrong call
order ``RuntimeError``, files and sockets ``OSError``.

Hierarchy (the subpackages' own ``errors`` modules add their leaves; all are listed here)::

    KbStreamError
    +-- ProtocolError (ValueError)          a message does not follow its protocol
    |   +-- TruncatedFrameError             a bridge msgpack frame ends inside a value
    |   +-- UnknownContentError             bridge header 'content' is not 'msgpack' / 'array'
    |   +-- UnsupportedDtypeError           object, structured, zero-size or unknown dtype
    |   +-- ShapeMismatchError              prod(shape) * itemsize != frame length, bad shape
    |   +-- AmplificationError              a bridge message decodes into too many containers
    |   +-- ServerError                     a bridge server answered 'Error: ...'
    |   +-- pipeline.PipelineProtocolError  a pipeline peer broke Karabo's TCP protocol
    +-- EncodeError (TypeError, ValueError) a value cannot be put on the wire
    |   +-- EncodeOverflowError (OverflowError)   int outside [-2**63, 2**64)
    +-- ChannelTimeout (TimeoutError)       nothing arrived / no peer within the timeout
    |   +-- pipeline.ConnectTimeout         an input's outputs did not connect in time
    +-- StateError (RuntimeError)           a call in the wrong life-cycle state
    |   +-- ServerStateError                bridge server or client: feed() after close() ...
    |   +-- pipeline.ChannelClosed          the channel was closed
    |   +-- broker.NotStartedError          the broker instance or transport is not started
    +-- BindError (OSError)                 a socket cannot bind its endpoint
    +-- pipeline.PipelineError              pipeline channels: the leaves above, and
    |   +-- SchemaError (ValueError)        data does not match the declared data schema
    |   +-- PipelineConfigError (ValueError)  an option value that is not allowed
    |   +-- ConnectionLost (ConnectionError)  the peer went away during an operation
    +-- broker.BrokerError                  broker layer: NotStartedError above, and
    |   +-- BrokerConfigError (ValueError), BrokerConnectionError (ConnectionError),
    |   +-- InvalidInstanceId, InvalidSlotName, InvalidOutputId, MessageError (ValueError),
    |   +-- InstanceIdInUse, RemoteError, RequestTimeout (TimeoutError)
    |   +-- ReconfigureError (ValueError)   slotReconfigure of a property that may not change
    +-- replay.ReplayError                  finding, reading and replaying run files
    |   +-- RunNotFoundError (FileNotFoundError), RunFileError (OSError)
    |   |   +-- TruncatedFileError          a train's data lies past the end of its file
    |   +-- PatternError, NoMatchError (ValueError)
    +-- matcher.MatcherError                train matcher: sources, options, bookkeeping
        +-- SourceSpecError (ValueError)    a source is not [ALIAS@]DEVICE:CHANNEL[=HOST:PORT]
        |   +-- UnresolvedSourceError       a source has no endpoint and there is no resolver
        |   +-- UnknownSourceError          an item names a source the matcher does not have
        +-- MatcherConfigError (ValueError) an option value that is not allowed
        +-- MatcherStateError (StateError)  a train settled twice, or never handed out

A test walks the package and checks that every exception class it defines is in this tree.

kbhash raises its own tree (:class:`kbhash.KbHashError`); where kbstream encodes a Hash
for the wire it turns :class:`kbhash.EncodeError` into :class:`EncodeError` (the kbhash
error is the ``__cause__``), so a kbstream caller needs to catch one tree only.
"""

__all__ = [
    "KbStreamError",
    "ProtocolError",
    "TruncatedFrameError",
    "UnknownContentError",
    "UnsupportedDtypeError",
    "ShapeMismatchError",
    "AmplificationError",
    "ServerError",
    "EncodeError",
    "EncodeOverflowError",
    "ChannelTimeout",
    "StateError",
    "ServerStateError",
    "BindError",
]


class KbStreamError(Exception):
    """Base class of every error raised by kbstream."""


class ProtocolError(KbStreamError, ValueError):
    """A received message does not follow its protocol.

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


class TruncatedFrameError(ProtocolError):
    """A bridge msgpack frame ends before the value it announces.

    (A truncated Hash archive is :class:`kbhash.TruncatedError`, a run file cut short
    :class:`kbstream.replay.TruncatedFileError`.)
    """


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


class AmplificationError(ProtocolError):
    """A bridge message would decode into more msgpack maps and arrays than allowed.

    A map or an array takes one byte on the wire and some 60 to 200 bytes as a Python
    dict or list, so a message made of them is refused once it holds more than the
    limit (``max_containers`` of :func:`kbstream.deserialize` and
    :class:`kbstream.Client`).

    Attributes
    ----------
    limit : int or None
        The number of containers the message was allowed.
    """

    def __init__(self, message, frame_index=None, offset=None, limit=None):
        super().__init__(message, frame_index, offset)
        self.limit = limit


class ServerError(ProtocolError):
    """The server replied with an error text instead of a train.

    ``karabo_bridge`` REP servers answer any request other than ``next`` with the single
    frame ``Error: bad request <request>``.
    """


class EncodeError(KbStreamError, TypeError, ValueError):
    """A value cannot be put on the wire (``karabo_bridge`` raises ``TypeError`` here too)."""


class EncodeOverflowError(EncodeError, OverflowError):
    """An integer does not fit msgpack's int64 / uint64 range."""


class ChannelTimeout(KbStreamError, TimeoutError):
    """Nothing arrived (or no peer connected) within the timeout.

    Attributes
    ----------
    endpoint : str or None
        The endpoint or channel that was waited on.
    timeout : float or None
        The timeout in seconds.
    """

    def __init__(self, message, endpoint=None, timeout=None):
        super().__init__(message)
        self.endpoint = endpoint
        self.timeout = timeout


class StateError(KbStreamError, RuntimeError):
    """A method was called in the wrong life-cycle state (``start()`` twice, ...)."""


class ServerStateError(StateError):
    """A bridge server or client was used in the wrong state (``feed()`` after ``close()``)."""


class BindError(KbStreamError, OSError):
    """A socket cannot bind its endpoint (in use, bad address, no such interface).

    Attributes
    ----------
    endpoint : str or None
    """

    def __init__(self, message, endpoint=None):
        super().__init__(message)
        self.endpoint = endpoint

    def __str__(self):
        return self.args[0]
