"""kbstream: Karabo Bridge streaming with a compiled zero-copy codec.

Drop-in replacement for ``karabo_bridge`` (``Client``, ``ServerInThread``, ``serialize``,
``deserialize``) and ``extra_data.export.ZMQStreamer``: only the import changes::

    from kbstream import Client, ServerInThread, ZMQStreamer, serialize, deserialize

Protocol 2.2 (default) and 1.0 are produced, 1.0 / 2.0 / 2.1 / 2.2 understood; frames are
byte-identical with ``karabo_bridge.serialize`` for the same input.  Arrays leave as their
own memory and arrive as numpy views on the received frames.

Implementation selection: the compiled codec (``kbstream._codec``) is used by default; set
``KB_IMPL=pure`` to use the pure-Python twin (``kbstream._pure``).  There is no silent
fallback: a missing extension makes ``import kbstream`` fail and say how to build it.
``kbstream.backend`` names the codec in use (``"cython"`` or ``"pure"``).
"""

from .errors import (
    ChannelTimeout,
    EncodeError,
    EncodeOverflowError,
    KbStreamError,
    ProtocolError,
    ServerError,
    ServerStateError,
    ShapeMismatchError,
    TruncatedFrameError,
    UnknownContentError,
    UnsupportedDtypeError,
)

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("kbstream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

from kbhash._backend import select as _select

_backend, backend = _select("kbstream")

from .bridge import (  # noqa: E402  (needs _backend)
    Client,
    ServerInThread,
    ZMQStreamer,
    deserialize,
    flatten_hash,
    serialize,
)
from ._memory import keep_large_buffers  # noqa: E402

__all__ = [
    "backend",
    "__version__",
    # karabo_bridge / extra_data names
    "serialize",
    "deserialize",
    "Client",
    "ServerInThread",
    "ZMQStreamer",
    # kbhash input
    "flatten_hash",
    # receive-side memory
    "keep_large_buffers",
    # errors
    "KbStreamError",
    "ProtocolError",
    "TruncatedFrameError",
    "UnknownContentError",
    "UnsupportedDtypeError",
    "ShapeMismatchError",
    "ServerError",
    "EncodeError",
    "EncodeOverflowError",
    "ChannelTimeout",
    "ServerStateError",
]
