"""A real ``karabo-middlelayerserver`` (Karabo's asyncio middle layer) for the interop tests.

The server runs in the Karabo side environment (``KBSTREAM_KARABO_PYTHON``), where
scripts/karabo-env.sh installed ``karabo-karathon``, ``karabo-hdf5writer`` and the test
devices of tests/peers/mdl (``KbMdlSource``, ``KbMdlSink``). It talks to the suite's private
RabbitMQ on its own topic, leads its own process group, and is stopped with SIGTERM (then
SIGKILL after a grace period), also when a test fails.

Fixtures (import them into a test module): ``mdl_server`` -- a factory
``mdl_server(devices, classes, server_id="mdlServer", extra=())`` -> started
:class:`MdlServer`, with every device of ``devices`` answering ``slotPing`` (its
``slotInstanceNew`` went out) before it returns; ``probe`` -- a started kbstream
:class:`BrokerInstance` used to wait for instances and to call their slots.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from broker_stack import stop_process, wait_until


REPO = Path(__file__).resolve().parents[2]


def side_bin(python: str, program: str) -> str:
    """``program`` next to the side interpreter (the venv's console scripts)."""
    return str(Path(python).parent / program)


class MdlServer:
    """``karabo-middlelayerserver serverId=... deviceClasses=... init=<JSON>``."""

    def __init__(self, python: str, base: Path, broker_url: str, topic: str, server_id: str,
                 classes, devices: dict, extra=()):
        self.python = python
        self.server_id = server_id
        self.devices = devices
        karabo = Path(base) / f"karabo-{server_id}"
        for d in ("plugins", "var/data", "var/log"):
            (karabo / d).mkdir(parents=True, exist_ok=True)
        self.karabo = karabo
        # the test devices are imported from this tree (the installed copy of
        # tests/peers/mdl provides the entry points; its code may be older)
        self.env = dict(os.environ, KARABO=str(karabo), KARABO_BROKER=broker_url,
                        KARABO_BROKER_TOPIC=topic, PYTHONPATH=str(REPO / "tests/peers/mdl"))
        self.cmd = [side_bin(python, "karabo-middlelayerserver"), f"serverId={server_id}",
                    "deviceClasses=" + ",".join(classes), "log.level=INFO",
                    "heartbeatInterval=10", *extra, "init=" + json.dumps(devices)]
        self.log_path = Path(base) / f"{server_id}.out"
        self.proc = None

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         process_group=0, cwd=str(self.karabo))
        return self

    def stop(self):
        stop_process(self.proc, grace=20)

    def log_tail(self, n=4000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def wait_online(inst, iid, timeout=60, server=None):
    """Until ``iid`` answers ``slotPing`` (it announced itself)."""
    def ping():
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"{server.server_id} exited ({server.proc.returncode}):\n"
                               f"{server.log_tail()}")
        try:
            return inst.request(iid, "slotPing", 1, timeout=2.0)
        except Exception:
            return None
    return wait_until(ping, timeout, interval=0.3, what=f"{iid} online")


@pytest.fixture
def probe(broker_env):
    from kbstream.broker import BrokerInstance
    inst = BrokerInstance("kbProbe", heartbeat_interval=10)
    inst.start()
    yield inst
    inst.stop()


@pytest.fixture
def mdl_server(karabo_python, rabbitmq, topic, tmp_path, probe):
    servers = []

    def start(devices, classes, server_id="mdlServer", extra=()):
        s = MdlServer(karabo_python, tmp_path, rabbitmq.url, topic, server_id, classes,
                      devices, extra)
        servers.append(s)
        s.start()
        for iid in devices:
            wait_online(probe, iid, 90, server=s)
        return s

    yield start
    for s in reversed(servers):
        s.stop()
