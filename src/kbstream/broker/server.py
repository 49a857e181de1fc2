"""The server instance of a kbstream process, as Karabo's device servers announce themselves.

One job: make a kbstream process appear as a Karabo device server (``type`` ``server``,
with ``serverId``, ``version``, ``host``, ``user``, ``lang``, ``log``, ``serverFlags``,
``deviceClasses``, ``heartbeatInterval``, ``karaboVersion`` in its instanceInfo, as
``karabo-cppserver`` sends them; docs/wire/karabo-broker-amqp.md, section 10.3), so that
GUIs and ``DeviceClient``\\ s list the process's device instances under it: each device
names the server in its ``serverId``, and the server lists the devices' classes.

Every ``BrokerInstance("myDevice")`` (a ``device``) names the process's server,
:func:`default_server_id`; ``server="myServer"`` names another. The devices of a process
that name one server id (on one broker and topic) share one server instance, started
before the first of them and stopped after the last (:func:`use`, :func:`start_used`,
:func:`release`); ``server=ServerInstance(...)`` uses a server the caller starts and
stops; ``server=False`` names none (``serverId`` ``__none__``).

Threads: those of a :class:`~kbstream.broker.instance.BrokerInstance`.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading

from kbhash import Hash, HashType

from .instance import BrokerInstance
from .protocol import KARABO_VERSION

__all__ = ["ServerInstance", "default_server_id", "use", "start_used", "release"]

_lock = threading.Lock()
# (broker urls, topic, server id) -> [ServerInstance, number of devices using it, maker]
_shared = {}


def _user():
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment
        return "none"


class ServerInstance(BrokerInstance):
    """A Karabo server instance; the keyword arguments are those of
    :class:`~kbstream.broker.instance.BrokerInstance` (without ``instance_type``).

    Parameters
    ----------
    server_id : str
        The server's instance id (letters, digits, ``_``, ``/``, ``-``).
    device_classes : iterable of str
        Initial ``deviceClasses``; :meth:`add_device_class` adds the classes of the
        devices that name this server.
    log_level : str
        Announced as ``log`` (Karabo servers announce their log level).
    """

    def __init__(self, server_id, *, device_classes=(), log_level="INFO", **kw):
        self._classes = list(dict.fromkeys(str(c) for c in device_classes))
        self._log_level = str(log_level)
        kw.pop("instance_type", None)
        kw.pop("server", None)
        self._start_lock = threading.Lock()
        super().__init__(server_id, instance_type="server", **kw)

    def _make_info(self, instance_type, info_extra):
        info = Hash()
        s, i32 = HashType.STRING, HashType.INT32
        info.set("type", "server", type=s)
        info.set("serverId", self.instance_id, type=s)
        info.set("version", KARABO_VERSION, type=s)
        info.set("host", self.hostname, type=s)
        info.set("user", _user(), type=s)
        info.set("lang", "python", type=s)
        info.set("log", self._log_level, type=s)
        info.set("serverFlags", 0, type=i32)
        info.set("deviceClasses", list(self._classes), type=HashType.VECTOR_STRING)
        info.set("heartbeatInterval", self.heartbeat_interval, type=i32)
        info.set("karaboVersion", KARABO_VERSION, type=s)
        info.set("status", "ok", type=s)
        for key, value in dict(info_extra or {}).items():
            info.set(key, value)
        return info

    @property
    def device_classes(self) -> list:
        return list(self._classes)

    def add_device_class(self, class_id):
        """List ``class_id`` in ``deviceClasses`` (announced with ``slotInstanceUpdated``
        when the server is up)."""
        class_id = str(class_id)
        if class_id in self._classes:
            return
        self._classes.append(class_id)
        from .codec import Typed

        self.update_info(deviceClasses=Typed(list(self._classes), HashType.VECTOR_STRING))


def default_server_id() -> str:
    """The id of a process's default server: ``<host>_kbstream_<pid>``.

    Karabo's device servers without a configured ``serverId`` take
    ``<host>_Server_<pid>`` (host name up to its first dot); kbstream keeps that form with
    ``kbstream`` in the middle, so the id is unique per host and process and tells what
    runs there. Characters an instance id may not hold become ``_``.
    """
    host = socket.gethostname().partition(".")[0] or "localhost"
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in host)
    return f"{host}_kbstream_{os.getpid()}"


def use(server_id, config, **kw) -> ServerInstance:
    """The process's server instance ``server_id`` on ``config``'s broker and topic, made
    (not started) on first use; every call must be matched by a :func:`release`."""
    key = (config.urls, config.topic, server_id)

    def make():
        s = ServerInstance(server_id, broker=config, **kw)
        s._shared_key = key
        return s

    with _lock:
        entry = _shared.get(key)
        if entry is None:
            entry = _shared[key] = [make(), 0, make]
        elif entry[0].state == "stopped":
            _renew(entry)
        entry[1] += 1
        return entry[0]


def _renew(entry):
    # a server whose start failed is closed: a fresh one of the same id and classes
    old = entry[0]
    entry[0] = entry[2]()
    entry[0]._classes = old.device_classes


def start_used(server) -> ServerInstance:
    """Start the shared server ``server`` unless a device using it did already (one start,
    also when several devices start at once); returns the server to name. A server whose
    start failed (it is closed then) is replaced by a fresh one of the same id."""
    with _lock:
        entry = _shared.get(getattr(server, "_shared_key", None))
        if entry is not None:
            if entry[0].state == "stopped":
                _renew(entry)
            server = entry[0]
    with server._start_lock:
        if server.state == "new":
            server.start()
    return server


def release(server, timeout=None):
    """One device stopped using ``server``; the last one closes it."""
    key = getattr(server, "_shared_key", None)
    with _lock:
        entry = _shared.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _shared[key]
            server = entry[0]
    server.close(timeout)
