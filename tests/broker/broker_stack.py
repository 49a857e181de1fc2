"""Real RabbitMQ and karabo-cppserver processes for the broker interop tests.

Everything listens on 127.0.0.1 only and keeps its state in a temporary directory
(docs/peers.md, section 5.2). Every process leads its own process group and is stopped with
SIGTERM, then SIGKILL after a grace period, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RMQ_BIN = Path("/usr/lib/rabbitmq/bin")
HERE = Path(__file__).resolve().parent
CLIENT_SCRIPT = HERE / "karabind_client.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, seconds, proc=None, what="") -> None:
    end = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before listening "
                                   f"on 127.0.0.1:{port}")
            if time.monotonic() > end:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s "
                                   f"({what})")
            time.sleep(0.05)


def stop_process(proc, grace=15.0) -> None:
    """SIGTERM to the process group, wait, then SIGKILL; never raises."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def rabbitmq_available() -> bool:
    return (RMQ_BIN / "rabbitmq-server").exists()


class RabbitMQ:
    """A private RabbitMQ node on 127.0.0.1; ``start()`` / ``stop()`` may be repeated
    (same ports and state: a broker restart)."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.port = free_port()
        self.epmd_port = free_port()
        self.dist_port = free_port()
        self.ctl_port = free_port()
        self.node = f"kbtest{self.port}@localhost"
        r = self.base
        for d in ("home", "mnesia", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "enabled_plugins").write_text("[].\n")
        (r / "rabbitmq-env.conf").write_text("")
        (r / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.console = true\nlog.console.level = warning\nlog.file = false\n")
        self.env = dict(os.environ)
        self.env.update({
            "HOME": str(r / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(r / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(r / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
            "RABBITMQ_LOG_BASE": str(r / "log"),
            "RABBITMQ_PID_FILE": str(r / "rabbit.pid"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(self.ctl_port),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(self.ctl_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}"
        self.epmd = None
        self.server = None
        self._logs = []

    def _popen(self, cmd, logname):
        log = open(self.base / logname, "ab")
        self._logs.append(log)
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=0)

    def start(self, timeout=90.0):
        if self.epmd is None or self.epmd.poll() is not None:
            # own epmd in the foreground: Erlang would otherwise daemonize one that stays
            self.epmd = self._popen(["epmd", "-address", "127.0.0.1", "-port",
                                     str(self.epmd_port)], "epmd.out")
            wait_port(self.epmd_port, 10, self.epmd, "epmd")
        self.server = self._popen([str(RMQ_BIN / "rabbitmq-server")], "server.out")
        try:
            wait_port(self.port, timeout, self.server, "rabbitmq-server")
        except Exception:
            out = (self.base / "server.out").read_text(errors="replace")[-3000:]
            self.stop()
            raise RuntimeError(f"RabbitMQ did not start:\n{out}") from None

    def stop_server(self):
        stop_process(self.server)
        self.server = None

    def stop(self):
        self.stop_server()
        stop_process(self.epmd, grace=5)
        self.epmd = None
        for f in self._logs:
            f.close()
        self._logs.clear()

    def ctl(self, *args, timeout=30):
        """``rabbitmqctl -q -n <node> ARGS`` -> stdout."""
        cp = subprocess.run([str(RMQ_BIN / "rabbitmqctl"), "-q", "-n", self.node, *args],
                            env=self.env, capture_output=True, text=True, timeout=timeout)
        if cp.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {cp.stderr.strip()}")
        return cp.stdout


def karabo_bin(python: str) -> Path:
    out = subprocess.run([python, "-c", "import karabo_cpp, os; "
                          "print(os.path.join(karabo_cpp.__path__[0], 'bin'))"],
                         capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"karabo_cpp not importable in {python}: {out.stderr[-500:]}")
    return Path(out.stdout.strip())


class CppServer:
    """A ``karabo-cppserver`` with PropertyTest devices (docs/peers.md, section 5.3)."""

    def __init__(self, kbin: Path, base: Path, broker_url: str, topic: str, server_id: str,
                 devices: dict):
        self.kbin = kbin
        self.base = Path(base)
        self.server_id = server_id
        self.devices = devices
        karabo = self.base / "karabo"
        for d in ("plugins", "var/data", "var/log"):
            (karabo / d).mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, KARABO=str(karabo), KARABO_BROKER=broker_url,
                        KARABO_BROKER_TOPIC=topic)
        self.proc = None
        self.log_path = self.base / f"{server_id}.out"

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [str(self.kbin / "karabo-cppserver"), f"serverId={self.server_id}",
                 "heartbeatInterval=10", "log.level=WARN",
                 "init=" + json.dumps(self.devices)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                process_group=0, cwd=str(self.base))
        finally:
            log.close()
        return self

    def stop(self):
        stop_process(self.proc, grace=15)

    def log_tail(self, n=3000):
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class KarabindClient:
    """``karabind_client.py`` in the side interpreter: JSON lines in and out."""

    def __init__(self, python: str, env: dict, args, log_path: Path):
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([python, "-u", str(CLIENT_SCRIPT), *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1, process_group=0)
        import queue
        import threading

        self.lines = queue.Queue()
        self.events = []

        def reader():
            for line in self.proc.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = {"event": "text", "text": line.rstrip()}
                self.events.append(msg)
                self.lines.put(msg)
            self.lines.put(None)

        self._reader = threading.Thread(target=reader, daemon=True)
        self._reader.start()

    def wait_for(self, pred, timeout, since=0):
        """The first message (from index ``since`` of :attr:`events`) matching ``pred``."""
        end = time.monotonic() + timeout
        while True:
            for msg in self.events[since:]:
                if pred(msg):
                    return msg
            if self.proc.poll() is not None and self.lines.empty():
                raise RuntimeError(f"karabind client ended (rc={self.proc.returncode})")
            if time.monotonic() > end:
                raise TimeoutError(f"no matching message from the karabind client in {timeout} s")
            time.sleep(0.05)

    def send(self, command: dict):
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def command(self, command: dict, timeout=30):
        since = len(self.events)
        self.send(command)
        return self.wait_for(lambda m: m.get("reply") == command["cmd"], timeout, since)

    def close(self):
        try:
            if self.proc.poll() is None:
                self.send({"cmd": "quit"})
                self.proc.wait(10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        stop_process(self.proc, grace=5)
        self._reader.join(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.log.close()


def run_json(python, args, env, timeout):
    """Run ``karabind_client.py ARGS`` to completion; return its last JSON line."""
    cp = subprocess.run([python, "-u", str(CLIENT_SCRIPT), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("{")]
    if cp.returncode or not lines:
        raise RuntimeError(f"karabind_client {args} failed ({cp.returncode}):\n"
                           f"{cp.stdout[-2000:]}\n{cp.stderr[-3000:]}")
    return json.loads(lines[-1])


def wait_until(pred, timeout, interval=0.05, what="condition"):
    """Poll ``pred()`` until true; raise TimeoutError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def wait_ready(inst, iid, timeout=30):
    """Until ``iid`` answers ``slotPing`` and its ``state`` is no longer ``INIT``: a C++
    device answers pings ~2 s after its server starts but refuses commands such as
    ``writeOutput`` ("not allowed in current state INIT") a moment longer."""
    def ping():
        try:
            return inst.request(iid, "slotPing", 1, timeout=1.0)
        except Exception:
            return None

    def ready():
        try:
            config = inst.request(iid, "slotGetConfiguration", timeout=2.0)[0]
        except Exception:
            return None
        return "state" not in config or config["state"] != "INIT"

    answer = wait_until(ping, timeout, interval=0.2, what=f"{iid} online")
    wait_until(ready, timeout, interval=0.2, what=f"{iid} out of state INIT")
    return answer


def require(ok: bool, reason: str):
    """Fail under CI, skip (with the reason, listed by ``-ra``) otherwise."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the broker interop tests must run)", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {reason}")


__all__ = ["wait_until", "wait_ready", "require", "RabbitMQ", "CppServer", "KarabindClient", "free_port", "stop_process",
           "rabbitmq_available", "karabo_bin", "run_json", "sys"]
