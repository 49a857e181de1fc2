"""Karabo pipeline InputChannel: connects to outputs, receives items, calls handlers.

Threads: one per connected output receives messages (straight into buffers
that become the items' numpy arrays, no further copy) and grants credit; one
handler thread calls the user's handlers, so handlers of one input never run
concurrently and receiving goes on while they run.

Flow control: an input holds at most ``capacity`` received but unhandled
items (``max(2 * minData, credit_window, 2)``); beyond that it stops sending
``update`` and the output's policy (drop / queueDrop / wait) applies, as with
Karabo.  With ``minData=0`` (everything until end of stream) it never stops.

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
import socket
import sys
import threading
import time
from enum import Enum

import numpy as np

import kbhash
from kbhash import Hash

from . import shm, wire
from ._io import recv_exact as _recv_exact, recv_into as _recv_into
from .errors import ChannelClosed, PipelineProtocolError

__all__ = ["InputChannel", "ConnectionStatus"]

log = logging.getLogger("kbstream.pipeline")

_EOS = object()


class ConnectionStatus(Enum):
    DISCONNECTED = 0
    CONNECTING = 1
    CONNECTED = 2


#: Buffers at least this large are recycled (small ones are cheap to allocate).
_POOL_MIN = 256 * 1024
_SOCKET_BUFFER = 4 * 1024 * 1024


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


class _Connection:
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
        self.last_error = None
        self.pool = _BufferPool(limit=2 * (channel.capacity + channel.credit_window) + 4)
        self.mapper = shm.SlotMapper()
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
                except (OSError, ConnectionError) as e:
                    self.last_error = str(e)
                    if not self.stop.is_set():
                        log.info("%s: connection to %s lost: %s", ch.channel_id, self.output_id, e)
                except PipelineProtocolError as e:
                    self.last_error = str(e)
                    log.warning("%s: closing connection to %s: %s", ch.channel_id, self.output_id, e)
                except Exception as e:  # never let a peer end the retries silently
                    self.last_error = repr(e)
                    log.exception("%s: closing connection to %s", ch.channel_id, self.output_id)
                finally:
                    self._disconnected()
            if self.stop.is_set():
                break
            self.wake.wait(ch.reconnect_interval)
            self.wake.clear()

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
            raise ConnectionError("input closed")
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        with self.lock:
            self.sock = sock
            self.mapper = shm.SlotMapper()
        sock.sendall(wire.hello(ch.channel_id, ch.data_distribution, ch.on_slowness, ch.max_queue_length,
                                credit_window=ch.credit_window, shm_token=ch.shm_token))
        ch._connected(self)
        self._set_status(ConnectionStatus.CONNECTED)

    def _set_status(self, status):
        self.status = status
        self.channel._track(self.output_id, status)

    def _disconnected(self):
        with self.lock:
            sock, self.sock = self.sock, None
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

    def _shm_body(self, name, slot, size):
        if self.channel.shm_token is None:
            raise PipelineProtocolError("shared-memory message on a connection that did not offer it")
        with self.lock:
            try:
                arr, new = self.mapper.open(slot, name, size)
            except (OSError, ValueError) as e:
                raise PipelineProtocolError(f"cannot map shared memory {name!r}: {e}") from None
            view = self.mapper.message_view(slot, arr, size)
        if new:
            self.send(wire.control("kbShmMapped", self.channel.channel_id, name=name))
        return memoryview(view)

    def send(self, frame):
        with self.lock:
            if self.sock is not None:
                self.sock.sendall(frame)

    def release_slots(self):
        """Give back the shared-memory slots whose items nobody references any more.

        Releases go on the connection whose slots they are: a mapper and its
        socket are read together, and a reconnect replaces both.
        """
        try:
            with self.lock:
                sock = self.sock
                if sock is None:
                    return
                frames = [wire.control("kbRelease", self.channel.channel_id, slot=slot)
                          for slot in self.mapper.releasable()]
                for frame in frames:
                    sock.sendall(frame)
        except OSError as e:
            log.info("%s: could not release slots to %s: %s", self.channel.channel_id, self.output_id, e)


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


class InputChannel:
    """Karabo pipeline input channel.

    Parameters
    ----------
    channel_id : str
        ``"<instanceId>:<channelName>"``, sent in the hello.
    connectedOutputChannels : list of str
        Output ids ``"<instanceId>:<channel>"`` to connect to via the resolver
        when :meth:`start` is called.
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
        if dataDistribution not in wire.DISTRIBUTION:
            raise ValueError(f"dataDistribution must be one of {wire.DISTRIBUTION}")
        if onSlowness not in wire.ON_SLOWNESS:
            raise ValueError(f"onSlowness must be one of {wire.ON_SLOWNESS}")
        self.channel_id = channel_id
        self.connected_output_channels = list(connectedOutputChannels)
        self.data_distribution = dataDistribution
        self.on_slowness = onSlowness
        self.max_queue_length = int(maxQueueLength)
        self.min_data = int(minData)
        self.respond_to_eos = bool(respondToEndOfStream)
        self.delay_on_input = float(delayOnInput) / 1000.0
        self.resolver = resolver
        self.reconnect_interval = float(reconnect_interval)
        self.credit_window = max(1, int(credit_window))
        self.connect_timeout = connect_timeout
        self.max_message_size = int(max_message_size)
        self.shm_token = shm.host_token() if use_shm else None
        self.schema = schema
        self.on_schema_mismatch = on_schema_mismatch
        self.schema_mismatches = 0
        self._reported = set()
        self.capacity = max(2 * max(self.min_data, 1), self.credit_window, 2)
        self._data_handler = None
        self._input_handler = None
        self._eos_handler = None
        self._trackers = []
        self._cond = threading.Condition()
        self._queue = collections.deque()  # (data, meta, conn) or (_EOS, None, conn)
        self._npending = 0  # data items in the queue
        self._conns = {}
        self._live = set()  # connections that are connected now
        self._eos_seen = set()
        self._closed = False
        self.received = 0
        self.handled = 0
        self.eos_count = 0
        self._handler_thread = threading.Thread(target=self._handler_loop, name=f"{channel_id}-handlers",
                                                daemon=True)
        self._handler_thread.start()

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

    def start(self):
        """Connect to every output of ``connectedOutputChannels`` (through the resolver)."""
        for oid in self.connected_output_channels:
            self._add(oid, None)

    def connect(self, info, output_id=None):
        """Connect to an output given its connection info (explicit endpoint).

        ``info``: Hash or dict with ``hostname``, ``port`` and optionally
        ``outputChannelString`` (the output id) and ``connectionType``.
        """
        if isinstance(info, Hash):
            info = info.to_dict()
        oid = output_id or info.get("outputChannelString") or f"{info['hostname']}:{info['port']}"
        self._add(oid, dict(info))
        return oid

    def _add(self, oid, info):
        with self._cond:
            if self._closed:
                raise ChannelClosed(f"{self.channel_id} is closed")
            old = self._conns.get(oid)
        if old is not None:
            self._stop_conn(old)
        conn = _Connection(self, oid, info)
        with self._cond:
            self._conns[oid] = conn
        conn.thread.start()

    def reconnect_now(self, output_id):
        """Try to (re)connect to ``output_id`` now instead of at the next retry."""
        conn = self._conns.get(output_id)
        if conn is not None and conn.status == ConnectionStatus.DISCONNECTED:
            conn.wake.set()

    def disconnect(self, output_id):
        conn = self._conns.pop(output_id, None)
        if conn is not None:
            self._stop_conn(conn)

    def _stop_conn(self, conn):
        conn.stop.set()
        conn.wake.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if conn.thread is not threading.current_thread():
            conn.thread.join(5)

    def connection_status(self):
        return {oid: c.status for oid, c in self._conns.items()}

    def wait_connected(self, output_ids=None, timeout=10.0):
        deadline = time.monotonic() + timeout
        want = set(output_ids or self._conns)
        while True:
            st = self.connection_status()
            if all(st.get(o) == ConnectionStatus.CONNECTED for o in want):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.channel_id}: not connected to {sorted(want)} within {timeout} s: {st}")
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
            conn.send(wire.update(self.channel_id))
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
                if self._closed:
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
                for conn in list(self._conns.values()):
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

    def close(self):
        with self._cond:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns.values())
            self._cond.notify_all()
        for c in conns:
            self._stop_conn(c)
        self._conns.clear()
        if self._handler_thread is not threading.current_thread():
            self._handler_thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<InputChannel {self.channel_id} {self.connection_status()}>"
