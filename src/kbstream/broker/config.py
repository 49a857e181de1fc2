"""Broker configuration the Karabo way: ``KARABO_BROKER`` and ``KARABO_BROKER_TOPIC``.

``KARABO_BROKER`` is a comma-separated list of ``amqp://user:password@host:port[/vhost]``
URLs, tried in order; ``KARABO_BROKER_TOPIC`` is the installation-wide "domain" that
prefixes every exchange and queue name (docs/wire/karabo-broker-amqp.md, section 12). Explicit arguments win
over the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import BrokerConfigError

__all__ = ["BrokerURL", "BrokerConfig", "parse_broker_urls", "default_topic",
           "DEFAULT_BROKER", "ENV_BROKER", "ENV_TOPIC"]

ENV_BROKER = "KARABO_BROKER"
ENV_TOPIC = "KARABO_BROKER_TOPIC"
#: Used when neither an argument nor ``KARABO_BROKER`` names a broker (the middle
#: layer's default; the C++ default list starts with a DESY host).
DEFAULT_BROKER = "amqp://guest:guest@localhost:5672"

# What AMQP exchange and queue names can carry (Karabo itself does not check topics;
# logins such as "john.doe" are common topics).
_TOPIC_RE = re.compile(r"^[A-Za-z0-9_\-/.:@]{1,200}$")


@dataclass(frozen=True)
class BrokerURL:
    """One parsed broker URL."""

    host: str
    port: int = 5672
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"

    @property
    def safe(self) -> str:
        """The URL without the password, for messages and logs."""
        vhost = "" if self.vhost == "/" else "/" + self.vhost
        return f"amqp://{self.user}@{self.host}:{self.port}{vhost}"


def parse_broker_urls(text: str) -> list[BrokerURL]:
    """Parse a ``KARABO_BROKER`` value (comma-separated ``amqp://`` URLs).

    Raises
    ------
    BrokerConfigError
        Empty list, a scheme other than ``amqp``, no host, or a bad port.
    """
    urls = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            u = urlsplit(part)
            port = u.port
        except ValueError as e:
            raise BrokerConfigError(f"invalid broker URL {part!r}: {e}") from None
        if u.scheme != "amqp":
            raise BrokerConfigError(
                f"invalid broker URL {part!r}: only amqp:// brokers are supported "
                f"(Karabo 3 uses AMQP 0-9-1 on RabbitMQ)")
        if not u.hostname:
            raise BrokerConfigError(f"invalid broker URL {part!r}: no host")
        vhost = unquote(u.path[1:]) if len(u.path) > 1 else "/"
        urls.append(BrokerURL(host=u.hostname, port=port or 5672,
                              user=unquote(u.username) if u.username else "guest",
                              password=unquote(u.password) if u.password else "guest",
                              vhost=vhost))
    if not urls:
        raise BrokerConfigError(f"no broker URL in {text!r}")
    return urls


def default_topic() -> str:
    """Karabo's default topic: the first of ``LOGNAME``, ``USER``, ``LNAME``, ``USERNAME``
    that is set, else ``karabo``."""
    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        value = os.environ.get(var)
        if value:
            return value
    return "karabo"  # as Karabo does: not the password database's name


@dataclass(frozen=True)
class BrokerConfig:
    """Where the broker is and which topic to use.

    Parameters
    ----------
    urls : list of BrokerURL
    topic : str
    """

    urls: tuple
    topic: str

    @classmethod
    def resolve(cls, broker=None, topic=None) -> "BrokerConfig":
        """Explicit arguments first, then ``KARABO_BROKER`` / ``KARABO_BROKER_TOPIC``, then
        the defaults (``amqp://guest:guest@localhost:5672``, the user name).

        ``broker`` may be a URL string (comma-separated list allowed), a list of them, or a
        :class:`BrokerConfig` (returned as is when ``topic`` is None).
        """
        if isinstance(broker, BrokerConfig):
            return broker if topic is None else cls(broker.urls, _check_topic(topic))
        if broker is None:
            broker = os.environ.get(ENV_BROKER) or DEFAULT_BROKER
        if isinstance(broker, (list, tuple)):
            broker = ",".join(broker)
        if topic is None:
            topic = os.environ.get(ENV_TOPIC) or default_topic()
        return cls(tuple(parse_broker_urls(broker)), _check_topic(topic))

    @property
    def exchanges(self) -> dict:
        """The three exchange names: ``signals``, ``slots``, ``global_slots``."""
        return {"signals": f"{self.topic}.Signals", "slots": f"{self.topic}.Slots",
                "global_slots": f"{self.topic}.Global_Slots"}


def _check_topic(topic: str) -> str:
    if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
        raise BrokerConfigError(
            f"invalid broker topic {topic!r}: 1-200 letters, digits or '_-/.:@'")
    return topic
