"""Exceptions of the stream tools (``glimpse``, its picture, ``monitor``, ``simulate``).

:class:`ToolError` is a branch of kbstream's one tree
(:class:`kbstream.errors.KbStreamError`); each leaf also subclasses the builtin a
caller would catch anyway.
"""

from ..errors import KbStreamError

__all__ = ["ToolError", "PlotDependencyError", "PictureError", "TrainNotFoundError"]


class ToolError(KbStreamError):
    """Base class of the errors of :mod:`kbstream.tools`."""


class PlotDependencyError(ToolError, ImportError):
    """A picture was asked for, but the optional plotting packages (extra-geom,
    matplotlib: ``pip install 'kbstream[plot]'``) are not installed.

    ``missing`` names the package that could not be imported.
    """

    def __init__(self, message, missing=None):
        super().__init__(message)
        self.missing = missing


class PictureError(ToolError, ValueError):
    """A picture cannot be made: no array to draw, a frame index outside the data, a
    geometry file that cannot be read or does not fit the detector's modules."""


class TrainNotFoundError(ToolError, LookupError):
    """The asked train id is not in the run (``train_ids`` holds the run's first and last
    ids, when known)."""

    def __init__(self, message, train_ids=()):
        super().__init__(message)
        self.train_ids = tuple(train_ids)
