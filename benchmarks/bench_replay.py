"""Replay benchmark: kbstream serve-files vs extra_data's serve-files vs raw pyzmq.

Same JF4M run for every server (8 JUNGFRAU modules, ``data.adc`` uint16
(16, 512, 1024) per train = 128 MiB), files in the page cache, server in its
own process, REQ client in another process, ``tcp://127.0.0.1``.  Three layouts
of the same data: h5py's automatic chunks (``small``), one chunk per train
(``train``) and one shuffled+deflated chunk per frame (``gzip``).  Each case
times trains ``WARMUP+1 .. NRECV`` of one pass over the run and reports:

- ``trains_per_s`` seen by the client;
- ``cpu_ms_per_train``: the server process's own CPU time (user + system, all its
  threads, from ``/proc/<pid>/stat``) over the timed trains, per train.  The run
  has more trains than are received, so the server's read-ahead is as deep at the
  end of the window as at its start (every timed train was read inside it).

The floor is raw pyzmq: a REP server sending the same 8 x 16 MiB from memory
(the kernel's copy into the socket, nothing else).  kbstream's server is measured
with kbstream's client (the product as users get it) and with karabo_bridge's
(the server alone); extra_data's with karabo_bridge's (what users run today).

Run with pytest (``pytest benchmarks/bench_replay.py``) or as a script, which
interleaves the cases over ``KB_BENCH_REPEAT`` repetitions (default 3), one layout
at a time (only one run in the page cache), and prints a Markdown table::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_replay.py

in the main environment (``.venv``, with the ``test`` extra: h5py, extra-data 1.25.0,
karabo-bridge, pyzmq; build the compiled cores in place first).  kbstream is taken from
this tree's ``src``.  ``bash scripts/bench.sh benchmarks/bench_replay.py`` runs the
pytest form in ``.venv-bench``, which installs the same extra.

Environment: ``KB_BENCH_TRAINS`` (trains in the run, default 32; ``KB_BENCH_TRAINS -
12`` are received), ``KB_BENCH_FRAME`` (``16,512,1024``), ``KB_BENCH_LAYOUTS``
(``small,train,gzip``; also ``small1``: h5py's automatic chunk shape with one train per
chunk, (1, 2, 64, 128), whose chunks of a train lie side by side in the file),
``KB_BENCH_CLIENTS`` (``kbstream,karabo_bridge``: kbstream's server with which
clients), ``KB_BENCH_DIR`` (default a new directory under /tmp, deleted afterwards).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NTRAINS = int(os.environ.get("KB_BENCH_TRAINS", "32"))
FRAME = tuple(int(x) for x in os.environ.get("KB_BENCH_FRAME", "16,512,1024").split(","))
WARMUP = 4
MODULES = 8
#: Trains received: the last servers' read-ahead (extra_data queues 10 trains,
#: kbstream reads ``--prefetch`` ahead) stays inside the run.
NRECV = max(WARMUP + 2, NTRAINS - 12)
LAYOUTS = [x for x in os.environ.get("KB_BENCH_LAYOUTS", "small,train,gzip").split(",") if x]
KB_CLIENTS = [x for x in os.environ.get("KB_BENCH_CLIENTS", "kbstream,karabo_bridge").split(",")
              if x]

_SERVER_KBSTREAM = """
import sys
sys.path.insert(0, {src!r})
from kbstream.replay import cli
sys.exit(cli.serve_files_main(sys.argv[1:]))
"""

_SERVER_RAW = """
import sys, numpy as np, zmq
ep, ntrains, modules, shape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), tuple(map(int, sys.argv[4].split(",")))
ctx = zmq.Context(); s = ctx.socket(zmq.REP); s.linger = 0; s.bind(ep)
arrays = [np.full(shape, i, np.uint16) for i in range(modules)]
header = b"x" * 100
while True:
    s.recv()
    frames = []
    for a in arrays:
        frames += [header, header, header, a]
    s.send_multipart(frames, copy=False)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run(directory, chunking):
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from kbstream.replay.demo import make_demo_run
    except ImportError:
        import types
        pkg = types.ModuleType("kbstream")
        pkg.__path__ = [str(ROOT / "src" / "kbstream")]
        sys.modules["kbstream"] = pkg
        from kbstream.replay.demo import make_demo_run
    import h5py._hl.filters as h5filters
    guess = h5filters.guess_chunk
    if chunking == "small1":   # h5py's chunk shape, one train per chunk
        h5filters.guess_chunk = lambda *a: (1,) + tuple(guess(*a)[1:])
    try:
        d = make_demo_run(Path(directory) / chunking, NTRAINS, frame_shape=FRAME,
                          modules=MODULES, chunking=chunking.rstrip("1"), gain_mask=False,
                          trains_per_file=NTRAINS)
    finally:
        h5filters.guess_chunk = guess
    for p in Path(d).glob("*.h5"):  # into the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return d


# The client runs in a process of its own too: process-wide settings of one client
# (kbstream.Client keeps freed receive buffers, see kbstream.keep_large_buffers) must not
# help another.  It prints one JSON line: trains/s and GB/s over the trains after the
# warm-up ones, the server's CPU time per timed train (user + system of the server
# process, /proc/<pid>/stat) and its peak RSS (VmHWM, read after every train).
_CLIENT = """
import json, os, sys, time
kind, ep, nrecv, warmup, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, {src!r})
TICK = os.sysconf("SC_CLK_TCK")

def cpu_seconds():
    with open(f"/proc/{{pid}}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, all threads

def peak_rss():
    try:
        with open(f"/proc/{{pid}}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None

if kind == "raw":
    import zmq
    ctx = zmq.Context(); sock = ctx.socket(zmq.REQ); sock.linger = 0; sock.connect(ep)
    def nxt():
        sock.send(b"next")
        frames = sock.recv_multipart(copy=False)
        return sum(len(f.buffer) for f in frames[3::4])
else:
    if kind == "kbstream":
        import kbstream as mod
    else:
        import karabo_bridge as mod
    client = mod.Client(ep, timeout=120)
    def nxt():
        data, _ = client.next()
        return sum(getattr(v, "nbytes", 0) for src in data.values() for v in src.values())
nbytes, peak = 0, None
for i in range(nrecv):
    if i == warmup:
        t0 = time.perf_counter()
        c0 = cpu_seconds()
        nbytes = 0
    nbytes += nxt()
    if i < warmup or i == nrecv - 1:
        peak = peak_rss() or peak
c1 = cpu_seconds()
dt = time.perf_counter() - t0
n = nrecv - warmup
print(json.dumps({{"trains_per_s": n / dt, "gb_per_s": nbytes / dt / 1e9,
                  "cpu_ms_per_train": (c1 - c0) * 1e3 / n, "peak_rss": peak}}))
"""


def measure(argv, nrecv, env=None, client="karabo_bridge"):
    """Start a server process, receive ``nrecv`` trains in a client process of the given
    kind (karabo_bridge, kbstream or raw), time all but the warm-up ones."""
    import json

    port = _free_port()
    ep = f"tcp://127.0.0.1:{port}"
    argv = [a.replace("{ep}", ep) for a in argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **(env or {})))
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CLIENT.format(src=str(ROOT / "src")), client, ep,
             str(nrecv), str(WARMUP), str(proc.pid)],
            capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"client failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def case_kbstream(rundir, prefetch=4, client="kbstream"):
    script = _SERVER_KBSTREAM.format(src=str(ROOT / "src"))
    return measure([sys.executable, "-c", script, str(rundir), "{ep}", "--include",
                    "SPB_IRDA_JF4M/DET/JNGFR*:daqOutput[data.adc]", "--no-progress",
                    "--prefetch", str(prefetch)], NRECV, client=client)


def case_extra_data(rundir):
    # By module, not by console script: once kbstream is installed, the
    # karabo-bridge-serve-files script may be kbstream's own.
    return measure([sys.executable, "-m", "extra_data.cli.serve_files", str(rundir), "{ep}", "--source", "SPB_IRDA_JF4M/DET/JNGFR*",
                    "--key", "data.adc"], NRECV, client="karabo_bridge")


def case_raw_pyzmq():
    return measure([sys.executable, "-c", _SERVER_RAW, "{ep}", str(NTRAINS), str(MODULES),
                    ",".join(map(str, FRAME))], NRECV, client="raw")


TRAIN_BYTES = MODULES * 2 * FRAME[0] * FRAME[1] * FRAME[2]


@pytest.fixture(scope="module", params=LAYOUTS)
def run(request):
    """One layout's run at a time (each is NTRAINS x 128 MiB in the page cache)."""
    pytest.importorskip("karabo_bridge")
    pytest.importorskip("extra_data")
    base = os.environ.get("KB_BENCH_DIR") or tempfile.mkdtemp(prefix="kbbench-", dir="/tmp")
    try:
        yield request.param, make_run(base, request.param)
    finally:
        if not os.environ.get("KB_BENCH_DIR"):
            shutil.rmtree(base, ignore_errors=True)


#: (label, function(rundir)) of every contender; kbstream's server is measured with
#: kbstream's client (the product) and with karabo_bridge's (the server alone).
CASES = {"extra_data + karabo_bridge.Client": case_extra_data}
for _c in KB_CLIENTS:
    CASES[f"kbstream + {_c}.Client"] = (lambda c: lambda d: case_kbstream(d, client=c))(_c)
FLOOR = "raw pyzmq (floor)"


def _record(benchmark, res, library):
    benchmark.extra_info.update(res, library=library, bytes_per_train=TRAIN_BYTES,
                                metric="trains_per_s and cpu_ms_per_train (the time column "
                                       "includes start-up)",
                                correct=res["gb_per_s"] > 0)


@pytest.mark.parametrize("case", list(CASES))
def test_replay(benchmark, run, case):
    """One round per case.  The figures are the client's ``trains_per_s`` and the
    server's ``cpu_ms_per_train`` (in extra_info, as ``main()`` prints them): the time
    column also holds the start of the server and client processes."""
    layout, rundir = run
    benchmark.group = f"replay JF4M data.adc, {layout} chunks"
    res = benchmark.pedantic(CASES[case], args=(rundir,), rounds=1, iterations=1)
    _record(benchmark, res, case)
    assert res["gb_per_s"] > 0 and res["cpu_ms_per_train"] >= 0  # clock ticks: 0 for tiny runs


def test_raw_pyzmq(benchmark):
    pytest.importorskip("karabo_bridge")
    benchmark.group = "replay JF4M data.adc, raw pyzmq"
    res = benchmark.pedantic(case_raw_pyzmq, rounds=1, iterations=1)
    _record(benchmark, res, "pyzmq")
    assert res["gb_per_s"] > 0 and res["cpu_ms_per_train"] >= 0  # clock ticks: 0 for tiny runs


def _median(xs, k):
    v = sorted(x[k] for x in xs if x.get(k) is not None)
    if not v:
        return float("nan")
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def _ratio(a, b):
    return f"{a / b:.2f}" if b > 0 else "-"


def main():
    """Per layout: every case once per repetition (the floor with each layout), the
    order rotated from one repetition to the next (the machine's load drifts); prints
    medians and ratios as Markdown."""
    base = os.environ.get("KB_BENCH_DIR") or tempfile.mkdtemp(prefix="kbbench-", dir="/tmp")
    reps = int(os.environ.get("KB_BENCH_REPEAT", "3"))
    rows = {}
    names = list(CASES) + [FLOOR]
    try:
        for layout in LAYOUTS:
            d = make_run(base, layout)
            for rep in range(reps):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    res = case_raw_pyzmq() if name == FLOOR else CASES[name](d)
                    rows.setdefault((layout, name), []).append(res)
            shutil.rmtree(d, ignore_errors=True)
    finally:
        if not os.environ.get("KB_BENCH_DIR"):
            shutil.rmtree(base, ignore_errors=True)

    print(f"JF4M train = {TRAIN_BYTES / 2**20:.0f} MiB, run of {NTRAINS} trains, "
          f"{NRECV} received ({WARMUP} not timed), {reps} interleaved repetitions, medians "
          f"(all values in brackets)")
    print("| layout | server + client | server CPU ms / train | x floor | x extra_data "
          "| trains/s | server peak RSS / train |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for layout in LAYOUTS:
        floor = _median(rows[(layout, FLOOR)], "cpu_ms_per_train")
        ed = _median(rows[(layout, "extra_data + karabo_bridge.Client")], "cpu_ms_per_train")
        for name in names:
            xs = rows[(layout, name)]
            cpu = _median(xs, "cpu_ms_per_train")
            every = ", ".join(f"{x['cpu_ms_per_train']:.0f}" for x in xs)
            tps = ", ".join(f"{x['trains_per_s']:.1f}" for x in xs)
            print(f"| {layout} | {name} | {cpu:.1f} ({every}) | {_ratio(cpu, floor)} | "
                  f"{_ratio(cpu, ed)} | {_median(xs, 'trains_per_s'):.1f} ({tps}) | "
                  f"{_median(xs, 'peak_rss') / TRAIN_BYTES:.2f} |")


if __name__ == "__main__":
    main()
