"""Karabo pipeline OutputChannel: a TCP server that sends items to connected inputs.

Who gets which message is decided by :class:`~kbstream.pipeline.policy.DeliveryPolicy`
(its docstring describes every option); this module owns the sockets, the threads and
the sending.

Threads: one accepts connections (started by :meth:`OutputChannel.start`); one per
connection reads the input's control frames (hello, update, and kbstream's own
kbRelease) and sends what the input's credit releases.  ``write``/``update``
run in the caller's thread; ``update`` sends the message itself (``socket.sendmsg``
straight from the arrays' memory) and returns once it is sent, dropped or queued for
every input, so the arrays passed to ``write`` may be reused then; messages *queued* for a
slow input are copied first (as Karabo's ``safeNDArray``).

Thread safety: ``write``, ``update`` and ``signal_end_of_stream`` may be called from
several threads; a message is the set of items written since the previous ``update`` by
any thread.  Each input has one sender at a time and gets its messages in the order of
their sequence numbers, so nothing is reordered and an end of stream never overtakes the
data before it nor is overtaken by the data after it.

An input that has credit but does not read for ``send_timeout`` seconds is disconnected,
so a stalled peer cannot hold ``update()`` for ever.
"""

import ipaddress
import logging
import socket
import struct
import threading
import time

import kbhash
from kbhash import Hash, HashType

from .._lifecycle import Lifecycle
from ..errors import BindError, EncodeError, KbStreamError, StateError
from . import shm, wire
from ._io import close as _close, recv_exact as _recv_exact, sendmsg_all as _sendmsg_all
from .errors import ChannelClosed, ChannelTimeout, PipelineConfigError, PipelineProtocolError, SchemaError
from .policy import MODES, DeliveryPolicy

__all__ = ["OutputChannel"]

log = logging.getLogger("kbstream.pipeline")

#: Seconds close() waits for the channel's threads, all together.
_JOIN_TIMEOUT = 5.0


class _Connection:
    """One accepted TCP connection; an input once its hello arrived.

    Its delivery state lives in the policy (keyed by this object); here are the socket,
    the shared-memory slots and ``gone`` (set once, by the first ``_drop``).
    """

    __slots__ = ("sock", "addr", "id", "ring", "shm_sent", "gone")

    def __init__(self, sock, addr):
        self.sock = sock
        self.addr = addr
        self.id = None
        self.ring = None  # shared-memory slots when the input runs on this machine
        self.shm_sent = 0
        self.gone = False


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _hello_int(h, key, default):
    try:
        return int(h.get(key, default))
    except (TypeError, ValueError):
        raise PipelineProtocolError(f"hello has a non-integer {key!r}") from None


def _materialize(msg):
    """A copy of a message that may outlive ``update()`` (the caller may reuse its arrays);
    a data message stays one, so a same-host input still gets it in shared memory."""
    if isinstance(msg, wire.Message):
        return msg.copied()
    return [bytes(memoryview(b).cast("B")) for b in msg]


class OutputChannel(Lifecycle):
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
    schema : DataSchema, optional
        Declared content of the items; ``write`` validates against it
        (``validateSchema="always"``, or ``"once"`` per stream).
    use_shm : bool
        Offer kbstream inputs on the same machine the shared-memory data path
        (:mod:`kbstream.pipeline.shm`); Karabo inputs always get TCP.
    send_timeout : float
        Seconds an input with credit may take to read a message before it is
        disconnected as stalled.
    """

    def __init__(self, channel_id, *, hostname="default", port=0, noInputShared="drop",
                 distributionMode="load-balanced", shared_selector=None, sharedQueueLength=10,
                 schema=None, validateSchema="always", use_shm=True, send_timeout=30.0):
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
            self.send_timeout = float(send_timeout)
            port = int(port)
        except (TypeError, ValueError) as e:
            raise PipelineConfigError(f"{channel_id}: a numeric option is not a number ({e})") from None
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
        self.port = self._server.getsockname()[1]
        # Locks.  Each is a leaf: none is ever taken while another one is held (should two
        # ever be needed together, take them in this order):
        #   1. Lifecycle._lc_lock  the started/closed flags; held only inside the
        #                          bookkeeping of start() and close().
        #   2. _lock (Condition)   the delivery policy (every queue, credit and counter),
        #                          _inputs, _conns, _threads, and each connection's ring,
        #                          shm_sent and gone.  Held for decisions only: never across
        #                          a send, a receive, a join or a log call; what it does
        #                          cover besides bookkeeping is the copy of a message queued
        #                          for a slow input, taking (or making) a shared-memory slot
        #                          and the shared_selector callback.  Writers waiting for
        #                          credit wait on it; every change of the policy notifies.
        #   3. _chunk_lock         _chunk (the items written since the last update).
        # Sending to one input is serialised by the policy (one sender at a time, from
        # next_send to end_send), not by a lock: nobody ever waits behind a send in flight.
        self._lock = threading.Condition()
        self._policy = DeliveryPolicy(noInputShared, distributionMode, shared_selector,
                                      self.shared_queue_length, copy=_materialize)
        self._inputs = {}  # id -> _Connection, once its hello arrived
        self._conns = set()  # every open _Connection
        self._threads = []
        self._chunk = []
        self._chunk_lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept_loop, name=f"{channel_id}-accept", daemon=True)

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
        onSlowness) and of the shared pool (key ``"__shared__"``: dropped, queued)."""
        with self._lock:
            out = self._policy.counters()
            for iid, conn in self._inputs.items():
                out[iid]["shm"] = conn.shm_sent
        return out

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

    # ------------------------------------------------------------ connections

    def _accept_loop(self):
        timeval = struct.pack("ll", int(self.send_timeout), int((self.send_timeout % 1) * 1e6))
        while True:
            try:
                sock, addr = self._server.accept()
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            # sends give up after send_timeout (the socket stays blocking for reads)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            conn = _Connection(sock, addr)
            t = threading.Thread(target=self._read_loop, args=(conn,), name=f"{self.channel_id}-in-{addr[1]}",
                                 daemon=True)
            with self._lock:
                if self.closed:  # close() has taken its list of connections already
                    _close(sock)
                    break
                self._conns.add(conn)
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)
            t.start()

    def _read_loop(self, conn):
        reason = "closed"
        try:
            while not self.closed:
                n = wire.U32.unpack(_recv_exact(conn.sock, 4))[0]
                if n > wire.MAX_CONTROL_SIZE:
                    raise PipelineProtocolError(f"control frame of {n} bytes")
                kind, h = wire.parse_control(_recv_exact(conn.sock, n))
                if kind == "hello":
                    self._on_hello(conn, h)
                elif conn.id is None:
                    raise PipelineProtocolError(f"{kind!r} before hello")
                elif kind == "update":
                    with self._lock:
                        serve = self._policy.credit(conn)
                        self._lock.notify_all()
                    self._serve(serve)
                elif kind == "kbRelease":
                    with self._lock:
                        if conn.ring is not None:
                            conn.ring.release(_hello_int(h, "slot", -1))
                else:
                    log.debug("%s: ignoring control frame %r", self.channel_id, kind)
        except PipelineProtocolError as e:
            reason = f"protocol error: {e}"
            log.warning("%s: closing connection from %s: %s", self.channel_id, conn.addr, e)
        except (ConnectionError, OSError) as e:
            reason = f"connection lost ({e})"
        except Exception as e:  # never let a peer kill the thread silently
            reason = f"internal error: {e!r}"
            log.exception("%s: closing connection from %s", self.channel_id, conn.addr)
        finally:
            self._drop(conn, reason)
            with self._lock:
                self._conns.discard(conn)

    def _on_hello(self, conn, h):
        iid = h.get("instanceId")
        if not isinstance(iid, str) or not iid:
            raise PipelineProtocolError("hello without instanceId")
        dist = h.get("dataDistribution", "copy")
        slow = h.get("onSlowness", "drop")
        if dist not in wire.DISTRIBUTION:
            raise PipelineProtocolError(f"unknown dataDistribution {dist!r}")
        if slow not in wire.ON_SLOWNESS:
            raise PipelineProtocolError(f"unknown onSlowness {slow!r}")
        mem = h.get("memoryLocation", "remote")
        if mem != "remote":
            raise PipelineProtocolError(f"memoryLocation {mem!r}: only 'remote' is served")
        max_queue = max(1, _hello_int(h, "maxQueueLength", 2))
        window = max(1, min(_hello_int(h, "kbCreditWindow", 1), 64))
        offer = h.get("kbShmFd")
        ring = self._shm_ring(conn, offer, window) if self.use_shm and offer is not None else None
        with self._lock:
            if conn.id is not None:
                if ring is not None:
                    ring.close()
                raise PipelineProtocolError("second hello on one connection")
            if conn.gone:  # the channel closed meanwhile
                if ring is not None:
                    ring.close()
                return
            old = self._inputs.get(iid)
            release_old = old is not None and self._unregister(old)
            conn.id = iid
            conn.ring = ring
            serve = self._policy.connect(conn, iid, shared=dist == "shared", on_slowness=slow,
                                         max_queue=max_queue, window=window)
            self._inputs[iid] = conn
            self._lock.notify_all()
        if old is not None:
            log.info("%s: %s connected again, closing its old connection", self.channel_id, iid)
            _close(old.sock)
            if release_old:
                self._release(old)
        log.debug("%s: %s connected (%s, %s, window %d)", self.channel_id, iid, dist, slow, window)
        self._serve(serve)

    def _shm_ring(self, conn, offer, window):
        """Shared-memory slots for an input that offered them, or None (it gets TCP)."""
        peer = shm.connect_input(conn.sock, offer, self.send_timeout)
        if peer is None:
            log.debug("%s: %s gets TCP (shared memory offered but not usable)", self.channel_id, conn.addr)
            return None
        return shm.SlotRing(peer, self._shm_budget, max_slots=window + 8)

    def _unregister(self, conn):
        """Take ``conn`` out of the policy and the registry (``_lock`` held).

        True when the caller must release its slots now; False if it was gone already or a
        send to it is in flight (its sender releases them, see ``_serve``).
        """
        if conn.gone:
            return False
        conn.gone = True
        if conn.id is not None and self._inputs.get(conn.id) is conn:
            del self._inputs[conn.id]
        sending = self._policy.disconnect(conn)
        self._lock.notify_all()
        return not sending

    def _drop(self, conn, reason):
        with self._lock:
            registered = not conn.gone and conn.id is not None and self._inputs.get(conn.id) is conn
            release = self._unregister(conn)
        if registered:
            log.info("%s: input %s gone: %s", self.channel_id, conn.id, reason)
        _close(conn.sock)
        if release:
            self._release(conn)

    def _release(self, conn):
        with self._lock:
            ring, conn.ring = conn.ring, None
        if ring is not None:
            ring.close()

    # ------------------------------------------------------------ sending

    def _serve(self, conns):
        """Send what the policy hands out for each of ``conns`` (in its order), until it
        says nothing is left or another thread is that input's sender."""
        for conn in conns:
            while True:
                with self._lock:
                    entry = self._policy.next_send(conn)
                    if entry is None:
                        break
                    slot = self._slot_for(conn, entry.payload)
                error = "interrupted"
                try:
                    error = self._transmit(conn, entry.payload, slot)
                finally:
                    with self._lock:
                        gone = self._policy.end_send(conn, entry, ok=error is None)
                        if error is None and slot is not None:
                            conn.shm_sent += 1
                        self._lock.notify_all()
                if gone:  # dropped while we were sending: its slots are ours to release
                    self._release(conn)
                    break
                if error is not None:
                    self._drop(conn, f"send failed ({error})")
                    break

    def _slot_for(self, conn, msg):
        """A shared-memory slot for ``msg`` (``_lock`` held), or None to send over TCP."""
        ring = conn.ring
        if ring is None or not isinstance(msg, wire.Message) or msg.body_size < shm.MIN_SHM_MESSAGE:
            return None
        return ring.acquire(msg.body_size)

    @staticmethod
    def _transmit(conn, msg, slot):
        """Send one message; None, or the error that ended the connection."""
        try:
            if slot is not None:
                # conn.ring is released only when no send to conn is in flight
                msg = conn.ring.place(slot, msg)
            _sendmsg_all(conn.sock, msg)
        except (OSError, ValueError) as e:
            # OSError: the peer left or stalled past send_timeout; ValueError: the
            # connection (and its slots) was closed under us
            return e
        return None

    # ------------------------------------------------------------ writing

    def write(self, data, meta=None):
        """Add one item (a Hash or dict, plus metadata) to the current message."""
        self._require_started("write()")
        if not isinstance(data, Hash):
            data = Hash(data)
        if self.schema is not None and (self.validate_schema == "always" or not self._validated):
            problems = self.schema.validate(data)
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

        Blocks for ``wait`` inputs until they grant credit.  With ``timeout``
        (seconds), an input that gives no credit in time is skipped (the
        message counts as dropped for it; every other input still gets it) and
        ChannelTimeout is raised at the end.  Data sent while no input is
        connected is discarded, as in Karabo.  An item kbhash cannot encode
        raises :class:`kbstream.EncodeError` (the message is not sent).
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
        if d.error is not None:
            log.error("%s: shared input selector failed", self.channel_id, exc_info=d.error)
        self._serve(d.serve)
        if d.owed:
            with self._lock:
                while d.owed:
                    if self.closed:
                        raise ChannelClosed(f"{self.channel_id} closed while waiting for an input")
                    left = 1.0
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            self._policy.expire(d)  # what remains owed is a send in flight
                            deadline = None
                            continue
                    self._lock.wait(left)
        if d.late:
            raise ChannelTimeout(f"{self.channel_id}: {', '.join(d.late)} gave no credit in time",
                                 self.channel_id, timeout)

    # ------------------------------------------------------------ life cycle

    def _start(self):
        self._accepter.start()

    def _close(self):
        """Stop listening and close every connection (waiting writers get ChannelClosed)."""
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
            self._lock.notify_all()
        _close(self._server)
        for conn in conns:
            self._drop(conn, "channel closed")
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for t in [self._accepter] + threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def __repr__(self):
        return f"<OutputChannel {self.channel_id} on {self.hostname}:{self.port}, inputs {self.input_ids()}>"
