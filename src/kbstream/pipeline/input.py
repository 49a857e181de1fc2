"""Karabo pipeline InputChannel: connects to outputs, receives items, calls handlers.

Threads (started by :meth:`InputChannel.start`): one per output it connects to
(:mod:`kbstream.pipeline._receive`) receives messages (straight into buffers that
become the items' numpy arrays, no further copy) and grants credit; one handler thread
calls the user's handlers, so handlers of one input never run concurrently and receiving
goes on while they run.

Flow control: an input holds at most ``capacity`` received but unhandled
items (``max(2 * minData, credit_window, 2)``); beyond that it stops sending
``update`` and the output's policy (drop / queueDrop / wait) applies, as with
Karabo.  With ``minData=0`` (everything until end of stream) it never stops.
An output that sends more messages than it was granted is disconnected (a
protocol error, logged) and connected again later.

End of stream: the handler is called once every connected output has sent
its end of stream, after the data handlers for everything before it, and the
bookkeeping restarts for the next stream (Karabo's C++ input only gets the
first stream right).

Reconnection: when an output goes away (or sends garbage, which closes the
connection with a logged reason), the input tries again every
``reconnect_interval`` seconds, asking the resolver for fresh connection
details each time.
"""

import collections
import logging
import threading
import time

from kbhash import Hash

from .._lifecycle import Lifecycle
from ..errors import StateError
from . import shm, wire
from ._receive import Connection, ConnectionStatus
from .errors import ChannelClosed, ConnectTimeout, PipelineConfigError

__all__ = ["InputChannel", "ConnectionStatus"]

log = logging.getLogger("kbstream.pipeline")

_EOS = object()
#: Seconds close() waits for the channel's threads, all together.
_JOIN_TIMEOUT = 5.0


class _Batch:
    """What an input handler sees: the items of one round."""

    def __init__(self, items):
        self.items = items

    def size(self):
        return len(self.items)

    def read(self, i):
        return self.items[i][0]

    def get_meta_data(self, i):
        return self.items[i][1]


class InputChannel(Lifecycle):
    """Karabo pipeline input channel.

    Nothing runs before :meth:`start`: outputs given to :meth:`connect` earlier are
    connected then, together with ``connectedOutputChannels``; :meth:`close` (or
    ``stop``) ends everything.  ``with InputChannel(...) as inp:`` starts and closes it.

    Parameters
    ----------
    channel_id : str
        ``"<instanceId>:<channelName>"``, sent in the hello.
    connectedOutputChannels : list of str
        Output ids ``"<instanceId>:<channel>"`` to connect to via the resolver
        when :meth:`start` is called (an output given to :meth:`connect` before
        keeps its explicit address).
    dataDistribution : {"copy", "shared"}
    onSlowness : {"drop", "queueDrop", "wait"}
    maxQueueLength : int
    minData : int
        Items per handler round (0: everything until end of stream).
    respondToEndOfStream : bool
    delayOnInput : float
        Milliseconds to wait before each credit (throttles the sender).
    resolver : callable or dict, optional
        ``output_id -> connection info`` (Hash or dict with hostname, port,
        connectionType; None when not available yet: retried).
    reconnect_interval : float
        Seconds between connection attempts.
    credit_window : int
        Messages a kbstream output may have in flight towards this input
        (a Karabo output ignores it and keeps one).
    max_message_size : int
        Largest message body accepted (bytes); a larger declaration closes the
        connection.
    schema : DataSchema, optional
        Expected content; mismatches are counted, logged once per problem and
        passed to ``on_schema_mismatch(data, problems)`` if given.
    use_shm : bool
        Offer a kbstream output on the same machine the shared-memory data
        path (:mod:`kbstream.pipeline.shm`); ignored by Karabo outputs.
    """

    def __init__(self, channel_id, connectedOutputChannels=(), *, dataDistribution="copy",
                 onSlowness="drop", maxQueueLength=2, minData=1, respondToEndOfStream=True,
                 delayOnInput=0, resolver=None, reconnect_interval=2.0, credit_window=4,
                 connect_timeout=5.0, max_message_size=0xFFFFFFFF, schema=None, on_schema_mismatch=None,
                 use_shm=True):
        Lifecycle.__init__(self)
        if dataDistribution not in wire.DISTRIBUTION:
            raise PipelineConfigError(f"dataDistribution must be one of {wire.DISTRIBUTION}, "
                                      f"not {dataDistribution!r}")
        if onSlowness not in wire.ON_SLOWNESS:
            raise PipelineConfigError(f"onSlowness must be one of {wire.ON_SLOWNESS}, not {onSlowness!r}")
        self.channel_id = channel_id
        self.connected_output_channels = list(connectedOutputChannels)
        self.data_distribution = dataDistribution
        self.on_slowness = onSlowness
        try:
            self.max_queue_length = int(maxQueueLength)
            self.min_data = int(minData)
            self.delay_on_input = float(delayOnInput) / 1000.0
            self.reconnect_interval = float(reconnect_interval)
            self.credit_window = max(1, int(credit_window))
            self.max_message_size = int(max_message_size)
        except (TypeError, ValueError) as e:
            raise PipelineConfigError(f"{channel_id}: a numeric option is not a number ({e})") from None
        self.respond_to_eos = bool(respondToEndOfStream)
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.use_shm = bool(use_shm) and shm.available()
        self.schema = schema
        self.on_schema_mismatch = on_schema_mismatch
        self.schema_mismatches = 0
        self._reported = set()
        self.capacity = max(2 * max(self.min_data, 1), self.credit_window, 2)
        self._data_handler = None
        self._input_handler = None
        self._eos_handler = None
        self._trackers = []
        # Locks.  Each is a leaf: none is ever taken while another one is held (should two
        # ever be needed together, take them in this order):
        #   1. Lifecycle._lc_lock  the started/closed flags; held only inside the
        #                          bookkeeping of start() and close().
        #   2. _cond (Condition)   the handler queue (_queue, _npending), _conns, _live,
        #                          _eos_seen, _running, ``received`` and each connection's
        #                          owed_update.  Never held across socket I/O, a join or a
        #                          user callback; the handler thread waits on it.
        #   3. Connection.lock     one per output (see _receive): that socket's writes
        #                          (hello, update, kbRelease) and its
        #                          shared-memory mapper.
        self._cond = threading.Condition()
        self._queue = collections.deque()  # (data, meta, conn) or (_EOS, None, conn)
        self._npending = 0  # data items in the queue
        self._conns = {}  # output id -> Connection
        self._live = set()  # connections that are connected now
        self._eos_seen = set()
        self._running = False  # start() ran: new connections start at once
        self.received = 0
        self.handled = 0
        self.eos_count = 0
        self._handler_thread = threading.Thread(target=self._handler_loop, name=f"{channel_id}-handlers",
                                                daemon=True)

    # ------------------------------------------------------------ registration

    def register_data_handler(self, fn):
        """``fn(data: Hash, meta: ChannelMetaData)`` for every item (handler thread)."""
        self._data_handler = fn

    def register_input_handler(self, fn):
        """``fn(batch)`` once per round; ``batch.size()``, ``batch.read(i)``, ``batch.get_meta_data(i)``."""
        self._input_handler = fn

    def register_end_of_stream_handler(self, fn):
        """``fn(channel)`` once all connected outputs have sent end of stream."""
        self._eos_handler = fn

    def register_connection_tracker(self, fn):
        """``fn(output_id, ConnectionStatus)`` on every status change."""
        self._trackers.append(fn)

    # ------------------------------------------------------------ connecting

    def _start(self):
        """Start the handler thread, then connect to the outputs given to :meth:`connect`
        and to every output of ``connectedOutputChannels`` (through the resolver)."""
        self._handler_thread.start()
        with self._cond:
            self._running = True
            waiting = list(self._conns.values())
        for conn in waiting:
            conn.thread.start()
        for oid in self.connected_output_channels:
            with self._cond:
                known = oid in self._conns
            if not known:
                self._add(oid, None)

    def connect(self, info, output_id=None):
        """Connect to an output given its connection info (explicit endpoint); returns
        the output id.  Before :meth:`start` the connection is made when it starts.

        ``info``: Hash or dict with ``hostname``, ``port`` and optionally
        ``outputChannelString`` (the output id) and ``connectionType``.
        """
        if isinstance(info, Hash):
            info = info.to_dict()
        oid = output_id or info.get("outputChannelString") or f"{info['hostname']}:{info['port']}"
        self._add(oid, dict(info))
        return oid

    def add_output(self, output_id):
        """Also read from the output ``output_id`` (``"<instanceId>:<channel>"``), found
        through the resolver; the other connections stay as they are. Listed in
        ``connected_output_channels``; before :meth:`start` the connection is made when
        it starts. Adding an output already listed changes nothing.

        Raises
        ------
        PipelineConfigError
            ``output_id`` is not a non-empty string.
        ChannelClosed
            The channel is closed.
        """
        if not isinstance(output_id, str) or not output_id:
            raise PipelineConfigError(
                f"{self.channel_id}: an output id is a non-empty string, not {output_id!r}")
        if self.closed:
            raise ChannelClosed(f"add_output() on {self.channel_id}, which is closed")
        if output_id not in self.connected_output_channels:
            self.connected_output_channels.append(output_id)
        with self._cond:
            known = output_id in self._conns
            run = self._running
        if run and not known:
            self._add(output_id, None)

    def remove_output(self, output_id):
        """Stop reading from the output ``output_id``: its connection is closed (its thread
        ended) and it leaves ``connected_output_channels``; the other connections stay.
        Returns whether the output was listed or connected."""
        listed = output_id in self.connected_output_channels
        if listed:
            self.connected_output_channels.remove(output_id)
        with self._cond:
            known = output_id in self._conns
        self.disconnect(output_id)
        return listed or known

    def _add(self, oid, info):
        with self._cond:
            if self.closed:
                raise ChannelClosed(f"connect() on {self.channel_id}, which is closed")
            old = self._conns.pop(oid, None)
        if old is not None:
            self._stop(old)
        conn = Connection(self, oid, info)
        with self._cond:
            if self.closed:
                raise ChannelClosed(f"connect() on {self.channel_id}, which is closed")
            self._conns[oid] = conn
            run = self._running
        if run:
            conn.thread.start()

    def reconnect_now(self, output_id):
        """Try to (re)connect to ``output_id`` now instead of at the next retry."""
        with self._cond:
            conn = self._conns.get(output_id)
        if conn is not None and conn.status == ConnectionStatus.DISCONNECTED:
            conn.wake.set()

    def disconnect(self, output_id):
        """Stop receiving from ``output_id`` (and stop reconnecting to it)."""
        with self._cond:
            conn = self._conns.pop(output_id, None)
        if conn is not None:
            self._stop(conn)

    @staticmethod
    def _stop(*conns, timeout=_JOIN_TIMEOUT):
        """End these connections' threads, waiting ``timeout`` seconds for all of them."""
        for conn in conns:
            conn.halt()
        deadline = time.monotonic() + timeout
        for conn in conns:
            t = conn.thread
            if t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def connection_status(self):
        """``{output id: ConnectionStatus}``."""
        with self._cond:
            return {oid: c.status for oid, c in self._conns.items()}

    def wait_connected(self, output_ids=None, timeout=10.0):
        """Wait until these outputs (default: all) are connected; ConnectTimeout after
        ``timeout`` seconds."""
        if self.closed:
            raise ChannelClosed(f"wait_connected() on {self.channel_id}, which is closed")
        if not self.started:
            raise StateError(f"wait_connected() on {self.channel_id} before start()")
        deadline = time.monotonic() + timeout
        with self._cond:
            want = set(output_ids or self._conns)
        while True:
            st = self.connection_status()
            if all(st.get(o) == ConnectionStatus.CONNECTED for o in want):
                return
            if time.monotonic() > deadline:
                raise ConnectTimeout(f"{self.channel_id}: not connected to {sorted(want)} within {timeout} s: {st}",
                                     self.channel_id, timeout)
            time.sleep(0.01)

    def _track(self, oid, status):
        for fn in self._trackers:
            try:
                fn(oid, status)
            except Exception:
                log.exception("%s: connection tracker failed", self.channel_id)

    def _connected(self, conn):
        with self._cond:
            self._live.add(conn)
            self._eos_seen.discard(conn)

    def _gone(self, conn):
        with self._cond:
            self._live.discard(conn)
            self._eos_seen.discard(conn)
            # a stream whose other outputs all ended is complete now
            if self._eos_seen and self._eos_seen >= self._live:
                self._queue.append((_EOS, None, None))
            self._cond.notify_all()

    # ------------------------------------------------------------ receiving

    def _deliver(self, conn, items, eos):
        with self._cond:
            for data, meta in items:
                self._queue.append((data, meta, conn))
            self._npending += len(items)
            if eos:
                self._queue.append((_EOS, None, conn))
            self.received += len(items)
            self._cond.notify_all()
            owe = self.min_data > 0 and self._npending >= self.capacity
            conn.owed_update = owe
        if not owe:
            self._grant(conn)

    def _grant(self, conn):
        if self.delay_on_input:
            time.sleep(self.delay_on_input)
        try:
            conn.grant(wire.update(self.channel_id))
        except OSError as e:
            log.info("%s: could not grant credit to %s: %s", self.channel_id, conn.output_id, e)

    def _grant_owed(self):
        with self._cond:
            if self._npending >= self.capacity:
                return
            owed = [c for c in self._conns.values() if c.owed_update]
            for c in owed:
                c.owed_update = False
        for c in owed:
            self._grant(c)

    # ------------------------------------------------------------ handlers

    def _next_round(self):
        """Wait for the next round: (items, stream complete); None when closed."""
        with self._cond:
            while True:
                if self.closed:
                    return None
                items = []
                eos_at = None
                for k, (data, meta, conn) in enumerate(self._queue):
                    if data is _EOS:
                        eos_at = k
                        break
                    items.append((data, meta))
                    if self.min_data and len(items) >= self.min_data:
                        break
                if self.min_data and len(items) >= self.min_data:
                    for _ in items:
                        self._queue.popleft()
                    self._npending -= len(items)
                    return items, False
                if eos_at is not None:
                    for _ in items:
                        self._queue.popleft()
                    self._npending -= len(items)
                    _, _, conn = self._queue.popleft()
                    if conn is not None:
                        self._eos_seen.add(conn)
                    complete = conn is None or self._eos_seen >= self._live
                    if complete:
                        self._eos_seen = set()
                    return items, complete
                self._cond.wait(0.5)

    def _handler_loop(self):
        while True:
            r = self._next_round()
            if r is None:
                return
            items, eos = r
            if items:
                self._grant_owed()
                self._run_handlers(items)
                items = r = None
                with self._cond:
                    conns = list(self._conns.values())
                for conn in conns:
                    try:
                        conn.release_slots()
                    except Exception:  # keep the handler thread alive whatever happens
                        log.exception("%s: releasing shared-memory slots failed", self.channel_id)
                self._grant_owed()
            if eos:
                self.eos_count += 1
                if self.respond_to_eos and self._eos_handler is not None:
                    try:
                        self._eos_handler(self)
                    except Exception:
                        log.exception("%s: end-of-stream handler failed", self.channel_id)

    def _run_handlers(self, items):
        if self.schema is not None:
            for data, _ in items:
                problems = self.schema.validate(data)
                if problems:
                    self.schema_mismatches += 1
                    new = [p for p in problems if p not in self._reported]
                    if new:
                        self._reported.update(new)
                        log.warning("%s: data does not match the expected schema: %s", self.channel_id,
                                    "; ".join(new))
                    if self.on_schema_mismatch is not None:
                        self.on_schema_mismatch(data, problems)
        if self._input_handler is not None:
            try:
                self._input_handler(_Batch(items))
            except Exception:
                log.exception("%s: input handler failed", self.channel_id)
        if self._data_handler is not None:
            for data, meta in items:
                try:
                    self._data_handler(data, meta)
                except Exception:
                    log.exception("%s: data handler failed", self.channel_id)
        self.handled += len(items)

    # ------------------------------------------------------------ life cycle

    def _close(self):
        with self._cond:
            conns = list(self._conns.values())
            self._conns.clear()
            self._cond.notify_all()
        self._stop(*conns)
        t = self._handler_thread
        if t.is_alive() and t is not threading.current_thread():
            t.join(_JOIN_TIMEOUT)

    def __repr__(self):
        return f"<InputChannel {self.channel_id} {self.connection_status()}>"
