"""Exceptions of the pipeline channels (leaves of :mod:`kbstream.errors`' tree).

::

    KbStreamError
    +-- PipelineError
        +-- PipelineProtocolError (ProtocolError, ValueError)  a peer broke Karabo's protocol
        +-- SchemaError (ValueError)                  data does not match the declared schema
        +-- PipelineConfigError (ValueError)          a channel option has an unknown value
        +-- ChannelClosed (StateError, RuntimeError)  the channel was closed
        +-- ConnectTimeout (ChannelTimeout, TimeoutError)  outputs did not connect in time
        +-- ConnectionLost (ConnectionError, OSError) a peer closed the connection
"""

from ..errors import ChannelTimeout, KbStreamError, ProtocolError, StateError

__all__ = [
    "PipelineError",
    "PipelineProtocolError",
    "SchemaError",
    "PipelineConfigError",
    "ChannelClosed",
    "ChannelTimeout",
    "ConnectTimeout",
    "ConnectionLost",
]


class PipelineError(KbStreamError):
    """Base class of pipeline channel errors."""


class PipelineProtocolError(PipelineError, ProtocolError):
    """A peer sent something that is not Karabo's pipeline protocol (the connection is closed)."""


class SchemaError(PipelineError, ValueError):
    """Data does not match the channel's declared data schema."""


class PipelineConfigError(PipelineError, ValueError):
    """A channel option has a value Karabo does not know (``onSlowness="later"``, ...)."""


class ChannelClosed(PipelineError, StateError):
    """The channel was closed."""


class ConnectTimeout(PipelineError, ChannelTimeout):
    """An input's outputs did not all connect within the timeout (``wait_connected``)."""


class ConnectionLost(PipelineError, ConnectionError):
    """The peer closed the connection (handled inside the channels: they reconnect or
    forget the peer)."""
