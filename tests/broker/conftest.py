"""Fixtures of the broker tests: a private RabbitMQ, a karabo-cppserver, karabind clients.

* ``rabbitmq`` (session): RabbitMQ on 127.0.0.1 with all state in a temp dir, stopped at
  the end (docs/peers.md, section 5.2).
* ``topic``: a fresh ``KARABO_BROKER_TOPIC`` per test, so tests never see each other.
* ``karabo_python``: the Python 3.12 side interpreter with karabo.cpp (``KBSTREAM_KARABO_PYTHON``
  or ``<repo>/.venv-karabo/bin/python``).
* ``cpp_server``: factory for ``karabo-cppserver`` processes with PropertyTest devices.
* ``karabind_client``: factory for ``karabind_client.py client`` (a tracking DeviceClient).

When RabbitMQ or the side interpreter is missing the interop tests fail under CI (``CI``
set) and are skipped with the reason otherwise; install them with ``scripts/rabbitmq.sh``
and ``scripts/karabo-env.sh``.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import pytest

from broker_stack import require  # noqa: F401  (tests and fixtures call it)
from broker_stack import CppServer, KarabindClient, RabbitMQ, karabo_bin, rabbitmq_available

REPO = Path(__file__).resolve().parents[2]


def _karabo_python():
    explicit = os.environ.get("KBSTREAM_KARABO_PYTHON")
    if explicit:
        return explicit
    default = REPO / ".venv-karabo" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    require(rabbitmq_available(),
            "RabbitMQ is not installed (/usr/lib/rabbitmq/bin/rabbitmq-server); "
            "run `bash scripts/rabbitmq.sh`")
    require(importlib.util.find_spec("pika") is not None,
            "pika is not installed (the `broker` extra): pip install 'kbstream[broker]'")
    r = RabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def topic():
    return f"kbt{uuid.uuid4().hex[:10]}"


@pytest.fixture
def broker_env(rabbitmq, topic, monkeypatch):
    """``KARABO_BROKER`` / ``KARABO_BROKER_TOPIC`` of the private broker, set for the test."""
    monkeypatch.setenv("KARABO_BROKER", rabbitmq.url)
    monkeypatch.setenv("KARABO_BROKER_TOPIC", topic)
    return {"KARABO_BROKER": rabbitmq.url, "KARABO_BROKER_TOPIC": topic}


@pytest.fixture(scope="session")
def karabo_python():
    py = _karabo_python()
    require(bool(py) and Path(py).exists(),
            "no Karabo side interpreter (.venv-karabo): run `bash scripts/karabo-env.sh "
            ".venv-karabo` or set KBSTREAM_KARABO_PYTHON")
    return py


@pytest.fixture(scope="session")
def karabo_bin_dir(karabo_python):
    return karabo_bin(karabo_python)


@pytest.fixture
def cpp_server(karabo_bin_dir, rabbitmq, topic, tmp_path):
    """``cpp_server(devices, server_id="kbServer")`` -> started :class:`CppServer`."""
    servers = []

    def start(devices, server_id="kbServer"):
        s = CppServer(karabo_bin_dir, tmp_path, rabbitmq.url, topic, server_id, devices)
        servers.append(s)
        return s.start()

    yield start
    for s in reversed(servers):
        s.stop()


@pytest.fixture
def karabind_client(karabo_python, broker_env, tmp_path):
    """``karabind_client()`` -> running :class:`KarabindClient` (DeviceClient, tracking)."""
    clients = []
    env = dict(os.environ, **broker_env)

    def start(client_id=None):
        cid = client_id or f"kbTopologyCheck-{len(clients)}"
        c = KarabindClient(karabo_python, env, ["client", cid],
                           tmp_path / f"karabind-{cid}.log")
        clients.append(c)
        c.wait_for(lambda m: m.get("event") == "ready", 60)
        return c

    yield start
    for c in clients:
        c.close()


@pytest.fixture
def instances(broker_env):
    """``make(iid, **kw)``: BrokerInstances on the private broker (not started), stopped
    after the test in reverse order."""
    from kbstream.broker import BrokerInstance

    made = []

    def make(iid, **kw):
        inst = BrokerInstance(iid, **kw)
        made.append(inst)
        return inst

    yield make
    for inst in reversed(made):
        inst.stop()
