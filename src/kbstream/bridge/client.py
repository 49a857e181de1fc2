"""Karabo Bridge client (``karabo_bridge.Client``), with the peer's traps fixed.

* A REQ client survives a timeout: its socket is replaced, so the next ``next()`` sends a
  fresh request and a late reply to the old one is never returned (the "lazy pirate"
  pattern; ``REQ_RELAXED`` would race with the server's HWM of 1).
* A context passed in is never terminated; a malformed message raises a
  :class:`~kbstream.ProtocolError` and the client stays usable.
* Receive memory: see :func:`kbstream.keep_large_buffers`.
* Hostile servers: a frame larger than ``max_message_size`` (default 2 GiB) is refused
  by libzmq before it is allocated, and a message that would decode into more than
  ``max_containers`` msgpack maps and arrays raises
  :class:`~kbstream.errors.AmplificationError` (``docs/safety-bridge.md``).

The client connects when it is made, like the peer, so it has no ``start()``; ``close()``
(or leaving a ``with`` block) ends it.
"""

import zmq

from ..errors import ChannelTimeout, ServerStateError
from ._memory import keep_large_buffers
from ._rules import MAX_CONTAINERS, container_limit
from .codec import deserialize

__all__ = ["Client", "MAX_MESSAGE_SIZE"]

#: default receive limit of a :class:`Client`, per frame (bytes): a JF4M train in protocol
#: 1.0 is one 134 MB frame, an AGIPD module's data frame 46 MiB
MAX_MESSAGE_SIZE = 2 << 30

_CLIENT_SOCKETS = {"REQ": zmq.REQ, "SUB": zmq.SUB, "PULL": zmq.PULL}
#: connection events a SUB / PULL client watches
_MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


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
    max_message_size : int or None
        Largest frame accepted, in bytes (``ZMQ_MAXMSGSIZE``, set before connecting);
        default :data:`MAX_MESSAGE_SIZE` (2 GiB); ``None``: no limit (as
        ``karabo_bridge``).  libzmq checks the size a frame announces before it allocates
        it; a larger frame makes libzmq drop the connection to that server silently, so
        :meth:`next` raises :class:`~kbstream.ChannelTimeout` when ``timeout`` runs out
        (with ``timeout=None`` it keeps waiting).  Then a REQ client connects afresh and
        asks again on the next call; a SUB or PULL client sees at that timeout that its
        connection is gone and connects afresh on the next call
        (``docs/safety-bridge.md``).
    max_containers : int or None
        Most msgpack maps and arrays one message may decode into (all frames, any depth);
        default (None) :data:`kbstream.bridge.MAX_CONTAINERS` (1 << 20).  One more raises
        :class:`~kbstream.errors.AmplificationError` (a :class:`~kbstream.ProtocolError`)
        and the client stays usable.

    Notes
    -----
    ``next()`` returns ``(data, meta)``; the client is an iterator and a context manager
    (``close()`` on exit).  A REQ client recovers from a timeout: the next call reconnects
    and sends a new request; a late reply to the old one is never returned.  A malformed message raises
    :class:`~kbstream.ProtocolError` and the next call works.
    """

    def __init__(self, endpoint, sock="REQ", ser="msgpack", timeout=None, context=None, *,
                 keep_buffers=True, max_message_size=MAX_MESSAGE_SIZE, max_containers=None):
        if ser != "msgpack":
            raise ValueError("Only serialization supported is msgpack")
        if sock not in _CLIENT_SOCKETS:
            raise NotImplementedError(f"Unsupported socket: {sock}")
        self._max_message_size = _message_size_limit(max_message_size)
        limit = container_limit(max_containers)
        self._max_containers = None if limit == MAX_CONTAINERS else limit
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
        self._monitor = None
        self._last_event = None
        try:
            self._socket = self._make_socket()
        except BaseException:
            self.close()
            raise

    def _make_socket(self):
        sock = self._context.socket(_CLIENT_SOCKETS[self._pattern])
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_message_size)
            sock.set_hwm(1)
            if self._pattern == "SUB":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            if self._timeout is not None:
                sock.setsockopt(zmq.RCVTIMEO, int(self._timeout * 1000))
            if self._pattern != "REQ":
                # connection events, read only after a timeout (see _connection_lost)
                self._monitor = sock.get_monitor_socket(_MONITORED)
            sock.connect(self._endpoint)
        except BaseException:
            self._drop_socket(sock)
            raise
        return sock

    def _drop_socket(self, sock):
        """Close ``sock`` (linger 0) and its monitor, if any."""
        if self._monitor is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        sock.close(linger=0)

    def _connection_lost(self):
        """Whether the last connection event of a SUB / PULL socket is a disconnect with
        no reconnect after it.  libzmq drops a connection whose peer sent a frame over
        ``max_message_size`` and, as for any protocol error, never reconnects it (a peer
        that went away gets a retry, which comes as its own event)."""
        last = None
        while True:
            try:
                msg = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            event = int.from_bytes(msg[0][:2], "little")
            if event & _MONITORED:
                last = event
        if last is not None:
            self._last_event = last
        return self._last_event == zmq.EVENT_DISCONNECTED

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
            if self._pattern == "REQ" or self._connection_lost():
                # REQ: the request stays outstanding at the server: drop this socket so
                # its late reply goes nowhere; the next call connects afresh and asks
                # again.  SUB / PULL: the connection was dropped for good (a frame over
                # max_message_size): the next call connects afresh.
                self._drop_socket(sock)
                self._socket = None
                self._awaiting = False
                self._last_event = None
            raise ChannelTimeout(
                f"No data received from {self._endpoint} in the last "
                f"{int(self._timeout * 1000)} ms",
                self._endpoint,
                self._timeout,
            ) from None
        self._awaiting = False
        return deserialize(frames, max_containers=self._max_containers)

    def close(self):
        """Close the socket (linger 0); terminate the context only if the client made it."""
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            self._drop_socket(self._socket)
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


def _message_size_limit(value):
    """``ZMQ_MAXMSGSIZE`` for ``max_message_size``: -1 (no limit) for None."""
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_message_size must be an int or None, got {type(value).__name__}")
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"max_message_size must be in [0, 2**63), got {value}")
    return value
