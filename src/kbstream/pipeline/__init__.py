"""Karabo pipeline channels over Karabo's own TCP protocol.

``OutputChannel`` (a TCP server) and ``InputChannel`` (a TCP client) speak the
protocol of Karabo's C++ ``xms`` channels byte for byte, so a kbstream channel
connects to a real Karabo device's channel and back.  Items are kbhash Hashes;
arrays go out from their own memory and arrive in buffers that become the
numpy arrays handed to the handlers.

Both channels follow kbstream's life cycle: construct, ``start()``, ``close()``
(``with`` starts and closes).  Example::

    from kbstream.pipeline import InputChannel, OutputChannel

    with (OutputChannel("sender:output", hostname="127.0.0.1") as out,
          InputChannel("receiver:input", onSlowness="wait") as inp):
        inp.register_data_handler(lambda data, meta: print(meta.tid, data["image"].shape))
        inp.register_end_of_stream_handler(lambda channel: done.set())
        inp.connect(out.info)
        out.wait_for_inputs(copy=["receiver:input"])
        out.write({"image": frame}, {"tid": 1000})
        out.update()
        out.signal_end_of_stream()
        done.wait(10)   # done = threading.Event(): the handlers ran

Who gets which message (copy / shared, drop / queueDrop / wait) is decided by
:class:`kbstream.pipeline.policy.DeliveryPolicy`, a pure state machine.
"""

from .errors import (
    ChannelClosed,
    ChannelTimeout,
    ConnectionLost,
    ConnectTimeout,
    PipelineConfigError,
    PipelineError,
    PipelineProtocolError,
    SchemaError,
)
from .input import ConnectionStatus, InputChannel
from .output import OutputChannel
from .schema import DataSchema, Image, Vector
from .wire import ChannelMetaData

__all__ = [
    "OutputChannel",
    "InputChannel",
    "ChannelMetaData",
    "ConnectionStatus",
    "DataSchema",
    "Vector",
    "Image",
    "PipelineError",
    "PipelineProtocolError",
    "SchemaError",
    "PipelineConfigError",
    "ChannelClosed",
    "ChannelTimeout",
    "ConnectTimeout",
    "ConnectionLost",
]
