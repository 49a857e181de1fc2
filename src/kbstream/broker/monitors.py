"""Channel monitors: watch a pipeline output by name, as Karabo's
``DeviceClient.registerChannelMonitor`` does.

One job: for :meth:`BrokerInstance.register_channel_monitor` make an input channel named after
the output (``<own instance id>:<DEVICE:CHANNEL>``), find the output through the broker
(``slotGetOutputChannelInformation``, docs/wire/karabo-broker-amqp.md, section 11), keep it
connected (again at once when the output's instance announces itself with
``slotInstanceNew``, and on a retry timer otherwise), tell the status tracker every change of
the connection, and end it all on :meth:`ChannelMonitors.unregister` or when the instance
closes.

Karabo's semantics kept: the defaults ``dataDistribution="copy"``, ``onSlowness="drop"``,
``maxQueueLength=2``, ``delayOnInput=0`` (``config`` overrides them; its
``connectedOutputChannels`` is replaced by the monitored output); ``:`` or ``@`` separates
device and channel; a second registration of a monitored channel returns False, and so does
unregistering one that is not monitored. Differences (docs/channel-monitors.md):
``DEVICE@CHANNEL`` and ``DEVICE:CHANNEL`` are the same monitor; a malformed id or
configuration raises a typed error at once; every failed attempt to find the output is kept
as a typed error in :attr:`ChannelMonitor.last_error`.

Threads: each monitor is one :class:`kbstream.pipeline.InputChannel` (its connection thread
asks the broker and receives; its handler thread runs the handlers); announcements arrive in
the instance's worker thread; registering and unregistering run in the caller's thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

from kbhash import Hash

from .errors import BrokerError, NotStartedError, RequestTimeout
from .protocol import split_output_id, validate_instance_id
from .resolver import SLOT, connection_details, info_request

__all__ = ["ChannelMonitor", "ChannelMonitors", "monitor_name", "DEFAULT_CONFIG"]

log = logging.getLogger("kbstream.broker.monitors")

#: Karabo's defaults for a channel monitor's input (DeviceClient.registerChannelMonitor).
DEFAULT_CONFIG = {"dataDistribution": "copy", "onSlowness": "drop", "maxQueueLength": 2,
                  "delayOnInput": 0}
#: Karabo input-channel keys a ``config`` may set (``connectedOutputChannels`` is replaced).
_KARABO_KEYS = ("dataDistribution", "onSlowness", "maxQueueLength", "minData",
                "respondToEndOfStream", "delayOnInput")
#: kbstream options a ``config`` may set as well (seconds; see :class:`InputChannel`), and
#: ``request_timeout``: seconds to wait for ``slotGetOutputChannelInformation`` (Karabo: 3).
_KBSTREAM_KEYS = ("reconnect_interval", "credit_window", "connect_timeout", "max_message_size",
                  "use_shm", "request_timeout")
#: Seconds between attempts while the output is not connected (Karabo's C++ inputs: 6 s).
RETRY_INTERVAL = 6.0
REQUEST_TIMEOUT = 3.0
#: How often a waiting request looks whether it should stop or ask again.
_POLL = 0.1


def monitor_name(channel_id) -> str:
    """``"DEVICE:CHANNEL"`` for ``DEVICE:CHANNEL`` or ``DEVICE@CHANNEL``.

    Raises
    ------
    InvalidOutputId
        Not a string, no separator or an empty part.
    InvalidInstanceId
        The device part is not a valid instance id.
    """
    iid, channel = split_output_id(channel_id)
    validate_instance_id(iid)
    return f"{iid}:{channel}"


def _input_options(config):
    """The InputChannel keyword arguments for ``config`` (a Hash, a mapping or None)."""
    from ..pipeline.errors import PipelineConfigError

    if config is None:
        given = {}
    elif isinstance(config, Hash):
        given = {k: config[k] for k in config.keys()}
    elif isinstance(config, dict):
        given = dict(config)
    else:
        raise PipelineConfigError(
            f"a channel monitor's config must be a Hash or a dict, not {type(config).__name__}")
    given.pop("connectedOutputChannels", None)  # replaced, as Karabo does
    unknown = sorted(k for k in given if k not in _KARABO_KEYS and k not in _KBSTREAM_KEYS)
    if unknown:
        raise PipelineConfigError(f"unknown channel monitor option(s) {unknown}; known: "
                                  f"{sorted(_KARABO_KEYS + _KBSTREAM_KEYS)}")
    opts = dict(DEFAULT_CONFIG, reconnect_interval=RETRY_INTERVAL)
    opts.update(given)
    given_timeout = opts.pop("request_timeout", REQUEST_TIMEOUT)
    try:
        timeout = float(given_timeout)
    except (TypeError, ValueError):
        timeout = -1.0
    if not timeout > 0:
        raise PipelineConfigError(f"request_timeout must be a positive number of seconds, "
                                  f"not {given_timeout!r}")
    return opts, timeout


class _Stopped(Exception):
    """Internal: the monitor was unregistered while asking for its output."""


class ChannelMonitor:
    """One monitored output: its input channel, connection status and last error.

    Attributes
    ----------
    name : str
        ``"DEVICE:CHANNEL"``.
    input : kbstream.pipeline.InputChannel
        The input channel (id ``<instance id>:DEVICE:CHANNEL``).
    status : kbstream.pipeline.ConnectionStatus
    last_error : BrokerError or None
        Why the last attempt to find the output failed (:class:`RequestTimeout`: no answer;
        :class:`RemoteError`: an error reply or no such channel; :class:`MessageError`: a
        reply that is not connection details); None once connected.
    attempts : int
        Requests for the output's connection details sent so far.
    """

    def __init__(self, owner, name, handlers, config):
        from ..pipeline import ConnectionStatus, InputChannel

        opts, self.request_timeout = _input_options(config)
        self._owner = owner
        self.name = name
        self.instance_id, self.channel = split_output_id(name)
        self.status = ConnectionStatus.DISCONNECTED
        self._connected_status = ConnectionStatus.CONNECTED
        self.last_error = None
        self.attempts = 0
        self._stop = threading.Event()
        self._renew = threading.Event()
        data_handler, input_handler, eos_handler, status_tracker = handlers
        self._status_tracker = status_tracker
        self.input = InputChannel(f"{owner.instance_id}:{name}", [name], resolver=self._resolve,
                                  **opts)
        if data_handler is not None:
            self.input.register_data_handler(data_handler)
        if input_handler is not None:
            self.input.register_input_handler(input_handler)
        if eos_handler is not None:
            self.input.register_end_of_stream_handler(eos_handler)
        self.input.register_connection_tracker(self._on_status)

    def __repr__(self):
        return f"<ChannelMonitor {self.name} {self.status.name}>"

    def start(self):
        self.input.start()
        return self

    def close(self):
        self.halt()
        self.input.close()

    def halt(self):
        """Ask a pending request to give up (the input is closed by :meth:`close`)."""
        self._stop.set()
        self._renew.set()

    def announced(self):
        """The output's instance announced itself: ask again now, connect now."""
        self._renew.set()
        self.input.reconnect_now(self.name)

    # ---- status (the input's connection thread) ---------------------------------------

    def _on_status(self, _output_id, status):
        self.status = status
        if status == self._connected_status:
            self.last_error = None
        if self._stop.is_set():
            return
        if self._status_tracker is not None:
            try:
                self._status_tracker(status)
            except Exception:
                log.exception("%s: status tracker of the monitor of %s failed",
                              self._owner.instance_id, self.name)

    def _failed(self, error):
        previous = self.last_error
        self.last_error = error
        if previous is None or type(previous) is not type(error) or str(previous) != str(error):
            log.warning("%s: cannot connect the monitor of %s yet: %s", self._owner.instance_id,
                        self.name, error)
        return None

    # ---- finding the output (the input's connection thread) ---------------------------

    def _resolve(self, _output_id):
        """Connection info of the output, or None (the input retries on its timer)."""
        try:
            return self._details(self._ask())
        except _Stopped:
            return None
        except NotStartedError:  # the instance is closing: it closes this monitor next
            return None
        except BrokerError as e:
            return self._failed(e)

    def _ask(self):
        """The reply values of ``slotGetOutputChannelInformation``; asks again (at most a few
        times) when the output's instance announces itself meanwhile."""
        arg = info_request(self.channel, self._owner.pid, self._owner.hostname)
        for _ in range(4):
            if self._stop.is_set():
                raise _Stopped()
            self._renew.clear()
            # no timeout here (no timer thread per request): this loop expires it
            fut = self._owner.request_async(self.instance_id, SLOT, arg)
            self.attempts += 1
            deadline = time.monotonic() + self.request_timeout
            try:
                while True:
                    left = deadline - time.monotonic()
                    done, _ = concurrent.futures.wait([fut], timeout=min(_POLL, max(0.0, left)))
                    if done:
                        return fut.result()
                    if self._stop.is_set():
                        raise _Stopped()
                    if self._renew.is_set() or left <= 0:
                        break
            finally:
                if not fut.done():
                    fut.abandon(NotStartedError(f"request to {self.instance_id}.{SLOT} given up"))
            if not self._renew.is_set():
                raise RequestTimeout(
                    f"{self.instance_id} did not answer {SLOT} within {self.request_timeout} s "
                    f"(offline?)", self.instance_id, SLOT, self.request_timeout)
        raise RequestTimeout(f"{self.instance_id} kept announcing itself without answering "
                             f"{SLOT}", self.instance_id, SLOT, self.request_timeout)

    def _details(self, reply):
        """The input's connection info from the reply, or a typed error."""
        return connection_details(reply[0] if reply else None, self.name, self._owner.hostname)


class ChannelMonitors:
    """The channel monitors of one :class:`~kbstream.broker.BrokerInstance`.

    Parameters
    ----------
    owner : BrokerInstance
        Gives ``instance_id``, ``pid``, ``hostname``, ``state``, ``request_async`` and
        ``on_instance_new``.
    """

    def __init__(self, owner):
        self._owner = owner
        self._lock = threading.Lock()
        self._monitors = {}
        self._closed = False
        owner.on_instance_new(self._instance_new)

    def register(self, channel_id, *, data_handler=None, input_handler=None, eos_handler=None,
                 status_tracker=None, config=None) -> bool:
        name = monitor_name(channel_id)
        with self._lock:
            if name in self._monitors:
                return False
        if self._owner.state != "up":
            raise NotStartedError(f"register_channel_monitor({channel_id!r}) on "
                                  f"{self._owner!r}: start the instance first")
        mon = ChannelMonitor(self._owner, name,
                             (data_handler, input_handler, eos_handler, status_tracker), config)
        with self._lock:
            if self._closed:
                raise NotStartedError(f"{self._owner!r} was closed")
            if name in self._monitors:  # registered by another thread meanwhile
                return False
            self._monitors[name] = mon
        try:
            mon.start()
        except BaseException:
            with self._lock:
                self._monitors.pop(name, None)
            mon.close()
            raise
        return True

    def unregister(self, channel_id) -> bool:
        name = monitor_name(channel_id)
        with self._lock:
            mon = self._monitors.pop(name, None)
        if mon is None:
            return False
        mon.close()
        return True

    def get(self, channel_id):
        """The :class:`ChannelMonitor` of ``channel_id``, or None."""
        with self._lock:
            return self._monitors.get(monitor_name(channel_id))

    def names(self) -> list:
        with self._lock:
            return sorted(self._monitors)

    def close(self):
        """End every monitor (the instance closes)."""
        with self._lock:
            self._closed = True
            monitors = list(self._monitors.values())
            self._monitors.clear()
        for mon in monitors:
            mon.halt()
        for mon in monitors:
            try:
                mon.close()
            except Exception:
                log.exception("%s: closing the monitor of %s failed", self._owner.instance_id,
                              mon.name)

    def _instance_new(self, instance_id, _info):
        # the instance's worker thread: only wake the connection threads, never block
        with self._lock:
            monitors = [m for m in self._monitors.values() if m.instance_id == instance_id]
        for mon in monitors:
            mon.announced()
