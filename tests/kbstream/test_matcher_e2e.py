"""The train matcher end to end: pipeline outputs in other processes -> TrainMatcher ->
a real karabo_bridge.Client (REQ) and a kbstream.Client (PULL); and the kbstream-bridge
command as a process."""

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kbstream
from kbstream.matcher import TrainMatcher

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "matcher_source.py")
SHAPE = (16, 512, 128)


def value(key, tid):
    return (tid % 1000) * 16 + key  # as matcher_source.value


def _env():
    """The children import kbstream as this process does (installed, or PYTHONPATH)."""
    return dict(os.environ)


def _readline(proc, timeout=60.0):
    """The next line of a process's stdout; fails instead of hanging when none comes."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args} within {timeout} s"
    return proc.stdout.readline()


class Sources:
    """N pipeline outputs, each in its own process (tests/kbstream/matcher_source.py)."""

    def __init__(self, input_prefix, first, ntrains, n=4, skip={}):
        self.procs = []
        self.ports = []
        self.names = []
        for k in range(n):
            name = f"SPB_IRDA_JF4M/DET/JNGFR{k + 1:02d}:daqOutput"
            cmd = [sys.executable, DRIVER, name, f"{input_prefix}:input{k}", str(first), str(ntrains), str(k)]
            if k in skip:
                cmd += ["--skip-every", str(skip[k])]
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
            self.procs.append(p)
            self.names.append(name)
        try:
            for p in self.procs:
                line = _readline(p).split()
                assert line[:1] == ["PORT"], line
                self.ports.append(int(line[1]))
        except BaseException:
            self.close()  # no process or pipe outlives a failed start
            raise

    def specs(self):
        return [f"{n}=127.0.0.1:{p}" for n, p in zip(self.names, self.ports)]

    def close(self):
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()


def _collect(client, n, out, errors):
    try:
        for _ in range(n):
            out.append(client.next())
    except Exception as e:  # reported by the test
        errors.append(e)


def _check_train(data, meta, names, tid):
    assert list(data) == names
    for k, name in enumerate(names):
        src = data[name]
        adc = src["data.adc"]
        assert adc.shape == SHAPE and adc.dtype == np.uint16
        assert (adc == value(k, tid)).all()
        assert src["data.trainId"] == tid and src["data.key"] == k
        m = meta[name]
        assert m["source"] == name and m["timestamp.tid"] == tid
        assert {"timestamp", "timestamp.sec", "timestamp.frac"} <= set(m)


def test_four_processes_matched_to_req_and_pull_clients(tmp_path):
    karabo_bridge = pytest.importorskip("karabo_bridge")
    first, ntrains = 10_000, 25
    iid = "kbstream_matcher_e2e"
    # source 4 skips every 3rd train: those trains can never be complete
    complete = [first + i for i in range(ntrains) if i % 3 != 2]
    incomplete = ntrains - len(complete)
    sources = Sources(iid, first, ntrains, skip={3: 3})
    try:
        rep = f"ipc://{tmp_path}/rep"
        push = f"ipc://{tmp_path}/push"
        matcher = TrainMatcher(sources.specs(), [(rep, "REP"), (push, "PUSH")], instance_id=iid,
                               queue_length=ntrains, input_options={"onSlowness": "wait"})
        got_req, got_pull, errors = [], [], []
        with matcher, karabo_bridge.Client(rep, sock="REQ", timeout=60) as req, \
                kbstream.Client(push, sock="PULL", timeout=60) as pull:
            threads = [threading.Thread(target=_collect, args=(req, len(complete), got_req, errors)),
                       threading.Thread(target=_collect, args=(pull, len(complete), got_pull, errors))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert errors == [] and not any(t.is_alive() for t in threads)
        stats = matcher.stats()
    finally:
        sources.close()
    for got in (got_req, got_pull):
        tids = [next(iter(meta.values()))["timestamp.tid"] for _, meta in got]
        assert tids == complete  # every complete train once, strictly increasing
        for (data, meta), tid in zip(got, tids):
            _check_train(data, meta, sources.names, tid)
    tr = stats["trains"]
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    assert (tr["seen"], tr["matched"], tr["sent"], tr["dropped"], tr["pending"]) == \
        (ntrains, len(complete), len(complete), 0, 0)
    assert tr["incomplete"] == tr["incomplete_by"]["superseded"] == incomplete
    src = stats["sources"]
    assert [src[n]["received"] for n in sources.names] == [ntrains] * 3 + [len(complete)]
    assert [src[n]["missing"] for n in sources.names] == [0, 0, 0, incomplete]
    assert [o["sent"] for o in stats["outputs"]] == [len(complete)] * 2


def test_a_slow_client_never_stalls_the_inputs(tmp_path):
    """Nobody asks the REP output: the queue keeps the newest trains, the rest are counted
    dropped; the inputs received everything."""
    first, ntrains = 20_000, 12
    iid = "kbstream_matcher_slow"
    sources = Sources(iid, first, ntrains, n=2)
    try:
        matcher = TrainMatcher(sources.specs(), [f"ipc://{tmp_path}/rep"], instance_id=iid, queue_length=3,
                               input_options={"onSlowness": "wait"})
        with matcher:
            for p in sources.procs:  # each source sent everything, nobody stalled
                assert _readline(p).strip() == "DONE"
            deadline = time.monotonic() + 60  # until the last item is matched
            while not (matcher.stats()["trains"]["matched"] == ntrains or time.monotonic() > deadline):
                time.sleep(0.02)
        stats = matcher.stats()
    finally:
        sources.close()
    tr = stats["trains"]
    # 12 matched: the REP output holds the newest 3 (one may sit in the sender, waiting)
    assert tr["matched"] == ntrains and tr["sent"] == 0
    assert tr["dropped"] == tr["dropped_by"]["output_full"] >= ntrains - 4
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    assert tr["pending"] in (3, 4)


def test_kbstream_bridge_command_serves_and_writes_stats(tmp_path):
    first, ntrains = 30_000, 10
    sources = Sources("kbstream_matcher", first, ntrains, n=2)
    stats_file = tmp_path / "stats.json"
    endpoint = f"ipc://{tmp_path}/push"
    cmd = [sys.executable, "-m", "kbstream", "bridge", *[f"M{k}@{s}" for k, s in enumerate(sources.specs())],
           "--port", endpoint, "-z", "PUSH", "--stats", str(stats_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert "serving on" in _readline(proc)
        with kbstream.Client(endpoint, sock="PULL", timeout=60) as c:
            got = [c.next() for _ in range(ntrains)]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sources.close()
    assert proc.returncode == 0, err
    assert [m["M0"]["timestamp.tid"] for _, m in got] == list(range(first, first + ntrains))
    for data, meta in got:
        tid = meta["M1"]["timestamp.tid"]
        assert list(data) == ["M0", "M1"]
        assert (data["M1"]["data.adc"] == value(1, tid)).all() and meta["M1"]["source"] == "M1"
    stats = json.loads(stats_file.read_text())
    tr = stats["trains"]
    assert (tr["seen"], tr["matched"], tr["sent"], tr["incomplete"], tr["dropped"], tr["pending"]) == \
        (ntrains, ntrains, ntrains, 0, 0, 0)
    assert set(stats["sources"]) == {"M0", "M1"}
    assert f"{ntrains} trains seen, {ntrains} matched, {ntrains} sent" in out.splitlines()[-1]


def test_kbstream_bridge_refuses_a_source_without_endpoint(capsys):
    from kbstream.matcher.cli import main

    assert main(["SPB/DET/JF:daqOutput", "--port", "tcp://127.0.0.1:0"]) == 2
    assert "has no endpoint" in capsys.readouterr().err


# ---------------------------------------------------------------- sources that misbehave


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Source:
    """One pipeline output process (tests/kbstream/matcher_source.py) with its options."""

    def __init__(self, name, input_id, first, ntrains, key, *options):
        cmd = [sys.executable, DRIVER, name, input_id, str(first), str(ntrains), str(key), *options]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        try:
            line = _readline(self.proc).split()
            assert line[:1] == ["PORT"], line
            self.port = int(line[1])
        except BaseException:
            self.close()
            raise

    def done(self):
        assert _readline(self.proc).strip() == "DONE"

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class _Collector(threading.Thread):
    """Receives trains until stopped (a client that times out keeps trying)."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client = client
        self.got = []
        self.errors = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.got.append(self.client.next())
            except kbstream.ChannelTimeout:
                continue
            except Exception as e:  # reported by the test
                self.errors.append(e)
                return


def _wait_for(cond, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


JF = [f"SPB_IRDA_JF4M/DET/JNGFR{k + 1:02d}:daqOutput" for k in range(4)]


def test_jitter_gaps_a_late_source_and_a_restarted_one_in_match_mode(tmp_path):
    """Four source processes: 0 with jitter, 1 missing every 3rd train, 2 starting late
    (its process starts after the others finished, at train 10), 3 stopped after train 19
    and restarted on its port from train 26.  Exactly the trains every source sent arrive,
    once, in strictly increasing order, intact; the restart is counted; the counters add up."""
    karabo_bridge = pytest.importorskip("karabo_bridge")
    from kbstream.matcher.matcher import MISSING_KEY

    first, n = 40_000, 40
    iid = "kbstream_matcher_mix"
    late_port, restart_port = _free_port(), _free_port()
    sent = {0: set(range(n)), 1: {i for i in range(n) if i % 3 != 2}, 2: set(range(10, n)),
            3: set(range(20)) | set(range(26, n))}
    complete = sorted(first + i for i in set.intersection(*sent.values()))
    procs = [Source(JF[0], f"{iid}:input0", first, n, 0, "--jitter", "0.01"),
             Source(JF[1], f"{iid}:input1", first, n, 1, "--skip-every", "3")]
    try:
        procs.append(Source(JF[3], f"{iid}:input3", first, n, 3, "--port", str(restart_port), "--stop", "20"))
        ports = [procs[0].port, procs[1].port, late_port, restart_port]
        specs = [f"{name}=127.0.0.1:{port}" for name, port in zip(JF, ports)]
        pull_ep, rep_ep = f"ipc://{tmp_path}/pull", f"ipc://{tmp_path}/rep"
        matcher = TrainMatcher(specs, [(pull_ep, "PUSH", {"report_missing": True}), (rep_ep, "REP")],
                               instance_id=iid, queue_length=2 * n, input_options={"onSlowness": "wait"})
        with matcher, kbstream.Client(pull_ep, sock="PULL", timeout=0.5) as pull, \
                karabo_bridge.Client(rep_ep, sock="REQ", timeout=60) as req:
            collector = _Collector(pull)
            collector.start()
            for p in procs:
                p.done()
            st = matcher.stats()["sources"]
            assert st[JF[2]]["received"] == 0 and st[JF[2]]["status"] in ("connecting", "disconnected")
            assert st[JF[2]]["connects"] == 0
            procs[2].close()  # source 3 goes away ...
            _wait_for(lambda: matcher.stats()["sources"][JF[3]]["status"] == "disconnected", "source 3 gone")
            procs[2] = Source(JF[3], f"{iid}:input3", first, n, 3, "--port", str(restart_port), "--start", "26")
            procs.append(Source(JF[2], f"{iid}:input2", first, n, 2, "--port", str(late_port), "--start", "10"))
            for p in procs[2:]:
                p.done()
            _wait_for(lambda: len(collector.got) >= len(complete), "the complete trains")
            _wait_for(lambda: matcher.stats()["trains"]["sent"] >= len(complete), "the trains settled")
            via_req = [req.next() for _ in range(3)]
            collector.stop.set()
            collector.join(30)
            stats = matcher.stats()
    finally:
        for p in procs:
            p.close()
    assert collector.errors == []
    tids = [next(iter(meta.values()))["timestamp.tid"] for _, meta in collector.got]
    assert tids == complete  # every complete train once, strictly increasing
    for data, meta in collector.got:
        tid = next(iter(meta.values()))["timestamp.tid"]
        _check_train(data, {k: {kk: vv for kk, vv in m.items() if kk != MISSING_KEY} for k, m in meta.items()},
                     JF, tid)
        assert all(m[MISSING_KEY] == [] for m in meta.values())
    # the karabo_bridge client on the plain output: the same trains, nothing added
    for (data, meta), tid in zip(via_req, complete):
        _check_train(data, meta, JF, tid)
        assert all(set(m) == {"source", "timestamp", "timestamp.sec", "timestamp.frac", "timestamp.tid"}
                   for m in meta.values())
    src, tr = stats["sources"], stats["trains"]
    assert [src[name]["received"] for name in JF] == [len(sent[k]) for k in range(4)]
    assert [src[name]["connects"] for name in JF] == [1, 1, 1, 2]  # source 3 reconnected
    assert [src[name]["missing"] for name in JF] == [n - len(sent[k]) for k in range(4)]
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    assert (tr["seen"], tr["matched"], tr["sent"], tr["incomplete"], tr["pending"]) == \
        (n, len(complete), len(complete), n - len(complete), 0)


def test_buffer_mode_sends_partial_trains_with_exactly_the_sources_that_arrived(tmp_path):
    """Two jittery source processes, one missing every 3rd train, buffer mode: each train
    arrives with exactly the items that reached it in time (its data intact), a kbstream
    client on a 'missing' output is told what is missing, a karabo_bridge client on the
    plain output sees a normal stream; every item received is in one train sent or
    counted late."""
    karabo_bridge = pytest.importorskip("karabo_bridge")
    from kbstream.matcher.matcher import MISSING_KEY

    first, n = 50_000, 45
    iid = "kbstream_matcher_buf"
    names = JF[:2]
    procs = [Source(names[0], f"{iid}:input0", first, n, 0, "--jitter", "0.02"),
             Source(names[1], f"{iid}:input1", first, n, 1, "--skip-every", "3", "--jitter", "0.02")]
    try:
        specs = [f"{name}=127.0.0.1:{p.port}" for name, p in zip(names, procs)]
        pull_ep, rep_ep = f"ipc://{tmp_path}/pull", f"ipc://{tmp_path}/rep"
        matcher = TrainMatcher(specs, [(pull_ep, "PUSH", {"report_missing": True}), (rep_ep, "REP")],
                               mode="buffer", buffer=3, max_wait=1.0, instance_id=iid, queue_length=2 * n,
                               input_options={"onSlowness": "wait"})
        with matcher, kbstream.Client(pull_ep, sock="PULL", timeout=0.5) as pull, \
                karabo_bridge.Client(rep_ep, sock="REQ", timeout=60) as req:
            collector = _Collector(pull)
            collector.start()
            for p in procs:
                p.done()
            # max_wait flushes the last trains; then everything seen was handed out
            _wait_for(lambda: matcher.stats()["trains"]["waiting"] == 0, "the last trains")
            _wait_for(lambda: len(collector.got) >= matcher.stats()["trains"]["seen"], "every train")
            via_req = [req.next() for _ in range(5)]
            collector.stop.set()
            collector.join(30)
            stats = matcher.stats()
    finally:
        for p in procs:
            p.close()
    assert collector.errors == []
    tids = [next(iter(meta.values()))["timestamp.tid"] for _, meta in collector.got]
    assert tids == sorted(set(tids))  # strictly increasing
    present = dict.fromkeys(names, 0)
    partial = 0
    for data, meta in collector.got:
        tid = next(iter(meta.values()))["timestamp.tid"]
        assert set(data) <= set(names) and data
        for name in data:
            k = names.index(name)
            assert (data[name]["data.adc"] == value(k, tid)).all() and data[name]["data.trainId"] == tid
            assert meta[name][MISSING_KEY] == [s for s in names if s not in data]
            present[name] += 1
        if (tid - first) % 3 == 2:
            assert names[1] not in data  # never sent
        partial += len(data) < len(names)
    assert partial >= n // 3
    for data, meta in via_req:  # plain output: partial trains, nothing added
        assert all(MISSING_KEY not in m for m in meta.values()) and list(data) == list(meta)
    src, tr = stats["sources"], stats["trains"]
    for name in names:  # every item received went into one train sent, or was late
        assert src[name]["received"] == present[name] + src[name]["late"] + src[name]["duplicates"]
    assert tr["seen"] == len(collector.got) == tr["matched"] + partial
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    assert tr["incomplete"] == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_kbstream_bridge_stops_cleanly_on_a_signal(tmp_path, signum):
    """Two outputs, an offset, status lines on a pipe: the signal closes the inputs (the
    sources see their input leave), writes the stats and exits 0; no control characters."""
    first, ntrains = 60_000, 12
    iid = "kbstream_matcher"
    procs = [Source(JF[0], f"{iid}:input0", first, ntrains, 0, "--report-gone"),
             Source(JF[1], f"{iid}:input1", first + 5, ntrains, 1, "--report-gone")]  # 5 trains ahead
    stats_file = tmp_path / "stats.json"
    push, pub = f"ipc://{tmp_path}/push", f"ipc://{tmp_path}/pub"
    cmd = [sys.executable, "-m", "kbstream", "bridge", f"A@{JF[0]}=127.0.0.1:{procs[0].port}",
           f"B@{JF[1]}=127.0.0.1:{procs[1].port}", "--offset", "B=-5", "--port", f"{push},PUSH,missing",
           "--port", pub, "-z", "PUB", "--interval", "0.2", "--stats", str(stats_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert "serving on" in _readline(proc)
        with kbstream.Client(push, sock="PULL", timeout=60) as c:
            got = [c.next() for _ in range(ntrains)]
        assert _readline(proc).startswith("trains seen")  # a status line comes every interval
        for p in procs:
            p.done()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
        for p in procs:  # the inputs were closed: each source sees its input leave
            assert _readline(p.proc).strip() == "GONE"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in procs:
            p.close()
    assert proc.returncode == 0, err
    assert "\x1b" not in out and "\r" not in out
    assert [m["A"]["timestamp.tid"] for _, m in got] == list(range(first, first + ntrains))
    for data, meta in got:
        tid = meta["A"]["timestamp.tid"]
        assert (data["B"]["data.adc"] == value(1, tid + 5)).all() and meta["B"]["timestamp.tid"] == tid
        assert meta["A"]["kbstream.missing"] == []
    stats = json.loads(stats_file.read_text())
    tr = stats["trains"]
    assert (tr["seen"], tr["matched"], tr["sent"], tr["incomplete"], tr["dropped"], tr["pending"]) == \
        (ntrains, ntrains, ntrains, 0, 0, 0)
    assert set(stats["sources"]) == {"A", "B"}
    for s in stats["sources"].values():
        assert {"received", "missing", "latency", "rate", "status"} <= set(s)
    assert [o["sock"] for o in stats["outputs"]] == ["PUSH", "PUB"]


def test_kbstream_bridge_on_a_terminal_shows_a_live_table(tmp_path):
    """With a terminal as stdout the command draws the rich table in place (control
    sequences, the column names, the source) and still ends cleanly on SIGINT."""
    import pty

    src = Source(JF[0], "kbstream_matcher:input0", 70_000, 5, 0)
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "kbstream", "bridge", f"A@{JF[0]}=127.0.0.1:{src.port}",
           "--port", f"ipc://{tmp_path}/t", "-z", "PUSH", "--interval", "0.2"]
    proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.PIPE, env=dict(_env(), COLUMNS="160"))
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while not (b"received" in seen and b"\x1b[" in seen and b"A" in seen) and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        while True:  # the rest of the output, the summary included
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        os.close(master)
        src.close()
    assert proc.returncode == 0
    assert b"\x1b[" in seen and b"received" in seen and b"status" in seen
    assert b"kbstream-bridge: " in seen and b"trains seen" in seen
