"""Channel monitors against real Karabo 3.1.2 on a real RabbitMQ (docs/peers.md, section 5).

(a) ``BrokerInstance.register_channel_monitor`` and karabind's
``DeviceClient.registerChannelMonitor`` watch the same output of a C++ PropertyTest device in
karabo-cppserver and receive the same items (train id, source, every key, type and value;
arrays compared by dtype, shape and digest), also after the server was killed and started
again with the same ids; both refuse a second registration; unregister ends kbstream's
monitor (no handler call after it while karabind's still receives, input closed, no thread
left). (b) ``kbstream monitor DEVICE:CHANNEL`` prints the items of a kbstream output found
by name, ends after ``--ntrains`` and on SIGINT, and gives up with a typed error on an output
nobody answers for.
"""

import hashlib
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from kbhash import Hash, HashType

import broker_stack
from broker_stack import KarabindClient, stop_process, wait_until, wait_ready
from kbstream.broker import BrokerInstance, RemoteError
from kbstream.pipeline import ConnectionStatus, OutputChannel

pytestmark = pytest.mark.karabo

KB_DEV = {"kbDev": {"classId": "PropertyTest", "heartbeatInterval": 10,
                    "output": {"hostname": "127.0.0.1"}}}
MONITOR_SCRIPT = broker_stack.HERE / "karabind_monitor.py"


def digest(a):
    a = np.ascontiguousarray(a)
    return [str(a.dtype), list(a.shape), hashlib.sha1(a.tobytes()).hexdigest()]


def leaves(h):
    """The item as karabind_monitor.py reports it: ``[[path, kind, value], ...]``."""
    res = []
    for path in h.paths():
        value = h[path]
        kind = h.get_type(path).name
        if kind.startswith("VECTOR_") and isinstance(value, np.ndarray):
            res.append([path, "vector", value.tolist()])
        elif isinstance(value, np.ndarray):
            res.append([path, "array", digest(value)])
        elif hasattr(value, "pixels"):  # ImageData
            res.append([path + ".pixels.data", "array", digest(value.pixels)])
        else:
            res.append([path, "scalar", value])
    return sorted(res)


@pytest.fixture
def karabind_monitor(karabo_python, broker_env, tmp_path, monkeypatch):
    """``karabind_monitor(client_id, channel)`` -> running KarabindClient of
    karabind_monitor.py (registered)."""
    made = []
    env = dict(os.environ, **broker_env)

    def start(client_id, channel):
        monkeypatch.setattr(broker_stack, "CLIENT_SCRIPT", MONITOR_SCRIPT)
        c = KarabindClient(karabo_python, env, [client_id, channel],
                           tmp_path / f"{client_id}.log")
        made.append(c)
        assert c.wait_for(lambda m: m.get("event") == "registered", 60)["ok"] is True
        return c

    yield start
    for c in made:
        c.close()


@pytest.fixture
def instance(broker_env):
    made = []

    def make(iid, **kw):
        made.append(BrokerInstance(iid, **kw).start())
        return made[-1]

    yield make
    for i in reversed(made):
        i.stop()


def kill_hard(server):
    """SIGKILL the C++ server's process group: no goodbye, sockets closed by the kernel."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(20)


def cpp_items(client):
    return [(m["tid"], m["source"], m["leaves"]) for m in client.events
            if m.get("event") == "data"]


def counter(item):
    return next(v for p, _, v in item[2] if p == "node.int32")


def write_until_both_have(peer, ours, client, what):
    """``writeOutput`` until both monitors got an item of the same counter (the first items
    may reach only one of them: an output drops data for an input whose hello it has not
    registered yet); returns that counter."""
    for _ in range(60):
        peer.request("kbDev", "writeOutput", timeout=5)
        try:
            wait_until(lambda: ours and cpp_items(client)
                       and counter(ours[-1]) == counter(cpp_items(client)[-1]), 2, what=what)
            return counter(ours[-1])
        except TimeoutError:
            continue
    pytest.fail(f"{what}: the two monitors never received the same item")


def compare_next_items(peer, ours, client, n):
    """Write ``n`` items one at a time; each must reach both monitors identically."""
    for _ in range(n):
        a, b = len(ours), len(cpp_items(client))
        peer.request("kbDev", "writeOutput", timeout=5)
        wait_until(lambda: len(ours) > a and len(cpp_items(client)) > b, 20,
                   what="the item on both monitors")
        assert len(ours) == a + 1 and len(cpp_items(client)) == b + 1
        assert ours[-1] == cpp_items(client)[-1]


def test_same_items_as_karabind_monitor_also_after_server_restart_and_unregister(
        instance, cpp_server, karabind_monitor):
    server = cpp_server(KB_DEV)
    peer = instance("kbMonPy", instance_type="client")
    wait_ready(peer, "kbDev")
    cpp = karabind_monitor("kbMonCpp", "kbDev:output")
    ours, statuses = [], []

    def on_data(data, meta):
        ours.append((meta.tid, meta.source, leaves(data)))

    # a retry timer far beyond the test's waits: only the device's announcement
    # (slotInstanceNew) can bring the connection back after the restart
    assert peer.register_channel_monitor("kbDev:output", data_handler=on_data,
                                         status_tracker=statuses.append,
                                         config={"reconnect_interval": 600}) is True
    # a second registration is refused by both, with either separator
    assert peer.register_channel_monitor("kbDev@output") is False
    since = len(cpp.events)
    cpp.send({"cmd": "register"})
    assert cpp.wait_for(lambda m: m.get("event") == "registered", 30, since)["ok"] is False
    wait_until(lambda: ConnectionStatus.CONNECTED in statuses, 30, what="kbstream connected")
    mon = peer.channel_monitor("kbDev:output")
    assert mon.input.on_slowness == "drop" and mon.input.max_queue_length == 2

    write_until_both_have(peer, ours, cpp, "first common item")
    compare_next_items(peer, ours, cpp, 4)
    paths = [p for p, _, _ in ours[-1][2]]
    assert paths == ["node.image.pixels.data", "node.int32", "node.ndarray", "node.string",
                     "node.vecInt64"]
    assert ours[-1][1] == "kbDev:output"

    # the server dies without a word and comes back with the same ids (new port)
    kill_hard(server)
    wait_until(lambda: statuses[-1] == ConnectionStatus.DISCONNECTED, 30, what="disconnected")
    seen = len(statuses)
    server = cpp_server(KB_DEV)
    wait_until(lambda: statuses[-1] == ConnectionStatus.CONNECTED, 60, what="reconnected")
    assert ConnectionStatus.CONNECTING in statuses[seen:]
    wait_until(lambda: cpp.events[-1].get("status") == "CONNECTED"
               and sum(e.get("status") == "DISCONNECTED" for e in cpp.events) >= 1, 60,
               what="karabind's monitor reconnected")
    write_until_both_have(peer, ours, cpp, "first common item after the restart")
    compare_next_items(peer, ours, cpp, 3)

    # a channel the device does not have: a typed error from the device's real answer
    assert peer.register_channel_monitor("kbDev:nope", config={"reconnect_interval": 0.5})
    nope = peer.channel_monitor("kbDev:nope")
    wait_until(lambda: isinstance(nope.last_error, RemoteError), 20, what="no such channel")
    assert peer.unregister_channel_monitor("kbDev:nope")

    # unregister: no handler call after it, input closed, its threads gone
    assert peer.unregister_channel_monitor("kbDev:output") is True
    assert mon.input.closed
    assert not [t.name for t in threading.enumerate() if "kbMonPy:kbDev:" in t.name]
    n = len(ours)
    for _ in range(3):  # one at a time: karabind's monitor drops what comes too fast
        b = len(cpp_items(cpp))
        peer.request("kbDev", "writeOutput", timeout=5)
        wait_until(lambda: len(cpp_items(cpp)) > b, 20, what="karabind still receives")
    assert len(ours) == n
    assert peer.unregister_channel_monitor("kbDev:output") is False
    assert server.proc.poll() is None


# ---- kbstream monitor DEVICE:CHANNEL --------------------------------------------------------

LINE = re.compile(r"^tid (\d+)  kbPeer:output  (- Hz|\d+\.\d Hz)  "
                  r"node\.int32 INT32 \| node\.ndarray float32 \(4, 5\)$")


def _item(i):
    h = Hash()
    h.set("node.int32", i, type=HashType.INT32)
    h.set("node.ndarray", np.full((4, 5), i, np.float32))
    return h


def _send(out, input_id, i):
    for _ in range(400):
        before = out.stats()[input_id]["sent"]
        out.write(_item(i), {"tid": 1000 + i})
        out.update(timeout=10)
        if out.stats()[input_id]["sent"] > before:
            return
        threading.Event().wait(0.025)
    pytest.fail(f"item {i} never sent: {out.stats()}")


def _cli(rabbitmq, topic, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "kbstream", "monitor", *args, "--broker",
                             rabbitmq.url, "--topic", topic],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            process_group=0)


def _wait_line(stream, pattern, timeout=60):
    """Read ``stream`` lines until one contains ``pattern``, in a thread (bounded)."""
    found, lines = threading.Event(), []

    def read():
        for line in stream:
            lines.append(line)
            if pattern in line:
                found.set()
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert found.wait(timeout), f"no line with {pattern!r}: {lines}"
    return lines


@pytest.fixture
def kbpeer_output(instance):
    out = OutputChannel("kbPeer:output", hostname="127.0.0.1").start()
    peer = BrokerInstance("kbPeer", heartbeat_interval=10)
    peer.add_output_channel("output", out)
    peer.start()
    yield out
    peer.stop()
    out.close()


@pytest.mark.parametrize("end", ["ntrains", "sigint", "sigterm"])
def test_kbstream_monitor_cli_prints_items_of_an_output_found_by_name(
        rabbitmq, topic, broker_env, kbpeer_output, instance, end):
    out = kbpeer_output
    watcher = instance("kbWatch", track_heartbeats=True)
    gone = []
    watcher.on_instance_gone(lambda iid, info: gone.append(iid))
    args = ["kbPeer:output", "--instance-id", "kbCliMon"]
    if end == "ntrains":
        args += ["--ntrains", "3"]
    proc = _cli(rabbitmq, topic, *args)
    early = []
    try:
        _wait_line(proc.stderr, "kbPeer:output connected")
        out.wait_for_inputs(copy=["kbCliMon:kbPeer:output"], timeout=30)
        for i in (1, 2, 3):
            _send(out, "kbCliMon:kbPeer:output", i)
        if end in ("sigint", "sigterm"):
            wait_until(lambda: out.stats()["kbCliMon:kbPeer:output"]["sent"] >= 3, 10,
                       what="3 items sent")
            early = _wait_line(proc.stdout, "tid 1003", 30)
            proc.send_signal(signal.SIGINT if end == "sigint" else signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, stderr
    # with a signal the first lines were read while waiting for the third item;
    # the summary comes last for SIGTERM as for Ctrl-C
    lines = [ln for ln in "".join(early + [stdout]).splitlines() if ln]
    assert len(lines) == 4, lines
    tids = [int(LINE.match(ln).group(1)) for ln in lines[:3]]
    assert tids == [1001, 1002, 1003]
    assert LINE.match(lines[0]).group(2) == "- Hz"
    assert lines[3] == "kbPeer:output: 3 items, train ids 1001..1003"
    wait_until(lambda: "kbCliMon" in gone, 20, what="the tool's instance said goodbye")


def test_kbstream_monitor_cli_gives_up_on_an_output_nobody_answers_for(rabbitmq, topic,
                                                                       broker_env):
    proc = _cli(rabbitmq, topic, "kbNobody:output", "--connect-timeout", "4")
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        stop_process(proc)
    assert proc.returncode == 1, stderr
    assert "kbNobody:output not connected within 4.0 s (RequestTimeout:" in stderr
    assert stdout.splitlines() == ["kbNobody:output: 0 items, train ids None..None"]


# ---- dead and hostile outputs over the real broker ------------------------------------------

def _monitor_threads():
    return [t.name for t in threading.enumerate() if "kbMonDead:" in t.name]


@pytest.mark.parametrize("kind", ["silent", "swallows", "not a hash", "port text",
                                  "error reply"])
def test_dead_or_hostile_output_gives_typed_error_no_hang_no_thread_left(instance, kind):
    from kbstream.broker import RequestTimeout
    from kbstream.broker.errors import MessageError

    from kbstream.broker.dispatch import NO_REPLY

    expected = {"silent": RequestTimeout, "swallows": RequestTimeout, "not a hash": MessageError,
                "port text": MessageError, "error reply": RemoteError}[kind]
    asked = []
    if kind != "silent":
        bad = BrokerInstance("kbHostile", heartbeat_interval=10)

        def slot(arg=None, *_):
            asked.append(arg)
            if kind == "swallows":  # online, asked, never answers
                return NO_REPLY
            if kind == "error reply":
                raise RuntimeError("broken output")
            if kind == "not a hash":
                return "127.0.0.1:4000"
            info = Hash("connectionType", "tcp", "hostname", "127.0.0.1", "port", "4000")
            return Hash("success", True, "info", info)

        bad.register_slot("slotGetOutputChannelInformation", slot)
        bad.start()
    try:
        client = instance("kbMonDead", instance_type="client")
        statuses = []
        assert client.register_channel_monitor(
            "kbHostile:output", status_tracker=statuses.append,
            config={"request_timeout": 0.5, "reconnect_interval": 0.2})
        mon = client.channel_monitor("kbHostile:output")
        wait_until(lambda: mon.attempts >= 2 and isinstance(mon.last_error, expected), 30,
                   what=f"{expected.__name__} twice")
        assert bool(asked) is (kind != "silent")
        assert statuses == [] and mon.status == ConnectionStatus.DISCONNECTED
        assert client.unregister_channel_monitor("kbHostile:output")
        assert not _monitor_threads() and mon.input.closed
        wait_until(lambda: not client._requests.pending, 10, what="no request left pending")
    finally:
        if kind != "silent":
            bad.stop()
