"""kbstream: Karabo data transport with a compiled zero-copy core.

Drop-in replacement for ``karabo_bridge`` (``Client``, ``ServerInThread``, ``serialize``,
``deserialize``) and ``extra_data.export.ZMQStreamer``: only the import changes::

    from kbstream import Client, ServerInThread, ZMQStreamer, serialize, deserialize

Subpackages, each with one job:

``kbstream.bridge``
    the Karabo Bridge protocol over ZeroMQ (codec, the one sender, servers, client).
``kbstream.pipeline``
    Karabo's pipeline output / input channels on Karabo's TCP protocol.
``kbstream.broker``
    Karabo's broker layer (AMQP on RabbitMQ): instances, discovery, channel look-up.
``kbstream.replay``
    ``karabo-bridge-serve-run`` / ``-serve-files``: saved runs over the bridge.

The bridge names at this level are loaded on first use, so ``import kbstream.pipeline``
and ``import kbstream.broker`` load neither zmq nor the bridge codec.  ``kbstream.backend``
names the bridge codec in use (``"cython"``, or ``"pure"`` with ``KB_IMPL=pure``).  Every
exception is in the tree under :class:`KbStreamError` (:mod:`kbstream.errors`).
"""

from .errors import (
    BindError,
    ChannelTimeout,
    EncodeError,
    EncodeOverflowError,
    KbStreamError,
    ProtocolError,
    ServerError,
    ServerStateError,
    ShapeMismatchError,
    StateError,
    TruncatedFrameError,
    UnknownContentError,
    UnsupportedDtypeError,
)

from ._lazy import lazy

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("kbstream")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

#: names served lazily from kbstream.bridge
_BRIDGE_NAMES = (
    "serialize",
    "deserialize",
    "Client",
    "ServerInThread",
    "ZMQStreamer",
    "flatten_hash",
    "keep_large_buffers",
    "backend",
)

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
    "StateError",
    "ServerStateError",
    "BindError",
]

__getattr__, __dir__ = lazy(__name__, {name: "bridge" for name in _BRIDGE_NAMES}, __all__)
