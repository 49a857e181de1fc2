"""Karabo pipeline OutputChannel: a TCP server that sends items to connected inputs.

Threads: one accepts connections; one per connection reads the input's
control frames (hello, update) and serves queued messages when credit
arrives.  ``write``/``update`` run in the caller's thread; ``update`` sends
the message itself (``socket.sendmsg`` straight from the arrays' memory), so
when it returns the arrays passed to ``write`` may be reused, except that
messages *queued* for a slow input are copied first (as Karabo's
``safeNDArray``).

Thread safety: ``write``, ``update`` and ``signal_end_of_stream`` may be
called from several threads; a message is the set of items written since the
previous ``update`` by any thread.

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

End of stream is never dropped: inputs without credit get it queued, ``wait``
inputs are waited for.
"""

import collections
import ipaddress
import logging
import socket
import threading
import time

from kbhash import Hash, HashType

from . import shm, wire
from .errors import ChannelClosed, ChannelTimeout, PipelineProtocolError, SchemaError

__all__ = ["OutputChannel"]

log = logging.getLogger("kbstream.pipeline")

_POLICIES = ("drop", "queueDrop", "wait")
_MODES = ("load-balanced", "round-robin")


class _Input:
    """State of one connected input (guarded by the channel's condition)."""

    __slots__ = (
        "id", "sock", "addr", "shared", "on_slowness", "max_queue", "window", "credits",
        "queue", "sent", "dropped", "alive", "send_lock", "memory_location", "eos_pending",
        "ring", "shm_sent",
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
        self.queue = collections.deque()
        self.sent = 0
        self.dropped = 0
        self.alive = True
        self.send_lock = threading.Lock()
        self.memory_location = "remote"
        self.eos_pending = None  # a shared input's end of stream, sent once all queued data is out
        self.ring = None  # shared-memory slots when the input runs on this machine
        self.shm_sent = 0


def _recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("connection closed by peer")
        got += k
    return buf


def _sendmsg_all(sock, buffers):
    """Send all buffers (scatter-gather, partial sends resumed)."""
    views = [memoryview(b).cast("B") for b in buffers if memoryview(b).nbytes]
    while views:
        n = sock.sendmsg(views[:512])
        while n:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


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
    """

    def __init__(self, channel_id, *, hostname="default", port=0, noInputShared="drop",
                 distributionMode="load-balanced", shared_selector=None, sharedQueueLength=10,
                 schema=None, validateSchema="always", use_shm=True):
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
        self._validated = False
        self.hostname = socket.gethostname() if hostname == "default" else hostname
        bind = self.hostname if _is_ip(self.hostname) else "0.0.0.0"
        self._server = socket.create_server((bind, int(port)), reuse_port=False)
        self.port = self._server.getsockname()[1]
        self._cond = threading.Condition()
        self._inputs = {}  # id -> _Input (registered by hello)
        self._ready_shared = collections.deque()  # ids of shared inputs with credit, in order
        self._shared_queue = collections.deque()
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
        """Counters per input: sent, dropped, queued; plus the shared pool's drops."""
        with self._cond:
            out = {
                i.id: {"sent": i.sent, "dropped": i.dropped, "queued": len(i.queue),
                       "shared": i.shared, "onSlowness": i.on_slowness, "shm": i.shm_sent}
                for i in self._inputs.values()
            }
        out["__shared__"] = {"dropped": self.shared_dropped, "queued": len(self._shared_queue)}
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
        while not self._closed:
            try:
                sock, addr = self._server.accept()
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
            peer = _Input(sock, addr)
            t = threading.Thread(target=self._read_loop, args=(peer,), name=f"{self.channel_id}-in-{addr[1]}",
                                 daemon=True)
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
                elif kind == "update":
                    if peer.id is None:
                        raise PipelineProtocolError("update before hello")
                    self._on_update(peer)
                elif kind == "kbRelease" and peer.ring is not None:
                    with self._cond:
                        peer.ring.release(int(h.get("slot", -1)))
                elif kind == "kbShmMapped" and peer.ring is not None:
                    with self._cond:
                        peer.ring.mapped(str(h.get("name", "")))
                else:
                    log.debug("%s: ignoring control frame %r", self.channel_id, kind)
        except (ConnectionError, OSError) as e:
            reason = f"connection lost ({e})"
        except PipelineProtocolError as e:
            reason = f"protocol error: {e}"
            log.warning("%s: closing connection from %s: %s", self.channel_id, peer.addr, e)
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
        old = None
        with self._cond:
            if peer.id is not None:
                raise PipelineProtocolError("second hello on one connection")
            old = self._inputs.get(iid)
            peer.id = iid
            peer.shared = dist == "shared"
            peer.on_slowness = slow
            peer.max_queue = max(1, int(h.get("maxQueueLength", 2)))
            peer.window = max(1, min(int(h.get("kbCreditWindow", 1)), 64))
            token = h.get("kbShm")
            if self.use_shm and token and token == shm.host_token():
                peer.ring = shm.SlotRing(max_slots=peer.window + 8)
            self._inputs[iid] = peer
            # the hello is the first credit (Karabo); a kbstream input may ask for more
            peer.credits = peer.window
            if peer.shared:
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

    def _serve_queue(self, peer):
        """Send queued messages (own queue, then the shared queue) while credit lasts."""
        while True:
            with self._cond:
                if not peer.alive or peer.credits <= 0:
                    return
                if peer.queue:
                    msg = peer.queue.popleft()
                elif peer.shared and self._shared_queue:
                    msg = self._shared_queue.popleft()
                elif peer.eos_pending is not None:
                    msg, peer.eos_pending = peer.eos_pending, None
                else:
                    return
                self._take_credit(peer)
            self._send(peer, msg)

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
                if not any(i.shared for i in self._inputs.values()):
                    self._shared_queue.clear()
                log.info("%s: input %s gone: %s", self.channel_id, peer.id, reason)
            peer.queue.clear()
            ring, peer.ring = peer.ring, None
            self._cond.notify_all()
        _close(peer.sock)
        if ring is not None:
            with peer.send_lock:
                ring.close()

    def _send(self, peer, msg):
        slot = None
        if peer.ring is not None and isinstance(msg, wire.Message) and msg.body_size >= shm.MIN_SHM_MESSAGE:
            with self._cond:
                if peer.ring is not None:
                    slot = peer.ring.acquire(msg.body_size)
        try:
            with peer.send_lock:
                if slot is not None:
                    index, seg = slot
                    shm.fill(seg, msg.body)  # the one copy of this message
                    msg = msg.via_shm(seg.name, index)
                _sendmsg_all(peer.sock, msg)
            with self._cond:
                peer.sent += 1
                if slot is not None:
                    peer.shm_sent += 1
        except OSError as e:
            self._drop_input(peer, f"send failed ({e})")

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

        Blocks for ``wait`` inputs until they grant credit (``timeout``
        seconds at most, then ChannelTimeout; the message is then dropped for
        the inputs that were still waited for).  Data sent while no input is
        connected is discarded, as in Karabo.
        """
        with self._chunk_lock:
            items, self._chunk = self._chunk, []
        if not items:
            return
        self._distribute(wire.data_message(items), eos=False, timeout=timeout)

    def signal_end_of_stream(self, timeout=None):
        """Send pending items, then the end of stream to every input (never dropped)."""
        self.update(timeout=timeout)
        self._validated = False
        self._distribute([wire.eos_message()], eos=True, timeout=timeout)

    def _materialize(self, msg):
        # a queued message outlives update(): copy it so the caller may reuse the arrays
        return [bytes(memoryview(b).cast("B")) for b in msg]

    def _distribute(self, msg, eos, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        queued = None
        with self._cond:
            copies = [i for i in self._inputs.values() if not i.shared]
            shared = [i for i in self._inputs.values() if i.shared]
        # copy inputs: every one of them gets the message
        for peer in copies:
            with self._cond:
                if not peer.alive:
                    continue
                if peer.credits > 0 and not peer.queue:
                    self._take_credit(peer)
                    send = True
                elif peer.on_slowness == "wait":
                    send = self._wait_credit(lambda: peer.credits > 0 and not peer.queue, peer, deadline)
                    if send:
                        self._take_credit(peer)
                elif eos or peer.on_slowness == "queueDrop":
                    if queued is None:
                        queued = self._materialize(msg)
                    peer.queue.append(queued)
                    if not eos:
                        while len(peer.queue) > peer.max_queue:
                            peer.queue.popleft()
                            peer.dropped += 1
                    send = False
                else:
                    peer.dropped += 1
                    send = False
            if send:
                self._send(peer, msg)
            else:
                self._serve_queue(peer)
        if not shared:
            return
        if eos:
            for peer in shared:  # every shared input gets the end of stream
                with self._cond:
                    if not peer.alive:
                        continue
                    drained = lambda: not peer.queue and not self._shared_queue  # noqa: E731
                    if self.no_input_shared == "wait":
                        ok = self._wait_credit(lambda: peer.credits > 0 and drained(), peer, deadline)
                    else:
                        ok = peer.credits > 0 and drained()
                    if ok:
                        self._take_credit(peer)
                    else:
                        peer.eos_pending = self._materialize(msg)
                if ok:
                    self._send(peer, msg)
                else:
                    self._serve_queue(peer)
            return
        self._distribute_shared(msg, deadline)

    def _distribute_shared(self, msg, deadline):
        with self._cond:
            ids = sorted(i.id for i in self._inputs.values() if i.shared)
            if not ids:
                return
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
                    return
            elif self.distribution_mode == "round-robin":
                target = self._inputs[ids[self._rr % len(ids)]]
                self._rr += 1
            elif self._ready_shared:
                target = self._inputs.get(self._ready_shared[0])
            if target is not None and target.credits > 0 and not target.queue:
                self._take_credit(target)
                send = target
            elif self.no_input_shared == "wait":
                if target is None:  # load-balanced: any shared input that becomes ready
                    ok = self._wait_credit(lambda: bool(self._ready_shared), None, deadline)
                    target = self._inputs.get(self._ready_shared[0]) if ok and self._ready_shared else None
                else:
                    ok = self._wait_credit(lambda: target.credits > 0, target, deadline)
                if target is None or not ok:
                    self.shared_dropped += 1
                    return
                self._take_credit(target)
                send = target
            elif self.no_input_shared == "queueDrop":
                queued = self._materialize(msg)
                if target is None:
                    self._shared_queue.append(queued)
                    while len(self._shared_queue) > self.shared_queue_length:
                        self._shared_queue.popleft()
                        self.shared_dropped += 1
                else:
                    target.queue.append(queued)
                    while len(target.queue) > max(target.max_queue, 1):
                        target.queue.popleft()
                        target.dropped += 1
                send = None
            else:
                self.shared_dropped += 1
                send = None
        if send is not None:
            self._send(send, msg)

    def _wait_credit(self, predicate, peer, deadline):
        """Wait (holding the condition) until predicate() or the input is gone; False if gone."""
        while not predicate():
            if self._closed:
                raise ChannelClosed(f"{self.channel_id} closed while waiting for an input")
            if peer is not None and not peer.alive:
                return False
            if peer is None and not any(i.shared for i in self._inputs.values()):
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                who = peer.id if peer is not None else "a shared input"
                raise ChannelTimeout(f"{self.channel_id}: {who} gave no credit in time")
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
            if p.ring is not None:
                with p.send_lock:
                    p.ring.close()
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<OutputChannel {self.channel_id} on {self.hostname}:{self.port}, inputs {self.input_ids()}>"


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
