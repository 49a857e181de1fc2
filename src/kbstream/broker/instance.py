"""A Karabo signal-slot instance on the broker: life cycle, default slots, request/reply.

:class:`BrokerInstance` makes a kbstream process appear to a Karabo 3 installation as an
instance (broker spec, section 10): it checks that its id is free (``slotPing``), announces
itself (``slotInstanceNew``), sends heartbeats, answers ``slotDiscover`` and the default
slots, serves its output channels' connection details
(``slotGetOutputChannelInformation``), resolves other instances' outputs for its input
channels, tracks the instances it hears of, and says goodbye (``slotInstanceGone``).

Threads: the transport's thread (AMQP I/O; replies are matched to their requests there),
one worker thread that runs slots and callbacks in arrival order, and one timer thread
(heartbeats, tracking countdowns). A slot may itself make blocking requests.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field

import kbhash
from kbhash import Hash, HashType, Schema

from ..errors import EncodeError
from . import codec
from .config import BrokerConfig
from .errors import (BrokerConfigError, InstanceIdInUse, InvalidInstanceId, InvalidSlotName,
                     MessageError, NotStartedError, RemoteError, RequestTimeout)

__all__ = ["BrokerInstance", "InstanceRecord", "validate_instance_id", "BROADCAST_SLOTS"]

log = logging.getLogger("kbstream.broker")

_ID_RE = re.compile(r"^[A-Za-z0-9_/\-]+$")
#: The broadcast slots every instance binds (``*.<slot>`` on ``Global_Slots``).
BROADCAST_SLOTS = ("slotInstanceNew", "slotInstanceUpdated", "slotInstanceGone", "slotDiscover")
#: A tracker checks for silent instances every this many seconds (C++: 3 s) ...
TRACK_TICK = 3.0
#: ... and declares an instance gone after this many heartbeat intervals without a sign of
#: life (C++: a countdown of heartbeatInterval ticks of 3 s).
DEAD_AFTER_INTERVALS = 3
SELF_CHECK_TIMEOUT = 1.0
CHANNEL_INFO_TIMEOUT = 3.0
KARABO_VERSION = "3.1.2"


def validate_instance_id(instance_id: str) -> str:
    """Karabo's rule: one or more of ``A-Z a-z 0-9 _ / -`` (no ``.``, ``:`` or space)."""
    if not isinstance(instance_id, str) or not _ID_RE.match(instance_id):
        raise InvalidInstanceId(
            f"invalid instance id {instance_id!r}: use only letters, digits, '_', '/' and '-'")
    return instance_id


@dataclass
class InstanceRecord:
    """What this instance knows about another one.

    Attributes
    ----------
    instance_id : str
    info : Hash
        The last full instanceInfo (from slotInstanceNew / Updated / DiscoverAnswer, or the
        reduced ``{type, heartbeatInterval}`` of a heartbeat when nothing else came).
    last_seen : float
        ``time.monotonic()`` of the last sign of life.
    last_heartbeat : float or None
        ``time.monotonic()`` of the last ``slotHeartbeat``.
    """

    instance_id: str
    info: Hash = field(default_factory=Hash)
    last_seen: float = 0.0
    last_heartbeat: float | None = None
    heartbeats: int = 0
    #: False after our own reconnect to the broker until the instance is seen again:
    #: its slotInstanceNew may have been sent while our queue was gone, so the next
    #: sighting (e.g. its slotDiscoverAnswer) counts as new.
    confirmed: bool = True

    @property
    def type(self):
        return self.info.get("type", "unknown")

    @property
    def heartbeat_interval(self):
        hb = self.info.get("heartbeatInterval")
        return hb if isinstance(hb, int) and hb > 0 else None


class _SlotCall:
    """Per-call context available to slots through :attr:`BrokerInstance.current_call`."""

    __slots__ = ("sender", "slot", "header", "broadcast")

    def __init__(self, sender, slot, header, broadcast):
        self.sender = sender
        self.slot = slot
        self.header = header
        self.broadcast = broadcast


_live_instances = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit():  # slotInstanceGone also when the program just ends
    for inst in list(_live_instances):
        try:
            inst.stop(timeout=2.0)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def install_sigterm_exit():
    """Make SIGTERM end the program like ``sys.exit`` so that live instances say goodbye.

    With Python's default, SIGTERM kills the process at once: no ``atexit`` handler runs
    and other Karabo instances only notice after about three heartbeat intervals.  This
    installs a handler that raises ``SystemExit(128 + SIGTERM)`` in the main thread, so
    ``finally`` blocks and the ``atexit`` hook that stops every live
    :class:`BrokerInstance` (``slotInstanceGone``) run.  It does nothing, and returns
    False, outside the main thread or when the program already handles SIGTERM (a
    handler other than the default is never replaced).
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        current = signal.getsignal(signal.SIGTERM)
    except (AttributeError, ValueError):  # pragma: no cover - no SIGTERM here
        return False
    if current is _exit_on_sigterm:
        return True
    if current is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return True


class BrokerInstance:
    """A kbstream process (or part of it) as a Karabo instance.

    Parameters
    ----------
    instance_id : str
        Letters, digits, ``_``, ``/``, ``-``.
    broker : str, list of str or BrokerConfig, optional
        ``amqp://user:password@host:port[/vhost]`` URL(s); default ``KARABO_BROKER``.
    topic : str, optional
        Default ``KARABO_BROKER_TOPIC``, else the user name.
    heartbeat_interval : int
        Seconds between ``slotHeartbeat`` broadcasts, announced as INT32 in the
        instanceInfo. Trackers declare an instance dead after about 3 x this interval.
    instance_type : str
        ``device`` (listed by ``DeviceClient.getDevices()``), ``client``, ``server``, ...
    info_extra : mapping, optional
        More instanceInfo keys (e.g. ``{"classId": "MyProcessor"}``).
    track_heartbeats : bool
        Bind ``*.slotHeartbeat`` and keep :meth:`instances` current with tracking
        countdowns (what a GUI server or ``DeviceClient`` does).
    connect_timeout : float
        How long :meth:`start` keeps trying to reach the broker (0 = one attempt per URL).
    reconnect_interval : float
        Pause between reconnect attempts after losing the broker.
    self_check : bool
        Do the 1 s ``slotPing`` uniqueness check before announcing (Karabo always does).
    transport : Transport, optional
        A transport to use instead of a :class:`~kbstream.broker.transport.PikaTransport`
        made from ``broker``: any object with the interface of
        :class:`~kbstream.broker.transport.Transport` (the tests pass an in-memory one).
    send_heartbeats : bool
        False only for tests of trackers (a silent instance).
    exit_on_sigterm : bool
        On :meth:`start`, call :func:`install_sigterm_exit` (default True): a SIGTERM'd
        program then still broadcasts ``slotInstanceGone``.  Only takes effect from the
        main thread and when SIGTERM has Python's default disposition.
    """

    def __init__(self, instance_id, *, broker=None, topic=None, heartbeat_interval=10,
                 instance_type="device", info_extra=None, track_heartbeats=False,
                 connect_timeout=0.0, reconnect_interval=1.0, self_check=True,
                 transport=None, send_heartbeats=True, exit_on_sigterm=True):
        self.instance_id = validate_instance_id(instance_id)
        if transport is None:
            self.config = BrokerConfig.resolve(broker, topic)
        else:
            self.config = BrokerConfig.resolve(broker or "amqp://memory", topic or "kbtest")
        try:
            self.heartbeat_interval = int(heartbeat_interval)
        except (TypeError, ValueError):
            self.heartbeat_interval = 0
        if self.heartbeat_interval <= 0:
            raise BrokerConfigError(
                f"heartbeat_interval must be a positive number of seconds, "
                f"not {heartbeat_interval!r}")
        self.track_heartbeats = track_heartbeats
        self.connect_timeout = connect_timeout
        self.reconnect_interval = reconnect_interval
        self.self_check = self_check
        self.send_heartbeats = send_heartbeats
        self.exit_on_sigterm = exit_on_sigterm
        self._transport = transport
        self._ex = self.config.exchanges
        self.hostname = socket.gethostname()
        self.pid = os.getpid()

        info = Hash()
        info.set("type", instance_type, type=HashType.STRING)
        if instance_type == "device":
            info.set("classId", "KbStreamInstance", type=HashType.STRING)
            info.set("serverId", "__none__", type=HashType.STRING)
        info.set("host", self.hostname, type=HashType.STRING)
        info.set("status", "ok", type=HashType.STRING)
        if instance_type == "device":
            info.set("capabilities", 0, type=HashType.UINT32)
        info.set("lang", "python", type=HashType.STRING)
        info.set("heartbeatInterval", self.heartbeat_interval, type=HashType.INT32)
        info.set("karaboVersion", KARABO_VERSION, type=HashType.STRING)
        for key, value in dict(info_extra or {}).items():
            if isinstance(value, codec.Typed):
                info.set(key, value.value, type=value.type)
            else:
                info.set(key, value)
        self._info = info

        self._state = "new"  # new -> starting -> up -> stopped
        self._lock = threading.RLock()
        self._pending = {}  # replyTo -> (Future, instance id, slot)
        self._slots = {}
        self._outputs = {}
        self._inputs = []  # (name, channel, [output ids])
        self._new_callbacks = []
        self._gone_callbacks = []
        self._instances = {}
        self._ping_rand = None
        self._work = None
        self._worker = None
        self._timer = None

        self._stop_event = threading.Event()
        self._tls = threading.local()
        self.announcements = 0
        self._register_default_slots()

    # ---- life cycle -----------------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return (f"<BrokerInstance {self.instance_id!r} topic={self.config.topic!r} "
                f"{self._state}>")

    @property
    def state(self) -> str:
        """``new``, ``starting``, ``up`` or ``stopped``."""
        return self._state

    @property
    def instance_info(self) -> Hash:
        """A copy of the instanceInfo sent with slotInstanceNew and discovery answers."""
        return Hash(self._info)

    def start(self):
        """Connect, declare, self-check (1 s), announce, start heartbeats.

        Raises
        ------
        BrokerConnectionError
            The broker cannot be reached within ``connect_timeout``.
        InstanceIdInUse
            Another instance answered the ``slotPing`` self-check.
        """
        import queue as _queue

        with self._lock:
            if self._state != "new":
                raise NotStartedError(f"{self!r}: start() can be called once")
            self._state = "starting"
        self._work = _queue.Queue()
        self._worker = threading.Thread(target=self._work_loop,
                                        name=f"kbstream-broker-{self.instance_id}",
                                        daemon=True)
        self._worker.start()
        if self._transport is None:
            from .transport import PikaTransport

            self._transport = PikaTransport(self.config, connect_timeout=self.connect_timeout,
                                            reconnect_interval=self.reconnect_interval,
                                            name=f"kbstream:{self.instance_id}")
        bindings = [(self._ex["slots"], f"{self.instance_id}.#")]
        bindings += [(self._ex["global_slots"], f"*.{s}") for s in BROADCAST_SLOTS]
        if self.track_heartbeats:
            bindings.append((self._ex["global_slots"], "*.slotHeartbeat"))
        try:
            self._transport.open(f"{self.config.topic}.{self.instance_id}",
                                 list(self._ex.values()), bindings, self._on_message,
                                 self._on_reconnect)
            if self.self_check:
                self._check_unique()
        except BaseException:
            self._shutdown_threads()
            self._state = "stopped"
            raise
        with self._lock:
            self._state = "up"
        _live_instances.add(self)
        if self.exit_on_sigterm:
            install_sigterm_exit()
        self._announce()
        if self.track_heartbeats:
            self.broadcast("slotDiscover", self.instance_id)
        self._timer = threading.Thread(target=self._timer_loop,
                                       name=f"kbstream-broker-timer-{self.instance_id}",
                                       daemon=True)
        self._timer.start()
        return self

    def stop(self, timeout=5.0):
        """Broadcast ``slotInstanceGone``, stop the threads, disconnect. Idempotent."""
        with self._lock:
            if self._state in ("new", "stopped"):
                self._state = "stopped"
                return
            was_up = self._state == "up"
            self._state = "stopped"
        _live_instances.discard(self)
        if was_up:
            try:
                self.broadcast("slotInstanceGone", self.instance_id, self.instance_info,
                               _force=True)
            except Exception:  # pragma: no cover - transport already gone
                log.debug("could not send slotInstanceGone", exc_info=True)
        self._shutdown_threads(timeout)

    def _shutdown_threads(self, timeout=5.0):
        self._stop_event.set()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut, iid, slot in pending:
            if not fut.done():
                fut.set_exception(NotStartedError(f"instance stopped while waiting for "
                                                  f"{iid}.{slot}"))
        if self._work is not None:
            self._work.put(None)
        if self._transport is not None:
            try:
                self._transport.close(timeout)
            except Exception:
                log.exception("%s: closing the broker transport failed", self.instance_id)
        for t in (self._worker, self._timer):
            if t is not None and t is not threading.current_thread():
                t.join(timeout)

    def _check_unique(self):
        rand = random.randint(2, 2**31 - 1)
        self._ping_rand = rand
        try:
            reply = self.request(self.instance_id, "slotPing",
                                 codec.Typed(rand, HashType.INT32),
                                 timeout=SELF_CHECK_TIMEOUT, _allow_starting=True)
        except RequestTimeout:
            return
        finally:
            self._ping_rand = None
        other = reply[0] if reply and isinstance(reply[0], Hash) else Hash()
        host = other.get("host")
        raise InstanceIdInUse(
            f"another instance with id {self.instance_id!r} is online"
            + (f" on host {host!r}" if host else "")
            + f" (topic {self.config.topic!r})", self.instance_id, host)

    def _announce(self):
        self.announcements += 1
        self.broadcast("slotInstanceNew", self.instance_id, self.instance_info)

    def update_info(self, **changes):
        """Change instanceInfo keys and broadcast ``slotInstanceUpdated``."""
        with self._lock:
            for key, value in changes.items():
                if isinstance(value, codec.Typed):
                    self._info.set(key, value.value, type=value.type)
                else:
                    self._info.set(key, value)
        if self._state == "up":
            self.broadcast("slotInstanceUpdated", self.instance_id, self.instance_info)

    def _on_reconnect(self):
        # The broker lost our queue and bindings (restart): they are redeclared; tell the
        # others we are here again and, when tracking, ask who else is.
        if self._state != "up":
            return
        log.warning("%s: broker connection restored; announcing again", self.instance_id)
        with self._lock:
            for rec in self._instances.values():
                rec.confirmed = False
        self._announce()
        if self.track_heartbeats:
            self.broadcast("slotDiscover", self.instance_id)

    def _timer_loop(self):
        next_beat = time.monotonic() + self.heartbeat_interval
        next_tick = time.monotonic() + TRACK_TICK
        while not self._stop_event.wait(max(0.0, min(next_beat, next_tick) - time.monotonic())):
            now = time.monotonic()
            if now >= next_beat:
                next_beat += self.heartbeat_interval
                if next_beat < now:
                    next_beat = now + self.heartbeat_interval
                if self.send_heartbeats and self._state == "up":
                    try:
                        self.broadcast("slotHeartbeat", *self.heartbeat_args())
                    except Exception:
                        log.debug("heartbeat not sent", exc_info=True)
            if now >= next_tick:
                next_tick += TRACK_TICK
                if self.track_heartbeats:
                    self._age_instances()

    def heartbeat_args(self):
        """``(id, {type, heartbeatInterval INT32})``: the arguments of ``slotHeartbeat``."""
        reduced = Hash()
        reduced.set("type", self._info.get("type", "unknown"), type=HashType.STRING)
        reduced.set("heartbeatInterval", self.heartbeat_interval, type=HashType.INT32)
        return self.instance_id, reduced

    def _age_instances(self):
        dead = []
        now = time.monotonic()
        with self._lock:
            for iid, rec in list(self._instances.items()):
                interval = rec.heartbeat_interval or 10
                if now - rec.last_seen > DEAD_AFTER_INTERVALS * interval:
                    dead.append(self._instances.pop(iid))
        for rec in dead:
            log.info("%s: %s silently disappeared (no heartbeat)", self.instance_id,
                     rec.instance_id)
            self._post(self._fire_gone, rec.instance_id, rec.info)

    # ---- sending --------------------------------------------------------------------

    def _check_up(self, allow_starting=False):
        st = self._state
        if st == "up" or (allow_starting and st == "starting"):
            return
        raise NotStartedError(f"{self!r} is not started")

    def _publish(self, exchange, key, header, body):
        try:
            data = codec.encode_message(header, body)
        except kbhash.KbHashError as e:
            raise EncodeError(f"cannot encode the message to {key}: {e}") from e
        self._transport.publish(exchange, key, data)

    def call(self, instance_id, slot, *args):
        """Call ``<instance_id>.<slot>(*args)`` one-to-one, no reply wanted (fire and forget)."""
        self._check_up()
        self._publish(self._ex["slots"], f"{instance_id}.{slot}",
                      codec.make_header(self.instance_id), codec.body_from_args(args))

    def broadcast(self, slot, *args, _force=False):
        """Broadcast a slot call on ``Global_Slots`` (routing key ``<own id>.<slot>``)."""
        if not _force:
            self._check_up()
        self._publish(self._ex["global_slots"], f"{self.instance_id}.{slot}",
                      codec.make_header(self.instance_id), codec.body_from_args(args))

    def emit(self, signal, *args):
        """Emit a signal on ``Signals`` (routing key ``<own id>.<signal>``)."""
        self._check_up()
        self._publish(self._ex["signals"], f"{self.instance_id}.{signal}",
                      codec.make_header(self.instance_id), codec.body_from_args(args))

    def request_async(self, instance_id, slot, *args, timeout=None, _allow_starting=False):
        """Start a request; return a ``concurrent.futures.Future`` of the reply tuple.

        With ``timeout`` the future fails with :class:`RequestTimeout` after that many
        seconds (requests to offline instances are dropped by the broker: no other error
        comes). Error replies make it fail with :class:`RemoteError`.
        """
        self._check_up(_allow_starting)
        reply_to = str(uuid.uuid4())
        fut = ReplyFuture()
        fut.kb_reply_to = reply_to
        with self._lock:
            self._pending[reply_to] = (fut, instance_id, slot)
        if timeout is not None:
            t = threading.Timer(timeout, self._expire, (reply_to, timeout))
            t.daemon = True
            t.start()
            fut.add_done_callback(lambda _f, t=t: t.cancel())
        self._publish(self._ex["slots"], f"{instance_id}.{slot}",
                      codec.make_header(self.instance_id, reply_to=reply_to),
                      codec.body_from_args(args))
        return fut

    def _expire(self, reply_to, timeout):
        with self._lock:
            entry = self._pending.pop(reply_to, None)
        if entry is not None and not entry[0].done():
            fut, iid, slot = entry
            _complete(fut, RequestTimeout(
                f"no reply from {iid}.{slot} within {timeout:g} s (is {iid!r} online "
                f"in topic {self.config.topic!r}?)", iid, slot, timeout))

    def request(self, instance_id, slot, *args, timeout=5.0, _allow_starting=False):
        """Request ``<instance_id>.<slot>(*args)`` and wait for the reply values (a tuple).

        Raises
        ------
        RequestTimeout
            No reply within ``timeout`` seconds.
        RemoteError
            The slot answered with an error reply.
        """
        # no timer thread per request here: wait on the future and expire it ourselves
        fut = self.request_async(instance_id, slot, *args, _allow_starting=_allow_starting)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            self._expire(fut.kb_reply_to, timeout)
            return fut.result(0)

    # ---- slots ----------------------------------------------------------------------

    def register_slot(self, name, fn):
        """Make ``fn(*args)`` callable as slot ``name`` by other instances.

        The return value is the reply: None = empty reply, a tuple = several values, else
        one value. Use :class:`~kbstream.broker.codec.Typed` for explicit Karabo types.
        An exception becomes an error reply. Slots run in the instance's worker thread;
        :attr:`current_call` tells who called.
        """
        if not isinstance(name, str) or not name or " " in name:
            raise InvalidSlotName(f"invalid slot name {name!r}")
        self._slots[name] = fn

    @property
    def current_call(self):
        """Sender id, slot and header of the slot call running in this thread, or None."""
        return getattr(self._tls, "call", None)

    def _register_default_slots(self):
        r = self._slots
        r["slotPing"] = self._slot_ping
        r["slotDiscover"] = self._slot_discover
        r["slotDiscoverAnswer"] = self._slot_discover_answer
        r["slotInstanceNew"] = self._slot_instance_new
        r["slotInstanceUpdated"] = self._slot_instance_updated
        r["slotInstanceGone"] = self._slot_instance_gone
        r["slotHeartbeat"] = self._slot_heartbeat
        r["slotHasSlot"] = lambda name=None: codec.Typed(name in self._slots, HashType.BOOL)
        r["slotGetAvailableFunctions"] = self._slot_available_functions
        r["slotGetOutputChannelInformation"] = self._slot_output_info
        r["slotGetOutputChannelNames"] = lambda: codec.Typed(sorted(self._outputs),
                                                             HashType.VECTOR_STRING)
        if self._info.get("type") == "device":
            # what a GUI or DeviceClient asks a device for when it opens it (spec 10.3)
            r["slotGetConfiguration"] = lambda *_: (self.configuration(), self.instance_id)
            r["slotGetSchema"] = lambda *_: (self.schema(), self.instance_id)

    # ---- device view: read-only properties ------------------------------------------

    def _properties(self):
        """[(path, value, HashType, displayed name)] of the read-only device view."""
        info = self._info
        props = [
            ("deviceId", self.instance_id, HashType.STRING, "DeviceID"),
            ("classId", info.get("classId") or "KbStreamInstance", HashType.STRING, "ClassID"),
            ("serverId", info.get("serverId") or "__none__", HashType.STRING, "ServerID"),
            ("hostName", self.hostname, HashType.STRING, "Host"),
            ("pid", self.pid, HashType.INT32, "Process ID"),
            ("karaboVersion", KARABO_VERSION, HashType.STRING, "Karabo version"),
            ("heartbeatInterval", self.heartbeat_interval, HashType.INT32,
             "Heartbeat interval"),
            ("state", "ON" if self._state == "up" else "UNKNOWN", HashType.STRING, "State"),
            ("status", str(info.get("status") or ""), HashType.STRING, "Status"),
        ]
        taken = {p[0] for p in props}
        for name in sorted(self._outputs):
            try:
                oinfo = _output_info(self._outputs[name])
            except Exception:  # an output without connection details yet
                oinfo = None
            host = oinfo.get("hostname") if oinfo is not None else ""
            port = oinfo.get("port") if oinfo is not None else 0
            # an output is shown under its own name (like a device's output channel
            # property), or under outputChannels.<name> if that would collide with a
            # property above
            node = name if name.split(".")[0] not in taken else f"outputChannels.{name}"
            props.append((f"{node}.hostname", str(host or ""), HashType.STRING, "Hostname"))
            props.append((f"{node}.port", int(port or 0), HashType.UINT32, "Port"))
        return props

    def configuration(self) -> Hash:
        """The device configuration ``slotGetConfiguration`` answers: the instance's
        identity, its state and its output channels' addresses (all read-only)."""
        h = Hash()
        for path, value, t, _ in self._properties():
            h.set(path, value, type=t)
        return h

    def schema(self) -> Schema:
        """The Schema ``slotGetSchema`` answers, describing :meth:`configuration`: one
        read-only leaf per property (Karabo's attribute names and codes: ``nodeType`` 0
        leaf / 1 node, ``accessMode`` 2 read, ``assignment`` 0 optional), and one node per
        output channel."""
        params = Hash()
        nodes = set()

        def element(path, node_type, shown):
            params.set(path, Hash())
            for k, v in (("nodeType", node_type), ("accessMode", 2), ("assignment", 0),
                         ("requiredAccessLevel", 0)):
                params.set_attribute(path, k, v, type=HashType.INT32)
            params.set_attribute(path, "displayedName", shown, type=HashType.STRING)

        for path, value, t, shown in self._properties():
            parts = path.split(".")
            for depth in range(1, len(parts)):   # every enclosing node, outermost first
                head = ".".join(parts[:depth])
                if head not in nodes:
                    nodes.add(head)
                    element(head, 1, parts[depth - 1])
            element(path, 0, shown)
            params.set_attribute(path, "valueType", t.name, type=HashType.STRING)
            params.set_attribute(path, "defaultValue", value, type=t)
            if path == "state":
                params.set_attribute(path, "leafType", 2, type=HashType.INT32)
                params.set_attribute(path, "displayType", "State", type=HashType.STRING)
                params.set_attribute(path, "classId", "State", type=HashType.STRING)
        return Schema(self._info.get("classId") or "KbStreamInstance", params)

    def _slot_ping(self, rand=None, *_):
        call = self.current_call
        if call is not None and call.sender == self.instance_id and rand is not None \
                and rand == self._ping_rand:
            # our own self-check ping (recognised by its random value: a twin with the
            # same id has the same sender): never answer it (spec 10.2).  Every other
            # ping is answered, also while starting, so two instances with one id
            # cannot both come up.
            return _NO_REPLY
        return self.instance_info

    def _slot_discover(self, requester=None, *_):
        if isinstance(requester, str) and requester and requester != self.instance_id:
            try:
                self.call(requester, "slotDiscoverAnswer", self.instance_id, self.instance_info)
            except NotStartedError:
                pass
        return None

    def _slot_discover_answer(self, iid=None, info=None, *_):
        self._seen(iid, info, announce=True)

    def _slot_instance_new(self, iid=None, info=None, *_):
        self._seen(iid, info, announce=True, new=True)

    def _slot_instance_updated(self, iid=None, info=None, *_):
        self._seen(iid, info, announce=False)

    def _slot_instance_gone(self, iid=None, info=None, *_):
        if not isinstance(iid, str) or iid == self.instance_id:
            return
        with self._lock:
            rec = self._instances.pop(iid, None)
        self._fire_gone(iid, info if isinstance(info, Hash) else (rec.info if rec else Hash()))

    def _slot_heartbeat(self, iid=None, info=None, *_):
        if not isinstance(iid, str) or iid == self.instance_id:
            return
        with self._lock:
            rec = self._instances.get(iid)
            known = rec is not None
            if rec is None:
                rec = self._instances[iid] = InstanceRecord(iid, Hash(info) if isinstance(
                    info, Hash) else Hash())
            rec.last_seen = rec.last_heartbeat = time.monotonic()
            rec.heartbeats += 1
        if not known and self._state == "up":
            # a tracker that hears an unknown heartbeat asks the instance for its info
            self.call(iid, "slotDiscover", self.instance_id)

    def _seen(self, iid, info, *, announce, new=False):
        if not isinstance(iid, str) or iid == self.instance_id:
            return
        info = Hash(info) if isinstance(info, Hash) else Hash()
        with self._lock:
            rec = self._instances.get(iid)
            fresh = rec is None or not rec.confirmed
            if rec is None:
                rec = self._instances[iid] = InstanceRecord(iid)
            rec.confirmed = True
            if len(info):
                rec.info = info
            rec.last_seen = time.monotonic()
        if new or (announce and fresh):
            for cb in list(self._new_callbacks):
                try:
                    cb(iid, rec.info)
                except Exception:
                    log.exception("%s: instance-new callback failed for %s", self.instance_id,
                                  iid)
        if new:
            resolver = getattr(self, "_resolver", None)
            if resolver is not None:
                resolver.renew(iid)
            self._reconnect_inputs_of(iid)

    def _fire_gone(self, iid, info):
        for cb in list(self._gone_callbacks):
            try:
                cb(iid, info)
            except Exception:
                log.exception("%s: instance-gone callback failed for %s", self.instance_id, iid)

    def _slot_available_functions(self, kind="slots", *_):
        names = sorted(self._slots) if kind == "slots" else []
        return codec.Typed(names, HashType.VECTOR_STRING)

    def _slot_output_info(self, arg=None, *_):
        channel_id = arg.get("channelId") if isinstance(arg, Hash) else None
        reply = Hash()
        source = self._outputs.get(channel_id) if isinstance(channel_id, str) else None
        info = None
        if source is not None:
            try:
                info = _output_info(source)
            except Exception:
                log.exception("%s: output channel %r has no connection info",
                              self.instance_id, channel_id)
        if info is None:
            reply.set("success", False, type=HashType.BOOL)
            reply.set("info", Hash())
            return reply
        if info.get("hostname") in (None, "", "0.0.0.0", "default", "*"):
            info.set("hostname", self.hostname, type=HashType.STRING)
        # a peer in another process is always "remote" (broker spec 11.2)
        info.set("memoryLocation", "remote", type=HashType.STRING)
        reply.set("success", True, type=HashType.BOOL)
        reply.set("info", info)
        return reply

    # ---- channels -------------------------------------------------------------------

    def add_output_channel(self, name, channel):
        """Serve ``channel``'s connection details as ``<instance_id>:<name>``.

        ``channel`` is an object with an ``info`` attribute (a Hash
        ``{connectionType, hostname, port UINT32}``, e.g. ``kbstream.pipeline.OutputChannel``),
        a callable returning such a Hash, or the Hash itself. Add outputs before
        :meth:`start`: inputs ask right after ``slotInstanceNew``.
        """
        self._outputs[name] = channel

    def remove_output_channel(self, name):
        self._outputs.pop(name, None)

    def add_input_channel(self, channel, outputs=None):
        """Reconnect ``channel`` when one of its outputs' instances announces itself.

        ``outputs`` (``["<instanceId>:<channel>", ...]``) defaults to the channel's
        ``connectedOutputChannels`` (or ``connected_output_channels``); on
        ``slotInstanceNew`` of such an instance ``channel.reconnect_now(output_id)`` is
        called. Pass :attr:`resolver` to the channel as its resolver.
        """
        if outputs is None:
            outputs = (getattr(channel, "connectedOutputChannels", None)
                       or getattr(channel, "connected_output_channels", None) or [])
        self._inputs.append((channel, list(outputs)))

    def _reconnect_inputs_of(self, iid):
        for channel, outputs in list(self._inputs):
            for out in outputs:
                if _split_output_id(out)[0] == iid:
                    try:
                        channel.reconnect_now(out)
                    except Exception:
                        log.exception("%s: reconnect_now(%r) failed", self.instance_id, out)

    @property
    def resolver(self):
        """``resolver(output_id) -> Hash | None`` for input channels (see
        :class:`~kbstream.broker.resolver.OutputResolver`)."""
        from .resolver import OutputResolver

        r = getattr(self, "_resolver", None)
        if r is None:
            r = self._resolver = OutputResolver(self)
        return r

    # ---- topology -------------------------------------------------------------------

    def on_instance_new(self, callback):
        """``callback(instance_id, instance_info)`` on slotInstanceNew (and the first
        discovery answer of an instance); runs in the worker thread."""
        self._new_callbacks.append(callback)
        return callback

    def on_instance_gone(self, callback):
        """``callback(instance_id, instance_info)`` on slotInstanceGone or when a tracked
        instance stops sending heartbeats."""
        self._gone_callbacks.append(callback)
        return callback

    def instances(self) -> dict:
        """Known other instances: ``{instance_id: InstanceRecord}`` (a snapshot)."""
        with self._lock:
            return {k: InstanceRecord(v.instance_id, Hash(v.info), v.last_seen,
                                      v.last_heartbeat, v.heartbeats)
                    for k, v in self._instances.items()}

    def discover(self):
        """Broadcast ``slotDiscover``; answers arrive as ``slotDiscoverAnswer``."""
        self.broadcast("slotDiscover", self.instance_id)

    # ---- receiving ------------------------------------------------------------------

    def _on_message(self, exchange, routing_key, body):
        # Transport thread: match replies here (the worker may be blocked in a request).
        try:
            header, payload = codec.decode_message(body)
        except MessageError as e:
            log.warning("%s: ignoring malformed broker message (%s, %s): %s",
                        self.instance_id, exchange, routing_key, e)
            return
        reply_from = header.get("replyFrom")
        if reply_from is not None:
            self._on_reply(header, payload, reply_from)
            return
        if self._work is not None:
            self._work.put((exchange, routing_key, header, payload))

    def _on_reply(self, header, payload, reply_from):
        with self._lock:
            entry = self._pending.pop(reply_from, None)
        if entry is None:
            return  # late (timed out) or not ours
        fut, iid, slot = entry
        if fut.done():
            return
        args = codec.args_from_body(payload)
        if header.get("error") is True:
            msg = args[0] if args and isinstance(args[0], str) else ""
            details = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            outcome = RemoteError(f"{iid}.{slot} failed: {msg}", iid, slot, msg, details)
        else:
            outcome = args
        _complete(fut, outcome)

    def _cancel(self, reply_to, exc):
        """Fail a pending request and forget it (used when a request is renewed)."""
        with self._lock:
            entry = self._pending.pop(reply_to, None)
        if entry is not None:
            _complete(entry[0], exc)

    def _post(self, fn, *args):
        if self._work is not None:
            self._work.put((fn, args))

    def _work_loop(self):
        while True:
            item = self._work.get()
            if item is None:
                return
            if len(item) == 2:
                fn, args = item
                try:
                    fn(*args)
                except Exception:
                    log.exception("%s: internal callback failed", self.instance_id)
                continue
            try:
                self._dispatch(*item)
            except Exception:
                log.exception("%s: error handling a broker message", self.instance_id)

    def _dispatch(self, exchange, routing_key, header, payload):
        sender = header["signalInstanceId"]
        target, _, slot = routing_key.partition(".")
        if not slot:
            log.warning("%s: ignoring message with routing key %r", self.instance_id,
                        routing_key)
            return
        broadcast = exchange == self._ex["global_slots"]
        if exchange == self._ex["slots"] and target != self.instance_id:
            return  # :none: or a stray binding
        if exchange == self._ex["signals"]:
            return  # kbstream subscribes to no signals yet
        reply_to = header.get("replyTo")
        reply_function = header.get("replyFunction")
        if not _valid_id(sender) or (reply_to is not None and not _valid_reply(reply_to)) or (
                reply_function is not None and not _valid_reply(reply_function)):
            log.warning("%s: ignoring a message with an invalid sender or reply address (%r, %r)",
                        self.instance_id, str(sender)[:80], str(reply_to)[:80])
            return
        if self._state == "starting" and slot != "slotPing":
            return  # not up yet: stay silent (the caller retries on slotInstanceNew)
        if self._state == "stopped":
            return
        fn = self._slots.get(slot)
        if fn is None:
            if not broadcast and reply_to is not None:
                self._reply_error(sender, reply_to,
                                  f"'{self.instance_id}' has no slot '{slot}'")
            elif not broadcast:
                log.info("%s: call of unknown slot %r from %s", self.instance_id, slot, sender)
            return
        args = codec.args_from_body(payload)
        self._tls.call = _SlotCall(sender, slot, header, broadcast)
        try:
            result = fn(*args)
        except Exception as e:
            log.warning("%s: slot %s called by %s failed: %s", self.instance_id, slot, sender,
                        e, exc_info=log.isEnabledFor(logging.DEBUG))
            if not broadcast and reply_to is not None:
                self._reply_error(sender, reply_to,
                                  f"'{self.instance_id}'.{slot} failed: {type(e).__name__}: {e}")
            return
        finally:
            self._tls.call = None
        if broadcast or result is _NO_REPLY:
            return  # broadcasts are never answered
        values = () if result is None else (result if isinstance(result, tuple) else (result,))
        try:
            if reply_to is not None:
                self._publish(self._ex["slots"], f"{sender}.{reply_to}",
                              codec.make_header(self.instance_id, reply_from=reply_to),
                              codec.body_from_args(values))
            elif reply_function is not None:
                self._publish(self._ex["slots"], f"{sender}.{reply_function}",
                              codec.make_header(self.instance_id), codec.body_from_args(values))
        except Exception as e:  # e.g. an unencodable reply value
            log.warning("%s: reply of slot %s not sent: %s", self.instance_id, slot, e)
            if reply_to is not None:
                self._reply_error(sender, reply_to, f"reply of {slot} not encodable: {e}")

    def _reply_error(self, requester, reply_to, message, details=""):
        self._publish(self._ex["slots"], f"{requester}.{reply_to}",
                      codec.make_header(self.instance_id, reply_from=reply_to, error=True),
                      codec.body_from_args((message, details)))


_NO_REPLY = object()


_callback_pool = None
_callback_pool_lock = threading.Lock()


def _callbacks():
    global _callback_pool
    with _callback_pool_lock:
        if _callback_pool is None:
            _callback_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="kbstream-callbacks")
        return _callback_pool


class ReplyFuture(concurrent.futures.Future):
    """The future of a request.  Its done-callbacks run on a small thread pool, never
    on the broker's I/O thread, so a callback may block, even on another request."""

    def add_done_callback(self, fn):
        super().add_done_callback(lambda f: _callbacks().submit(fn, f))


def _complete(fut, outcome):
    """Set a future's result (or exception) unless somebody already did."""
    if fut.done():
        return
    try:
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass


def _valid_id(text):
    """An instance id that can be a routing key part (Karabo: letters, digits, _ / -)."""
    return isinstance(text, str) and 0 < len(text) <= 200 and "." not in text and text.isprintable()


def _valid_reply(text):
    """A replyTo / replyFunction: one routing-key word (no '.')."""
    return isinstance(text, str) and 0 < len(text) <= 50 and "." not in text and text.isprintable()


def _split_output_id(output_id):
    """``"<instanceId>:<channel>"`` (``@`` accepted too) -> ``(instanceId, channel)``."""
    for sep in (":", "@"):
        if sep in output_id:
            iid, _, channel = output_id.partition(sep)
            return iid, channel
    return output_id, ""


def _output_info(source):
    info = source.info if hasattr(source, "info") else (source() if callable(source) else source)
    if not isinstance(info, Hash):
        raise BrokerConfigError(f"output channel info must be a Hash, not {type(info).__name__}")
    out = Hash()
    out.set("connectionType", info.get("connectionType", "tcp"), type=HashType.STRING)
    out.set("hostname", info.get("hostname", ""), type=HashType.STRING)
    out.set("port", int(info["port"]), type=HashType.UINT32)
    for key in info:
        if key not in out:
            out.set(key, info[key])
    return out
