"""Shared fixtures for the whole test suite.

* ``impl``: every codec test runs on the compiled codec and on its pure-Python twin.
* ``ipc_endpoint`` / ``tcp_endpoint`` / ``endpoint``: ZeroMQ endpoints that only listen
  locally (``ipc://`` under ``tmp_path``, ``tcp://127.0.0.1`` on a free port).
* ``vectors_dir``: ``/work/shared/vectors`` (golden bytes from the real producers).
"""

import importlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HYPOTHESIS_PROFILE", "default")


@pytest.fixture(params=["cython", "pure"])
def impl(request):
    """The bridge codec module: ``kbstream.bridge._codec`` or its twin ``kbstream.bridge._pure``."""
    name = {"cython": "kbstream.bridge._codec", "pure": "kbstream.bridge._pure"}[request.param]
    return importlib.import_module(name)


@pytest.fixture
def vectors_dir():
    """Folder of the shared golden vectors (read-only)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "vectors"


@pytest.fixture
def ipc_endpoint(tmp_path):
    """A fresh ``ipc://`` endpoint in the test's temporary directory."""
    return f"ipc://{tmp_path}/kbstream.sock"


@pytest.fixture
def tcp_endpoint():
    """``tcp://127.0.0.1:<free port>`` (a port the OS just handed out, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


@pytest.fixture(params=["ipc", "tcp"])
def endpoint(request, tmp_path):
    """Both kinds of local endpoint, one test each."""
    if request.param == "ipc":
        return f"ipc://{tmp_path}/kbstream.sock"
    return request.getfixturevalue("tcp_endpoint")
