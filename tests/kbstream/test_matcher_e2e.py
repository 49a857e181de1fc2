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
