"""Karabo pipeline OutputChannel: a TCP server that sends items to connected inputs.

Threads: one accepts connections; one per connection reads the input's
control frames (hello, update, and kbstream's own kbRelease/kbShmMapped) and
serves queued messages when credit arrives.  ``write``/``update`` run in the
caller's thread; ``update`` sends the message itself (``socket.sendmsg``
straight from the arrays' memory), so when it returns the arrays passed to
``write`` may be reused, except that messages *queued* for a slow input are
copied first (as Karabo's ``safeNDArray``).

Thread safety: ``write``, ``update`` and ``signal_end_of_stream`` may be
called from several threads; a message is the set of items written since the
previous ``update`` by any thread.  Every message gets a sequence number;
queued messages of an input (its own queue and, for shared inputs, the
shared queue) are always sent in that order, and each input has one sender
at a time, so nothing is reordered and an end of stream never overtakes the
data before it nor is overtaken by the data after it.

Policies (per input, from its hello):

- copy / ``drop``: no credit at ``update()`` -> the message is not sent to it;
- copy / ``queueDrop``: queued, at most ``maxQueueLength`` messages; when full
  the **oldest** queued message is dropped (Karabo's documented behaviour; the
  C++ output drops the new one instead);
- copy / ``wait``: ``update()`` blocks until the input grants credit;
- shared: one input of the shared pool gets each message: the first ready one
  (``distributionMode="load-balanced"``, Karabo's default), the next one in
  turn (``"round-robin"``), or the one a ``shared_selector(ids)`` callback
  names; ``noInputShared`` (drop/queueDrop/wait) applies when it is not ready.

End of stream is never dropped: inputs without credit get it queued (never
evicted), ``wait`` inputs are waited for.  An input that has credit but does
not read for ``send_timeout`` seconds is disconnected, so a stalled peer
cannot hold ``update()`` for ever.
"""

import collections
import ipaddress
import itertools
import logging
import socket
import struct
import threading
import time

from kbhash import Hash, HashType

from . import shm, wire
from ._io import close as _close, recv_exact as _recv_exact, sendmsg_all as _sendmsg_all
from .errors import ChannelClosed, ChannelTimeout, PipelineProtocolError, SchemaError

__all__ = ["OutputChannel"]

log = logging.getLogger("kbstream.pipeline")

_POLICIES = ("drop", "queueDrop", "wait")
_MODES = ("load-balanced", "round-robin")


class _Entry:
    """A queued message: its sequence number, buffers, and for a shared end of
    stream the ids of the shared inputs that still have to get it."""

    __slots__ = ("seq", "msg", "eos", "pending")

    def __init__(self, seq, msg, eos, pending=None):
        self.seq = seq
        self.msg = msg
        self.eos = eos
        self.pending = pending


class _Input:
    """State of one connected input (guarded by the channel's condition)."""

    __slots__ = (
        "id", "sock", "addr", "shared", "on_slowness", "max_queue", "window", "credits",
        "queue", "sent", "dropped", "alive", "send_lock", "ring", "shm_sent",
    )

    def __init__(self, sock, addr):
        self.sock = sock
        self.addr = addr
        self.id = None
        self.shared = False
        self.on_slowness = "drop"
        self.max_queue = 2
        self.window = 1
        self.credits = 0
        self.queue = collections.deque()  # _Entry, in sequence order
        self.sent = 0
        self.dropped = 0
        self.alive = True
        # one sender at a time; reentrant because a failed send drops the input
        self.send_lock = threading.RLock()
        self.ring = None  # shared-memory slots when the input runs on this machine
        self.shm_sent = 0


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


class OutputChannel:
    """Karabo pipeline output channel.

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
        ready (see module docstring).
    distributionMode : {"load-balanced", "round-robin"}
        How the shared pool is served (Karabo 2.x names); round-robin goes
        through the shared inputs in the order of their ids.
    shared_selector : callable, optional
        ``f(list_of_shared_input_ids) -> id``; "" or an unknown id drops.
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
        if noInputShared not in _POLICIES:
            raise ValueError(f"noInputShared must be one of {_POLICIES}, not {noInputShared!r}")
        if distributionMode not in _MODES:
            raise ValueError(f"distributionMode must be one of {_MODES}, not {distributionMode!r}")
        if validateSchema not in ("always", "once"):
            raise ValueError("validateSchema must be 'always' or 'once'")
        self.channel_id = channel_id
        self.no_input_shared = noInputShared
        self.distribution_mode = distributionMode
        self.shared_selector = shared_selector
        self.shared_queue_length = int(sharedQueueLength)
        self.schema = schema
        self.validate_schema = validateSchema
        self.use_shm = use_shm
        self.send_timeout = float(send_timeout)
        self._validated = False
        self.hostname = socket.gethostname() if hostname == "default" else hostname
        bind = self.hostname if _is_ip(self.hostname) else "0.0.0.0"
        self._server = socket.create_server((bind, int(port)), reuse_port=False)
        self.port = self._server.getsockname()[1]
        self._cond = threading.Condition()
        self._inputs = {}  # id -> _Input (registered by hello)
        self._ready_shared = collections.deque()  # ids of shared inputs with credit, in order
        self._shared_queue = collections.deque()  # _Entry: data for any shared input, EOS markers
        self._seq = itertools.count()
        self._rr = 0
        self._chunk = []
        self._chunk_lock = threading.Lock()
        self._closed = False
        self._threads = []
        self.shared_dropped = 0
        self._accepter = threading.Thread(target=self._accept_loop, name=f"{channel_id}-accept", daemon=True)
        self._accepter.start()

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
        with self._cond:
            return [i.id for i in self._inputs.values() if shared is None or i.shared == shared]

    def stats(self):
        """Counters per input: sent, dropped, queued, shm; plus the shared pool's."""
        with self._cond:
            out = {
                i.id: {"sent": i.sent, "dropped": i.dropped, "queued": len(i.queue),
                       "shared": i.shared, "onSlowness": i.on_slowness, "shm": i.shm_sent}
                for i in self._inputs.values()
            }
            out["__shared__"] = {"dropped": self.shared_dropped,
                                 "queued": sum(1 for e in self._shared_queue if not e.eos)}
        return out

    def wait_for_inputs(self, copy=(), shared=(), timeout=10.0):
        """Block until inputs with these ids have sent their hello."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                have = {i.id: i.shared for i in self._inputs.values()}
                if all(have.get(x) is False for x in copy) and all(have.get(x) is True for x in shared):
                    return
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise ChannelTimeout(f"{self.channel_id}: inputs {list(copy) + list(shared)} did not connect "
                                         f"within {timeout} s (connected: {sorted(have)})", timeout=timeout)
                self._cond.wait(left)

    # ------------------------------------------------------------ connections

    def _accept_loop(self):
        timeval = struct.pack("ll", int(self.send_timeout), int((self.send_timeout % 1) * 1e6))
        while not self._closed:
            try:
                sock, addr = self._server.accept()
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            # sends give up after send_timeout (the socket stays blocking for reads)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            peer = _Input(sock, addr)
            t = threading.Thread(target=self._read_loop, args=(peer,), name=f"{self.channel_id}-in-{addr[1]}",
                                 daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
            t.start()

    def _read_loop(self, peer):
        reason = "closed"
        try:
            while not self._closed:
                n = wire.U32.unpack(_recv_exact(peer.sock, 4))[0]
                if n > wire.MAX_CONTROL_SIZE:
                    raise PipelineProtocolError(f"control frame of {n} bytes")
                kind, h = wire.parse_control(_recv_exact(peer.sock, n))
                if kind == "hello":
                    self._on_hello(peer, h)
                elif peer.id is None:
                    raise PipelineProtocolError(f"{kind!r} before hello")
                elif kind == "update":
                    self._on_update(peer)
                elif kind == "kbRelease":
                    with self._cond:
                        if peer.ring is not None:
                            peer.ring.release(_hello_int(h, "slot", -1))
                elif kind == "kbShmMapped":
                    with self._cond:
                        if peer.ring is not None:
                            peer.ring.mapped(str(h.get("name", "")))
                else:
                    log.debug("%s: ignoring control frame %r", self.channel_id, kind)
        except (ConnectionError, OSError) as e:
            reason = f"connection lost ({e})"
        except PipelineProtocolError as e:
            reason = f"protocol error: {e}"
            log.warning("%s: closing connection from %s: %s", self.channel_id, peer.addr, e)
        except Exception as e:  # never let a peer kill the thread silently
            reason = f"internal error: {e!r}"
            log.exception("%s: closing connection from %s", self.channel_id, peer.addr)
        finally:
            self._drop_input(peer, reason)

    def _on_hello(self, peer, h):
        iid = h.get("instanceId")
        if not isinstance(iid, str) or not iid:
            raise PipelineProtocolError("hello without instanceId")
        dist = h.get("dataDistribution", "copy")
        slow = h.get("onSlowness", "drop")
        if dist not in wire.DISTRIBUTION:
            raise PipelineProtocolError(f"unknown dataDistribution {dist!r}")
        if slow not in _POLICIES:
            raise PipelineProtocolError(f"unknown onSlowness {slow!r}")
        mem = h.get("memoryLocation", "remote")
        if mem != "remote":
            raise PipelineProtocolError(f"memoryLocation {mem!r}: only 'remote' is served")
        max_queue = max(1, _hello_int(h, "maxQueueLength", 2))
        window = max(1, min(_hello_int(h, "kbCreditWindow", 1), 64))
        token = h.get("kbShm")
        old = None
        with self._cond:
            if peer.id is not None:
                raise PipelineProtocolError("second hello on one connection")
            old = self._inputs.get(iid)
            peer.id = iid
            peer.shared = dist == "shared"
            peer.on_slowness = slow
            peer.max_queue = max_queue
            peer.window = window
            if self.use_shm and token and token == shm.host_token():
                peer.ring = shm.SlotRing(max_slots=peer.window + 8)
            self._inputs[iid] = peer
            # the hello is the first credit (Karabo); a kbstream input may ask for more
            peer.credits = peer.window
            if peer.shared and iid not in self._ready_shared:
                self._ready_shared.append(iid)
            self._cond.notify_all()
        if old is not None and old is not peer:
            log.info("%s: %s connected again, closing its old connection", self.channel_id, iid)
            old.alive = False
            _close(old.sock)
        log.debug("%s: %s connected (%s, %s, window %d)", self.channel_id, iid, dist, slow, peer.window)
        self._serve_queue(peer)

    def _on_update(self, peer):
        with self._cond:
            peer.credits = min(peer.credits + 1, peer.window)
            if peer.shared and peer.id not in self._ready_shared:
                self._ready_shared.append(peer.id)
            self._cond.notify_all()
        self._serve_queue(peer)

    def _next_entry(self, peer):
        """Take the next queued message for ``peer`` (lowest sequence number), or None."""
        own = peer.queue[0] if peer.queue else None
        sh = None
        if peer.shared:
            for e in self._shared_queue:
                if not e.eos or peer.id in e.pending:
                    sh = e
                    break
        if own is not None and (sh is None or own.seq < sh.seq):
            return peer.queue.popleft()
        if sh is None:
            return None
        if sh.eos:
            sh.pending.discard(peer.id)
            if not sh.pending:
                self._shared_queue.remove(sh)
        else:
            self._shared_queue.remove(sh)
        self._cond.notify_all()
        return sh

    def _has_queued(self, peer):
        if peer.queue:
            return True
        return peer.shared and any(not e.eos or peer.id in e.pending for e in self._shared_queue)

    def _serve_queue(self, peer):
        """Send queued messages for ``peer`` while it has credit (one sender at a time)."""
        with self._cond:   # nothing to do: never wait behind a send in flight to find out
            if not (peer.alive and peer.credits > 0 and self._has_queued(peer)):
                return
        with peer.send_lock:
            while True:
                with self._cond:
                    if not peer.alive or peer.credits <= 0:
                        return
                    entry = self._next_entry(peer)
                    if entry is None:
                        return
                    self._take_credit(peer)
                if not self._transmit(peer, entry.msg):
                    return

    def _take_credit(self, peer):
        peer.credits -= 1
        if peer.shared and peer.credits <= 0:
            try:
                self._ready_shared.remove(peer.id)
            except ValueError:
                pass

    def _drop_input(self, peer, reason):
        with self._cond:
            peer.alive = False
            if peer.id is not None and self._inputs.get(peer.id) is peer:
                del self._inputs[peer.id]
                try:
                    self._ready_shared.remove(peer.id)
                except ValueError:
                    pass
                for e in list(self._shared_queue):
                    if e.eos:
                        e.pending.discard(peer.id)
                        if not e.pending:
                            self._shared_queue.remove(e)
                if not any(i.shared for i in self._inputs.values()):
                    self._shared_queue.clear()
                log.info("%s: input %s gone: %s", self.channel_id, peer.id, reason)
            peer.queue.clear()
            self._cond.notify_all()
        _close(peer.sock)
        with peer.send_lock:
            ring, peer.ring = peer.ring, None
            if ring is not None:
                ring.close()

    def _transmit(self, peer, msg):
        """Send one message to ``peer`` (caller holds ``peer.send_lock``); False if the input is gone."""
        try:
            slot = None
            ring = peer.ring
            if ring is not None and isinstance(msg, wire.Message) and msg.body_size >= shm.MIN_SHM_MESSAGE:
                with self._cond:
                    slot = ring.acquire(msg.body_size)
                if slot is not None:
                    index, seg = slot
                    shm.fill(seg, msg.body)  # the one copy of this message
                    msg = msg.via_shm(seg.name, index)
            _sendmsg_all(peer.sock, msg)
        except (OSError, ValueError) as e:
            # OSError: the peer left or stalled past send_timeout; ValueError: the
            # connection (and its slots) was closed under us
            self._drop_input(peer, f"send failed ({e})")
            return False
        with self._cond:
            peer.sent += 1
            if slot is not None:
                peer.shm_sent += 1
        return True

    # ------------------------------------------------------------ writing

    def write(self, data, meta=None):
        """Add one item (a Hash or dict, plus metadata) to the current message."""
        if self._closed:
            raise ChannelClosed(f"{self.channel_id} is closed")
        if not isinstance(data, Hash):
            data = Hash(data)
        if self.schema is not None and (self.validate_schema == "always" or not self._validated):
            problems = self.schema.validate(data)
            if problems:
                raise SchemaError(f"{self.channel_id}: data does not match the schema: " + "; ".join(problems))
            self._validated = True
        meta = wire.ChannelMetaData.coerce(meta, self.channel_id)
        with self._chunk_lock:
            self._chunk.append((data, meta))

    def update(self, timeout=None):
        """Send the items written since the last update as one message.

        Blocks for ``wait`` inputs until they grant credit.  With ``timeout``
        (seconds), an input that gives no credit in time is skipped (the
        message counts as dropped for it; every other input still gets it) and
        ChannelTimeout is raised at the end.  Data sent while no input is
        connected is discarded, as in Karabo.
        """
        with self._chunk_lock:
            items, self._chunk = self._chunk, []
        if not items:
            return
        self._distribute(wire.data_message(items), eos=False, timeout=timeout)

    def signal_end_of_stream(self, timeout=None):
        """Send pending items, then the end of stream to every input (never dropped)."""
        late = None
        try:
            self.update(timeout=timeout)
        except ChannelTimeout as e:
            late = e
        self._validated = False
        self._distribute([wire.eos_message()], eos=True, timeout=timeout)
        if late is not None:
            raise late

    def _materialize(self, msg):
        # a queued message outlives update(): copy it so the caller may reuse the arrays;
        # a data message stays one, so a same-host input still gets it in shared memory
        if isinstance(msg, wire.Message):
            return msg.copied()
        return [bytes(memoryview(b).cast("B")) for b in msg]

    def _distribute(self, msg, eos, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        late = []
        copied = None
        with self._cond:
            if self._closed:
                raise ChannelClosed(f"{self.channel_id} is closed")
            seq = next(self._seq)
            copies = [i for i in self._inputs.values() if not i.shared]
            shared = [i for i in self._inputs.values() if i.shared]
        # copy inputs: every one of them gets the message
        for peer in copies:
            send = False
            with self._cond:
                if not peer.alive:
                    continue
                if peer.on_slowness == "wait":
                    ok = self._wait(lambda: peer.credits > 0 and not peer.queue, peer, deadline)
                    if ok is None:  # timed out
                        late.append(peer.id)
                    if ok:
                        self._take_credit(peer)
                        send = True
                    elif ok is None and eos:
                        copied = copied or self._materialize(msg)
                        peer.queue.append(_Entry(seq, copied, True))
                    elif ok is None:
                        peer.dropped += 1
                elif peer.credits > 0 and not peer.queue:
                    self._take_credit(peer)
                    send = True
                elif eos or peer.on_slowness == "queueDrop":
                    copied = copied or self._materialize(msg)
                    peer.queue.append(_Entry(seq, copied, eos))
                    self._trim(peer.queue, peer.max_queue, peer)
                else:
                    peer.dropped += 1
            if send:
                with peer.send_lock:
                    self._transmit(peer, msg)
            self._serve_queue(peer)
        if shared:
            if eos:
                late += self._distribute_shared_eos(seq, msg, shared, deadline)
            else:
                late += self._distribute_shared(seq, msg, deadline)
        if late:
            raise ChannelTimeout(f"{self.channel_id}: {', '.join(late)} gave no credit in time")

    def _trim(self, queue, limit, peer=None):
        """Drop the oldest queued data beyond ``limit`` (ends of stream are never dropped)."""
        while sum(1 for e in queue if not e.eos) > limit:
            for e in queue:
                if not e.eos:
                    queue.remove(e)
                    break
            if peer is not None:
                peer.dropped += 1
            else:
                self.shared_dropped += 1

    def _distribute_shared_eos(self, seq, msg, shared, deadline):
        """Every shared input gets the end of stream, after the data queued before it."""
        with self._cond:
            marker = _Entry(seq, self._materialize(msg), True, {p.id for p in shared if p.alive})
            if not marker.pending:
                return []
            self._shared_queue.append(marker)
        for peer in shared:
            self._serve_queue(peer)
        if self.no_input_shared != "wait":
            return []
        with self._cond:
            ok = self._wait(lambda: marker not in self._shared_queue, None, deadline)
            return sorted(marker.pending) if ok is None else []

    def _distribute_shared(self, seq, msg, deadline):
        with self._cond:
            ids = sorted(i.id for i in self._inputs.values() if i.shared)
            if not ids:
                return []
            target = None
            if self.shared_selector is not None:
                try:
                    chosen = self.shared_selector(list(ids))
                except Exception:  # a user callback: log it and drop, never kill the writer
                    log.exception("%s: shared input selector failed", self.channel_id)
                    chosen = ""
                target = self._inputs.get(chosen) if chosen else None
                if target is None or not target.shared:
                    self.shared_dropped += 1
                    return []
            elif self.distribution_mode == "round-robin":
                target = self._inputs[ids[self._rr % len(ids)]]
                self._rr += 1

            def ready(p):
                return p.alive and p.credits > 0 and not self._has_queued(p)

            def shared_data_queued():
                return any(not e.eos for e in self._shared_queue)

            if target is None:  # load-balanced: the first ready input, after anything queued
                send = None
                if not shared_data_queued():
                    send = next((self._inputs[i] for i in self._ready_shared
                                 if i in self._inputs and ready(self._inputs[i])), None)
            else:
                send = target if ready(target) else None
            if send is None and self.no_input_shared == "wait":
                if target is None:
                    ok = self._wait(lambda: not shared_data_queued() and any(
                        ready(self._inputs[i]) for i in self._ready_shared if i in self._inputs), None, deadline)
                    if ok:
                        send = next(self._inputs[i] for i in self._ready_shared
                                    if i in self._inputs and ready(self._inputs[i]))
                else:
                    ok = self._wait(lambda: ready(target), target, deadline)
                    send = target if ok else None
                if send is None:
                    self.shared_dropped += 1
                    return ["a shared input"] if ok is None else []
            elif send is None and self.no_input_shared == "queueDrop":
                entry = _Entry(seq, self._materialize(msg), False)
                if target is None:
                    self._shared_queue.append(entry)
                    self._trim(self._shared_queue, self.shared_queue_length)
                else:
                    target.queue.append(entry)
                    self._trim(target.queue, max(target.max_queue, 1), target)
            elif send is None:
                self.shared_dropped += 1
            if send is not None:
                self._take_credit(send)
        if send is not None:
            with send.send_lock:
                self._transmit(send, msg)
        for p in [i for i in list(self._inputs.values()) if i.shared]:
            self._serve_queue(p)
        return []

    def _wait(self, predicate, peer, deadline):
        """Wait (holding the condition) until predicate().

        Returns True when it holds, False when the input (or, for None, every
        shared input) is gone, None when the deadline passed.
        """
        while not predicate():
            if self._closed:
                raise ChannelClosed(f"{self.channel_id} closed while waiting for an input")
            if peer is not None and not peer.alive:
                return False
            if peer is None and not any(i.shared for i in self._inputs.values()):
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            self._cond.wait(left if left is not None else 1.0)
        return True

    # ------------------------------------------------------------ life cycle

    def close(self):
        """Stop listening and close every connection (waiting writers get ChannelClosed)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            peers = list(self._inputs.values())
            self._cond.notify_all()
        _close(self._server)
        for p in peers:
            _close(p.sock)
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)
        for p in peers:
            with p.send_lock:
                ring, p.ring = p.ring, None
                if ring is not None:
                    ring.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<OutputChannel {self.channel_id} on {self.hostname}:{self.port}, inputs {self.input_ids()}>"
