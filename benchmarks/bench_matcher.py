"""The train matcher end to end: 8 JUNGFRAU module outputs -> kbstream-bridge -> a client,
against a plain kbstream bridge server sending the same JF4M train from memory.

    PYTHONPATH=src .venv/bin/python -m pytest benchmarks/bench_matcher.py -q -s \\
        --benchmark-columns=median,rounds

Every part is a process of its own, all on this host: 8 pipeline outputs
(``_matcher_source.py``, ``data.adc`` uint16 (16, 512, 1024) each, as fast as the matcher's
``wait`` inputs take them, sharing one train clock: none more than 2 trains ahead of the
slowest, as the modules of one detector share its trigger, and paused while the plain
server is measured), ``kbstream-bridge`` (match mode, one PUSH output on tcp
loopback), and a kbstream.Client PULL (``_bridge_client.py``).  The contender: a plain
kbstream bridge server (``_bridge_server.py``, ServerInThread PUSH fed the same train
from memory) and the same client program.  Both pipelines stay up; blocks of
``KB_MATCHER_BLOCK`` trains are timed in the client, alternating between the two,
``KB_MATCHER_BLOCKS`` blocks each (after ``KB_MATCHER_WARMUP`` untimed trains each,
default 0), and the medians compared (``extra_info``: trains/s of
each, ``ratio`` matcher / plain, the matcher process's CPU seconds per train from
/proc/<pid>/stat during its blocks, the CPU of each whole pipeline per train (sources,
matcher or server, client), its VmHWM and the bound, see below).

Memory bound: every item the matcher holds is in an input queue (at most the input's
capacity, 4 items per source), in a train waiting for items (at most ``max_pending`` =
100 trains), in the output queue (``queue_length`` = 4 trains) or in the sender / libzmq
(about 2 trains).  So VmHWM <= base + (4 + W + 4 + O + 2) x 8 x 16 MiB, O = 8 with
``--when-full wait`` (a queue may take one more train per input), W the trains waiting
(<= 100; about 1 here, the sources keep one pace); base is the VmHWM of the matcher
before any source connected.
"""

import json
import mmap
import os
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
NSOURCES = 8
MODULE_BYTES = 16 * 512 * 1024 * 2
BLOCK = int(os.environ.get("KB_MATCHER_BLOCK", "10"))
BLOCKS = int(os.environ.get("KB_MATCHER_BLOCKS", "6"))
#: trains each client takes, untimed, before the blocks: the sources' shared-memory rings
#: grow to what the matcher holds during the first trains (a new slot is allocated,
#: zeroed and mapped once), a cost of the start, not of the steady state
WARMUP = int(os.environ.get("KB_MATCHER_WARMUP", "0"))
NAMES = [f"SPB_IRDA_JF4M/DET/JNGFR{k:02d}:daqOutput" for k in range(1, NSOURCES + 1)]


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    def __init__(self, *args):
        self.p = subprocess.Popen([sys.executable, *map(str, args)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1, env=_env())

    def line(self):
        out = self.p.stdout.readline()
        if not out:
            raise RuntimeError(f"{self.p.args} ended (status {self.p.poll()})")
        return out.strip()

    def say(self, text):
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def close(self, timeout=60):
        try:
            self.p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.p.stdout.close()


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _minflt(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def _vm(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


@pytest.mark.parametrize("when_full", ["wait", "drop"])
def test_matcher_jf4m_push_vs_plain_server(benchmark, tmp_path, when_full):
    """``when_full``: ``wait`` paces the sources by the client (nothing matched is thrown
    away); ``drop`` (the default policy) lets the matcher run ahead and drop the oldest
    queued trains, work the client never sees."""
    benchmark.group = f"matcher-jf4m-PUSH-{when_full}"
    iid = "kbstream_matcher"  # the inputs of kbstream-bridge are <its instance id>:input<k>
    ports = [_free_port() for _ in NAMES]
    out_ep, plain_ep = f"tcp://127.0.0.1:{_free_port()}", f"tcp://127.0.0.1:{_free_port()}"
    stats_file = tmp_path / "stats.json"
    procs = []
    matcher = subprocess.Popen(
        [sys.executable, "-m", "kbstream", "bridge", *[f"{n}=127.0.0.1:{p}" for n, p in zip(NAMES, ports)],
         "--port", out_ep, "-z", "PUSH", "--on-slowness", "wait", "--when-full", when_full, "--quiet", "--stats", str(stats_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        assert "serving on" in matcher.stdout.readline()
        base = _vm(matcher.pid, "VmHWM")  # no source is there yet
        clock = tmp_path / "clock"
        clock.write_bytes(np.array([10_000_000_000 - 1] * NSOURCES + [1], dtype=np.int64).tobytes())
        with open(clock, "r+b") as f:
            shared = np.frombuffer(mmap.mmap(f.fileno(), 8 * (NSOURCES + 1)), dtype=np.int64)
        for k, (name, port) in enumerate(zip(NAMES, ports)):
            procs.append(_Proc(HERE / "_matcher_source.py", name, f"{iid}:input{k}", k, port, clock, NSOURCES))
            assert procs[-1].line().split()[0] == "PORT"
        plain = _Proc(HERE / "_bridge_server.py", plain_ep, "PUSH")
        procs.append(plain)
        assert plain.line() == "ready"
        clients = {"matcher": _Proc(HERE / "_bridge_client.py", out_ep, "PULL", NSOURCES),
                   "plain": _Proc(HERE / "_bridge_client.py", plain_ep, "PULL", NSOURCES)}
        procs.extend(clients.values())
        for c in clients.values():
            assert c.line() == "ready"
        times = {"matcher": [], "plain": []}
        cpu = {"matcher": 0.0, "plain": 0.0}
        # the whole pipeline's CPU during each contender's blocks: servers, sources, client
        sources = [p.p.pid for p in procs[:NSOURCES]]
        pipeline_pids = {"matcher": [matcher.pid, *sources, clients["matcher"].p.pid],
                         "plain": [plain.p.pid, clients["plain"].p.pid]}
        pipeline_cpu = {"matcher": 0.0, "plain": 0.0}
        faults = {"matcher": 0, "plain": 0}
        pids = {"matcher": matcher.pid, "plain": plain.p.pid}
        ok = True

        def alternate():
            nonlocal ok
            for b in range(BLOCKS):
                for name in (("matcher", "plain") if b % 2 == 0 else ("plain", "matcher")):
                    shared[NSOURCES] = name == "matcher"  # the sources pause while the other runs
                    c0, f0 = _cpu_seconds(pids[name]), _minflt(pids[name])
                    p0 = sum(map(_cpu_seconds, pipeline_pids[name]))
                    clients[name].say(f"take {BLOCK}")
                    seconds, good = clients[name].line().split()
                    cpu[name] += _cpu_seconds(pids[name]) - c0
                    faults[name] += _minflt(pids[name]) - f0
                    pipeline_cpu[name] += sum(map(_cpu_seconds, pipeline_pids[name])) - p0
                    times[name].append(float(seconds) / BLOCK)
                    ok = ok and good == "1"

        for name in ("matcher", "plain") if WARMUP else ():
            shared[NSOURCES] = name == "matcher"
            clients[name].say(f"take {WARMUP}")
            ok = clients[name].line().split()[1] == "1" and ok
        benchmark.pedantic(alternate, rounds=1, iterations=1)
        shared[NSOURCES] = 1
        hwm = _vm(matcher.pid, "VmHWM")
        matcher.send_signal(signal.SIGINT)
        out, err = matcher.communicate(timeout=120)
        assert matcher.returncode == 0, err
    finally:
        if matcher.poll() is None:
            matcher.kill()
            matcher.communicate()
        for p in procs:
            p.close()
    stats = json.loads(stats_file.read_text())
    tr = stats["trains"]
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    med = {k: statistics.median(v) for k, v in times.items()}
    n = BLOCK * BLOCKS
    waiting_bound = 100  # max_pending
    overflow = NSOURCES if when_full == "wait" else 0  # a "wait" queue may take one more train per input
    train_bytes = NSOURCES * MODULE_BYTES
    info = {
        "library": "kbstream", "op": "matcher vs plain server",
        "matcher_trains_per_s": 1 / med["matcher"], "plain_trains_per_s": 1 / med["plain"],
        "ratio": med["plain"] / med["matcher"],
        "matcher_cpu_s_per_train": cpu["matcher"] / n, "plain_cpu_s_per_train": cpu["plain"] / n,
        "matcher_pipeline_cpu_s_per_train": pipeline_cpu["matcher"] / n,
        "plain_pipeline_cpu_s_per_train": pipeline_cpu["plain"] / n,
        "matcher_page_faults_per_train": faults["matcher"] / n, "plain_page_faults_per_train": faults["plain"] / n,
        "matcher_vmhwm_mib": hwm / 2**20, "matcher_base_vmhwm_mib": base / 2**20,
        "held_trains_at_peak": (hwm - base) / train_bytes,
        "bound_mib": (base + (4 + waiting_bound + 4 + overflow + 2) * train_bytes) / 2**20,
        "matched": tr["matched"], "incomplete": tr["incomplete"], "dropped": tr["dropped"],
        "when_full": when_full, "blocks": BLOCKS, "block": BLOCK, "warmup": WARMUP,
        "correct": ok,
    }
    benchmark.extra_info.update(info)
    print(f"\nmatcher bench ({os.getloadavg()[0]:.1f} load): " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                              for k, v in info.items()}))
    assert ok and hwm <= (base + (4 + waiting_bound + 4 + overflow + 2) * train_bytes)
