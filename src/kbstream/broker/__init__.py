"""kbstream on a Karabo 3 broker (AMQP 0-9-1 on RabbitMQ): instances, heartbeats, discovery
and output-channel connection details, so that Karabo devices and kbstream channels find
each other by name while the data flows point to point.

Nothing here is imported by ``import kbstream``; the AMQP client (pika, the ``broker``
extra) is imported only when an instance connects to a real broker.

>>> from kbstream.broker import BrokerInstance
>>> with BrokerInstance("myProcessor", heartbeat_interval=10) as inst:   # KARABO_BROKER...
...     inst.add_output_channel("output", output_channel)
...     info = inst.resolver("SPB_IRDA_JF4M/DET/JNGFR01:daqOutput")

:class:`BrokerInstance` follows kbstream's life cycle (construct, ``start()``, ``close()``
= ``stop()``, ``with``). The package is built from rooms with one job each; the arrows of
import point one way, down this list:

* :mod:`~kbstream.broker.instance` - :class:`BrokerInstance`: the life cycle (self-check,
  announcement, heartbeats, goodbye, reconnects) and the composition of the rooms below.
* :mod:`~kbstream.broker.server` - :class:`ServerInstance`: the Karabo server instance the
  devices of a process name (by default one per process, broker and topic).
* :mod:`~kbstream.broker.device_view` - the read-only configuration and schema a device
  shows (``slotGetConfiguration`` / ``slotGetSchema``), built from extendable sections.
* :mod:`~kbstream.broker.monitors` - channel monitors: an output watched by name
  (``register_channel_monitor``), reconnected on announcements and on a timer.
* :mod:`~kbstream.broker.channels` - output channels served
  (``slotGetOutputChannelInformation``), input channels reconnected on announcements.
* :mod:`~kbstream.broker.resolver` - :class:`OutputResolver`: output id -> connection info.
* :mod:`~kbstream.broker.tracking` - :class:`InstanceRecord`s of the other instances,
  heartbeat ageing, ``on_instance_new`` / ``on_instance_gone``.
* :mod:`~kbstream.broker.dispatch` - the slot table and the worker thread running slots.
* :mod:`~kbstream.broker.requests` - request/reply: pending requests, ``ReplyFuture``,
  expiry, error replies.
* :mod:`~kbstream.broker.shutdown` - goodbye at program exit and on SIGTERM.
* :mod:`~kbstream.broker.transport` - the :class:`~kbstream.broker.transport.Transport`
  interface and :class:`~kbstream.broker.transport.PikaTransport` (one AMQP thread).
* :mod:`~kbstream.broker.protocol` - valid ids and names, output ids, fixed constants.
* :mod:`~kbstream.broker.codec` - message bytes (header archive ++ body archive).
* :mod:`~kbstream.broker.config` - ``KARABO_BROKER`` / ``KARABO_BROKER_TOPIC``.
* :mod:`~kbstream.broker.errors` - the broker's branch of the kbstream error tree.

:mod:`~kbstream.broker.cli` is the ``kbstream-broker-status`` command.
"""

from .codec import Typed
from .config import BrokerConfig, parse_broker_urls
from .errors import (BrokerConfigError, BrokerConnectionError, BrokerError, InstanceIdInUse,
                     InvalidInstanceId, InvalidOutputId, InvalidSlotName, MessageError,
                     NotStartedError, RemoteError, RequestTimeout)
from .instance import BrokerInstance
from .protocol import split_output_id, validate_instance_id
from .resolver import OutputResolver, resolve_host
from .server import ServerInstance
from .shutdown import install_sigterm_exit
from .tracking import InstanceRecord

__all__ = [
    "BrokerInstance",
    "ServerInstance",
    "install_sigterm_exit",
    "InstanceRecord",
    "OutputResolver",
    "BrokerConfig",
    "Typed",
    "parse_broker_urls",
    "resolve_host",
    "split_output_id",
    "validate_instance_id",
    "BrokerError",
    "BrokerConfigError",
    "BrokerConnectionError",
    "InvalidInstanceId",
    "InvalidSlotName",
    "InvalidOutputId",
    "InstanceIdInUse",
    "RequestTimeout",
    "RemoteError",
    "MessageError",
    "NotStartedError",
]
