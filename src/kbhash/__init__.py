"""kbhash: the Karabo Hash and its binary format, with a zero-copy compiled codec.

The codec is byte-identical with Karabo's C++ serializer ("Bin").  Encoding
returns a list of buffers whose array payloads are the arrays' own memory
(split as Karabo's BufferSet splits it); decoding returns numpy views on the
input.

Implementation selection: the compiled codec (``kbhash._codec``) is used by
default; set ``KB_IMPL=pure`` to use the pure-Python twin (``kbhash._pure``).
There is no silent fallback: if the extension is missing, importing kbhash
fails and says how to build it.  ``kbhash.backend`` names the one in use;
:func:`select_backend` applies the same rule to any package that ships such a
pair of codecs.

Decoding is bounded for hostile input: nesting by ``MAX_DEPTH``, every length
prefix by the bytes present, and the number of objects a decode creates
(Hashes, attribute sets, arrays) by ``max(DEFAULT_MIN_OBJECTS, nbytes //
DEFAULT_BYTES_PER_OBJECT)`` -- :func:`object_limit`, :func:`set_object_limit`,
``decode(..., max_objects=n)``; beyond it :class:`LimitError`.  See
docs/safety-kbhash.md.
"""

from ._types import NDARRAY_DTYPE, Encoding, HashType, dtype_type
from ._infer import infer_type
from ._values import (
    DEFAULT_BYTES_PER_OBJECT,
    DEFAULT_MIN_OBJECTS,
    MAX_DEPTH,
    object_limit,
    set_object_limit,
)
from .errors import DecodeError, EncodeError, KbHashError, LimitError, TruncatedError, UnknownTypeError
from .hash import Attributes, Hash
from .special import ImageData, Schema
from .template import HashTemplate
from .timestamp import Timestamp

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("kbstream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

from ._backend import select_backend

_backend_module, backend = select_backend("kbhash")

encode = _backend_module.encode
encode_bytes = _backend_module.encode_bytes
decode = _backend_module.decode
decode_prefix = _backend_module.decode_prefix


def bufferset_layout(buffers):
    """Sizes and BufferSet types of the buffers :func:`encode` returned.

    Returns ``(sizes, types)`` where type 0 is ordinary bytes (Karabo's COPY)
    and 1 a BYTE_ARRAY payload (NO_COPY_BYTEARRAY_CONTENTS): the payloads are at
    the odd positions.
    """
    sizes = [memoryview(b).nbytes for b in buffers]
    return sizes, [i % 2 for i in range(len(buffers))]


__all__ = [
    "Hash",
    "HashTemplate",
    "Attributes",
    "HashType",
    "Encoding",
    "ImageData",
    "Schema",
    "Timestamp",
    "encode",
    "encode_bytes",
    "decode",
    "decode_prefix",
    "bufferset_layout",
    "infer_type",
    "NDARRAY_DTYPE",
    "dtype_type",
    "MAX_DEPTH",
    "object_limit",
    "set_object_limit",
    "DEFAULT_MIN_OBJECTS",
    "DEFAULT_BYTES_PER_OBJECT",
    "backend",
    "select_backend",
    "KbHashError",
    "DecodeError",
    "TruncatedError",
    "UnknownTypeError",
    "LimitError",
    "EncodeError",
    "__version__",
]
