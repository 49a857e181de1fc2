"""Karabo Bridge client (``karabo_bridge.Client``), with the peer's traps fixed.

* A REQ client survives a timeout: its socket is replaced, so the next ``next()`` sends a
  fresh request and a late reply to the old one is never returned (the "lazy pirate"
  pattern; ``REQ_RELAXED`` would race with the server's HWM of 1).
* A context passed in is never terminated; a malformed message raises a
  :class:`~kbstream.ProtocolError` and the client stays usable.
* Receive memory: see :func:`kbstream.keep_large_buffers`.

The client connects when it is made, like the peer, so it has no ``start()``; ``close()``
(or leaving a ``with`` block) ends it.
"""

import zmq

from ..errors import ChannelTimeout, ServerStateError
from ._memory import keep_large_buffers
from .codec import deserialize

__all__ = ["Client"]

_CLIENT_SOCKETS = {"REQ": zmq.REQ, "SUB": zmq.SUB, "PULL": zmq.PULL}


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
