"""Payload fixtures for the benchmarks (run: ``pytest benchmarks`` or
``bash scripts/bench.sh``); the payloads themselves are in payloads.py.
"""

import numpy as np
import pytest

from payloads import make_train

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="session")
def module_train():
    return make_train(1)


@pytest.fixture(scope="session")
def jf4m_train():
    return make_train(8)


@pytest.fixture(scope="session", params=["module", "jf4m"])
def train(request):
    """(name, data, metadata, payload bytes) for both payloads."""
    data, meta = request.getfixturevalue(f"{request.param}_train")
    nbytes = sum(v.nbytes for p in data.values() for v in p.values() if isinstance(v, np.ndarray))
    return request.param, data, meta, nbytes
