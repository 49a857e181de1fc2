"""Exceptions of the pipeline channels."""

from ..errors import ChannelTimeout, KbStreamError, ProtocolError

__all__ = ["PipelineError", "PipelineProtocolError", "SchemaError", "ChannelClosed", "ChannelTimeout"]


class PipelineError(KbStreamError):
    """Base class of pipeline channel errors."""


class PipelineProtocolError(PipelineError, ProtocolError):
    """A peer sent something that is not Karabo's pipeline protocol (the connection is closed)."""


class SchemaError(PipelineError, ValueError):
    """Data does not match the channel's declared data schema."""


class ChannelClosed(PipelineError, RuntimeError):
    """The channel was closed."""
