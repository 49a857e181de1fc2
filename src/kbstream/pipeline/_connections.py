"""The output channel's connections: accepting, reading, admitting and dropping inputs.

One job: everything the output's I/O thread does with its connections, as a mixin of
:class:`~kbstream.pipeline.output.OutputChannel` (which owns the channel API, the delivery
policy and the sending).  The I/O thread accepts connections (at most
``max_connections``), reads every connection's control frames through one selector
(hello, update, kbstream's kbRelease), closes a connection that sends no valid hello
within ``hello_timeout``, admits an input (its hello checked by
:func:`kbstream.pipeline.wire.parse_hello`; a same-host input's shared-memory handshake
on a short-lived thread of its own) and drops inputs that leave or break the protocol.
Locks and their order are written at their definition in ``output.py``.
"""

import errno
import logging
import selectors
import socket
import threading
import time

from . import shm, wire
from .errors import PipelineProtocolError

log = logging.getLogger("kbstream.pipeline")

#: Connections accepted per wake-up of the I/O thread (the rest wait for the next turn).
_ACCEPT_BATCH = 64
#: Seconds the I/O thread stops accepting after running out of file descriptors.
_ACCEPT_PAUSE = 0.5
#: Receive buffer a connection starts with (it grows to the largest control frame).
_RECV_START = 4096
_SOCKET_BUFFER = 4 * 1024 * 1024


class _Connection:
    """One accepted TCP connection; an input once its hello arrived.

    Its delivery state lives in the policy (keyed by this object); here are the socket,
    the control-frame buffer, the shared-memory slots, the background send and ``gone``
    (set once, by the first ``_drop``).  The socket is closed by the I/O thread once no
    sender uses it any more (``_release``).
    """

    __slots__ = ("sock", "addr", "id", "ring", "shm_sent", "gone", "rbuf", "rlen", "hello_deadline", "tx",
                 "events", "poller", "paused", "bytes_read", "bytes_written")

    def __init__(self, sock, addr, hello_deadline):
        self.sock = sock
        self.addr = addr
        self.id = None
        self.ring = None  # shared-memory slots when the input runs on this machine
        self.shm_sent = 0
        self.bytes_read = 0  # control frames received (I/O thread)
        self.bytes_written = 0  # of the messages sent, counted when each send ends (under the lock)
        self.gone = False
        self.rbuf = bytearray(_RECV_START)  # control frames received, not yet parsed
        self.rlen = 0
        self.hello_deadline = hello_deadline
        self.tx = None  # the _Tx the I/O thread sends in the background
        self.events = 0  # selector events registered (I/O thread only)
        self.poller = None  # select.poll for a writer waiting on this socket (its sender only)
        self.paused = False  # not read while its shared-memory handshake runs

    def __repr__(self):
        return f"<connection {self.id or '(no hello)'} from {self.addr}>"


def _shutdown(sock):
    """Shut a socket down (wakes every thread blocked on it); it stays open."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close_socket(sock):
    _shutdown(sock)
    try:
        sock.close()
    except OSError:
        pass


def _hello_int(h, key, default):
    """An integer field of a kbstream control frame (kbRelease's slot)."""
    value = h.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PipelineProtocolError(f"control frame has a non-integer {key!r}")
    return value


class ConnectionsMixin:
    """The I/O thread's work on connections (see the module docstring)."""

    # ------------------------------------------------------------ the I/O thread

    def _io_loop(self):
        sel = self._sel
        try:
            sel.register(self._server, selectors.EVENT_READ, None)
            sel.register(self._wake_r, selectors.EVENT_READ, self)
            while not self.closed:
                for key, mask in sel.select(self._timers()):
                    what = key.data
                    if what is None:
                        self._accept()
                    elif what is self:
                        self._drain_wake()
                    elif what.gone:
                        self._forget(what)
                    else:
                        if mask & selectors.EVENT_READ:
                            self._on_readable(what)
                        if mask & selectors.EVENT_WRITE and not what.gone:
                            self._send_background(what)
                self._housekeeping()
        except Exception:  # a bug: never leave writers waiting for a thread that is gone
            log.exception("%s: the I/O thread failed; closing every connection", self.channel_id)
        finally:
            self._io_exit()

    def _wake(self):
        """Make the I/O thread look at _kick and _closing."""
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (it wakes anyway) or closed (it is gone)
            pass

    def _drain_wake(self):
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _housekeeping(self):
        """Start the background sends asked for, close the sockets of dropped connections."""
        if not (self._kick or self._closing or self._admitting):
            return
        with self._lock:
            kick, self._kick = self._kick, set()
            closing, self._closing = self._closing, []
            admitting, self._admitting = self._admitting, []
        for conn, hello, ring in admitting:
            self._admitted(conn, hello, ring)
        for conn in kick:
            if conn.gone:
                self._forget(conn)  # ends a send a writer left to us
            else:
                self._send_background(conn)
        for conn in closing:
            self._forget(conn)
            try:
                conn.sock.close()
            except OSError:
                pass

    def _forget(self, conn):
        """Stop watching a dropped connection; finish its background send (I/O thread)."""
        if conn.events:
            conn.events = 0
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        self._background.discard(conn)
        tx = conn.tx
        if tx is not None:
            self._finish(conn, tx, ConnectionError("input dropped"))

    def _interest(self, conn, write):
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        if conn.events and conn.events != events:
            self._sel.modify(conn.sock, events, conn)
            conn.events = events

    def _timers(self):
        """Close connections past their hello deadline and stalled background sends;
        returns the seconds until the next deadline (None: none)."""
        now = time.monotonic()
        nxt = None
        greeting = self._greeting
        while greeting:
            conn = greeting[0]
            if conn.id is not None or conn.gone:
                greeting.popleft()
            elif conn.hello_deadline <= now:
                greeting.popleft()
                log.warning("%s: closing connection from %s: no hello within %s s", self.channel_id, conn.addr,
                            self.hello_timeout)
                self._drop(conn, "no hello")
            else:
                nxt = conn.hello_deadline
                break
        for conn in list(self._background):
            tx = conn.tx
            if conn.gone:
                self._forget(conn)
                continue
            if tx is None:
                self._background.discard(conn)
                continue
            limit = tx.progress_at + self.send_timeout
            if limit <= now:
                self._finish(conn, tx, TimeoutError(f"nothing read for {self.send_timeout} s"))
                self._forget(conn)
            elif nxt is None or limit < nxt:
                nxt = limit
        if self._accept_paused_until is not None:
            if self._accept_paused_until <= now:
                self._accept_paused_until = None
                self._sel.register(self._server, selectors.EVENT_READ, None)
            elif nxt is None or self._accept_paused_until < nxt:
                nxt = self._accept_paused_until
        if self._kick or self._closing or self._admitting:
            return 0
        return None if nxt is None else max(0.0, nxt - now)

    def _accept(self):
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = self._server.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("%s: cannot accept connections (%s); trying again in %s s", self.channel_id, e,
                                _ACCEPT_PAUSE)
                    self._sel.unregister(self._server)
                    self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                    return
                log.info("%s: accept failed: %s", self.channel_id, e)
                continue
            conn = _Connection(sock, addr, time.monotonic() + self.hello_timeout)
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                _close_socket(sock)
                if not self._refusing:
                    log.warning("%s: %d connections open (max_connections): refusing new ones", self.channel_id,
                                self.max_connections)
                    self._refusing = True
                else:
                    log.debug("%s: refused a connection from %s", self.channel_id, addr)
                continue
            self._refusing = False
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
                self._sel.register(sock, selectors.EVENT_READ, conn)
                conn.events = selectors.EVENT_READ
            except (OSError, ValueError) as e:
                self._drop(conn, f"cannot set the connection up ({e})")
                continue
            self._greeting.append(conn)

    def _on_readable(self, conn):
        try:
            with memoryview(conn.rbuf) as view:
                n = conn.sock.recv_into(view[conn.rlen:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(conn, f"connection lost ({e})")
            return
        if n == 0:
            self._drop(conn, "connection closed by the peer")
            return
        conn.rlen += n
        conn.bytes_read += n
        self._handle_frames(conn)

    def _handle_frames(self, conn):
        try:
            self._parse_frames(conn)
        except PipelineProtocolError as e:
            log.warning("%s: closing connection from %s: %s", self.channel_id, conn.addr, e)
            self._drop(conn, f"protocol error: {e}")
        except Exception as e:  # never let a peer stop the I/O thread
            log.exception("%s: closing connection from %s", self.channel_id, conn.addr)
            self._drop(conn, f"internal error: {e!r}")

    def _parse_frames(self, conn):
        """Handle every complete control frame received on ``conn``."""
        buf = conn.rbuf
        pos = 0
        need = 0
        while not conn.gone and not conn.paused:
            avail = conn.rlen - pos
            if avail < 4:
                break
            size = wire.U32.unpack_from(buf, pos)[0]
            if size > wire.MAX_CONTROL_SIZE:
                raise PipelineProtocolError(f"control frame of {size} bytes")
            if avail < 4 + size:
                need = 4 + size
                break
            frame = bytes(buf[pos + 4:pos + 4 + size])
            pos += 4 + size
            self._on_control(conn, frame)
        if conn.gone:
            return
        rest = conn.rlen - pos
        if pos:
            if rest == 0 and len(buf) > _RECV_START:
                conn.rbuf = bytearray(_RECV_START)  # a large frame is done with
            else:
                buf[:rest] = buf[pos:conn.rlen]
            conn.rlen = rest
        if need > len(conn.rbuf):
            conn.rbuf.extend(bytes(need - len(conn.rbuf)))

    def _on_control(self, conn, data):
        kind, h = wire.parse_control(data)
        if kind == "hello":
            self._on_hello(conn, h)
        elif conn.id is None:
            raise PipelineProtocolError(f"{kind!r} before hello")
        elif kind == "update":
            with self._lock:
                self._dispatch(self._policy.credit(conn))
                self._lock.notify_all()
        elif kind == "kbRelease":
            with self._lock:
                if conn.ring is not None:
                    conn.ring.release(_hello_int(h, "slot", -1))
        else:
            log.debug("%s: ignoring control frame %r", self.channel_id, kind)

    def _on_hello(self, conn, h):
        hello = wire.parse_hello(h)
        if hello.memory_location != "remote":
            raise PipelineProtocolError(f"memoryLocation {hello.memory_location!r}: only 'remote' is served")
        if conn.id is not None:
            raise PipelineProtocolError("second hello on one connection")
        offer = h.get("kbShmFd")
        if not (self.use_shm and offer is not None):
            self._admit(conn, hello, None)
            return
        # The shared-memory handshake may wait (shm.HANDSHAKE_TIMEOUT): never in this
        # thread.  The connection is not read meanwhile; its hello deadline still runs.
        conn.paused = True
        if conn.events:
            conn.events = 0
            self._sel.unregister(conn.sock)
        threading.Thread(target=self._handshake, args=(conn, hello, offer), daemon=True,
                         name=f"{self.channel_id}-shm-{conn.addr[1]}").start()

    def _handshake(self, conn, hello, offer):
        try:
            ring = self._shm_ring(conn, offer, hello.credit_window)
        except PipelineProtocolError as e:
            ring = e
        except Exception as e:  # never leave the connection paused
            log.exception("%s: shared-memory handshake with %s failed", self.channel_id, conn.addr)
            ring = PipelineProtocolError(f"internal error: {e!r}")
        with self._lock:
            later = self._io_running
            if later:
                self._admitting.append((conn, hello, ring))
        if later:
            self._wake()
        elif not isinstance(ring, Exception) and ring is not None:
            ring.close()

    def _admitted(self, conn, hello, ring):
        """A shared-memory handshake ended (I/O thread): admit the input, or drop it."""
        if isinstance(ring, Exception):
            log.warning("%s: closing connection from %s: %s", self.channel_id, conn.addr, ring)
            self._drop(conn, f"protocol error: {ring}")
            return
        if conn.gone:
            if ring is not None:
                ring.close()
            return
        self._admit(conn, hello, ring)
        if conn.gone:
            return
        conn.paused = False
        try:
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)
            conn.events = selectors.EVENT_READ
        except (OSError, ValueError) as e:
            self._drop(conn, f"cannot watch the connection ({e})")
            return
        self._handle_frames(conn)  # what arrived after the hello

    def _admit(self, conn, hello, ring):
        """Register the input of a valid hello (I/O thread)."""
        iid = hello.instance_id
        window = hello.credit_window
        with self._lock:
            if conn.gone:  # the channel closed meanwhile
                if ring is not None:
                    ring.close()
                return
            old = self._inputs.get(iid)
            release_old = old is not None and self._unregister(old)
            conn.id = iid
            conn.ring = ring
            shared = hello.data_distribution == "shared"
            serve = self._policy.connect(conn, iid, shared=shared, on_slowness=hello.on_slowness,
                                         max_queue=hello.max_queue_length, window=window)
            self._inputs[iid] = conn
            self._dispatch(serve)
            self._lock.notify_all()
        if old is not None:
            log.info("%s: %s connected again, closing its old connection", self.channel_id, iid)
            _shutdown(old.sock)
            if release_old:
                self._release(old)
        log.debug("%s: %s connected (%s, %s, window %d)", self.channel_id, iid, hello.data_distribution,
                  hello.on_slowness, window)

    # ------------------------------------------------------------ dropping connections

    def _shm_ring(self, conn, offer, window):
        """Shared-memory slots for an input that offered them, or None (it gets TCP)."""
        peer = shm.connect_input(conn.sock, offer, self.send_timeout)
        if peer is None:
            log.debug("%s: %s gets TCP (shared memory offered but not usable)", self.channel_id, conn.addr)
            return None
        return shm.SlotRing(peer, self._shm_budget, max_slots=window + shm.INPUT_EXTRA_SLOTS)

    def _unregister(self, conn):
        """Take ``conn`` out of the policy and the registry (``_lock`` held).

        True when the caller must release it now; False if it was gone already or a
        send to it is in flight (its sender releases it, see ``_finish``).
        """
        if conn.gone:
            return False
        conn.gone = True
        self._conns.discard(conn)
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
        _shutdown(conn.sock)  # wakes whoever waits on it
        if release:
            self._release(conn)

    def _release(self, conn):
        """Free a dropped connection's slots; its socket is closed by the I/O thread (which
        watches it), or here once that thread has ended."""
        with self._lock:
            ring, conn.ring = conn.ring, None
            later = self._io_running
            if later:
                self._closing.append(conn)
        if ring is not None:
            ring.close()
        if later:
            self._wake()
        else:
            _close_socket(conn.sock)
