"""Blocking socket helpers shared by the pipeline's output and input channels."""

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


def sendmsg_all(sock, buffers):
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


def close(sock):
    """Shut down and close, ignoring a socket that is already gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
