"""kbstream on a Karabo 3 broker (AMQP 0-9-1 on RabbitMQ): instances, heartbeats, discovery
and output-channel connection details, so that Karabo devices and kbstream channels find
each other by name while the data flows point to point.

Nothing here is imported by ``import kbstream``; the AMQP client (pika, the ``broker``
extra) is imported only when an instance connects to a real broker.

>>> from kbstream.broker import BrokerInstance
>>> with BrokerInstance("myProcessor", heartbeat_interval=10) as inst:   # KARABO_BROKER...
...     inst.add_output_channel("output", output_channel)
...     info = inst.resolver("SPB_IRDA_JF4M/DET/JNGFR01:daqOutput")
"""

from .codec import Typed
from .config import BrokerConfig, parse_broker_urls
from .errors import (BrokerConfigError, BrokerConnectionError, BrokerError, InstanceIdInUse,
                     InvalidInstanceId, InvalidOutputId, InvalidSlotName, MessageError,
                     NotStartedError, RemoteError, RequestTimeout)
from .instance import (BrokerInstance, InstanceRecord, install_sigterm_exit,
                       validate_instance_id)
from .resolver import OutputResolver, resolve_host, split_output_id

__all__ = [
    "BrokerInstance",
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
