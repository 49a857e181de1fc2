"""A Karabo signal-slot instance on the broker: its life cycle, and the class that composes
the rooms of the broker layer.

:class:`BrokerInstance` makes a kbstream process appear to a Karabo 3 installation as an
instance (docs/wire/karabo-broker-amqp.md, section 10). This module does the life cycle: on :meth:`start` it
connects, checks that its id is free (``slotPing``), announces itself
(``slotInstanceNew``) and sends heartbeats; it answers ``slotPing`` and ``slotDiscover``,
announces itself again after a broker restart, and on :meth:`close` says goodbye
(``slotInstanceGone``) and ends its threads. Everything else is delegated:

* :mod:`.requests` - request/reply (pending requests, futures, expiry, error replies),
* :mod:`.dispatch` - the slot table and the worker thread that runs slots in order,
* :mod:`.tracking` - what the instance knows about the others, and its callbacks,
* :mod:`.channels` - output channels served and input channels reconnected, the resolver,
* :mod:`.device_view` - the read-only configuration and schema of a device,
* :mod:`.monitors` - channel monitors (``register_channel_monitor``),
* :mod:`.shutdown` - goodbye at program exit and on SIGTERM.

Threads: the transport's thread (AMQP I/O; replies are matched there), the worker thread
of :mod:`.dispatch`, and one timer thread owned here (heartbeats, tracking countdowns).
``start()`` and ``close()`` run in the caller's thread.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time

import kbhash
from kbhash import Hash, HashType, Schema

from .. import _lifecycle
from ..errors import EncodeError
from . import codec, shutdown, tracking
from .channels import Channels
from .config import BrokerConfig
from .device_view import DeviceView
from .dispatch import NO_REPLY, Dispatcher
from .monitors import ChannelMonitors
from .errors import BrokerConfigError, InstanceIdInUse, NotStartedError, RequestTimeout
from .protocol import BROADCAST_SLOTS, KARABO_VERSION, validate_instance_id
from .requests import ReplyFuture, Requests
from .shutdown import install_sigterm_exit
from .tracking import InstanceRecord

__all__ = ["BrokerInstance", "InstanceRecord", "validate_instance_id", "install_sigterm_exit",
           "BROADCAST_SLOTS", "ReplyFuture"]

log = logging.getLogger("kbstream.broker")

SELF_CHECK_TIMEOUT = 1.0


class BrokerInstance(_lifecycle.Lifecycle):
    """A kbstream process (or part of it) as a Karabo instance.

    The life cycle of every kbstream object (docs/conventions.md): the constructor checks
    its arguments and contacts nobody; :meth:`start` connects and announces, and returns
    the instance; :meth:`close` (= :meth:`stop`) says goodbye and ends every thread the
    instance made within about ``close_timeout`` seconds, and may be called any number of
    times; ``with BrokerInstance(...) as inst:`` starts it if needed and closes it.
    Calls in the wrong state raise :class:`NotStartedError`.

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
        :meth:`start` opens it; the caller closes it, after closing the instance.
    send_heartbeats : bool
        False only for tests of trackers (a silent instance).
    exit_on_sigterm : bool
        On :meth:`start`, call :func:`install_sigterm_exit` (default True): a SIGTERM'd
        program then still broadcasts ``slotInstanceGone``.  Only takes effect from the
        main thread and when SIGTERM has Python's default disposition.
    close_timeout : float
        Seconds :meth:`close` waits in all for the transport and the threads to end.
    server : str, ServerInstance, bool or None
        The Karabo server instance a ``device`` belongs to (its ``serverId``; GUIs and
        ``DeviceClient``\\ s list devices under their server). Default (None or True): the
        process's server, id :func:`~kbstream.broker.server.default_server_id`
        (``<host>_kbstream_<pid>``). A server id: the server of that id. Either way the
        devices of the process naming one server id on one broker and topic share one
        server instance, started before the first of them and closed (``slotInstanceGone``)
        after the last (:mod:`kbstream.broker.server`). A
        :class:`~kbstream.broker.server.ServerInstance`: that one (started and closed by
        the caller). False: no server, the ``serverId`` is ``__none__``. Like Karabo's
        ``DeviceClient``, instances of another ``instance_type`` (``client``, ...) have no
        server. With a ``transport`` of the caller's there is no default server (it would
        need a connection of its own): pass a ServerInstance.
    """

    _state_error = NotStartedError

    def __init__(self, instance_id, *, broker=None, topic=None, heartbeat_interval=10,
                 instance_type="device", info_extra=None, track_heartbeats=False,
                 connect_timeout=0.0, reconnect_interval=1.0, self_check=True,
                 transport=None, send_heartbeats=True, exit_on_sigterm=True,
                 close_timeout=5.0, server=None):
        _lifecycle.Lifecycle.__init__(self)
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
        self.close_timeout = float(close_timeout)
        self._transport = transport
        self._own_transport = transport is None
        self._ex = self.config.exchanges
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._server, self._own_server = None, False
        if instance_type == "device" and server is not False:
            self._server, self._own_server = self._make_server(server, transport)
        self._info = self._make_info(instance_type, info_extra)
        if self._server is not None:
            self._server.add_device_class(self._info.get("classId"))

        self._state = "new"  # new -> starting -> up -> stopped
        self._lock = threading.Lock()
        self._ping_rand = None
        self._timer = None
        self._stop_event = threading.Event()
        #: How often the instance announced itself (slotInstanceNew), reconnects included.
        self.announcements = 0

        self._requests = Requests(self.instance_id, self._ex["slots"], self._publish,
                                  self.config.topic)
        self._dispatcher = Dispatcher(self.instance_id, self._ex, self._publish,
                                      self._requests.on_reply, lambda: self._state)
        self._channels = Channels(self)
        self._tracker = tracking.Tracker(self.instance_id, self._dispatcher.post,
                                         self._ask_info, self._channels.instance_announced)
        self._view = DeviceView(self, self._channels)
        self._monitors = ChannelMonitors(self)
        for room in (self._dispatcher, self._tracker, self._channels):
            self._register_slots(room.slots())
        self._register_slots({"slotPing": self._slot_ping, "slotDiscover": self._slot_discover})
        if self._info.get("type") == "device":
            self._register_slots(self._view.slots())

    def _make_server(self, server, transport):
        from .server import ServerInstance, default_server_id, use

        if isinstance(server, ServerInstance):
            return server, False
        if server is None or server is True:
            if transport is not None:
                # the default server is a second connection to the broker: with a
                # transport of the caller's there is none to make (pass a ServerInstance)
                return None, False
            server = default_server_id()
        elif not isinstance(server, str):
            raise BrokerConfigError(
                f"server must be a server id, a ServerInstance, True/None (the process's "
                f"default server) or False (none), not {type(server).__name__}")
        else:
            validate_instance_id(server)
        if transport is not None:
            raise BrokerConfigError("a server id needs a broker to connect to; with a "
                                    "transport pass a started ServerInstance instead")

        return use(server, self.config, heartbeat_interval=max(10, self.heartbeat_interval),
                   connect_timeout=self.connect_timeout,
                   reconnect_interval=self.reconnect_interval, self_check=self.self_check,
                   exit_on_sigterm=self.exit_on_sigterm, close_timeout=self.close_timeout), True

    @property
    def server(self):
        """The :class:`~kbstream.broker.server.ServerInstance` of a device, or None."""
        return self._server

    def _make_info(self, instance_type, info_extra):
        info = Hash()
        info.set("type", instance_type, type=HashType.STRING)
        if instance_type == "device":
            info.set("classId", "KbStreamInstance", type=HashType.STRING)
            info.set("serverId", self._server.instance_id if self._server is not None
                     else "__none__", type=HashType.STRING)
        info.set("host", self.hostname, type=HashType.STRING)
        info.set("status", "ok", type=HashType.STRING)
        if instance_type == "device":
            info.set("capabilities", 0, type=HashType.UINT32)
        info.set("lang", "python", type=HashType.STRING)
        info.set("heartbeatInterval", self.heartbeat_interval, type=HashType.INT32)
        info.set("karaboVersion", KARABO_VERSION, type=HashType.STRING)
        for key, value in dict(info_extra or {}).items():
            _set_info(info, key, value)
        return info

    def _register_slots(self, slots):
        for name, fn in slots.items():
            self._dispatcher.register(name, fn)

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
        with self._lock:
            return Hash(self._info)

    # ---- life cycle -----------------------------------------------------------------

    def start(self):
        """Connect, declare, self-check (1 s), announce, start heartbeats; returns self.

        Raises
        ------
        BrokerConnectionError
            The broker cannot be reached within ``connect_timeout``.
        InstanceIdInUse
            Another instance answered the ``slotPing`` self-check.
        NotStartedError
            ``start()`` twice, or after :meth:`close`.
        """
        return super().start()

    def close(self, timeout=None):
        """Broadcast ``slotInstanceGone``, stop the threads, close the transport the
        instance made (not one passed in). Idempotent; waits at most ``timeout`` (default
        ``close_timeout``) seconds."""
        if timeout is not None:
            self.close_timeout = float(timeout)
        super().close()

    def stop(self, timeout=None):
        """Same as :meth:`close`."""
        self.close(timeout)

    def _start(self):
        # under the lock, so that a close() from another thread sees either nothing
        # started or the worker and the transport it has to end
        with self._lock:
            if self._state != "new":
                raise NotStartedError(f"{self!r} was closed while starting")
            self._state = "starting"
        if self._own_server:
            from .server import start_used

            # first, so that the device's server is known
            self._server = start_used(self._server)
        with self._lock:
            if self._state != "starting":
                raise NotStartedError(f"{self!r} was closed while starting")
            self._dispatcher.start()
            if self._transport is None:
                from .transport import PikaTransport

                self._transport = PikaTransport(
                    self.config, connect_timeout=self.connect_timeout,
                    reconnect_interval=self.reconnect_interval,
                    name=f"kbstream:{self.instance_id}", close_timeout=self.close_timeout)
        bindings = [(self._ex["slots"], f"{self.instance_id}.#")]
        bindings += [(self._ex["global_slots"], f"*.{s}") for s in BROADCAST_SLOTS]
        if self.track_heartbeats:
            bindings.append((self._ex["global_slots"], "*.slotHeartbeat"))
        self._transport.open(f"{self.config.topic}.{self.instance_id}",
                             list(self._ex.values()), bindings, self._dispatcher.on_message,
                             self._on_reconnect)
        if self.self_check:
            self._check_unique()
        with self._lock:
            if self._state != "starting":  # closed from another thread meanwhile
                raise NotStartedError(f"{self!r} was closed while starting")
            self._state = "up"
        shutdown.register(self)
        if self.exit_on_sigterm:
            install_sigterm_exit()
        self._announce()
        if self.track_heartbeats:
            self.broadcast("slotDiscover", self.instance_id)
        self._timer = threading.Thread(target=self._timer_loop,
                                       name=f"kbstream-broker-timer-{self.instance_id}",
                                       daemon=True)
        self._timer.start()

    def _close(self):
        deadline = time.monotonic() + self.close_timeout
        with self._lock:
            was_up = self._state == "up"
            self._state = "stopped"
        shutdown.unregister(self)
        self._monitors.close()
        if was_up:
            try:
                self.broadcast("slotInstanceGone", self.instance_id, self.instance_info,
                               _force=True)
            except Exception:  # pragma: no cover - transport already gone
                log.debug("could not send slotInstanceGone", exc_info=True)
        self._stop_event.set()
        self._requests.fail_all(lambda fut: NotStartedError(
            f"instance stopped while waiting for {fut.instance_id}.{fut.slot}"))
        self._dispatcher.stop()
        if self._own_transport and self._transport is not None:
            try:
                self._transport.close(max(0.0, deadline - time.monotonic()))
            except Exception:
                log.exception("%s: closing the broker transport failed", self.instance_id)
        self._dispatcher.join(deadline - time.monotonic())
        t = self._timer
        if t is not None and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
        if self._own_server:
            from .server import release

            release(self._server, max(0.5, deadline - time.monotonic()))

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
                _set_info(self._info, key, value)
        if self._state == "up":
            self.broadcast("slotInstanceUpdated", self.instance_id, self.instance_info)

    def _on_reconnect(self):
        # The broker lost our queue and bindings (restart): they are redeclared; tell the
        # others we are here again and, when tracking, ask who else is.
        if self._state != "up":
            return
        log.warning("%s: broker connection restored; announcing again", self.instance_id)
        self._tracker.unconfirm_all()
        self._announce()
        if self.track_heartbeats:
            self.broadcast("slotDiscover", self.instance_id)

    def _timer_loop(self):
        next_beat = time.monotonic() + self.heartbeat_interval
        next_tick = time.monotonic() + tracking.TRACK_TICK
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
                next_tick += tracking.TRACK_TICK
                if self.track_heartbeats:
                    self._tracker.age()

    def heartbeat_args(self):
        """``(id, {type, heartbeatInterval INT32})``: the arguments of ``slotHeartbeat``."""
        reduced = Hash()
        reduced.set("type", self._info.get("type", "unknown"), type=HashType.STRING)
        reduced.set("heartbeatInterval", self.heartbeat_interval, type=HashType.INT32)
        return self.instance_id, reduced

    def _slot_ping(self, rand=None, *_):
        call = self.current_call
        if call is not None and call.sender == self.instance_id and rand is not None \
                and rand == self._ping_rand:
            # our own self-check ping (recognised by its random value: a twin with the
            # same id has the same sender): never answer it (docs/wire/karabo-broker-amqp.md, section 10.2).  Every other
            # ping is answered, also while starting, so two instances with one id
            # cannot both come up.
            return NO_REPLY
        return self.instance_info

    def _slot_discover(self, requester=None, *_):
        if isinstance(requester, str) and requester and requester != self.instance_id:
            try:
                self.call(requester, "slotDiscoverAnswer", self.instance_id, self.instance_info)
            except NotStartedError:
                pass
        return None

    def _ask_info(self, instance_id):
        if self._state == "up":
            self.call(instance_id, "slotDiscover", self.instance_id)

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

    def request_async(self, instance_id, slot, *args, timeout=None,
                      _allow_starting=False) -> ReplyFuture:
        """Start a request; return a :class:`~kbstream.broker.requests.ReplyFuture` (a
        ``concurrent.futures.Future``) of the reply tuple.

        With ``timeout`` the future fails with :class:`RequestTimeout` after that many
        seconds (requests to offline instances are dropped by the broker: no other error
        comes). Error replies make it fail with :class:`RemoteError`.
        """
        self._check_up(_allow_starting)
        return self._requests.send(instance_id, slot, args, timeout)

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
        self._check_up(_allow_starting)
        return self._requests.send(instance_id, slot, args).wait(timeout)

    def connect_signal(self, instance_id, signal, handler):
        """Call ``handler(*args)`` whenever ``<instance_id>`` emits ``signal`` (e.g.
        ``signalChanged(config, deviceId)``): binds ``<instance_id>.<signal>`` on the
        Signals exchange.  Handlers run in the worker thread, in arrival order.  Needs a
        started instance."""
        self._check_up()
        validate_instance_id(instance_id)
        key = self._dispatcher.subscribe(instance_id, signal, handler)
        self._transport.bind(self._ex["signals"], key)

    def disconnect_signal(self, instance_id, signal, handler):
        """Stop calling ``handler`` for ``<instance_id>.<signal>`` (the binding stays
        until the instance closes; nothing is delivered for it any more)."""
        self._dispatcher.unsubscribe(instance_id, signal, handler)

    # ---- slots ----------------------------------------------------------------------

    def register_slot(self, name, fn):
        """Make ``fn(*args)`` callable as slot ``name`` by other instances.

        The return value is the reply: None = empty reply, a tuple = several values, else
        one value. Use :class:`~kbstream.broker.codec.Typed` for explicit Karabo types.
        An exception becomes an error reply. Slots run in the instance's worker thread;
        :attr:`current_call` tells who called.

        Raises
        ------
        InvalidSlotName
            ``name`` is empty or contains a space.
        """
        self._dispatcher.register(name, fn)

    @property
    def current_call(self):
        """Sender id, slot and header of the slot call running in this thread, or None."""
        return self._dispatcher.current_call

    # ---- device view ----------------------------------------------------------------

    @property
    def device_view(self) -> DeviceView:
        """The read-only device view (``slotGetConfiguration`` / ``slotGetSchema`` of an
        instance of type ``device``); :meth:`DeviceView.add_section` extends it."""
        return self._view

    def configuration(self) -> Hash:
        """The device configuration ``slotGetConfiguration`` answers: the instance's
        identity, its state and its output channels' addresses (all read-only)."""
        return self._view.configuration()

    def schema(self) -> Schema:
        """The Schema ``slotGetSchema`` answers, describing :meth:`configuration`."""
        return self._view.schema()

    # ---- channels -------------------------------------------------------------------

    def add_output_channel(self, name, channel, schema=None):
        """Serve ``channel``'s connection details as ``<instance_id>:<name>``, and publish
        it in the device schema as Karabo's ``OUTPUT_CHANNEL`` with data schema ``schema``
        (a :class:`~kbstream.pipeline.DataSchema` or a Hash in Karabo's layout; default:
        the channel's own ``schema``).

        ``channel`` is an object with an ``info`` attribute (a Hash
        ``{connectionType, hostname, port UINT32}``, e.g. ``kbstream.pipeline.OutputChannel``),
        a callable returning such a Hash, or the Hash itself. Add outputs before
        :meth:`start`: inputs ask right after ``slotInstanceNew``.
        """
        self._channels.add_output(name, channel, schema)

    def remove_output_channel(self, name):
        self._channels.remove_output(name)

    def add_input_channel(self, channel, outputs=None, name=None):
        """Reconnect ``channel`` when one of its outputs' instances announces itself.

        ``outputs`` (``["<instanceId>:<channel>", ...]``) defaults to the channel's
        ``connectedOutputChannels`` (or ``connected_output_channels``); on
        ``slotInstanceNew`` of such an instance ``channel.reconnect_now(output_id)`` is
        called. Pass :attr:`resolver` to the channel as its resolver. The channel is
        published in the device schema as Karabo's ``INPUT_CHANNEL`` ``name`` (default: its
        ``channel_id`` after ``:``); ``slotReconfigure`` may change its outputs.
        """
        self._channels.add_input(channel, outputs, name)

    @property
    def resolver(self):
        """``resolver(output_id) -> Hash | None`` for input channels (see
        :class:`~kbstream.broker.resolver.OutputResolver`)."""
        return self._channels.resolver

    # ---- channel monitors -----------------------------------------------------------

    def register_channel_monitor(self, channel_id, *, data_handler=None, input_handler=None,
                                 eos_handler=None, status_tracker=None, config=None) -> bool:
        """Watch the output ``DEVICE:CHANNEL`` (or ``DEVICE@CHANNEL``), as Karabo's
        ``DeviceClient.registerChannelMonitor``; False if it is monitored already.

        An input channel ``<instance_id>:DEVICE:CHANNEL`` is made with Karabo's defaults
        (copy, ``onSlowness="drop"``, ``maxQueueLength=2``, ``delayOnInput=0``; ``config``
        overrides them) and kept connected: at once when DEVICE announces itself, else
        every ``config["reconnect_interval"]`` seconds (6). ``data_handler(data, meta)``,
        ``input_handler(batch)``, ``eos_handler(input_channel)`` run in the input's handler
        thread, ``status_tracker(ConnectionStatus)`` on every change of the connection.
        :meth:`channel_monitor` gives the monitor's status and last error
        (:mod:`kbstream.broker.monitors`).

        Raises
        ------
        InvalidOutputId, InvalidInstanceId
            ``channel_id`` is not ``DEVICE:CHANNEL``.
        kbstream.pipeline.PipelineConfigError
            ``config`` has an unknown key or value.
        NotStartedError
            The instance is not started (or closed).
        """
        return self._monitors.register(
            channel_id, data_handler=data_handler, input_handler=input_handler,
            eos_handler=eos_handler, status_tracker=status_tracker, config=config)

    def unregister_channel_monitor(self, channel_id) -> bool:
        """End the monitor of ``channel_id`` (handlers never called again, input closed,
        its threads joined); False if it was not monitored."""
        return self._monitors.unregister(channel_id)

    def channel_monitor(self, channel_id):
        """The :class:`~kbstream.broker.monitors.ChannelMonitor` of ``channel_id`` (with
        ``status``, ``last_error``, ``input``), or None."""
        return self._monitors.get(channel_id)

    # ---- topology -------------------------------------------------------------------

    def on_instance_new(self, callback):
        """``callback(instance_id, instance_info)`` on slotInstanceNew (and the first
        discovery answer of an instance); runs in the worker thread."""
        return self._tracker.on_instance_new(callback)

    def on_instance_gone(self, callback):
        """``callback(instance_id, instance_info)`` on slotInstanceGone or when a tracked
        instance stops sending heartbeats."""
        return self._tracker.on_instance_gone(callback)

    def instances(self) -> dict:
        """Known other instances: ``{instance_id: InstanceRecord}`` (a snapshot)."""
        return self._tracker.instances()

    def discover(self):
        """Broadcast ``slotDiscover``; answers arrive as ``slotDiscoverAnswer``."""
        self.broadcast("slotDiscover", self.instance_id)


def _set_info(info, key, value):
    if isinstance(value, codec.Typed):
        info.set(key, value.value, type=value.type)
    else:
        info.set(key, value)
