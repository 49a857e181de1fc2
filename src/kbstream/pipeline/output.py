"""Karabo pipeline OutputChannel: a TCP server that sends items to connected inputs.

Who gets which message is decided by :class:`~kbstream.pipeline.policy.DeliveryPolicy`
(its docstring describes every option); this module owns the sockets, the threads and
the sending.

Threads: one I/O thread (started by :meth:`OutputChannel.start`) accepts connections,
reads every connection's control frames (hello, update, and kbstream's own
kbRelease) through one selector, enforces the hello deadline and sends, in
the background, the messages that are already copies (queued ones, and the rest of a
message a slow input did not take at once).  A connection costs a socket and a small
buffer, never a thread (a same-host input's shared-memory handshake, which may wait,
runs on a short-lived thread of its own while its connection is not read).  ``write``/``update`` run in the caller's thread; ``update``
sends the message itself (``socket.sendmsg`` straight from the arrays' memory) and
returns once it is sent, dropped or queued (copied first, as Karabo's ``safeNDArray``)
for every input, so the arrays passed to ``write`` may be reused then.

Slow inputs cost only themselves.  Sockets never block: a ``drop`` or ``queueDrop``
input (and a shared input unless ``noInputShared="wait"``) whose socket does not take
the whole message at once gets the rest from a copy, in the background, and meanwhile
counts as having no credit, so its own policy applies to the next messages.  Only a
``wait`` input holds ``update()``: until it grants credit and has read the message, or
until ``update``'s ``timeout`` (the rest of a message it is reading then goes on in the
background).  An input that reads nothing for ``send_timeout`` seconds while a message
is being sent to it is disconnected as stalled.

Thread safety: ``write``, ``update`` and ``signal_end_of_stream`` may be called from
several threads; a message is the set of items written since the previous ``update`` by
any thread.  Each input has one sender at a time and gets its messages in the order of
their sequence numbers, so nothing is reordered and an end of stream never overtakes the
data before it nor is overtaken by the data after it.

Bounds against peers (docs/safety-pipeline.md): at most ``max_connections`` open
connections; a connection that sends no valid hello within ``hello_timeout`` seconds is
closed; every hello value is checked (:func:`kbstream.pipeline.wire.parse_hello`);
queues are bounded in messages and in bytes, per input and in total; ``close()``
returns within a bounded time whatever the peers do.
"""

import collections
import ipaddress
import logging
import select
import selectors
import socket
import threading
import time

import kbhash
from kbhash import Hash, HashType

from .._lifecycle import Lifecycle
from ..errors import BindError, EncodeError, KbStreamError, StateError
from . import shm, wire
from .errors import ChannelClosed, ChannelTimeout, PipelineConfigError, SchemaError
from ._connections import ConnectionsMixin, _close_socket
from .policy import MODES, SHARED, DeliveryPolicy
from .schema import DataSchema

__all__ = ["OutputChannel"]

log = logging.getLogger("kbstream.pipeline")

#: Seconds close() waits for the I/O thread.
_JOIN_TIMEOUT = 5.0
#: Buffers per sendmsg call (below the kernel's IOV_MAX).
_IOV_MAX = 512
#: What a writer does with a send it could not finish at once: go on in the background.
_LATER = object()


class _Tx:
    """One message being sent: what is left of its buffers, and since when nothing moved.

    ``owned``: the buffers are the channel's own bytes (a copy, a shared-memory
    reference), not the writer's arrays, so the send may outlive ``update()``.
    """

    __slots__ = ("entry", "slot", "views", "owned", "sent", "progress_at")

    def __init__(self, entry, slot, views, owned):
        self.entry = entry
        self.slot = slot
        self.views = views
        self.owned = owned
        self.sent = 0
        self.progress_at = time.monotonic()


def _views(buffers, skip=0):
    """Byte views of ``buffers`` (empty ones left out), without their first ``skip`` bytes."""
    views = []
    for b in buffers:
        v = memoryview(b).cast("B")
        n = v.nbytes
        if skip >= n:
            skip -= n
            continue
        views.append(v[skip:] if skip else v)
        skip = 0
    return views


def _push(sock, tx):
    """Send what the socket takes now (it never blocks); None, or the error that ends
    the connection.  ``tx.views`` is empty when the message is sent."""
    views = tx.views
    while views:
        try:
            n = sock.sendmsg(views[:_IOV_MAX])
        except (BlockingIOError, InterruptedError):
            return None
        except (OSError, ValueError) as e:  # ValueError: the socket was closed under us
            return e
        tx.sent += n
        tx.progress_at = time.monotonic()
        while n:
            first = views[0]
            if n >= first.nbytes:
                n -= first.nbytes
                del views[0]
            else:
                views[0] = first[n:]
                n = 0
    return None


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _materialize(msg):
    """A copy of a message that may outlive ``update()`` (the caller may reuse its arrays);
    a data message stays one, so a same-host input still gets it in shared memory."""
    if isinstance(msg, wire.Message):
        return msg.copied()
    return [bytes(memoryview(b).cast("B")) for b in msg]


def _positive(value, name, channel_id, kind=float):
    try:
        value = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise PipelineConfigError(f"{channel_id}: {name} must be a number, not {value!r}") from None
    if not value > 0 or value == float("inf"):
        raise PipelineConfigError(f"{channel_id}: {name} must be positive and finite, not {value!r}")
    return value


class OutputChannel(ConnectionsMixin, Lifecycle):
    """Karabo pipeline output channel.

    The constructor binds the listening socket (so :attr:`info` is known at once);
    :meth:`start` starts accepting inputs; :meth:`close` (or ``stop``) ends everything.
    ``with OutputChannel(...) as out:`` starts and closes it.

    Parameters
    ----------
    channel_id : str
        ``"<instanceId>:<channelName>"``; the default item source.
    hostname : str
        Address advertised in :attr:`info`.  ``"default"`` means the
        machine's host name.  When it is an IP address the server listens on
        that address only, otherwise on all interfaces (as Karabo does).
    port : int
        Listening port, 0 for an ephemeral one.
    noInputShared : {"drop", "queueDrop", "wait"}
        What happens to a message for the shared pool when no shared input is
        ready (see :mod:`kbstream.pipeline.policy`).
    distributionMode : {"load-balanced", "round-robin"}
        How the shared pool is served (Karabo 2.x names); round-robin goes
        through the shared inputs in the order of their ids.
    shared_selector : callable, optional
        ``f(list_of_shared_input_ids) -> id``; "" or an unknown id drops.  It runs
        with the channel's lock held: it must not call the channel.
    sharedQueueLength : int
        Bound of the shared queue for ``noInputShared="queueDrop"`` (oldest
        dropped when full).
    schema : DataSchema or Hash, optional
        Declared content of the items (a Hash: Karabo's layout, see
        :meth:`DataSchema.from_parameters`); ``write`` validates against it strictly, as
        Karabo does (missing and undeclared keys are errors): every item
        (``validateSchema="always"``), or the first one of each stream (``"once"``).
    use_shm : bool
        Offer kbstream inputs on the same machine the shared-memory data path
        (:mod:`kbstream.pipeline.shm`); Karabo inputs always get TCP.
    send_timeout : float
        Seconds an input may read nothing while a message is being sent to it
        before it is disconnected as stalled.
    hello_timeout : float
        Seconds a new connection has to send its hello before it is closed.
    max_connections : int
        Open connections at most (with or without hello); more are closed at once.
    max_queue_bytes : int
        Bytes each queue (a ``queueDrop`` input's, the shared one) may hold; beyond it
        the oldest messages are dropped, the newest always stays.
    max_total_queue_bytes : int
        Bytes all queues together may hold (each queue counted on its own).
    """

    def __init__(self, channel_id, *, hostname="default", port=0, noInputShared="drop",
                 distributionMode="load-balanced", shared_selector=None, sharedQueueLength=10,
                 schema=None, validateSchema="always", use_shm=True, send_timeout=30.0,
                 hello_timeout=10.0, max_connections=256, max_queue_bytes=256 << 20,
                 max_total_queue_bytes=1 << 30):
        Lifecycle.__init__(self)
        if noInputShared not in wire.ON_SLOWNESS:
            raise PipelineConfigError(f"noInputShared must be one of {wire.ON_SLOWNESS}, not {noInputShared!r}")
        if distributionMode not in MODES:
            raise PipelineConfigError(f"distributionMode must be one of {MODES}, not {distributionMode!r}")
        if validateSchema not in ("always", "once"):
            raise PipelineConfigError("validateSchema must be 'always' or 'once'")
        self.channel_id = channel_id
        self.no_input_shared = noInputShared
        self.distribution_mode = distributionMode
        self.shared_selector = shared_selector
        try:
            self.shared_queue_length = int(sharedQueueLength)
            port = int(port)
        except (TypeError, ValueError) as e:
            raise PipelineConfigError(f"{channel_id}: a numeric option is not a number ({e})") from None
        self.send_timeout = _positive(send_timeout, "send_timeout", channel_id)
        self.hello_timeout = _positive(hello_timeout, "hello_timeout", channel_id)
        self.max_connections = _positive(max_connections, "max_connections", channel_id, int)
        self.max_queue_bytes = _positive(max_queue_bytes, "max_queue_bytes", channel_id, int)
        self.max_total_queue_bytes = _positive(max_total_queue_bytes, "max_total_queue_bytes", channel_id, int)
        if isinstance(schema, Hash):  # a data schema in Karabo's layout
            schema = DataSchema.from_parameters(schema)
        self.schema = schema
        self.validate_schema = validateSchema
        self.use_shm = use_shm
        self._shm_budget = shm.SlotBudget()  # the slots of all inputs together
        self._validated = False
        self.hostname = socket.gethostname() if hostname == "default" else hostname
        bind = self.hostname if _is_ip(self.hostname) else "0.0.0.0"
        try:
            self._server = socket.create_server((bind, port), reuse_port=False)
        except OSError as e:
            raise BindError(f"{channel_id}: cannot listen on {bind}:{port}: {e}", f"{bind}:{port}") from e
        self._server.setblocking(False)
        self.port = self._server.getsockname()[1]
        # Locks.  Each is a leaf: none is ever taken while another one is held (should two
        # ever be needed together, take them in this order):
        #   1. Lifecycle._lc_lock  the started/closed flags; held only inside the
        #                          bookkeeping of start() and close().
        #   2. _lock (Condition)   the delivery policy (every queue, credit and counter),
        #                          _inputs, _conns, _kick, _closing, _io_running, and each
        #                          connection's ring, shm_sent, bytes_written, tx and
        #                          gone.  Held for
        #                          decisions only: never across a send, a receive, a join
        #                          or a log call; what it does cover besides bookkeeping is
        #                          the copy of a message queued for (or detached from) a
        #                          slow input, taking (or making) a shared-memory slot and
        #                          the shared_selector callback.  Writers waiting for credit
        #                          or for another input's sender wait on it; every change of
        #                          the policy notifies.
        #   3. _chunk_lock         _chunk (the items written since the last update).
        # Sending to one input is serialised by the policy (one sender at a time, from
        # next_send to end_send), not by a lock: nobody ever waits behind a send in flight.
        self._lock = threading.Condition()
        self._policy = DeliveryPolicy(noInputShared, distributionMode, shared_selector,
                                      self.shared_queue_length, copy=_materialize,
                                      max_queue_bytes=self.max_queue_bytes,
                                      max_total_bytes=self.max_total_queue_bytes)
        self._inputs = {}  # id -> _Connection, once its hello arrived
        self._conns = set()  # every open _Connection not dropped yet
        self._kick = set()  # connections whose next message is a copy for the I/O thread to send
        self._closing = []  # dropped connections whose socket the I/O thread closes
        self._admitting = []  # (connection, Hello, ring or error) after a shared-memory handshake
        self._io_running = False
        self._chunk = []
        self._chunk_lock = threading.Lock()
        # The I/O thread's own state (only it touches these after start()).
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._greeting = collections.deque()  # connections without hello, in accept order
        self._background = set()  # connections with a send in the background
        self._accept_paused_until = None
        self._refusing = False
        self._io = threading.Thread(target=self._io_loop, name=f"{channel_id}-io", daemon=True)

    # ------------------------------------------------------------ properties

    @property
    def info(self):
        """Connection information: ``Hash{connectionType, hostname, port (UINT32)}``."""
        h = Hash()
        h["connectionType"] = "tcp"
        h["hostname"] = self.hostname
        h.set("port", self.port, type=HashType.UINT32)
        return h

    def input_ids(self, shared=None):
        """Ids of the registered inputs (all, only shared, or only copy)."""
        with self._lock:
            return self._policy.input_ids(shared)

    def stats(self):
        """Counters per input (sent, dropped, queued, sending, queued_bytes, shm, shared,
        onSlowness, maxQueueLength, credit_window, background, bytes_written: TCP bytes of
        the messages whose send ended, bytes_read: TCP bytes received from the input,
        address: the input's ``(host, port)``) and of the shared pool (key
        ``"__shared__"``: dropped, queued, queued_bytes)."""
        with self._lock:
            out = self._policy.counters()
            for iid, conn in self._inputs.items():
                c = out[iid]
                c["shm"] = conn.shm_sent
                c["bytes_written"] = conn.bytes_written
                c["bytes_read"] = conn.bytes_read
                c["address"] = conn.addr
        return out

    def connection_count(self):
        """Open connections (inputs and connections still without hello)."""
        with self._lock:
            return len(self._conns)

    def wait_for_inputs(self, copy=(), shared=(), timeout=10.0):
        """Block until inputs with these ids have sent their hello."""
        self._require_started("wait_for_inputs()")
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                have = self._policy.kinds()
                if all(have.get(x) is False for x in copy) and all(have.get(x) is True for x in shared):
                    return
                if self.closed:
                    raise ChannelClosed(f"{self.channel_id} closed while waiting for inputs")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelTimeout(f"{self.channel_id}: inputs {list(copy) + list(shared)} did not connect "
                                         f"within {timeout} s (connected: {sorted(have)})",
                                         self.channel_id, timeout)
                self._lock.wait(left)

    def _require_started(self, what):
        if self.closed:
            raise ChannelClosed(f"{what} on {self.channel_id}, which is closed")
        if not self.started:
            raise StateError(f"{what} on {self.channel_id} before start()")

    # ------------------------------------------------------------ sending

    def _dispatch(self, conns):
        """After the policy handed messages out (``_lock`` held): the I/O thread sends the
        copies; a writer sends its own message (it waits for it)."""
        kick = False
        for conn in conns:
            e = self._policy.head(conn)
            if e is not None and e.delivery is None and conn not in self._kick:
                self._kick.add(conn)
                kick = True
        return kick

    def _slot_for(self, conn, msg):
        """A shared-memory slot for ``msg`` (``_lock`` held), or None to send over TCP."""
        ring = conn.ring
        if ring is None or not isinstance(msg, wire.Message) or msg.body_size < shm.MIN_SHM_MESSAGE:
            return None
        return ring.acquire(msg.body_size)

    @staticmethod
    def _start_tx(conn, entry, slot):
        """The buffers to send for ``entry``: the message, or its shared-memory reference
        after the one copy of its body into ``slot``."""
        msg = entry.payload
        try:
            if slot is not None:
                # conn.ring is released only when no send to conn is in flight
                return _Tx(entry, slot, _views(conn.ring.place(slot, msg)), True), None
            return _Tx(entry, slot, _views(msg), entry.delivery is None), None
        except (OSError, ValueError) as e:
            # ValueError: the connection (and its slots) was closed under us
            return _Tx(entry, slot, [], True), e

    def _finish(self, conn, tx, error):
        """The send of ``tx`` ended (``error`` None: completely).  True if the I/O thread
        has copies to send now."""
        with self._lock:
            if conn.tx is tx:
                conn.tx = None
            gone = self._policy.end_send(conn, tx.entry, ok=error is None)
            conn.bytes_written += tx.sent
            if error is None and tx.slot is not None:
                conn.shm_sent += 1
            kick = not gone and error is None and self._dispatch([conn])
            self._lock.notify_all()
        if gone:  # dropped while we were sending: it is ours to release
            self._release(conn)
        elif error is not None:
            self._drop(conn, f"send failed ({error})")
        return kick

    def _send_background(self, conn):
        """Send copies to ``conn`` while its socket takes them (I/O thread)."""
        while True:
            with self._lock:
                self._kick.discard(conn)
                tx = conn.tx  # a writer's detached send, or ours in progress
                entry = slot = None
                if tx is None and not conn.gone:
                    entry = self._policy.next_send(conn, background=True)
                    if entry is not None:
                        slot = self._slot_for(conn, entry.payload)
            if tx is None:
                if entry is None:
                    self._background.discard(conn)
                    if not conn.gone:
                        self._interest(conn, write=False)
                    return
                tx, error = self._start_tx(conn, entry, slot)
                if error is not None:
                    self._finish(conn, tx, error)
                    return
                with self._lock:
                    conn.tx = tx
            error = ConnectionError("input dropped") if conn.gone else _push(conn.sock, tx)
            if error is None and tx.views:
                self._background.add(conn)
                self._interest(conn, write=True)
                return
            self._finish(conn, tx, error)
            if error is not None:
                self._forget(conn)
                return

    def _send_inline(self, conn, entry, slot, may_wait, deadline):
        """A writer sends ``entry`` itself.  Without ``may_wait`` it takes what the socket
        takes at once; otherwise it waits for the socket until ``deadline`` (None: until
        the input stalls).  What is left then goes on in the background."""
        tx, error = self._start_tx(conn, entry, slot)
        sock = conn.sock
        while error is None:
            error = _push(sock, tx)
            if error is not None or not tx.views:
                break
            if not may_wait:
                return self._to_background(conn, tx)
            now = time.monotonic()
            limit = tx.progress_at + self.send_timeout
            if now >= limit:
                error = TimeoutError(f"nothing read for {self.send_timeout} s")
                break
            if deadline is not None:
                if now >= deadline:
                    return self._to_background(conn, tx)
                limit = min(limit, deadline)
            self._wait_writable(conn, limit - now)
        if self._finish(conn, tx, error):
            self._wake()

    @staticmethod
    def _wait_writable(conn, seconds):
        poller = conn.poller
        try:
            if poller is None:
                poller = select.poll()
                poller.register(conn.sock, select.POLLOUT)
                conn.poller = poller
            poller.poll(max(1, int(seconds * 1000) + 1))
        except (OSError, ValueError):  # closed under us: the next send says so
            pass

    def _to_background(self, conn, tx):
        """The writer leaves the rest of ``tx`` to the I/O thread (from the message's
        copy unless its buffers are the channel's own)."""
        with self._lock:
            new = None if conn.gone else self._policy.detach(conn, tx.entry, copy=not tx.owned)
            if new is not None:
                if not tx.owned:
                    tx.views = _views(new.payload, tx.sent)
                    tx.owned = True
                tx.entry = new
                conn.tx = tx
                self._kick.add(conn)
                self._lock.notify_all()
        if new is None:  # dropped meanwhile
            self._finish(conn, tx, ConnectionError("input dropped"))
        else:
            self._wake()

    def _claim(self, d, expired):
        """What the writer of ``d`` sends next (``_lock`` held): ``(conn, entry, slot,
        may_wait)`` or None, and whether the I/O thread has new work.  Messages for inputs
        it need not wait for, which it cannot send now, are detached (their copy goes on
        in the background)."""
        policy = self._policy
        keys = [k for k in d.owed if k is not SHARED]
        if len(keys) > 1:
            keys.sort(key=policy.waits)  # the inputs it need not wait for first
        kick = False
        for conn in keys:
            may_wait = not expired and policy.waits(conn)
            entry = policy.next_send(conn, owned_only=True)
            if entry is not None:
                return (conn, entry, self._slot_for(conn, entry.payload), may_wait), kick
            if not may_wait and policy.detach(conn, d.entry, queued_only=True) is not None:
                kick = self._dispatch([conn]) or kick
        return None, kick

    def _deliver(self, d, deadline):
        """Send, and wait for, what the writer of ``d`` owes its inputs."""
        expired = False
        while True:
            job = None
            kick = False
            with self._lock:
                while d.owed:
                    if self.closed:
                        raise ChannelClosed(f"{self.channel_id} closed while waiting for an input")
                    if not expired and deadline is not None and time.monotonic() >= deadline:
                        self._policy.expire(d)  # what stays owed is handed out already
                        expired = True
                    job, kick = self._claim(d, expired)
                    if job is not None or kick or not d.owed:
                        break
                    left = 1.0 if expired or deadline is None else deadline - time.monotonic()
                    self._lock.wait(max(0.0, left))
            if kick:
                self._wake()
            if job is None:
                if not d.owed:
                    return
                continue
            conn, entry, slot, may_wait = job
            self._send_inline(conn, entry, slot, may_wait, None if expired else deadline)

    # ------------------------------------------------------------ writing

    def write(self, data, meta=None):
        """Add one item (a Hash or dict, plus metadata) to the current message."""
        self._require_started("write()")
        if not isinstance(data, Hash):
            data = Hash(data)
        if self.schema is not None and (self.validate_schema == "always" or not self._validated):
            problems = self.schema.validate(data, strict=True)  # Karabo's rules: strict
            if problems:
                raise SchemaError(f"{self.channel_id}: data does not match the schema: " + "; ".join(problems))
            self._validated = True
        try:
            meta = wire.ChannelMetaData.coerce(meta, self.channel_id)
        except KbStreamError:
            raise
        except (TypeError, ValueError) as e:
            raise EncodeError(f"{self.channel_id}: unusable item metadata: {e}") from e
        with self._chunk_lock:
            self._chunk.append((data, meta))

    def update(self, timeout=None):
        """Send the items written since the last update as one message.

        Blocks for ``wait`` inputs until they grant credit and have read the message.
        With ``timeout`` (seconds), an input that gives no credit in time is skipped (the
        message counts as dropped for it; every other input still gets it) and
        ChannelTimeout is raised at the end; a message a ``wait`` input is still reading
        then goes on in the background.  Other inputs never hold ``update()``: what
        their sockets do not take at once is copied and sent in the background.  Data
        sent while no input is connected is discarded, as in Karabo.  An item kbhash
        cannot encode raises :class:`kbstream.EncodeError` (the message is not sent).
        """
        self._require_started("update()")
        with self._chunk_lock:
            items, self._chunk = self._chunk, []
        if not items:
            return
        try:
            msg = wire.data_message(items)
        except kbhash.EncodeError as e:
            raise EncodeError(f"{self.channel_id}: an item cannot be encoded: {e}") from e
        self._distribute(msg, False, msg.body_size + len(msg[0]), timeout)

    def signal_end_of_stream(self, timeout=None):
        """Send pending items, then the end of stream to every input (never dropped)."""
        late = None
        try:
            self.update(timeout=timeout)
        except ChannelTimeout as e:
            late = e
        self._validated = False
        frame = wire.eos_message()
        self._distribute([frame], True, len(frame), timeout)
        if late is not None:
            raise late

    def _distribute(self, msg, eos, nbytes, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self.closed:
                raise ChannelClosed(f"{self.channel_id} is closed")
            d = self._policy.offer(msg, eos, nbytes)
            kick = self._dispatch(d.serve)
        if kick:
            self._wake()
        if d.error is not None:
            log.error("%s: shared input selector failed", self.channel_id, exc_info=d.error)
        if d.owed:
            self._deliver(d, deadline)
        if d.late:
            raise ChannelTimeout(f"{self.channel_id}: {', '.join(d.late)} gave no credit in time",
                                 self.channel_id, timeout)

    # ------------------------------------------------------------ life cycle

    def _start(self):
        with self._lock:
            self._io_running = True
        self._io.start()

    def _close(self):
        """Stop listening and drop every connection (waiting writers get ChannelClosed);
        the I/O thread closes the sockets and ends."""
        with self._lock:
            conns = list(self._conns)
            started = self._io_running
            self._lock.notify_all()
        for conn in conns:
            self._drop(conn, "channel closed")
        if not started:
            self._io_exit()
            return
        self._wake()
        if self._io is not threading.current_thread():
            self._io.join(_JOIN_TIMEOUT)
        self._sweep()  # a writer may have left a send to the thread as it ended

    def _sweep(self):
        """End the background sends the I/O thread left (when it ends): their connections
        are dropped, so this releases them and closes their sockets."""
        with self._lock:
            conns = self._kick | self._background
            self._kick = set()
        for conn in conns:
            tx = conn.tx
            if tx is not None:
                self._finish(conn, tx, ConnectionError("channel closed"))

    def _io_exit(self):
        """Close what the I/O thread watched (its last act, or close() before start())."""
        with self._lock:
            self._io_running = False
            closing, self._closing = self._closing, []
            admitting, self._admitting = self._admitting, []
            conns = list(self._conns)
            self._lock.notify_all()
        for _, _, ring in admitting:
            if ring is not None and not isinstance(ring, Exception):
                ring.close()
        for conn in conns:  # only when the thread failed: close() dropped them already
            self._drop(conn, "channel closed")
        self._sweep()
        for conn in closing:
            _close_socket(conn.sock)
        for sock in (self._server, self._wake_r, self._wake_w):
            _close_socket(sock)
        try:
            self._sel.close()
        except (OSError, ValueError):
            pass

    def __repr__(self):
        return f"<OutputChannel {self.channel_id} on {self.hostname}:{self.port}, inputs {self.input_ids()}>"
