"""Exceptions raised while finding, reading and replaying run files.

:class:`ReplayError` is a branch of kbstream's one tree
(:class:`kbstream.errors.KbStreamError`).  Each class also subclasses the
builtin a caller would naturally catch (``FileNotFoundError``, ``OSError``,
``ValueError``), so code written against extra_data's behaviour keeps working.
A socket that cannot bind raises kbstream's own
:class:`~kbstream.errors.BindError`, re-exported here.
"""

from ..errors import BindError, KbStreamError

__all__ = [
    "ReplayError",
    "RunNotFoundError",
    "RunFileError",
    "TruncatedFileError",
    "PatternError",
    "NoMatchError",
    "BindError",
]


class ReplayError(KbStreamError):
    """Base class of every error of :mod:`kbstream.replay`."""


class RunNotFoundError(ReplayError, FileNotFoundError):
    """A proposal, run directory or file does not exist.

    ``searched`` lists the paths or glob patterns that were tried.
    """

    def __init__(self, message, searched=()):
        super().__init__(message)
        self.searched = list(searched)


class RunFileError(ReplayError, OSError):
    """A run file cannot be opened, does not have the EuXFEL layout, or a train's data in
    it cannot be read.

    Attributes
    ----------
    path : str or None
        The file.
    source, key, train_id
        Which data of which train could not be read (None when the whole file failed).
    """

    def __init__(self, message, path=None, source=None, key=None, train_id=None):
        super().__init__(message)
        self.path = path
        self.source = source
        self.key = key
        self.train_id = train_id

    def __str__(self):
        return self.args[0]


class TruncatedFileError(RunFileError):
    """Data of a train lies beyond the end of its file (truncated copy)."""


class PatternError(ReplayError, ValueError):
    """A ``SRC`` or ``SRC[key]`` pattern is malformed."""

    def __init__(self, message, pattern=None):
        super().__init__(message)
        self.pattern = pattern


class NoMatchError(ReplayError, ValueError):
    """A selection pattern matches no source (or no key) of the run."""

    def __init__(self, message, pattern=None):
        super().__init__(message)
        self.pattern = pattern
