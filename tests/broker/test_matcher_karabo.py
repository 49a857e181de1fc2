"""The train matcher on a real Karabo broker (RabbitMQ + karabo-cppserver 3.1.2):
``kbstream-bridge`` as a process reads kbstream outputs in other processes and a C++
PropertyTest output, all found by name through the broker, plus a C++ property as slow
data; a real ``karabo_bridge.Client`` receives the trains; a kbstream source is killed and
restarted mid-run; the matcher's statistics are read as properties by karabind's
DeviceClient; its Karabo output is read by name; SIGTERM writes the last statistics and
the instance leaves the broker.

Train ids of the C++ device: the server is started with ``timeServerId=kbTime`` and the
test is that time server: before each train it emits ``signalTimeTick(tid, sec, frac,
period)`` with a period of 1000 s, so every item and property change the device stamps
until the next tick carries exactly ``tid`` (checked through a probe property before the
device writes).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kbhash import Hash, HashType

from kbstream.broker import BrokerInstance, Typed
from kbstream.pipeline import InputChannel

from broker_stack import CppServer, stop_process, wait_until

pytestmark = pytest.mark.karabo

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "matcher_broker_source.py"
MATCHER_ID = "kbMatcher"
TIME_ID = "kbTime"
FIRST = 1000
NTRAINS = 30
SKIP = lambda tid: tid % 7 == 3  # source 1 leaves these trains out  # noqa: E731
KILL_AFTER, BACK_AT = 1010, 1018  # source 2 dead for FIRST+11 .. 1017
SLOW_SET = {1000: 500, 1012: 512, 1024: 524}  # tid at which int32Property gets a value


def value(key, tid):
    return (tid % 1000) * 16 + key  # as matcher_broker_source.value


class TickedCppServer(CppServer):
    """A karabo-cppserver whose time server is ``kbTime`` (this test)."""

    def start(self):
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [str(self.kbin / "karabo-cppserver"), f"serverId={self.server_id}",
                 "heartbeatInterval=10", "log.level=ERROR", f"timeServerId={TIME_ID}",
                 "init=" + json.dumps(self.devices)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                process_group=0, cwd=str(self.base))
        finally:
            log.close()
        return self


class Source:
    """tests/broker/matcher_broker_source.py in its own process."""

    def __init__(self, device, key, input_id, env):
        self.device, self.key, self.input_id, self.env = device, key, input_id, env
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([sys.executable, str(SOURCE), self.device, self.input_id,
                                      str(self.key)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=self.env,
                                     process_group=0)

    def expect(self, word, timeout=120, watch=None):
        """The next line starting with ``word``; fails when none comes in time or when
        the process ``watch`` (the matcher) ended meanwhile."""
        import select

        end = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if not ready:
                assert watch is None or watch.poll() is None, f"the matcher ended ({watch.returncode})"
                assert time.monotonic() < end, f"{self.device}: no {word} within {timeout} s"
                continue
            line = self.proc.stdout.readline()
            assert line, f"{self.device} ended (rc={self.proc.poll()}) before {word}"
            if line.split()[:1] == [word]:
                return line.split()

    def send(self, tid):
        self.proc.stdin.write(f"T {tid}\n")
        self.proc.stdin.flush()
        assert self.expect("SENT") == ["SENT", str(tid)]

    def kill(self):
        self.proc.kill()
        self.proc.wait(20)
        self._close_pipes()

    def close(self):
        if self.proc is None:
            return
        try:
            self.proc.stdin.write("Q\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, grace=5)
        self._close_pipes()

    def _close_pipes(self):
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Receiver(threading.Thread):
    """A real karabo_bridge.Client (REQ) pulling trains until stopped."""

    def __init__(self, endpoint):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.trains = []
        self.errors = []
        self.stop = threading.Event()

    def run(self):
        import karabo_bridge

        try:
            with karabo_bridge.Client(self.endpoint, sock="REQ", timeout=0.5) as c:
                while not self.stop.is_set():
                    try:
                        data, meta = c.next()
                    except TimeoutError:
                        continue
                    self.trains.append((data, meta))
        except Exception as e:  # reported by the test
            self.errors.append(e)


def test_kbstream_bridge_on_a_karabo_broker(rabbitmq, broker_env, karabo_bin_dir, topic,
                                            karabind_client, tmp_path):
    env = dict(os.environ, **broker_env)
    # the children import kbstream as this process does (installed in CI, else PYTHONPATH)
    server = TickedCppServer(karabo_bin_dir, tmp_path, rabbitmq.url, topic, "kbServer",
                             {"kbDev": {"classId": "PropertyTest", "heartbeatInterval": 10,
                                        "output": {"hostname": "127.0.0.1"}}}).start()
    driver = BrokerInstance(TIME_ID, heartbeat_interval=10)
    sources, bridge, receiver, client, reader = [], None, None, None, None
    karabo_items = []
    published = []  # the matcher's statistics as signalChanged sends them
    counters = []  # (outputCounter, its train id) of kbDev
    try:
        driver.start()
        driver.connect_signal(MATCHER_ID, "signalChanged", lambda h, iid: published.append(h))

        def on_dev(h, iid):
            if "outputCounter" in h:
                counters.append((h["outputCounter"], h.get_timestamp("outputCounter").tid))

        driver.connect_signal("kbDev", "signalChanged", on_dev)
        wait_until(lambda: _ping(driver, "kbDev"), 60, interval=0.2, what="kbDev online")
        client = karabind_client()
        devices = [f"JNGFR{k:02d}" for k in range(3)]
        sources = [Source(d, k, f"{MATCHER_ID}:input{k}", env) for k, d in enumerate(devices)]
        stats_file = tmp_path / "stats.json"
        endpoint = f"ipc://{tmp_path}/bridge"
        cmd = [sys.executable, "-m", "kbstream.matcher.cli",
               *[f"{d}:daqOutput" for d in devices], "kbDev:output", "kbDev.int32Property",
               "--instance-id", MATCHER_ID, "--port", endpoint, "-z", "REP",
               "--stats", str(stats_file), "--broker", rabbitmq.url, "--topic", topic,
               "--karabo-output", "output"]
        bridge_log = open(tmp_path / "bridge.out", "w")
        bridge = subprocess.Popen(cmd, env=env, stdout=bridge_log, stderr=subprocess.STDOUT,
                                  process_group=0)
        bridge_log.close()
        for s in sources:
            s.expect("READY", watch=bridge)
        client.wait_for(lambda m: m.get("event") == "new" and m.get("id") == MATCHER_ID, 60)

        def prop(key):
            r = client.command({"cmd": "get", "id": MATCHER_ID, "key": key})
            assert "error" not in r, r
            return r["value"]

        # the C++ output is connected once its source's status leaves (dis)connecting
        wait_until(lambda: prop("sources.kbDev_output.status") == "waiting", 60, interval=0.3,
                   what="the matcher connected to kbDev:output")
        assert prop("sources.kbDev_output.name") == "kbDev:output"
        receiver = Receiver(endpoint)
        receiver.start()
        # the matcher's Karabo output, found by name like any Karabo output
        reader = InputChannel(f"{TIME_ID}:reader", [f"{MATCHER_ID}:output"],
                              resolver=driver.resolver)
        reader.register_data_handler(lambda d, m: karabo_items.append(
            (m.source, m.tid, d.get("data.key") if m.source != "kbDev" else d.get("int32Property"))))
        driver.add_input_channel(reader)
        reader.start()
        reader.wait_connected(timeout=60)

        sent = {}  # tid -> set of fast sources sent
        slow_value = None
        for tid in range(FIRST, FIRST + NTRAINS):
            _tick(driver, tid)
            if tid in SLOW_SET:
                driver.request("kbDev", "slotReconfigure", Hash("int32Property", SLOW_SET[tid]),
                               timeout=10)
                slow_value = SLOW_SET[tid]
                # the matcher has the new value (its statistics, read as properties) before
                # this train's items leave: then "as of the train" is exact
                wait_until(lambda: prop("slowSources.kbDev_int32Property.tid") == tid, 30,
                           interval=0.2, what=f"the matcher got int32Property of train {tid}")
            sent[tid] = set()
            for k, s in enumerate(sources):
                if k == 1 and SKIP(tid):
                    continue
                if k == 2 and KILL_AFTER < tid < BACK_AT:
                    continue
                if k == 2 and tid == BACK_AT:
                    s.start()  # the same device id, a new process and port
                    s.expect("READY", watch=bridge)
                s.send(tid)
                sent[tid].add(f"{devices[k]}:daqOutput")
            driver.request("kbDev", "writeOutput", timeout=10)
            sent[tid].add("kbDev:output")
            # the device's item is out (its outputCounter changed, stamped with this train)
            # before the next tick: the reply of writeOutput may come first
            count = tid - FIRST + 1
            wait_until(lambda: any(c == count for c, _ in counters), 30,
                       what=f"kbDev wrote item {count}")
            assert [t for c, t in counters if c == count] == [tid]
            if len(sent[tid]) == 4 or tid == KILL_AFTER:
                # a complete train is received before the next one starts; the source
                # is killed only once its last item arrived (a killed process's socket
                # may reset instead of sending what it still holds)
                wait_until(lambda: receiver.trains and
                           receiver.trains[-1][1]["kbDev:output"]["timestamp.tid"] == tid,
                           60, what=f"train {tid} received")
            if tid == KILL_AFTER:
                sources[2].kill()

        complete = [t for t, got in sent.items() if len(got) == 4]
        last = max(complete)
        wait_until(lambda: receiver.trains and receiver.trains[-1][1]["kbDev:output"]["timestamp.tid"] == last,
                   60, what=f"train {last} received")
        # the statistics as properties, as of the end of the run
        wait_until(lambda: prop("trains.sent") == len(receiver.trains), 30, interval=0.3,
                   what="trains.sent published")
        assert prop("sources.JNGFR02_daqOutput.reconnects") == 1
        assert prop("sources.JNGFR01_daqOutput.missing") >= 1
        receiver.stop.set()
        receiver.join(20)
        assert not receiver.errors, receiver.errors

        since = len(client.events)
        bridge.send_signal(signal.SIGTERM)
        assert bridge.wait(60) == 0, (tmp_path / "bridge.out").read_text()
        client.wait_for(lambda m: m.get("event") == "gone" and m.get("id") == MATCHER_ID, 30, since)
        topo = client.command({"cmd": "topology"})
        assert MATCHER_ID not in topo["instances"]
        stats = json.loads(stats_file.read_text())
        # the last statistics went out on the broker too, after the inputs closed
        wait_until(lambda: published and published[-1]["trains.seen"] == stats["trains"]["seen"],
                   10, what="the last statistics published")
        last = published[-1]
        for k in ("seen", "matched", "sent", "incomplete", "dropped", "pending"):
            assert last[f"trains.{k}"] == stats["trains"][k]
        assert last["sources.JNGFR02_daqOutput.reconnects"] == 1
    finally:
        if reader is not None:
            reader.close()
        if receiver is not None:
            receiver.stop.set()
            receiver.join(20)
        if bridge is not None:
            stop_process(bridge, grace=20)
        for s in sources:
            s.close()
        driver.close()
        server.stop()

    # every complete train exactly once, in order, every source's data intact
    got = [meta["kbDev:output"]["timestamp.tid"] for _, meta in receiver.trains]
    assert got == sorted(set(got))
    assert got == complete, (got, complete)
    counter = 0
    outputs = {}
    for tid in sent:
        counter += 1  # the C++ device counts its writes: node.int32 = 1, 2, ...
        outputs[tid] = counter
    for data, meta in receiver.trains:
        tid = meta["kbDev:output"]["timestamp.tid"]
        assert set(data) == {*(f"{d}:daqOutput" for d in devices), "kbDev:output", "kbDev"}
        for k, d in enumerate(devices):
            src = data[f"{d}:daqOutput"]
            assert meta[f"{d}:daqOutput"]["timestamp.tid"] == tid
            assert src["data.trainId"] == tid and src["data.key"] == k
            adc = src["data.adc"]
            assert adc.shape == (16, 256, 64) and adc.dtype == np.uint16
            assert (adc == value(k, tid)).all()
        cpp = data["kbDev:output"]
        assert cpp["node.int32"] == outputs[tid]
        assert cpp["node.ndarray"].shape == (100, 200)
        # the slow value as of the train, with its own timestamp
        set_at = max(t for t in SLOW_SET if t <= tid)
        slow = data["kbDev"]
        assert slow["int32Property"] == SLOW_SET[set_at], (tid, slow)
        assert slow["int32Property.timestamp.tid"] == set_at
        assert meta["kbDev"]["timestamp.tid"] == tid
        assert float(slow["int32Property.timestamp"]) > 0

    # the counters add up exactly, and say what happened
    t = stats["trains"]
    assert t["seen"] == t["sent"] + t["incomplete"] + t["dropped"] + t["pending"]
    assert t["sent"] == len(complete) and t["dropped"] == 0
    assert t["seen"] == NTRAINS
    assert t["incomplete"] + t["pending"] == NTRAINS - len(complete)
    s = stats["sources"]
    assert s["JNGFR02:daqOutput"]["reconnects"] == 1
    assert s["JNGFR02:daqOutput"]["received"] == sum(1 for g in sent.values() if "JNGFR02:daqOutput" in g)
    assert s["JNGFR01:daqOutput"]["received"] == NTRAINS - sum(1 for t in sent if SKIP(t))
    assert s["kbDev:output"]["received"] == NTRAINS
    assert stats["slow"]["kbDev.int32Property"]["tid"] == max(SLOW_SET)
    assert stats["published"] >= 1
    # the Karabo output: every sent train, one item per source (slow values included)
    per_train = {}
    for source, tid, v in karabo_items:
        per_train.setdefault(tid, {})[source] = v
    assert sorted(per_train) == complete
    for tid, items in per_train.items():
        set_at = max(t for t in SLOW_SET if t <= tid)
        assert items == {**{f"{d}:daqOutput": k for k, d in enumerate(devices)},
                         "kbDev:output": None, "kbDev": SLOW_SET[set_at]}
    assert stats["karabo_output"] == {"written": len(complete), "dropped": 0}


def _ping(inst, iid):
    try:
        return inst.request(iid, "slotPing", 1, timeout=1.0)
    except Exception:
        return None


def _tick(driver, tid):
    """Emit the time tick of train ``tid`` and wait until kbDev stamps with it: set the
    probe property doubleProperty and read its timestamp back."""
    now = int(time.time())
    u64 = lambda v: Typed(v, HashType.UINT64)  # noqa: E731
    driver.emit("signalTimeTick", u64(tid), u64(now - 1), u64(0), u64(10**9))

    def stamped():
        driver.request("kbDev", "slotReconfigure", Hash("doubleProperty", float(tid)), timeout=10)
        (config, *_) = driver.request("kbDev", "slotGetConfiguration", timeout=10)
        return config.get_timestamp("doubleProperty").tid == tid

    wait_until(stamped, 30, interval=0.05, what=f"kbDev stamping train {tid}")


def test_kbstream_bridge_exits_2_when_its_instance_id_is_taken(broker_env, capsys):
    """docs/matcher-karabo.md: exit status 2 (and a message) for an instance id that is
    already on the broker, before any source is touched."""
    from kbstream.matcher.cli import main

    taken = BrokerInstance("kbTakenMatcher", heartbeat_interval=10).start()
    try:
        rc = main(["kbNoSuchDevice:output", "--instance-id", "kbTakenMatcher", "--quiet",
                   "--port", "tcp://127.0.0.1:0"])
    finally:
        taken.stop()
    assert rc == 2
    assert "kbTakenMatcher" in capsys.readouterr().err
