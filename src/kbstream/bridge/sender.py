"""The one Karabo Bridge sender: a bound ZeroMQ socket and the loop that feeds it trains.

Every kbstream bridge server sends through this module: :class:`~kbstream.ServerInThread`
and :class:`~kbstream.ZMQStreamer` (trains fed from the caller's thread), and
``karabo-bridge-serve-run`` / ``-serve-files`` (trains read ahead from run files).  So the
endpoint rules, the socket options, what a bad request gets, what counts as a dropped train
and the timestamp metadata (:func:`kbstream.bridge.source_metadata`) are the same on every
path.

:class:`Sender` owns the socket and hands it one serialized train at a time:

``REP``
    waits for a request; ``next`` gets the train.  Anything else gets the reply
    ``Error: bad request <request>`` (as ``karabo_bridge`` answers) and the train waits for
    the next good request (the peer loses it).  A request part over
    :data:`MAX_REQUEST_SIZE` bytes makes libzmq drop the connection (``ZMQ_MAXMSGSIZE``);
    a request is read part by part, and one of more than :data:`MAX_REQUEST_SIZE` bytes
    or :data:`MAX_REQUEST_PARTS` parts in all is read to its end without being kept and
    answered ``Error: bad request (...)``.  libzmq itself holds a whole multipart request
    before the first part can be read (``docs/safety-bridge.md``).
``PUB``
    never waits.  The socket is an XPUB, which speaks to SUB peers like PUB and reports
    each topic when its first subscriber arrives and when its last one leaves (however
    often a peer repeats a subscription).  The sender keeps that set of topics, and a
    train whose first frame no subscribed topic is a prefix of reaches nobody: it is
    counted as dropped, not as sent.
``PUSH``
    waits until a PULL peer can take the train (nothing is lost); a peer that vanishes
    between poll and send never blocks the sender.

Every wait is a poll of at most :data:`POLL_INTERVAL` seconds that checks a stop event, so
a dead or slow peer never keeps a server from closing.  Trains leave with ``copy=False``:
array frames are sent from the arrays' own memory.  With ``track=True`` the frames of at
least :data:`TRACK_THRESHOLD` bytes are tracked and :meth:`Sender.send` returns a
``zmq.MessageTracker`` that is done once libzmq no longer needs that memory (the replay
reuses its read buffers then); smaller frames are copied at once, which is cheaper.

:func:`run` is the sending loop: take the next train, serialize it (a train that cannot be
serialized is skipped, counted and reported, never the end of the server), pace it to a
rate if asked, send it, report the outcome.
"""

import fcntl
import logging
import socket as _pysocket
import struct
import time

import zmq

from ..errors import BindError
from . import codec

__all__ = [
    "Sender",
    "run",
    "parse_endpoint",
    "SOCKET_TYPES",
    "SENT",
    "DROPPED",
    "STOPPED",
    "EMPTY",
    "POLL_INTERVAL",
    "MAX_REQUEST_SIZE",
    "MAX_REQUEST_PARTS",
    "TRACK_THRESHOLD",
]

log = logging.getLogger("kbstream.bridge")

#: the server socket patterns, as their names are given by users
SOCKET_TYPES = ("REP", "PUB", "PUSH")
#: longest single wait of the sender (seconds): the longest a stop request waits for it
POLL_INTERVAL = 0.05
#: largest request to a REP server (bytes, all parts together; libzmq refuses a larger
#: single part by itself)
MAX_REQUEST_SIZE = 1 << 16
#: most parts of one request to a REP server (a good request has one: ``next``)
MAX_REQUEST_PARTS = 64
#: frames from this size up are sent zero-copy and tracked; smaller ones are copied
TRACK_THRESHOLD = 1 << 16

#: outcomes of :meth:`Sender.send`
SENT, DROPPED, STOPPED = "sent", "dropped", "stopped"
#: what a train source returns when it has nothing right now (the loop checks stop, asks again)
EMPTY = object()

_ZMQ_TYPES = {"REP": zmq.REP, "PUB": zmq.XPUB, "PUSH": zmq.PUSH}


def _interface_address(name):
    """IPv4 address of network interface ``name``, or None (Linux SIOCGIFADDR)."""
    s = _pysocket.socket(_pysocket.AF_INET, _pysocket.SOCK_DGRAM)
    try:
        res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        return _pysocket.inet_ntoa(res[20:24])
    except OSError:
        return None
    finally:
        s.close()


def parse_endpoint(endpoint, use_infiniband=False):
    """The ZeroMQ endpoint a server binds for ``endpoint``.

    A port number (an ``int`` or an all-digit ``str``) binds ``tcp://*:PORT`` (every
    interface), as ``ZMQStreamer`` and extra_data's commands do; with ``use_infiniband`` it
    binds the address of interface ``ib0`` instead, when there is one (a warning says so
    when there is not).  Any other string is used verbatim (``tcp://127.0.0.1:0``,
    ``ipc:///tmp/sock``, ``inproc://name``).

    Raises
    ------
    TypeError
        if ``endpoint`` is neither a str nor an int.
    """
    if isinstance(endpoint, bool) or not isinstance(endpoint, (int, str)):
        raise TypeError(f"endpoint must be a str or a port number, got {endpoint!r}")
    if isinstance(endpoint, int) or endpoint.isdigit():
        host = "*"
        if use_infiniband:
            host = _interface_address("ib0") or "*"
            if host == "*":
                log.warning("no InfiniBand interface ib0 with an IPv4 address; binding on *")
        return f"tcp://{host}:{int(endpoint)}"
    return endpoint


class Sender:
    """A bound bridge server socket and the rules for handing it one train at a time.

    Parameters
    ----------
    endpoint : str or int
        Where to bind (see :func:`parse_endpoint`).
    sock : {'REP', 'PUB', 'PUSH'}
    context : zmq.Context, optional
        Context for the socket; never terminated here.  Default: a new one, terminated by
        :meth:`close`.
    hwm : int
        Send high-water mark (trains queued in libzmq for PUB / PUSH).
    use_infiniband : bool
        Bind a bare port number on ``ib0``.

    Raises
    ------
    ValueError
        unknown socket type.
    kbstream.BindError
        the endpoint cannot be bound (in use, bad address).

    Counters: :attr:`sent`, :attr:`dropped` (PUB trains nobody subscribed to),
    :attr:`bad_requests` (REP).
    """

    def __init__(self, endpoint, sock="REP", *, context=None, hwm=1, use_infiniband=False):
        if sock not in _ZMQ_TYPES:
            raise ValueError(f"Unsupported socket type: {sock}")
        self.sock_type = sock
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._socket = self._context.socket(_ZMQ_TYPES[sock])
        bind_to = None
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.set_hwm(hwm)
            if sock == "REP":
                self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_SIZE)
            bind_to = parse_endpoint(endpoint, use_infiniband)
            self._socket.bind(bind_to)
        except zmq.ZMQError as e:
            self._abandon()
            raise BindError(f"cannot bind {bind_to or endpoint}: {e}", bind_to) from e
        except BaseException:
            self._abandon()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN if sock == "REP" else zmq.POLLOUT)
        self._topics = set()  # PUB: topics with at least one subscriber
        self._closed = False
        self.sent = 0
        self.dropped = 0
        self.bad_requests = 0

    def _abandon(self):
        self._socket.close(linger=0)
        if self._own_context:
            self._context.term()

    @property
    def endpoint(self):
        """The bound endpoint (``0.0.0.0`` replaced by the host name, as the peer does)."""
        ep = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        return ep.replace("0.0.0.0", _pysocket.gethostname())

    @property
    def bound_endpoint(self):
        """The bound endpoint exactly as libzmq reports it."""
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def send(self, frames, stop=None, *, idle=None, track=False):
        """Hand one train's frames to the socket as its pattern says (module docstring).

        Parameters
        ----------
        frames : list
            What :func:`kbstream.serialize` returned.
        stop : threading.Event, optional
            Give up waiting when it is set.
        idle : callable, optional
            Called between polls while waiting (e.g. to give back released buffers).
        track : bool
            Track the large frames; the tracker is returned.

        Returns
        -------
        (outcome, tracker)
            ``outcome`` is :data:`SENT`, :data:`DROPPED` (PUB, no subscriber) or
            :data:`STOPPED` (``stop`` was set first; nothing was sent); ``tracker`` is a
            ``zmq.MessageTracker`` when ``track`` and a frame was tracked, else None.
        """
        sock = self._socket
        kind = self.sock_type
        if kind == "PUB":
            self._drain_subscriptions()
            if not self._reaches_someone(frames[0]):
                self.dropped += 1
                return DROPPED, None
            frames, tracker = self._prepare(frames, track)
            sock.send_multipart(frames, copy=False)
            self.sent += 1
            return SENT, tracker
        poll_ms = int(POLL_INTERVAL * 1000)
        while True:
            if stop is not None and stop.is_set():
                return STOPPED, None
            if not self._poller.poll(poll_ms):
                if idle is not None:
                    idle()
                continue
            if kind == "REP":
                request = self._recv_request()
                if request != [b"next"]:
                    self._bad_request(request)
                    continue
                frames, tracker = self._prepare(frames, track)
                sock.send_multipart(frames, copy=False)
            else:
                frames, tracker = self._prepare(frames, track)
                try:
                    # NOBLOCK: the PULL peer may vanish between poll and send, and a
                    # blocking send would then wait for a new peer forever.  libzmq
                    # accepts all parts once it has accepted the first.
                    sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
            self.sent += 1
            return SENT, tracker

    def _recv_request(self):
        """One whole request to the REP socket: its parts (bytes), or a ``(parts,
        bytes)`` tuple when it has more than :data:`MAX_REQUEST_PARTS` parts or
        :data:`MAX_REQUEST_SIZE` bytes (the parts are read to the end, none kept)."""
        sock = self._socket
        parts = []
        count = size = 0
        while True:
            frame = sock.recv(copy=False)
            count += 1
            size += len(frame)
            if parts is not None:
                if size > MAX_REQUEST_SIZE or count > MAX_REQUEST_PARTS:
                    parts = None
                else:
                    parts.append(frame.bytes)
            if not frame.more:
                return parts if parts is not None else (count, size)

    def _bad_request(self, request):
        # karabo_bridge's reply, but the train is kept for the next good request
        self.bad_requests += 1
        if isinstance(request, tuple):
            shown = b"(%d parts, %d bytes: more than %d parts or %d bytes)" % (
                request + (MAX_REQUEST_PARTS, MAX_REQUEST_SIZE))
        else:
            shown = b" ".join(request)[:200]
        log.warning("kbstream server: bad request %r", shown)
        self._socket.send(b"Error: bad request %b" % shown)

    @staticmethod
    def _prepare(frames, track):
        """Frames for ``send_multipart(copy=False)``, and the tracker of the large ones."""
        if not track:
            return frames, None
        out, tracked = [], []
        for f in frames:
            if isinstance(f, (bytes, zmq.Frame)):
                out.append(f)
                continue
            mv = memoryview(f)
            if mv.nbytes < TRACK_THRESHOLD:
                out.append(mv.tobytes())  # small: copy now, its buffer is free at once
            else:
                fr = zmq.Frame(mv, copy=False, track=True)
                out.append(fr)
                tracked.append(fr)
        return out, (zmq.MessageTracker(*tracked) if tracked else None)

    def _drain_subscriptions(self):
        sock = self._socket
        while True:
            try:
                msg = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self._topics.add(msg[1:])
            elif msg[:1] == b"\x00":
                self._topics.discard(msg[1:])

    def _reaches_someone(self, first_frame):
        """Whether a subscribed topic is a prefix of the message (what XPUB delivers on)."""
        topics = self._topics
        if b"" in topics:
            return True
        if not topics:
            return False
        head = memoryview(first_frame)
        return any(head[:len(t)] == t for t in topics)

    def close(self, linger=0):
        """Close the socket (``linger`` seconds for queued trains to leave; 0 drops them).

        The context is terminated only if the sender made it.  Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self._socket.close(linger=int(linger * 1000))
        if self._own_context:
            self._context.term()


def run(sender, next_train, stop, *, protocol_version="2.2", dummy_timestamps=False,
        serialize=None, rate=None, idle=None, track=False, on_sent=None, on_error=None):
    """The sending loop: until ``stop`` is set or ``next_train`` says the end.

    Parameters
    ----------
    sender : Sender
    next_train : callable
        Returns the next ``(data, metadata, token)``, :data:`EMPTY` when nothing is ready
        yet (the loop checks ``stop`` and asks again; the callable should wait a little,
        e.g. up to :data:`POLL_INTERVAL`), or None at the end.
    stop : threading.Event
    protocol_version, dummy_timestamps
        As :func:`kbstream.serialize`.
    serialize : callable, optional
        ``serialize(data, metadata, protocol_version, dummy_timestamps)``; default
        :func:`kbstream.serialize`.
    rate : float, optional
        At most this many trains per second.
    idle, track
        As :meth:`Sender.send`.
    on_sent : callable, optional
        ``on_sent(token, outcome, tracker)`` after each train handed to
        :meth:`Sender.send`, also when it was dropped or the loop stopped while waiting.
    on_error : callable, optional
        ``on_error(token, exc)`` for a train that cannot be serialized: it is skipped
        (logged once per train) and the loop goes on.

    Returns
    -------
    bool
        True when ``next_train`` reached the end, False when ``stop`` ended the loop.
    """
    serialize = serialize or codec.serialize
    interval = 1.0 / rate if rate else 0.0
    next_time = time.perf_counter()
    while not stop.is_set():
        item = next_train()
        if item is EMPTY:
            continue
        if item is None:
            return True
        data, metadata, token = item
        try:
            frames = serialize(data, metadata, protocol_version, dummy_timestamps)
        except Exception as exc:  # noqa: BLE001 - any encoder error skips this train only
            log.warning("kbstream server: cannot serialize a train, skipped: %s: %s",
                        type(exc).__name__, exc)
            if on_error is not None:
                on_error(token, exc)
            continue
        if interval:
            delay = next_time - time.perf_counter()
            if delay > 0 and stop.wait(delay):
                if on_sent is not None:
                    on_sent(token, STOPPED, None)
                break
            next_time = max(next_time + interval, time.perf_counter() - interval)
        outcome, tracker = sender.send(frames, stop, idle=idle, track=track)
        # from here only the tracker (and the caller's token) may keep the arrays alive
        del frames
        if on_sent is not None:
            on_sent(token, outcome, tracker)
        if outcome is STOPPED:
            break
    return False
