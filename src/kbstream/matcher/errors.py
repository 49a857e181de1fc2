"""The train matcher's errors (leaves of :class:`kbstream.KbStreamError`).

::

    KbStreamError
    +-- matcher.MatcherError                train matcher: sources, options, bookkeeping
        +-- SourceSpecError (ValueError)    a source is not ``[ALIAS@]DEVICE:CHANNEL[=HOST:PORT]``
        |   +-- UnresolvedSourceError       a source has no endpoint and there is no resolver
        |   +-- UnknownSourceError          an item names a source the matcher does not have
        +-- MatcherConfigError (ValueError) an option value that is not allowed
        +-- MatcherStateError (RuntimeError)  a train settled twice, or never handed out
"""

from ..errors import KbStreamError, StateError

__all__ = [
    "MatcherError",
    "SourceSpecError",
    "UnresolvedSourceError",
    "UnknownSourceError",
    "MatcherConfigError",
    "MatcherStateError",
]


class MatcherError(KbStreamError):
    """Base class of the train matcher's errors."""


class SourceSpecError(MatcherError, ValueError):
    """A source specification does not follow ``[ALIAS@]DEVICE:CHANNEL[=HOST:PORT]``.

    Attributes
    ----------
    spec : str or None
        The text that was given.
    """

    def __init__(self, message, spec=None):
        super().__init__(message)
        self.spec = spec


class UnresolvedSourceError(SourceSpecError):
    """A source without ``=HOST:PORT`` was given, and no resolver to find its endpoint."""


class UnknownSourceError(SourceSpecError):
    """An item was offered for a source name the matcher was not configured with."""


class MatcherConfigError(MatcherError, ValueError):
    """An option of the matcher has a value that is not allowed (mode, buffer, ...)."""


class MatcherStateError(MatcherError, StateError):
    """The matcher's bookkeeping was used out of order (a train settled twice, ...)."""
