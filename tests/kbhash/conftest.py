"""Fixtures of the kbhash tests: both codec implementations, the golden vectors."""

import json
from pathlib import Path

import pytest

from kbhash import _pure

try:
    from kbhash import _codec
except ImportError:  # reported by test_package.py; here only the pure codec runs
    _codec = None

VECTORS_DIR = Path(__file__).resolve().parents[1] / "data"


def load_hash_vectors():
    with open(VECTORS_DIR / "karabo_hash_vectors.json") as f:
        return json.load(f)["vectors"]


IMPLS = {"pure": _pure, "cython": _codec}


@pytest.fixture(params=["cython", "pure"])
def codec(request):
    """The kbhash codec module under test: compiled or pure-Python."""
    mod = IMPLS[request.param]
    if mod is None:
        pytest.fail("kbhash._codec is not built")
    return mod


@pytest.fixture(scope="session")
def karabo_peer():
    """Karabo's own codecs (karabind, karabo.native) in the Python 3.12 side environment.

    Skipped loudly when the side environment is missing; with CI set, a failure.
    """
    from peers.karabo import KaraboPeer, require_karabo_python

    peer = KaraboPeer(require_karabo_python())
    try:
        yield peer
    finally:
        peer.close()
