"""TrainMatcher: pipeline inputs -> matching by train id -> bridge outputs.

Threads, once :meth:`TrainMatcher.start` ran:

* per source, the threads of its :class:`~kbstream.pipeline.InputChannel` (receiving, and
  one handler thread that flattens each item and offers it to the matching);
* per output, one thread running :func:`kbstream.bridge.sender.run` on its
  :class:`~kbstream.bridge.sender.Sender`, fed from a bounded queue;
* with ``max_wait``, one thread that ends the trains that waited too long.

One lock guards the matching (:class:`~kbstream.matcher.core.MatchCore`) and the hand-over
of ready trains to the output queues, so every output gets the trains in the order the
matching made them.  The lock is never held across socket I/O, a join or a wait: a
handler thread only matches and appends to the queues; the output threads serialize and
send without it.

A slow bridge client never stalls the inputs: when an output's queue is full, the
oldest train in it is dropped for that output (counted).  A train counts as ``sent`` once
at least one output delivered it, as ``dropped`` once every output dropped it (reasons
in :mod:`kbstream.matcher.core`); until then it is ``pending`` (``queued``).

What a bridge client gets for a train: ``{source name: {flat key: value}}`` (the item's
Hash flattened as :func:`kbstream.bridge.flatten_hash` does; arrays are the received
arrays, not copies) and per source the metadata of :func:`kbstream.bridge.source_metadata`:
the source name, the item's Karabo timestamp and the matched train id (the item's train
id plus the source's offset, the same for every source of the train).  An output opened
with ``report_missing`` also puts into every source's metadata :data:`MISSING_KEY`, the
list of the sources the train lacks (empty for a complete train); other outputs send
exactly what a Karabo Bridge client expects (``docs/matcher.md``).
"""

import logging
import threading
import time
from collections import deque

import zmq

from .._lifecycle import Lifecycle
from ..bridge import ENCODE_VERSIONS, flatten_hash, serialize, source_metadata
from ..bridge.stacking import ModuleStacker
from ..bridge.sender import EMPTY, POLL_INTERVAL, SENT, STOPPED, Sender, run
from ..pipeline import ConnectionStatus, InputChannel
from .core import DEFAULT_BUFFER, DEFAULT_MAX_PENDING, MatchCore
from .errors import (MatcherConfigError, MatcherStateError, SourceSpecError, UnknownSourceError,
                     UnresolvedSourceError)

__all__ = ["TrainMatcher", "SourceSpec", "parse_source", "parse_output", "DEFAULT_QUEUE_LENGTH",
           "DEFAULT_OUTPUT", "MISSING_KEY"]

log = logging.getLogger("kbstream.matcher")

#: trains each output may hold before it drops its oldest
DEFAULT_QUEUE_LENGTH = 4
#: the bridge output when none is given: REP on port 4545 of every interface
DEFAULT_OUTPUT = ("tcp://*:4545", "REP")
#: the metadata key (every source of a train) listing the sources the train lacks, on
#: outputs opened with ``report_missing``
MISSING_KEY = "kbstream.missing"
#: seconds between two checks for trains that waited ``max_wait``
_TICK = 0.1
#: seconds close() waits for the output and tick threads, all together
_JOIN_TIMEOUT = 5.0


class SourceSpec:
    """One source: ``name`` (the alias, or ``DEVICE:CHANNEL``), ``device``, ``channel``,
    ``host`` and ``port`` (None without an endpoint) and the train-id ``offset``."""

    __slots__ = ("name", "device", "channel", "host", "port", "offset")

    def __init__(self, name, device, channel, host=None, port=None, offset=0):
        self.name = name
        self.device = device
        self.channel = channel
        self.host = host
        self.port = port
        self.offset = offset

    @property
    def output_id(self):
        """``DEVICE:CHANNEL``, the pipeline output's id."""
        return f"{self.device}:{self.channel}"

    def __repr__(self):
        at = f"={self.host}:{self.port}" if self.host is not None else ""
        alias = f"{self.name}@" if self.name != self.output_id else ""
        return f"SourceSpec({alias}{self.output_id}{at}, offset={self.offset})"


def parse_source(text, offset=0):
    """Parse ``[ALIAS@]DEVICE:CHANNEL[=HOST:PORT]`` into a :class:`SourceSpec`.

    ``DEVICE`` may contain ``/`` (Karabo device ids do) but no ``:``; ``HOST`` may be an
    IPv6 address in brackets (``[::1]:4040``).  A :class:`SourceSpec` is returned as is.

    Raises
    ------
    SourceSpecError
        the text does not follow the grammar (the message says which part).
    """
    if isinstance(text, SourceSpec):
        return text
    if not isinstance(text, str):
        raise SourceSpecError(f"a source must be a str like DEVICE:CHANNEL=HOST:PORT, not {text!r}", text)
    spec, eq, endpoint = text.partition("=")
    host = port = None
    if eq:
        h, colon, p = endpoint.rpartition(":")
        if h.startswith("[") and h.endswith("]"):
            h = h[1:-1]
        if not colon or not h or not p.isdigit() or not 0 < int(p) < 65536:
            raise SourceSpecError(f"source {text!r}: the endpoint must be HOST:PORT with a port "
                                  f"1..65535, not {endpoint!r}", text)
        host, port = h, int(p)
    alias, at, output = spec.rpartition("@")
    if at and not alias:
        raise SourceSpecError(f"source {text!r}: empty name before '@'", text)
    device, colon, channel = output.partition(":")
    if not colon or not device or not channel or ":" in channel:
        raise SourceSpecError(f"source {text!r}: expected [ALIAS@]DEVICE:CHANNEL[=HOST:PORT]", text)
    if any(c.isspace() for c in spec):
        raise SourceSpecError(f"source {text!r}: white space in the name", text)
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise SourceSpecError(f"source {text!r}: the train-id offset must be an int, not {offset!r}", text)
    return SourceSpec(alias or output, device, channel, host, port, offset)


def parse_output(output, sock="REP"):
    """One bridge output as ``(endpoint, sock, report_missing)``.

    Accepted: a port number or endpoint (``sock`` is used); ``(endpoint, sock)``;
    ``(endpoint, sock, {"report_missing": bool})``; or the command line's text
    ``PORT_OR_ENDPOINT[,SOCK][,missing]`` (``4545``, ``tcp://*:4545,PUB``,
    ``ipc:///tmp/m,PUSH,missing``).

    Raises
    ------
    MatcherConfigError
        an unknown socket type or option.
    """
    options = {}
    if isinstance(output, (str, int)) and not isinstance(output, bool):
        endpoint = output
        if isinstance(output, str) and "," in output:
            endpoint, *extra = output.split(",")
            for word in extra:
                if word.upper() in ("REP", "PUB", "PUSH"):
                    sock = word.upper()
                elif word == "missing":
                    options["report_missing"] = True
                else:
                    raise MatcherConfigError(f"output {output!r}: unknown option {word!r} "
                                             "(expected REP, PUB, PUSH or missing)")
    else:
        try:
            endpoint, sock, *more = output
        except (TypeError, ValueError):
            raise MatcherConfigError(f"an output must be an endpoint or (endpoint, sock[, options]), "
                                     f"not {output!r}") from None
        if more:
            if len(more) > 1 or not isinstance(more[0], dict):
                raise MatcherConfigError(f"output {output!r}: options must be one dict")
            options = dict(more[0])
    if sock not in ("REP", "PUB", "PUSH"):
        raise MatcherConfigError(f"output socket must be REP, PUB or PUSH, not {sock!r}")
    report_missing = options.pop("report_missing", False)
    if options:
        raise MatcherConfigError(f"output {output!r}: unknown options {sorted(options)}")
    return endpoint, sock, bool(report_missing)


class _Token:
    """A train handed to the outputs: how many have yet to report, and what they did."""

    __slots__ = ("tid", "left", "sent", "reason")

    def __init__(self, tid, left):
        self.tid = tid
        self.left = left
        self.sent = False
        self.reason = None


class _Output:
    """One bridge output: its sender, its bounded queue and its thread."""

    def __init__(self, sender, queue_length, name, report_missing=False):
        self.sender = sender
        self.report_missing = report_missing
        self.endpoint = sender.bound_endpoint
        self.clients = 0
        # connection events of the bound socket (set up before its thread runs; read by
        # stats() under the matcher's lock only)
        self.monitor = sender._socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.queue = deque()
        self.queue_length = queue_length
        self.cond = threading.Condition()
        self.dropped = 0  # trains pushed out of this queue
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.run_args = None

    def push(self, item, evict=True):
        """Append a train; returns the one pushed out of a full queue (with ``evict``), or
        None."""
        with self.cond:
            evicted = None
            if evict and len(self.queue) >= self.queue_length:
                evicted = self.queue.popleft()
                self.dropped += 1
            self.queue.append(item)
            self.cond.notify()
        return evicted

    def count_clients(self):
        """Clients connected now, from the socket's connection events so far."""
        while not self.monitor.closed:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return self.clients
            event = int.from_bytes(frames[0][:2], "little")
            if event == zmq.EVENT_ACCEPTED:
                self.clients += 1
            elif event == zmq.EVENT_DISCONNECTED and self.clients > 0:
                self.clients -= 1
        return self.clients

    def close(self):
        self.monitor.close(linger=0)
        self.sender.close()
        # the trains still queued stay counted as pending; their arrays (views on the
        # sources' shared-memory slots) go now, not at a later cyclic garbage collection
        # (run_args refers back to the matcher)
        with self.cond:
            self.queue.clear()
        self.run_args = None

    def next_train(self):
        with self.cond:
            if not self.queue:
                self.cond.wait(POLL_INTERVAL)
                if not self.queue:
                    return EMPTY
            item = self.queue.popleft()
            self.cond.notify_all()  # room for a waiting input (when_full="wait")
            return item

    def wait_for_room(self, closing):
        """Block until the queue has room or ``closing`` is set (the lock is not held)."""
        with self.cond:
            while len(self.queue) >= self.queue_length and not closing.is_set():
                self.cond.wait(POLL_INTERVAL)

    def _run(self):
        stop, protocol_version, on_sent, on_error, serialize = self.run_args
        try:
            run(self.sender, self.next_train, stop, protocol_version=protocol_version,
                on_sent=on_sent, on_error=on_error, serialize=serialize)
        except Exception:
            log.exception("bridge output %s failed", self.endpoint)


class TrainMatcher(Lifecycle):
    """Match the items of several pipeline outputs by train id; serve the trains.

    Follows kbstream's life cycle: the constructor checks everything and binds the bridge
    outputs (their :attr:`endpoints` are known at once) but connects to no source;
    :meth:`start` connects and starts the threads; :meth:`close` ends everything within a
    bounded time; ``with`` starts and closes.

    Parameters
    ----------
    sources : iterable
        ``[ALIAS@]DEVICE:CHANNEL[=HOST:PORT]`` strings or :class:`SourceSpec` objects.
    outputs : iterable
        Bridge outputs, each ``(endpoint, sock)`` (sock ``'REP'``, ``'PUB'`` or
        ``'PUSH'``; endpoint as :func:`kbstream.bridge.parse_endpoint`), ``(endpoint,
        sock, {"report_missing": True})``, or a bare endpoint (REP); see
        :func:`parse_output`.  Default: :data:`DEFAULT_OUTPUT`.
    mode : {'match', 'buffer'}
    buffer : int
        Trains kept in ``buffer`` mode.
    max_pending : int
        Most trains waiting for items (100).
    max_wait : float, optional
        Seconds a train may wait for items (:mod:`kbstream.matcher.core`).
    offsets : dict, optional
        ``{source name: train-id offset}``, for sources given as strings.
    resolver : callable or dict, optional
        For sources without ``=HOST:PORT``: ``output_id -> connection info``, as
        :class:`~kbstream.pipeline.InputChannel` takes it.
    protocol_version : {'2.2', '1.0'}
        Bridge protocol of every output.
    queue_length : int
        Trains each output may hold (:data:`DEFAULT_QUEUE_LENGTH`).
    when_full : {'drop', 'wait'}
        What happens when an output's queue is full: ``drop`` (default) drops its oldest
        train (counted), so a slow client never stalls the inputs; ``wait`` makes the
        inputs wait for room (no lock held) before they offer the next item, so the
        sources are paced by the slowest client (with ``onSlowness="wait"`` inputs,
        nothing is lost anywhere).  A queue then never drops: it may exceed
        ``queue_length`` by the trains that several inputs complete at the same moment
        (in ``match`` mode at most one per input, plus what a :meth:`remove_source`
        completes).
    instance_id : str
        The inputs are named ``<instance_id>:input<i>`` towards the pipeline outputs.
    input_options : dict, optional
        More keyword arguments for each InputChannel (e.g. ``onSlowness``).
    use_infiniband : bool
        Bind outputs given as a bare port number on interface ``ib0`` (as serve-run).
    append_detector_modules : bool
        Stack the module sources of one detector into one ``<det>/DET/APPEND`` source
        (:class:`kbstream.bridge.stacking.ModuleStacker`, the replay's code), in each
        output's thread; this copies the module arrays into the stacked one.
    context : zmq.Context, optional
        For the bridge sockets; never terminated here.
    clock : callable
        Seconds of a monotonic clock (the matching's ``now``).

    Raises
    ------
    SourceSpecError, UnresolvedSourceError
        a source that does not parse, or has no endpoint and there is no resolver.
    MatcherConfigError
        an option out of range, or two sources with the same name.
    kbstream.BindError
        an output endpoint cannot be bound.
    kbstream.pipeline.PipelineConfigError
        ``input_options`` the InputChannel refuses.
    """

    def __init__(self, sources, outputs=(DEFAULT_OUTPUT,), *, mode="match", buffer=DEFAULT_BUFFER,
                 max_pending=DEFAULT_MAX_PENDING, max_wait=None, offsets=None, resolver=None,
                 protocol_version="2.2", queue_length=DEFAULT_QUEUE_LENGTH, instance_id="kbstream_matcher",
                 input_options=None, context=None, clock=time.monotonic, use_infiniband=False,
                 append_detector_modules=False, when_full="drop"):
        Lifecycle.__init__(self)
        offsets = dict(offsets or {})
        specs = []
        for s in sources:
            spec = parse_source(s)
            if spec.name in offsets:
                spec = SourceSpec(spec.name, spec.device, spec.channel, spec.host, spec.port,
                                  offsets.pop(spec.name))
            if spec.host is None and resolver is None:
                raise UnresolvedSourceError(
                    f"source {spec.name!r} has no endpoint: give it as {spec.output_id}=HOST:PORT "
                    "(finding it through the broker is not available here)", s)
            specs.append(spec)
        if offsets:
            raise MatcherConfigError(f"offsets for unknown sources: {sorted(offsets)}")
        if protocol_version not in ENCODE_VERSIONS:
            raise MatcherConfigError(f"protocol_version must be one of {ENCODE_VERSIONS}, "
                                     f"not {protocol_version!r}")
        if isinstance(queue_length, bool) or not isinstance(queue_length, int) or queue_length < 1:
            raise MatcherConfigError(f"queue_length must be an integer >= 1, not {queue_length!r}")
        self.specs = specs
        self.protocol_version = protocol_version
        self._clock = clock
        # checks the sources (names unique, offsets) and the matching options
        self._core = MatchCore([(s.name, s.offset) for s in specs], mode=mode, buffer=buffer,
                               max_pending=max_pending, max_wait=max_wait)
        outs = [parse_output(o) for o in outputs]
        if not outs:
            raise MatcherConfigError("a matcher needs at least one bridge output")
        if when_full not in ("drop", "wait"):
            raise MatcherConfigError(f"when_full must be 'drop' or 'wait', not {when_full!r}")
        self.when_full = when_full
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._outputs = []
        try:
            for i, (endpoint, sock, report_missing) in enumerate(outs):
                sender = Sender(endpoint, sock, context=context, use_infiniband=use_infiniband)
                try:
                    out = _Output(sender, queue_length, f"{instance_id}-output{i}", report_missing)
                except BaseException:
                    sender.close()
                    raise
                out.run_args = (self._stop, protocol_version, self._on_sent, self._on_error,
                                self._serialize)
                self._outputs.append(out)
        except BaseException:
            for out in self._outputs:
                out.close()
            raise
        self._instance_id = instance_id
        self._resolver = resolver
        self._append = bool(append_detector_modules)
        self._stacker = None
        if self._append:
            self._stacker = ModuleStacker([s.name for s in specs])
        self._connects = {}  # source name -> times its input connected
        self._connection = {}  # source name -> ConnectionStatus
        self._inputs = []
        options = {"onSlowness": "drop"}
        options.update(input_options or {})
        self._input_options = options
        self._next_input = 0  # inputs are numbered in the order they are made
        for spec in specs:
            try:
                self._inputs.append(self._make_input(spec))
            except BaseException:
                for inp in self._inputs:
                    inp.close()
                for out in self._outputs:
                    out.close()
                raise
        self._ticker = None
        if max_wait is not None:
            self._ticker = threading.Thread(target=self._tick_loop, name=f"{instance_id}-tick", daemon=True)

    # ------------------------------------------------------------ properties

    @property
    def endpoints(self):
        """The bound endpoints of the outputs, as libzmq reports them."""
        return [out.endpoint for out in self._outputs]

    @property
    def inputs(self):
        """The InputChannels, one per source (in the order of :attr:`specs`)."""
        return list(self._inputs)

    # ------------------------------------------------------------ life cycle

    def _make_input(self, spec):
        inp = InputChannel(f"{self._instance_id}:input{self._next_input}", resolver=self._resolver,
                           **self._input_options)
        self._next_input += 1
        inp.register_data_handler(self._handler(spec.name))
        inp.register_connection_tracker(self._tracker(spec.name))
        self._connection[spec.name] = ConnectionStatus.DISCONNECTED
        self._connects[spec.name] = 0
        return inp

    @staticmethod
    def _connect(spec, inp):
        if spec.host is not None:
            inp.connect({"hostname": spec.host, "port": spec.port, "connectionType": "tcp"},
                        output_id=spec.output_id)
        else:
            inp.connected_output_channels = [spec.output_id]

    def _start(self):
        for out in self._outputs:
            out.thread.start()
        if self._ticker is not None:
            self._ticker.start()
        for spec, inp in zip(self.specs, self._inputs):
            self._connect(spec, inp)
            inp.start()

    def _close(self):
        self._closing.set()
        for inp in self._inputs:
            inp.close()
        self._stop.set()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        threads = [out.thread for out in self._outputs]
        if self._ticker is not None:
            threads.append(self._ticker)
        for t in threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:  # stats() reads the monitors under it
            for out in self._outputs:
                out.monitor.close(linger=0)
        for out in self._outputs:
            out.close()

    # ------------------------------------------------------------ sources while running

    def add_source(self, source, offset=0):
        """Add a source (``[ALIAS@]DEVICE:CHANNEL[=HOST:PORT]`` or a :class:`SourceSpec`)
        while running (or before :meth:`start`); from now on a train is complete only
        with its item too.  Returns its :class:`SourceSpec`.

        Raises
        ------
        SourceSpecError, UnresolvedSourceError, MatcherConfigError
            as the constructor, e.g. a name the matcher has already.
        MatcherStateError
            the matcher is closed.
        """
        spec = parse_source(source, offset if not isinstance(source, SourceSpec) else 0)
        if spec.host is None and self._resolver is None:
            raise UnresolvedSourceError(
                f"source {spec.name!r} has no endpoint: give it as {spec.output_id}=HOST:PORT", source)
        if self.closed:
            raise MatcherStateError(f"add_source({spec.name!r}) on a closed matcher")
        with self._lock:
            self._core.add_source(spec.name, spec.offset)  # checks the name
            inp = self._make_input(spec)
            self.specs.append(spec)
            self._inputs.append(inp)
            self._restack()
        if self.started:
            self._connect(spec, inp)
            inp.start()
        return spec

    def remove_source(self, name):
        """Remove the source ``name`` while running: its input is closed, its items leave
        the waiting trains (which may complete them).

        Raises
        ------
        UnknownSourceError
            no source of that name.
        MatcherConfigError
            it is the last source.
        """
        with self._lock:
            names = [s.name for s in self.specs]
            if name not in names:
                raise UnknownSourceError(f"no source named {name!r}", name)
            if len(names) == 1:
                raise MatcherConfigError("a matcher needs at least one source: the last one cannot be removed")
            i = names.index(name)
            inp = self._inputs.pop(i)
            del self.specs[i]
        inp.close()  # outside the lock: its handler thread may be waiting for it
        with self._lock:
            ready = self._core.remove_source(name)
            self._connection.pop(name, None)
            self._connects.pop(name, None)
            self._restack()
            if ready:
                self._dispatch(ready)

    def _restack(self):
        """A new module stacker for the sources now (lock held)."""
        if self._append:
            self._stacker = ModuleStacker([s.name for s in self.specs])

    def wait_connected(self, timeout=10.0):
        """Wait until every source is connected (:class:`~kbstream.pipeline.ConnectTimeout`
        after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        for inp in self._inputs:
            inp.wait_connected(timeout=max(0.01, deadline - time.monotonic()))

    # ------------------------------------------------------------ data path

    def _handler(self, name):
        add = self._core.add
        clock = self._clock
        wait = self.when_full == "wait"

        def on_item(data, meta):
            if wait:
                for out in self._outputs:
                    out.wait_for_room(self._closing)
            values, _ = flatten_hash(data)
            with self._lock:
                try:
                    ready = add(name, meta.tid, (values, meta.timestamp), clock())
                except UnknownSourceError:
                    return  # an item of a source being removed
                if ready:
                    self._dispatch(ready)

        return on_item

    def _tracker(self, name):
        def track(output_id, status):
            if name in self._connection:
                self._connection[name] = status
                if status is ConnectionStatus.CONNECTED:
                    self._connects[name] = self._connects.get(name, 0) + 1

        return track

    def _serialize(self, data, metadata, protocol_version, dummy_timestamps):
        """What each output thread sends: the train, its detector modules stacked first
        with ``append_detector_modules``."""
        stacker = self._stacker
        if stacker is not None:
            data = dict(data)  # the outputs share the train: stack into copies of the maps
            metadata = dict(metadata)
            stacker.stack(data, metadata)
        return serialize(data, metadata, protocol_version, dummy_timestamps)

    def _dispatch(self, ready):
        """Hand trains to every output (lock held)."""
        n = len(self._outputs)
        reporting = any(out.report_missing for out in self._outputs)
        evict = self.when_full == "drop"
        for train in ready:
            tid = train.tid
            data = {}
            metadata = {}
            for name, (values, ts) in train.parts.items():
                data[name] = values
                metadata[name] = source_metadata(name, tid, ts.sec, ts.frac)
            for hook in self._train_hooks:  # add_train_hook (Karabo side: slow data, output)
                hook(tid, data, metadata)
            token = _Token(tid, n)
            item = (data, metadata, token)
            item_missing = None
            if reporting:
                missing = [] if train.complete else [s.name for s in self.specs if s.name not in data]
                item_missing = (data, {name: {**m, MISSING_KEY: missing} for name, m in metadata.items()},
                                token)
            for out in self._outputs:
                evicted = out.push(item_missing if out.report_missing else item, evict)
                if evicted is not None:
                    self._report(evicted[2], False, "output_full")

    def _tick_loop(self):
        while not self._stop.wait(_TICK):
            with self._lock:
                ready = self._core.tick(self._clock())
                if ready:
                    self._dispatch(ready)

    def _report(self, token, sent, reason=None):
        """One output is done with a train (lock held)."""
        token.left -= 1
        if sent:
            if not token.sent:  # sent as soon as one output delivered it
                token.sent = True
                self._core.settle(token.tid, "sent")
        else:
            token.reason = reason
        if token.left == 0 and not token.sent:
            self._core.settle(token.tid, "dropped", token.reason)

    def _on_sent(self, token, outcome, tracker):
        if outcome is STOPPED:
            return  # closing: the train stays pending
        with self._lock:
            self._report(token, outcome is SENT, None if outcome is SENT else "no_subscriber")

    def _on_error(self, token, exc):
        with self._lock:
            self._report(token, False, "unencodable")

    # ------------------------------------------------------------ statistics

    def stats(self):
        """``{"sources": {name: {received, missing, latency, rate, status, ...}},
        "trains": {seen, matched, sent, incomplete, dropped, pending, ...}}``.

        The counters are those of :meth:`kbstream.matcher.core.MatchCore.stats`; a source
        whose input is not connected has the status ``disconnected`` (``connecting``
        while a connection is being made), and ``outputs`` lists per output its endpoint,
        socket type, trains sent, dropped from its full queue, and queued now.
        """
        with self._lock:
            st = self._core.stats(self._clock())
            connects = dict(self._connects)
            clients = [out.count_clients() for out in self._outputs]
        for name, s in st["sources"].items():
            conn = self._connection.get(name)
            if conn is ConnectionStatus.DISCONNECTED:
                s["status"] = "disconnected"
            elif conn is ConnectionStatus.CONNECTING:
                s["status"] = "connecting"
            s["connects"] = connects.get(name, 0)
        st["outputs"] = [
            {"endpoint": out.endpoint, "sock": out.sender.sock_type, "sent": out.sender.sent,
             "dropped": out.dropped + out.sender.dropped, "queued": len(out.queue),
             "clients": n, "report_missing": out.report_missing}
            for out, n in zip(self._outputs, clients)
        ]
        st["clients"] = sum(clients)
        return st

    def __repr__(self):
        return f"<TrainMatcher {[s.name for s in self.specs]} -> {self.endpoints}>"

    # ------------------------------------------------------------ train hooks

    _train_hooks = ()

    def add_train_hook(self, fn):
        """Call ``fn(tid, data, metadata)`` for every train handed to the outputs, before
        it is queued: ``fn`` may add sources to ``data`` / ``metadata`` (slow data) or
        pass the train on (a Karabo output).  It runs with the matching lock held, in an
        input's handler thread: it must not block or do I/O.  Add hooks before
        :meth:`start`; an exception in a hook propagates to that handler thread."""
        self._train_hooks = (*self._train_hooks, fn)
        return fn
