"""Shared bits of the stream tools: the client for a server socket type, array sizes."""

import numpy as np

from ..bridge import Client

#: the client pattern that talks to each server socket type
CLIENT_FOR = {"REP": "REQ", "PUB": "SUB", "PUSH": "PULL"}


def connect(endpoint, server_socket="REP", timeout=None):
    """A :class:`kbstream.Client` for a server of ``server_socket`` type at ``endpoint``."""
    if endpoint.isdigit():
        endpoint = f"tcp://localhost:{endpoint}"
    return Client(endpoint, sock=CLIENT_FOR[server_socket], timeout=timeout)


def train_nbytes(data):
    """Bytes of the arrays of one train."""
    return sum(v.nbytes for src in data.values() for v in src.values()
               if isinstance(v, np.ndarray))


def train_id(meta):
    """The train id of a train's metadata (the largest one among its sources), or None."""
    tids = [m.get("timestamp.tid") for m in meta.values() if isinstance(m, dict)]
    tids = [t for t in tids if isinstance(t, int)]
    return max(tids) if tids else None
