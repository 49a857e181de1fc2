"""Karabo Bridge servers and client over ZeroMQ (policy layer: sockets, threads, timeouts).

Drop-in for ``karabo_bridge.ServerInThread`` / ``karabo_bridge.Client`` and
``extra_data.export.ZMQStreamer``, same signatures and behaviour, with the peers' traps
fixed:

* a REP server answers a bad request with ``Error: bad request <request>`` like the peer but
  keeps the train for the next good request (the peer loses it);
* a REQ client survives a timeout: its socket is replaced, so the next ``next()`` sends a
  fresh request and a late reply to the old one is never returned (the "lazy pirate"
  pattern; ``REQ_RELAXED`` would race with the server's HWM of 1);
* a context passed to the client is never destroyed; a malformed message raises a
  :class:`~kbstream.errors.ProtocolError` and the client stays usable;
* an invalid ``protocol_version`` or socket type fails in the constructor, not in the thread;
* ``stop()`` never blocks on a dead or slow client (every wait is a short poll) and memory
  stays bounded: the feed queue has ``maxlen`` entries, sockets have HWM 1 and a REP server
  refuses requests larger than 64 KiB (``MAXMSGSIZE``).

Endpoints: a bare port number (``int`` or all-digit ``str``) binds ``tcp://*:PORT`` (all
interfaces), like ``ZMQStreamer``; anything else is used verbatim (``tcp://127.0.0.1:0``,
``ipc:///tmp/sock``, ``inproc://name``).  Servers send with ``copy=False``: the arrays fed
in are sent from their own memory, so do not modify them after ``feed()``.  Sockets close
with ``linger=0`` (``stop()`` drops trains not yet sent, like the peer).

kbhash input: a source whose value is a ``kbhash.Hash`` is flattened by
:func:`flatten_hash` (dotted keys, ImageData as ``<prefix>.data`` + fields), its timestamp
attributes become the metadata fields.
"""

import collections
import logging
import queue
import socket as _pysocket
import threading
import time

import zmq

from . import _backend
from ._memory import keep_large_buffers
from .errors import ChannelTimeout, ServerStateError

__all__ = ["serialize", "deserialize", "flatten_hash", "ServerInThread", "ZMQStreamer", "Client"]

log = logging.getLogger(__name__)

#: poll interval of the server thread (seconds): the longest ``stop()`` waits for it
POLL_INTERVAL = 0.05
#: requests to a REP server larger than this are refused by libzmq (bytes)
MAX_REQUEST_SIZE = 1 << 16

_SERVER_SOCKETS = {"REP": zmq.REP, "PUB": zmq.XPUB, "PUSH": zmq.PUSH}
_CLIENT_SOCKETS = {"REQ": zmq.REQ, "SUB": zmq.SUB, "PULL": zmq.PULL}


# --------------------------------------------------------------------------------------
# codec entry points


def serialize(data, metadata=None, protocol_version="2.2", dummy_timestamps=False):
    """Serialize one train for the Karabo Bridge (``karabo_bridge.serialize`` signature).

    Parameters
    ----------
    data : dict
        ``{source: {flat key: value}}``; a source may also be a ``kbhash.Hash`` (flattened
        with :func:`flatten_hash`).
    metadata : dict, optional
        ``{source: {source, timestamp, timestamp.sec, timestamp.frac, timestamp.tid}}``.
        Default: each source's ``'metadata'`` entry (or the timestamp of a Hash source).
    protocol_version : {'2.2', '1.0'}
    dummy_timestamps : bool
        Fill missing ``timestamp*`` fields from the current time (for OnDA).

    Returns
    -------
    list
        2.2: header ``bytes`` and zero-copy array ``memoryview`` s, ready for
        ``sock.send_multipart(frames, copy=False)``; 1.0: one ``bytes`` frame.
        A JUNGFRAU module train (16 MiB) serializes in a few microseconds in 2.2.
    """
    for props in data.values():
        if type(props) is not dict:
            data, metadata = _flatten_train(data, metadata)
            break
    return _backend.serialize(data, metadata, protocol_version, dummy_timestamps)


def deserialize(frames):
    """Decode one message into ``(data, meta)`` (``karabo_bridge.deserialize`` signature).

    Accepts 1.0 / 2.0 / 2.1 / 2.2; arrays are views on the frames (writeable for
    ``zmq.Frame``, read-only for ``bytes``).  2.0 / 2.1 metadata is returned in ``meta``
    (the peer returns it empty) and also left in ``data`` as the peer does.

    Raises
    ------
    kbstream.ProtocolError
        (a ``ValueError``) or a subclass for any malformed message.
    """
    return _backend.deserialize(frames)


def _flatten_train(data, metadata):
    """Flatten kbhash.Hash sources; return (flat data, explicit metadata for every source)."""
    flat = {}
    meta = {}
    for src, props in data.items():
        given = None if metadata is None else metadata.get(src)
        if isinstance(props, dict):
            flat[src] = props
            meta[src] = given if given is not None else props.get("metadata", {})
            continue
        values, src_meta = flatten_hash(props)
        src_meta["source"] = src
        flat[src] = values
        meta[src] = given if given is not None else src_meta
    return flat, meta


_IMAGE_FIELDS = (
    ("encoding", "encoding"),
    ("dims", "dimensions"),
    ("bitsPerPixel", "bitsPerPixel"),
    ("roiOffsets", "ROIOffsets"),
    ("binning", "binning"),
    ("rotation", "rotation"),
    ("flipX", "flipX"),
    ("flipY", "flipY"),
)


def flatten_hash(h):
    """Flatten a ``kbhash.Hash`` source the way the live bridge presents it.

    Returns ``(values, metadata)``:

    * ``values``: flat dict with dotted keys (``data.adc``, ``header.pulseCount``);
      NDArray nodes are numpy arrays (sent as array frames); nested empty Hashes are left
      out; lists of Hashes are sent as lists of flat dicts.
    * an ImageData at ``<prefix>`` gives ``<prefix>.data`` (the pixels array) and, in the
      msgpack part, ``<prefix>.encoding``, ``.dimensions`` (``dims``), ``.bitsPerPixel``,
      ``.ROIOffsets`` (``roiOffsets``), ``.binning``, ``.rotation``, ``.flipX``, ``.flipY``
      (names as in the C++ bridge client README, spec section 7; lists of ints).
    * ``metadata``: from the newest ``sec`` / ``frac`` / ``tid`` timestamp attributes of
      any node: ``timestamp`` (float seconds), ``timestamp.sec`` (str), ``timestamp.frac``
      (18-digit str, attoseconds), ``timestamp.tid`` (int); empty if no node has one.

    Raises
    ------
    TypeError
        if *h* is not a ``kbhash.Hash``.
    """
    import kbhash

    if not isinstance(h, kbhash.Hash):
        raise TypeError(f"expected a dict or kbhash.Hash source, got {type(h).__name__}")
    values = {}
    newest = []

    def visit(node, prefix):
        for key, value in node.items():
            path = prefix + key
            try:
                ts = node.get_timestamp(key)
            except KeyError:
                ts = None
            if ts is not None:
                stamp = (ts.tid, ts.sec, ts.frac)
                if not newest or stamp > newest[0]:
                    newest[:] = [stamp]
            if isinstance(value, kbhash.Hash):
                visit(value, path + ".")
            elif isinstance(value, kbhash.ImageData):
                values[path + ".data"] = value.pixels
                for field, name in _IMAGE_FIELDS:
                    v = getattr(value, field)
                    if hasattr(v, "tolist"):
                        v = v.tolist()
                    elif isinstance(v, tuple):
                        v = list(v)
                    values[f"{path}.{name}"] = v
            elif isinstance(value, list) and value and isinstance(value[0], kbhash.Hash):
                values[path] = [flatten_hash(item)[0] for item in value]
            else:
                values[path] = value

    visit(h, "")
    meta = {}
    if newest:
        tid, sec, frac = newest[0]
        meta = {
            "timestamp": sec + frac / 1e18,
            "timestamp.sec": str(sec),
            "timestamp.frac": str(frac).zfill(18),
            "timestamp.tid": tid,
        }
    return values, meta


# --------------------------------------------------------------------------------------
# servers


def _bind_endpoint(endpoint):
    if isinstance(endpoint, int) or (isinstance(endpoint, str) and endpoint.isdigit()):
        return f"tcp://*:{endpoint}"
    if not isinstance(endpoint, str):
        raise TypeError(f"endpoint must be a str or a port number, got {endpoint!r}")
    return endpoint


class ServerInThread:
    """Karabo Bridge server with a sending thread (``karabo_bridge.ServerInThread``).

    Parameters
    ----------
    endpoint : str or int
        ZeroMQ endpoint to bind (``tcp://127.0.0.1:0`` for a random port, read it back
        from :attr:`endpoint`), or a port number for ``tcp://*:PORT``.
    sock : {'REP', 'PUB', 'PUSH'}
        REP answers each ``next`` request with one train; PUB never waits (trains fed while
        no subscriber is connected are counted in :attr:`trains_dropped`); PUSH waits for a
        PULL peer with room (nothing lost).
    maxlen : int
        Trains queued by :meth:`feed` before it blocks (or raises ``queue.Full``).
    protocol_version : {'2.2', '1.0'}
    dummy_timestamps : bool
        Add timestamps from the current time where the metadata lacks them.
    context : zmq.Context, optional
        Context to create the socket in (not terminated by :meth:`stop`).

    Counters: :attr:`trains_sent`, :attr:`trains_dropped`, :attr:`bad_requests`,
    :attr:`errors` (trains that failed to serialize), :attr:`queue_depth`, :attr:`rate`.
    """

    def __init__(self, endpoint, sock="REP", maxlen=10, protocol_version="2.2",
                 dummy_timestamps=False, *, context=None):
        if sock not in _SERVER_SOCKETS:
            raise ValueError(f"Unsupported socket type: {sock}")
        if protocol_version not in _backend.ENCODE_VERSIONS:
            raise ValueError(f"Unknown protocol version {protocol_version}")
        self.sock_type = sock
        self.protocol_version = protocol_version
        self.dummy_timestamps = dummy_timestamps
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(_SERVER_SOCKETS[sock])
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.set_hwm(1)
            if sock == "REP":
                self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_SIZE)
            elif sock == "PUB":
                # XPUB speaks to SUB peers like PUB, and reports (un)subscriptions, so
                # trains published to nobody can be counted.
                self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)
                self._socket.setsockopt(zmq.XPUB_VERBOSER, 1)
            self._socket.bind(_bind_endpoint(endpoint))
        except BaseException:
            self._socket.close(linger=0)
            if self._own_context:
                self._context.term()
            raise
        self._queue = queue.Queue(maxsize=maxlen)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"kbstream-{sock}-server")
        self._started = False
        self._closed = False
        self._subscribers = 0
        self._send_times = collections.deque(maxlen=11)
        self.trains_sent = 0
        self.trains_dropped = 0
        self.bad_requests = 0
        self.errors = 0

    # -- public API ---------------------------------------------------------------------

    @property
    def endpoint(self):
        """The bound endpoint (``0.0.0.0`` replaced by the host name, as the peer does)."""
        ep = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return ep.replace("0.0.0.0", _pysocket.gethostname())

    @property
    def queue_depth(self):
        """Trains fed but not yet taken by the sending thread."""
        return self._queue.qsize()

    @property
    def rate(self):
        """Trains per second over the last (up to) 10 sends; 0.0 before two sends."""
        t = self._send_times
        if len(t) < 2 or t[-1] == t[0]:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    def stats(self):
        """All counters as a dict."""
        return {
            "trains_sent": self.trains_sent,
            "trains_dropped": self.trains_dropped,
            "bad_requests": self.bad_requests,
            "errors": self.errors,
            "queue_depth": self.queue_depth,
            "rate": self.rate,
        }

    def feed(self, data, metadata=None, block=True, timeout=None):
        """Queue one train for sending.

        Blocks while ``maxlen`` trains are waiting; raises ``queue.Full`` with
        ``block=False`` or once ``timeout`` seconds have passed (as ``queue.Queue.put``).
        The arrays are sent from their own memory later: do not modify them afterwards.

        Raises
        ------
        ServerStateError
            after :meth:`stop`.
        """
        if self._closed:
            raise ServerStateError("feed() on a stopped server")
        self._queue.put((data, metadata), block=block, timeout=timeout)

    def start(self):
        """Start the sending thread."""
        if self._started:
            raise ServerStateError("server already started")
        if self._closed:
            raise ServerStateError("start() on a stopped server")
        self._started = True
        self._thread.start()

    def stop(self):
        """Stop the thread and close the socket (linger 0: unsent trains are dropped).

        Returns within about ``POLL_INTERVAL`` whatever the clients do.  Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._started:
            self._thread.join()
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.stop()

    # -- sending thread -------------------------------------------------------------------

    def _serialize(self, item):
        data, metadata = item
        try:
            return serialize(data, metadata, self.protocol_version, self.dummy_timestamps)
        except Exception:
            self.errors += 1
            log.exception("kbstream server: cannot serialize a fed train, skipped")
            return None

    def _sent(self):
        self.trains_sent += 1
        self._send_times.append(time.monotonic())

    def _run(self):
        sock = self._socket
        stop = self._stop
        q = self._queue
        kind = self.sock_type
        poll_ms = int(POLL_INTERVAL * 1000)
        pending = None
        while not stop.is_set():
            if kind == "PUB":
                self._drain_subscriptions()
            if pending is None:
                try:
                    item = q.get(timeout=POLL_INTERVAL)
                except queue.Empty:
                    continue
                pending = self._serialize(item)
                if pending is None:
                    continue
            if kind == "REP":
                if not sock.poll(poll_ms, zmq.POLLIN):
                    continue
                request = sock.recv_multipart()
                if request == [b"next"]:
                    sock.send_multipart(pending, copy=False)
                    pending = None
                    self._sent()
                else:
                    # same reply as karabo_bridge, but the train is kept for the next
                    # good request
                    self.bad_requests += 1
                    shown = b" ".join(request)[:200]
                    log.warning("kbstream server: bad request %r", shown)
                    sock.send(b"Error: bad request %b" % shown)
            elif kind == "PUSH":
                if not sock.poll(poll_ms, zmq.POLLOUT):
                    continue
                try:
                    # NOBLOCK: the PULL peer may vanish between poll and send, and a
                    # blocking send would then wait for a new peer forever (stop() would
                    # hang).  libzmq accepts all parts once it has accepted the first.
                    sock.send_multipart(pending, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                pending = None
                self._sent()
            else:  # PUB: never waits
                if self._subscribers > 0:
                    sock.send_multipart(pending, copy=False)
                    self._sent()
                else:
                    self.trains_dropped += 1
                pending = None

    def _drain_subscriptions(self):
        sock = self._socket
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self._subscribers += 1
            elif msg[:1] == b"\x00":
                self._subscribers = max(0, self._subscribers - 1)


class ZMQStreamer(ServerInThread):
    """``extra_data.export.ZMQStreamer``: a :class:`ServerInThread` bound to a port.

    ``port`` is a port number (binds ``tcp://*:PORT``, all interfaces; 0 = random, read
    :attr:`endpoint`) or, as an extension, any endpoint string.  No deprecation warning.
    """

    def __init__(self, port, sock="REP", maxlen=10, protocol_version="2.2",
                 dummy_timestamps=False, *, context=None):
        super().__init__(_bind_endpoint(port), sock=sock, maxlen=maxlen,
                         protocol_version=protocol_version,
                         dummy_timestamps=dummy_timestamps, context=context)


# --------------------------------------------------------------------------------------
# client


class Client:
    """Karabo Bridge client (``karabo_bridge.Client``).

    Parameters
    ----------
    endpoint : str
        Server endpoint to connect to (``tcp://host:port``, ``ipc://...``).
    sock : {'REQ', 'SUB', 'PULL'}
        Must match the server: REP -> REQ, PUB -> SUB, PUSH -> PULL.  Other values raise
        ``NotImplementedError`` (as the peer).
    ser : 'msgpack'
        Deprecated, only ``'msgpack'`` (else ``ValueError``).
    timeout : float, optional
        Seconds :meth:`next` waits before raising :class:`~kbstream.ChannelTimeout`
        (a ``TimeoutError``); ``None`` waits forever.
    context : zmq.Context, optional
        Context to use; never terminated by the client.
    keep_buffers : bool
        Keep freed receive buffers in the process for the next trains (glibc only,
        process-wide, see :func:`kbstream.keep_large_buffers`); saves the kernel's page
        faults and zero-filling of every received frame.  Default True.

    ``next()`` returns ``(data, meta)``; the client is an iterator and a context manager
    (``close()`` on exit).  A REQ client recovers from a timeout: the next call reconnects
    and sends a new request; a late reply to the old one is never returned.  A malformed message raises
    :class:`~kbstream.ProtocolError` and the next call works.
    """

    def __init__(self, endpoint, sock="REQ", ser="msgpack", timeout=None, context=None, *,
                 keep_buffers=True):
        if ser != "msgpack":
            raise ValueError("Only serialization supported is msgpack")
        if sock not in _CLIENT_SOCKETS:
            raise NotImplementedError(f"Unsupported socket: {sock}")
        if keep_buffers:
            keep_large_buffers()
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._endpoint = endpoint
        self._timeout = timeout
        self._pattern = sock
        self._awaiting = False
        self._closed = False
        self._socket = None
        try:
            self._socket = self._make_socket()
        except BaseException:
            self.close()
            raise

    def _make_socket(self):
        sock = self._context.socket(_CLIENT_SOCKETS[self._pattern])
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.set_hwm(1)
            if self._pattern == "SUB":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            if self._timeout is not None:
                sock.setsockopt(zmq.RCVTIMEO, int(self._timeout * 1000))
            sock.connect(self._endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def next(self):
        """Receive the next train: ``(data, meta)``, both keyed by source.

        Raises
        ------
        ChannelTimeout
            nothing arrived within ``timeout`` (the client stays usable).
        ProtocolError
            the message is malformed, or the server answered with an error (ServerError).
        """
        if self._closed:
            raise ServerStateError("next() on a closed client")
        if self._socket is None:
            self._socket = self._make_socket()
        sock = self._socket
        if self._pattern == "REQ" and not self._awaiting:
            sock.send(b"next")
            self._awaiting = True
        try:
            frames = sock.recv_multipart(copy=False)
        except zmq.Again:
            if self._pattern == "REQ":
                # The request stays outstanding at the server: drop this socket so its
                # late reply goes nowhere; the next call connects afresh and asks again.
                sock.close(linger=0)
                self._socket = None
                self._awaiting = False
            raise ChannelTimeout(
                f"No data received from {self._endpoint} in the last "
                f"{int(self._timeout * 1000)} ms",
                self._endpoint,
                self._timeout,
            ) from None
        self._awaiting = False
        return deserialize(frames)

    def close(self):
        """Close the socket (linger 0); terminate the context only if the client made it."""
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._own_context:
            self._context.term()

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()


