"""The train matcher on a Karabo broker: sources found by name, slow data, statistics as
properties, a Karabo output of the matched trains.

:class:`KaraboMatcher` puts a :class:`~kbstream.matcher.TrainMatcher` behind a
:class:`~kbstream.broker.BrokerInstance` (type ``device``, class ``KbStreamTrainMatcher``):

* fast sources ``[ALIAS@]DEVICE:CHANNEL`` without ``=HOST:PORT`` are resolved through the
  broker (``slotGetOutputChannelInformation``); when the output's device announces itself
  again (``slotInstanceNew``: a restarted source) its input reconnects at once, and every
  reconnection is counted (``reconnects`` per source);
* slow sources ``DEVICE.property`` follow the device's ``signalChanged``
  (:mod:`kbstream.matcher.slow`), first value from ``slotGetConfiguration`` (asked again
  when the device comes back);
* the statistics (``stats()``: per source received / missing / latency / rate / status /
  reconnects, trains seen / matched / sent / incomplete / dropped / pending, slow sources)
  are read-only properties of the instance (``slotGetConfiguration`` / ``slotGetSchema``),
  published with ``signalChanged`` about once a second and once more at :meth:`close`;
* optionally a Karabo pipeline output ``<instance id>:<name>`` of the matched trains: per
  train one item per source (its flat keys as a Hash, its own timestamp with the train's
  id), then one update.  It has its own bounded queue (oldest train dropped, counted):
  a slow reader never stalls the matching or the bridge outputs.

:meth:`close` closes the inputs and outputs, publishes the last statistics and says
goodbye on the broker (``slotInstanceGone``).  Layout, property names and the command
line: docs/matcher-karabo.md.

Threads (besides those of the matcher and the broker instance): one statistics thread,
and one writer thread for the Karabo output.
"""

import logging
import os
import re
import socket
import threading
from collections import deque

from kbhash import Hash, HashType, Timestamp

from .._lifecycle import Lifecycle
from ..broker import BrokerInstance
from ..broker.device_view import Leaf
from ..errors import KbStreamError
from ..pipeline import ConnectionStatus, OutputChannel
from .errors import MatcherConfigError, SourceSpecError
from .matcher import DEFAULT_OUTPUT, TrainMatcher, parse_source
from .slow import SlowData, is_slow_source

__all__ = ["KaraboMatcher", "KaraboOutput", "split_sources", "property_key", "CLASS_ID",
           "STATS_INTERVAL"]

log = logging.getLogger("kbstream.matcher")

#: the classId the matcher's instance announces
CLASS_ID = "KbStreamTrainMatcher"
#: seconds between two publications of the statistics
STATS_INTERVAL = 1.0
#: trains the Karabo output may hold before it drops its oldest
KARABO_QUEUE_LENGTH = 4
_JOIN_TIMEOUT = 5.0


def split_sources(sources):
    """``(fast, slow)``: the fast sources (text or SourceSpec) and the ``DEVICE.property``
    texts, each in the order given."""
    fast, slow = [], []
    for s in sources:
        (slow if is_slow_source(s) else fast).append(s)
    return fast, slow


def property_key(name, taken):
    """A Karabo property key for a source name (letters, digits, ``_``; not starting
    with a digit), unique among ``taken`` (which it is added to)."""
    key = re.sub(r"[^A-Za-z0-9_]", "_", name) or "source"
    if key[0].isdigit():
        key = "s_" + key
    base, i = key, 2
    while key in taken:
        key = f"{base}_{i}"
        i += 1
    taken.add(key)
    return key


class KaraboOutput:
    """A Karabo pipeline output of matched trains, fed by a train hook.

    Parameters
    ----------
    channel : kbstream.pipeline.OutputChannel
        Not started; :meth:`start` starts it and :meth:`close` closes it.
    queue_length : int
        Trains held before the oldest is dropped (counted in :attr:`dropped`).
    update_timeout : float
        Seconds one ``update()`` may wait for a ``wait`` input.
    """

    def __init__(self, channel, queue_length=KARABO_QUEUE_LENGTH, update_timeout=5.0):
        self.channel = channel
        self.queue_length = queue_length
        self.update_timeout = update_timeout
        self.written = 0  # trains written
        self.dropped = 0  # trains pushed out of the full queue, or failed
        self._queue = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"{channel.channel_id}-writer",
                                        daemon=True)

    def push(self, tid, data, metadata):
        """Train hook: queue the train (never blocks)."""
        with self._cond:
            if len(self._queue) >= self.queue_length:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append((tid, data, metadata))
            self._cond.notify()

    def start(self):
        self.channel.start()
        self._thread.start()
        return self

    def close(self):
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(_JOIN_TIMEOUT)
        self.channel.close()

    def _run(self):
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    # trains still queued at close are never written: counted, not lost
                    self.dropped += len(self._queue)
                    self._queue.clear()
                    return
                tid, data, metadata = self._queue.popleft()
            try:
                for name, values in data.items():
                    h = _to_hash(values)
                    meta = metadata.get(name, {})
                    ts = Timestamp(int(meta.get("timestamp.sec", 0)),
                                   int(meta.get("timestamp.frac", 0)), int(tid))
                    self.channel.write(h, _meta(name, ts))
                self.channel.update(timeout=self.update_timeout)
                outcome = "written"
            except KbStreamError as e:
                outcome = "dropped"
                log.warning("%s: train %d not written: %s", self.channel.channel_id, tid, e)
            except Exception:
                outcome = "dropped"
                log.exception("%s: train %d not written", self.channel.channel_id, tid)
            with self._cond:  # push() counts under the same lock
                setattr(self, outcome, getattr(self, outcome) + 1)


_TS_FIELDS = (".timestamp", ".timestamp.sec", ".timestamp.frac", ".timestamp.tid")


def _to_hash(values):
    """A source's flat keys as a Hash.  ``<key>.timestamp*`` keys of slow data
    (:mod:`kbstream.matcher.slow`) become the ``sec`` / ``frac`` / ``tid`` attributes of
    ``<key>``, as Karabo stores a property's timestamp."""
    stamped = [k[:-14] for k in values if k.endswith(".timestamp.sec")
               and k[:-14] + ".timestamp.tid" in values]
    skip = {p + f for p in stamped for f in _TS_FIELDS}
    h = Hash()
    for k, v in values.items():
        if k not in skip:
            h[k] = v
    for p in stamped:
        if p in h:
            h.set_timestamp(p, Timestamp(int(values[p + ".timestamp.sec"]),
                                         int(values[p + ".timestamp.frac"]),
                                         int(values[p + ".timestamp.tid"])))
    return h


def _meta(source, ts):
    from ..pipeline.wire import ChannelMetaData

    return ChannelMetaData(source, ts)


class KaraboMatcher(Lifecycle):
    """A :class:`TrainMatcher` that is a Karabo instance (module docstring).

    Parameters
    ----------
    sources : iterable of str
        ``[ALIAS@]DEVICE:CHANNEL[=HOST:PORT]`` (fast; without the endpoint found through
        the broker) and ``DEVICE.property`` (slow).  At least one fast source.
    outputs : iterable
        Bridge outputs, as for :class:`TrainMatcher`.
    instance_id : str
        The instance's Karabo id (letters, digits, ``_``, ``/``, ``-``); the inputs are
        ``<instance_id>:input<i>``.
    broker, topic : optional
        As for :class:`~kbstream.broker.BrokerInstance` (default ``KARABO_BROKER``,
        ``KARABO_BROKER_TOPIC``).
    karabo_output : str, optional
        Name of a Karabo pipeline output of the matched trains (``<instance_id>:<name>``).
    karabo_output_options : dict, optional
        Keyword arguments of that :class:`~kbstream.pipeline.OutputChannel` (e.g.
        ``hostname``).
    stats_interval : float
        Seconds between two publications of the statistics.
    heartbeat_interval : int
        Of the instance.
    broker_options : dict, optional
        More keyword arguments of the :class:`~kbstream.broker.BrokerInstance` (e.g.
        ``transport``, ``exit_on_sigterm``).
    **options
        Of :class:`TrainMatcher` (``mode``, ``buffer``, ``max_wait``, ``offsets``,
        ``protocol_version``, ``queue_length``, ``input_options``, ...).

    Raises
    ------
    SourceSpecError, MatcherConfigError, kbstream.BindError,
    kbstream.broker.BrokerConfigError, kbstream.broker.InvalidInstanceId
    """

    def __init__(self, sources, outputs=(DEFAULT_OUTPUT,), *, instance_id="kbstream_matcher",
                 broker=None, topic=None, karabo_output=None, karabo_output_options=None,
                 stats_interval=STATS_INTERVAL, heartbeat_interval=10, broker_options=None,
                 **options):
        Lifecycle.__init__(self)
        fast, slow = split_sources(list(sources))
        if not fast:
            raise MatcherConfigError("a matcher needs at least one DEVICE:CHANNEL source")
        self.slow = SlowData(slow)
        fast_names = {parse_source(s).name for s in fast}
        clash = fast_names.intersection(self.slow.devices)
        if clash:
            raise SourceSpecError(f"slow sources of {sorted(clash)} would replace the fast "
                                  "sources of the same name", sorted(clash)[0])
        if not stats_interval > 0:
            raise MatcherConfigError(f"stats_interval must be > 0, not {stats_interval!r}")
        self.stats_interval = float(stats_interval)
        self.instance = BrokerInstance(instance_id, broker=broker, topic=topic,
                                       heartbeat_interval=heartbeat_interval,
                                       info_extra={"classId": CLASS_ID},
                                       **dict(broker_options or {}))
        self.instance_id = self.instance.instance_id
        self.matcher = TrainMatcher(fast, outputs, resolver=self.instance.resolver,
                                    instance_id=self.instance_id, **options)
        self.kout = None
        self.published = 0  # signalChanged messages with statistics sent
        try:
            self._attach(slow, karabo_output, karabo_output_options)
        except BaseException:
            self.matcher.close()
            if self.kout is not None:
                self.kout.close()
            raise

    def _attach(self, slow, karabo_output, karabo_output_options):
        if karabo_output is not None:
            channel = OutputChannel(f"{self.instance_id}:{karabo_output}",
                                    **dict(karabo_output_options or {}))
            self.kout = KaraboOutput(channel)
            self.instance.add_output_channel(karabo_output, channel)
        self._connects = {}
        for spec, inp in zip(self.matcher.specs, self.matcher.inputs):
            self._connects[spec.name] = 0
            inp.register_connection_tracker(self._counter(spec.name))
            if spec.host is None:
                self.instance.add_input_channel(inp, [spec.output_id])
        if slow:
            self.matcher.add_train_hook(self.slow.attach)
        if self.kout is not None:
            self.matcher.add_train_hook(self.kout.push)
        taken = set()
        self._source_keys = {s.name: property_key(s.name, taken) for s in self.matcher.specs}
        taken = set()
        self._slow_keys = {n: property_key(n, taken) for n in self.slow.names()}
        self._snapshot = self._collect()
        self._stop = threading.Event()
        self._stats_thread = threading.Thread(target=self._stats_loop,
                                              name=f"{self.instance_id}-stats", daemon=True)
        self.instance.device_view.add_section(self._stats_section)

    # ------------------------------------------------------------ properties

    @property
    def endpoints(self):
        """The bound endpoints of the bridge outputs."""
        return self.matcher.endpoints

    @property
    def specs(self):
        return self.matcher.specs

    # ------------------------------------------------------------ life cycle

    def _start(self):
        if self.kout is not None:
            self.kout.start()  # listening before the instance announces itself
        self.instance.start()
        if self.slow.devices:
            self.instance.on_instance_new(self._device_new)
            for device in self.slow.devices:
                self.instance.connect_signal(device, "signalChanged", self._changed(device))
                self._fetch(device)
        self.matcher.start()
        self._stats_thread.start()

    def _close(self):
        self._stop.set()
        if self._stats_thread.is_alive() and self._stats_thread is not threading.current_thread():
            self._stats_thread.join(_JOIN_TIMEOUT)
        self.matcher.close()
        if self.kout is not None:
            self.kout.close()
        try:
            self._publish()  # the last statistics, after the inputs closed
        except Exception:
            log.debug("last statistics not published", exc_info=True)
        self.instance.close()

    def wait_connected(self, timeout=10.0):
        """Wait until every fast source is connected (ConnectTimeout otherwise)."""
        self.matcher.wait_connected(timeout)

    # ------------------------------------------------------------ sources

    def _counter(self, name):
        def track(output_id, status):
            if status is ConnectionStatus.CONNECTED:
                self._connects[name] += 1

        return track

    def _changed(self, device):
        def on_changed(config=None, *_):
            self.slow.update(device, config)

        return on_changed

    def _fetch(self, device):
        """Ask ``device`` for its configuration (initial slow values), without waiting."""
        try:
            fut = self.instance.request_async(device, "slotGetConfiguration", timeout=3.0)
        except KbStreamError as e:
            log.info("%s: cannot ask %s for its configuration: %s", self.instance_id, device, e)
            return

        def done(f):
            try:
                reply = f.result()
            except Exception as e:  # offline: asked again on its slotInstanceNew
                log.info("%s: no configuration from %s yet: %s", self.instance_id, device, e)
                return
            if reply:
                self.slow.update(device, reply[0], initial=True)

        fut.add_done_callback(done)

    def _device_new(self, instance_id, info):
        if instance_id in self.slow.devices:
            self._fetch(instance_id)

    # ------------------------------------------------------------ statistics

    def stats(self):
        """:meth:`TrainMatcher.stats` plus ``reconnects`` per source (connections made
        after the first), ``slow`` (per ``DEVICE.property``: updates, missing, tid,
        status), ``karabo_output`` (written, dropped) when there is one, and
        ``published`` (statistics messages sent on the broker)."""
        st = self.matcher.stats()
        for name, s in st["sources"].items():
            s["reconnects"] = max(0, self._connects.get(name, 0) - 1)
        st["slow"] = self.slow.stats()
        if self.kout is not None:
            st["karabo_output"] = {"written": self.kout.written, "dropped": self.kout.dropped}
        st["published"] = self.published
        return st

    def _collect(self):
        """The statistics as Leafs (the device view's section and signalChanged)."""
        st = self.stats()
        leaves = []
        t = st["trains"]
        for k in ("seen", "matched", "sent", "incomplete", "dropped", "pending"):
            leaves.append(Leaf(f"trains.{k}", int(t[k]), HashType.UINT64, k.capitalize()))
        for name, s in st["sources"].items():
            p = f"sources.{self._source_keys[name]}"
            latency = s["latency"]
            leaves += [
                Leaf(f"{p}.name", name, HashType.STRING, "Source"),
                Leaf(f"{p}.received", int(s["received"]), HashType.UINT64, "Received"),
                Leaf(f"{p}.missing", int(s["missing"]), HashType.UINT64, "Missing"),
                Leaf(f"{p}.latency", -1 if latency is None else int(latency), HashType.INT64,
                     "Latency (trains)"),
                Leaf(f"{p}.rate", float(s["rate"]), HashType.DOUBLE, "Rate (Hz)"),
                Leaf(f"{p}.status", str(s["status"]), HashType.STRING, "Status"),
                Leaf(f"{p}.reconnects", int(s["reconnects"]), HashType.UINT64, "Reconnects"),
            ]
        for name, s in st["slow"].items():
            p = f"slowSources.{self._slow_keys[name]}"
            leaves += [
                Leaf(f"{p}.name", name, HashType.STRING, "Property"),
                Leaf(f"{p}.updates", int(s["updates"]), HashType.UINT64, "Updates"),
                Leaf(f"{p}.missing", int(s["missing"]), HashType.UINT64, "Missing"),
                Leaf(f"{p}.tid", int(s["tid"]), HashType.UINT64, "Train id of the value"),
                Leaf(f"{p}.status", str(s["status"]), HashType.STRING, "Status"),
            ]
        if self.kout is not None:
            k = st["karabo_output"]
            leaves += [Leaf("karaboOutput.written", int(k["written"]), HashType.UINT64, "Written"),
                       Leaf("karaboOutput.dropped", int(k["dropped"]), HashType.UINT64, "Dropped")]
        return leaves

    def _stats_section(self, taken):
        return list(self._snapshot)

    def _publish(self):
        """Refresh the snapshot and send it with ``signalChanged`` (each leaf with the
        timestamp of now)."""
        self._snapshot = leaves = self._collect()
        if self.instance.state != "up":
            return
        h = Hash()
        ts = Timestamp.now()
        for leaf in leaves:
            h.set(leaf.path, leaf.value, type=leaf.type)
            h.set_timestamp(leaf.path, ts)
        self.instance.emit("signalChanged", h, self.instance_id)
        self.published += 1

    def _stats_loop(self):
        while not self._stop.wait(self.stats_interval):
            try:
                self._publish()
            except Exception:
                log.warning("%s: statistics not published", self.instance_id, exc_info=True)

    def __repr__(self):
        return f"<KaraboMatcher {self.instance_id!r} {[s.name for s in self.specs]}>"


# ---------------------------------------------------------------- command line


def default_instance_id():
    """``kbstream-bridge-<host>-<pid>``, with only the characters Karabo allows."""
    text = f"kbstream-bridge-{socket.gethostname().split('.')[0]}-{os.getpid()}"
    return "".join(c if c.isalnum() or c in "_-/" else "_" for c in text)
