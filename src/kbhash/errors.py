"""Exceptions of kbhash.

Every class also derives from the builtin that fits, so callers that only know
the builtins (``ValueError``, ``TypeError``) still catch them.  Decoding errors
carry the absolute byte offset in the archive (across all buffers when a list of
buffers is decoded) where the problem was found.
"""

__all__ = [
    "KbHashError",
    "DecodeError",
    "TruncatedError",
    "UnknownTypeError",
    "LimitError",
    "EncodeError",
]


class KbHashError(Exception):
    """Base class of every error raised by kbhash."""


class DecodeError(KbHashError, ValueError):
    """The bytes are not a valid Karabo Hash archive.

    Attributes
    ----------
    offset : int
        Absolute byte offset at which the problem was detected.
    """

    def __init__(self, message, offset=None):
        super().__init__(message)
        self.offset = offset


class TruncatedError(DecodeError):
    """The archive ends before a value, or a length prefix points past the end."""


class UnknownTypeError(DecodeError):
    """A type id that is not part of the format (or not allowed at that place).

    Attributes
    ----------
    type_code : int
        The offending type id.
    """

    def __init__(self, message, offset=None, type_code=None):
        super().__init__(message, offset)
        self.type_code = type_code


class LimitError(DecodeError):
    """Decoding the archive would create more objects than the decode limit allows.

    The archive may be valid; it is refused because it would make far more
    Python objects (Hashes, attribute sets, arrays) per byte than Karabo's own
    data do, which is how a small hostile message could take some 80 times
    its size in memory.  The limit is ``max(4096, nbytes // 16)`` by
    default (:func:`kbhash.object_limit`, :func:`kbhash.set_object_limit`);
    pass ``max_objects=`` to :func:`kbhash.decode` to raise it for one call.
    See docs/safety-kbhash.md.

    Attributes
    ----------
    offset : int
        Absolute byte offset of the object that went over the limit.
    limit : int
        The number of objects that was allowed.
    """

    def __init__(self, message, offset=None, limit=None):
        super().__init__(message, offset)
        self.limit = limit


class EncodeError(KbHashError, TypeError, ValueError):
    """A value cannot be written as the requested (or inferred) Karabo type."""
