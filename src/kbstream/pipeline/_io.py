"""Blocking socket helpers of the pipeline's input channel (the output never blocks: output.py)."""

import socket

from .errors import ConnectionLost

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def recv_into(sock, view):
    """Fill ``view`` completely from ``sock``; ConnectionLost (a ConnectionError) on EOF."""
    got = 0
    n = view.nbytes
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionLost("connection closed by peer")
        got += k
        if _QUICKACK is not None:
            # Acknowledge at once: a sender with Nagle's algorithm on (Karabo's C++
            # output) holds the tail of a message back until the previous segment is
            # acknowledged, and delayed acknowledgements would stall every message.
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


def recv_exact(sock, n):
    """``n`` bytes from ``sock`` as a new bytearray."""
    buf = bytearray(n)
    recv_into(sock, memoryview(buf))
    return buf
