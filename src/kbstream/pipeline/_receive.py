"""One connection of an InputChannel to an output: connect, hello, receive, reconnect.

A :class:`Connection` runs one thread (started by its channel): it asks for the output's
address (explicit, or the channel's resolver), connects, sends the hello, then receives
messages straight into buffers that become the items' numpy arrays (or maps them from a
same-host output's shared memory) and hands them to the channel.  When the output goes
away (or sends garbage, which closes the connection with a logged reason) it tries again
every ``reconnect_interval`` seconds, asking the resolver afresh each time.

Credit: the hello grants the output ``credit_window`` messages and every ``update``
one more.  A message beyond that (an output that ignores credit and keeps sending) is a
protocol error: the connection is closed before its header is read, with a logged
reason, and tried again later.  So an input holds at most ``capacity`` items plus what
its credit let in, whatever the output does.

Locks: ``Connection.lock`` guards the socket's writes (hello, update, kbRelease), the
count of credits granted on it and the shared-memory mapper's record of held slots; the
channel never holds its own lock while taking it, nor does a connection hold it while
calling into the channel.
"""

import logging
import socket
import sys
import threading
from enum import Enum

import numpy as np

import kbhash

from . import shm, wire
from ._io import recv_exact as _recv_exact, recv_into as _recv_into
from .errors import ConnectionLost, PipelineProtocolError

__all__ = ["Connection", "ConnectionStatus"]

log = logging.getLogger("kbstream.pipeline")

#: Buffers at least this large are recycled (small ones are cheap to allocate).
_POOL_MIN = 256 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024


class ConnectionStatus(Enum):
    DISCONNECTED = 0
    CONNECTING = 1
    CONNECTED = 2


class _BufferPool:
    """Receive buffers for large payloads, reused once nothing references them.

    An item's arrays are views on the buffer it was received into; when the
    handlers are done and nobody kept an array, the buffer's reference count
    is back to the pool's own reference and the buffer can take the next
    payload.  Reusing mapped memory avoids a page fault (and the kernel's
    zeroing) for every 4 KiB of every item.  A buffer somebody still holds is
    simply not reused.
    """

    def __init__(self, limit):
        self.buffers = []
        self.limit = limit

    def get(self, size):
        if size < _POOL_MIN:
            return np.empty(size, np.uint8)
        buffers = self.buffers
        for i in range(len(buffers)):
            b = buffers[i]
            # references: the list, ``b`` and getrefcount's argument
            if b.size == size and sys.getrefcount(b) <= 3:
                return b
        b = np.empty(size, np.uint8)
        if len(buffers) >= self.limit:
            # forget a buffer that is still in use (or of another size)
            for i in range(len(buffers)):
                if buffers[i].size != size or sys.getrefcount(buffers[i]) > 2:
                    del buffers[i]
                    break
            else:
                del buffers[0]
        buffers.append(b)
        return b


class Connection:
    """One output this input is (or tries to be) connected to."""

    def __init__(self, channel, output_id, info=None):
        self.channel = channel
        self.output_id = output_id
        self.info = info  # explicit endpoint; else the resolver is asked
        self.sock = None
        self.status = ConnectionStatus.DISCONNECTED
        self.owed_update = False
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"{channel.channel_id}<-{output_id}", daemon=True)
        self.received = 0
        self.granted = 0  # credits granted on this socket: the hello's window, then updates
        self.taken = 0  # messages received on this socket
        self.last_error = None
        self.pool = _BufferPool(limit=2 * (channel.capacity + channel.credit_window) + 4)
        self.mapper = None  # shm.SlotMapper while connected to an output on this host
        self.lock = threading.Lock()  # the socket's writes and the mapper

    def _resolve(self):
        if self.info is not None:
            return self.info
        resolver = self.channel.resolver
        if resolver is None:
            return None
        try:
            info = resolver.get(self.output_id) if isinstance(resolver, dict) else resolver(self.output_id)
        except Exception as e:  # a resolver failure is a retry, not a crash
            log.warning("%s: resolving %s failed: %s", self.channel.channel_id, self.output_id, e)
            return None
        return info

    def run(self):
        ch = self.channel
        while not self.stop.is_set():
            info = self._resolve()
            if info is not None:
                try:
                    self._connect(info)
                    self._receive_loop()
                except PipelineProtocolError as e:
                    self.last_error = str(e)
                    log.warning("%s: closing connection to %s: %s", ch.channel_id, self.output_id, e)
                except (OSError, ConnectionError) as e:
                    self.last_error = str(e)
                    if not self.stop.is_set():
                        log.info("%s: connection to %s lost: %s", ch.channel_id, self.output_id, e)
                except Exception as e:  # never let a peer end the retries silently
                    self.last_error = repr(e)
                    log.exception("%s: closing connection to %s", ch.channel_id, self.output_id)
                finally:
                    self._disconnected()
            if self.stop.is_set():
                break
            self.wake.wait(ch.reconnect_interval)
            self.wake.clear()

    def halt(self):
        """Ask the thread to end (it is joined by the caller)."""
        self.stop.set()
        self.wake.set()
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        mapper = self.mapper
        if mapper is not None:
            mapper.interrupt()

    def _connect(self, info):
        ch = self.channel
        get = info.get
        if get("connectionType", "tcp") != "tcp":
            raise PipelineProtocolError(f"connectionType {get('connectionType')!r} is not supported")
        if get("memoryLocation", "remote") != "remote":
            raise PipelineProtocolError("memoryLocation 'local' is not supported across processes")
        host, port = get("hostname"), int(get("port"))
        self._set_status(ConnectionStatus.CONNECTING)
        sock = socket.create_connection((host, port), timeout=ch.connect_timeout)
        if self.stop.is_set():  # closed while connecting
            sock.close()
            raise ConnectionLost("input closed")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        mapper = self._shm_mapper(sock)
        with self.lock:
            self.sock = sock
            self.mapper = mapper
            self.granted = ch.credit_window  # the hello is the first credit (a window: more)
            self.taken = 0
        sock.sendall(wire.hello(ch.channel_id, ch.data_distribution, ch.on_slowness, ch.max_queue_length,
                                credit_window=ch.credit_window, shm_offer=mapper and mapper.offer))
        ch._connected(self)
        self._set_status(ConnectionStatus.CONNECTED)

    def _shm_mapper(self, sock):
        """A mapper that offers shared memory to the output, or None (TCP only): only an
        output on this host is offered it."""
        ch = self.channel
        if not ch.use_shm or not shm.is_local_peer(sock):
            return None
        try:
            return shm.SlotMapper(ch.max_message_size)
        except OSError as e:
            log.info("%s: no shared memory towards %s: %s", ch.channel_id, self.output_id, e)
            return None

    def _set_status(self, status):
        self.status = status
        self.channel._track(self.output_id, status)

    def _disconnected(self):
        with self.lock:
            sock, self.sock = self.sock, None
            mapper = self.mapper
        if mapper is not None:
            mapper.close()  # its sockets; mappings stay while arrays use them
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        was = self.status
        self.status = ConnectionStatus.DISCONNECTED
        if was != ConnectionStatus.DISCONNECTED:
            self.channel._track(self.output_id, ConnectionStatus.DISCONNECTED)
        self.channel._gone(self)

    def _receive_loop(self):
        ch = self.channel
        sock = self.sock
        while not self.stop.is_set():
            hlen = wire.U32.unpack(_recv_exact(sock, 4))[0]
            self.taken += 1
            if self.taken > self.granted:  # granted only grows, and before the update is sent
                raise PipelineProtocolError(f"the output sent message {self.taken} for {self.granted} credits")
            if hlen > wire.MAX_HEADER_SIZE:
                raise PipelineProtocolError(f"data header of {hlen} bytes")
            hdata = _recv_exact(sock, hlen)
            blen = wire.U32.unpack(_recv_exact(sock, 4))[0]
            if blen > ch.max_message_size:
                raise PipelineProtocolError(
                    f"message of {blen} bytes exceeds max_message_size {ch.max_message_size}")
            header = wire.parse_header(hdata, blen)
            header_eos = header.eos
            items = []
            body = bufs = buf = data = None
            pos = 0
            if header.shm is not None:
                body = self._shm_body(*header.shm)
            for sizes, meta in zip(header.buffers, header.metas):
                bufs = []
                for size in sizes:
                    if body is not None:
                        # a view on the shared-memory slot: no copy at all
                        buf = body[pos:pos + size]
                        pos += size
                    else:
                        # np.empty reserves memory without touching it: what a lying
                        # peer does not send is never committed
                        buf = self.pool.get(size)
                        _recv_into(sock, memoryview(buf))
                    bufs.append(buf)
                try:
                    data = kbhash.decode(bufs)
                except kbhash.DecodeError as e:
                    raise PipelineProtocolError(f"item is not a valid Hash archive: {e}") from None
                items.append((data, meta))
            self.received += len(items)
            # drop every local reference to the items, so that their buffers and
            # slots can be reused as soon as the handlers are done with them
            body = bufs = buf = data = meta = header = None
            ch._deliver(self, items, header_eos)
            items = None
            self.release_slots()

    def _shm_body(self, slot, gen, size):
        mapper = self.mapper
        if mapper is None:
            raise PipelineProtocolError("shared-memory message on a connection that did not offer it")
        mapping = mapper.open(slot, gen, size)  # may wait for the descriptor: not under the lock
        with self.lock:
            view = mapper.message_view(slot, mapping, size)
        return memoryview(view)

    def send(self, frame):
        with self.lock:
            if self.sock is not None:
                self.sock.sendall(frame)

    def grant(self, frame):
        """Send an ``update``: one more message the output may send on this socket."""
        with self.lock:
            if self.sock is not None:
                self.granted += 1  # first: the output may answer before sendall returns
                self.sock.sendall(frame)

    def release_slots(self):
        """Give back the shared-memory slots whose items nobody references any more.

        Releases go on the connection whose slots they are: a mapper and its
        socket are read together, and a reconnect replaces both.
        """
        try:
            with self.lock:
                sock = self.sock
                if sock is None or self.mapper is None:
                    return
                frames = [wire.control("kbRelease", self.channel.channel_id, slot=slot)
                          for slot in self.mapper.releasable()]
                for frame in frames:
                    sock.sendall(frame)
        except OSError as e:
            log.info("%s: could not release slots to %s: %s", self.channel.channel_id, self.output_id, e)
