"""Karabo Bridge servers fed from the caller's thread: ``ServerInThread``, ``ZMQStreamer``.

Drop-in for ``karabo_bridge.ServerInThread`` and ``extra_data.export.ZMQStreamer``, same
signatures; the sending is done by the one bridge sender (:mod:`kbstream.bridge.sender`),
so the behaviour per socket type is the replay's too:

* REP answers a bad request with ``Error: bad request <request>`` like the peer but keeps
  the train for the next good request (the peer loses it);
* PUB counts trains fed while nobody subscribes as dropped, not sent;
* an invalid ``protocol_version`` or socket type fails in the constructor, not in the thread;
* ``stop()`` / ``close()`` never block on a dead or slow client and memory stays bounded:
  the feed queue holds ``maxlen`` trains, sockets have HWM 1, a REP server refuses
  requests larger than 64 KiB;
* a train that cannot be serialized is skipped and counted in :attr:`errors`, the server
  goes on.

Life cycle (docs/conventions.md): the constructor binds, :meth:`start` starts the sending
thread, :meth:`close` (also :meth:`stop`) ends it; ``with`` does both.  Servers send with
``copy=False``: the arrays fed in are sent from their own memory, so do not modify them
after :meth:`feed`.  Sockets close with linger 0 (trains not yet sent are dropped, like the
peer).
"""

import collections
import queue
import threading
import time

from .._lifecycle import Lifecycle
from ..errors import ServerStateError
from . import codec, sender as _sender

__all__ = ["ServerInThread", "ZMQStreamer"]


class ServerInThread(Lifecycle):
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
        Context to create the socket in (not terminated by :meth:`close`).

    Notes
    -----
    Counters: :attr:`trains_sent`, :attr:`trains_dropped`, :attr:`bad_requests`,
    :attr:`errors` (trains that failed to serialize), :attr:`queue_depth`, :attr:`rate`.
    """

    _state_error = ServerStateError

    def __init__(self, endpoint, sock="REP", maxlen=10, protocol_version="2.2",
                 dummy_timestamps=False, *, context=None):
        Lifecycle.__init__(self)
        if sock not in _sender.SOCKET_TYPES:
            raise ValueError(f"Unsupported socket type: {sock}")
        if protocol_version not in codec.ENCODE_VERSIONS:
            raise ValueError(f"Unknown protocol version {protocol_version}")
        self.sock_type = sock
        self.protocol_version = protocol_version
        self.dummy_timestamps = dummy_timestamps
        self._sender = _sender.Sender(endpoint, sock, context=context, hwm=1)
        self._queue = queue.Queue(maxsize=maxlen)
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"kbstream-{sock}-server")
        self._send_times = collections.deque(maxlen=11)
        self.errors = 0

    # -- public API ---------------------------------------------------------------------

    @property
    def endpoint(self):
        """The bound endpoint (``0.0.0.0`` replaced by the host name, as the peer does)."""
        return self._sender.endpoint

    @property
    def trains_sent(self):
        """Trains handed to the socket."""
        return self._sender.sent

    @property
    def trains_dropped(self):
        """PUB trains sent while nobody subscribed."""
        return self._sender.dropped

    @property
    def bad_requests(self):
        """REP requests other than ``next`` (answered with an error, train kept)."""
        return self._sender.bad_requests

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
            after :meth:`close`.
        """
        self._check_open("feed()")
        self._queue.put((data, metadata, None), block=block, timeout=timeout)

    # -- life cycle -----------------------------------------------------------------------

    def _start(self):
        self._thread.start()

    def _close(self):
        """Returns within about ``POLL_INTERVAL`` whatever the clients do."""
        self._stop_event.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sender.close(linger=0)

    # -- sending thread -------------------------------------------------------------------

    def _next_fed(self):
        try:
            return self._queue.get(timeout=_sender.POLL_INTERVAL)
        except queue.Empty:
            return _sender.EMPTY

    def _on_sent(self, _token, outcome, _tracker):
        if outcome is _sender.SENT:
            self._send_times.append(time.monotonic())

    def _on_error(self, _token, _exc):
        self.errors += 1

    def _run(self):
        _sender.run(self._sender, self._next_fed, self._stop_event,
                    protocol_version=self.protocol_version,
                    dummy_timestamps=self.dummy_timestamps,
                    on_sent=self._on_sent, on_error=self._on_error)


class ZMQStreamer(ServerInThread):
    """``extra_data.export.ZMQStreamer``: a :class:`ServerInThread` bound to a port.

    ``port`` is a port number (binds ``tcp://*:PORT``, all interfaces; 0 = random, read
    :attr:`endpoint`) or, as an extension, any endpoint string.  No deprecation warning.
    """

    def __init__(self, port, sock="REP", maxlen=10, protocol_version="2.2",
                 dummy_timestamps=False, *, context=None):
        super().__init__(port, sock=sock, maxlen=maxlen, protocol_version=protocol_version,
                         dummy_timestamps=dummy_timestamps, context=context)
