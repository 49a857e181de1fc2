"""Replay benchmark: kbstream serve-files vs extra_data's serve-files vs raw pyzmq.

Same JF4M run for every server (8 JUNGFRAU modules, ``data.adc`` uint16
(16, 512, 1024) per train = 128 MiB), files in the page cache, server in its
own process, REQ client in another process, ``tcp://127.0.0.1``.  Each case
times trains ``WARMUP+1 .. N`` of one pass over the run.  kbstream's server is
measured with kbstream's client (the product as users get it) and with
karabo_bridge's client (the server alone); extra_data's with karabo_bridge's
(what users run today); raw pyzmq with a bare REQ socket.

Run with pytest (``pytest benchmarks/bench_replay.py``) or as a script
(``python benchmarks/bench_replay.py``), which interleaves the cases over
``KB_BENCH_REPEAT`` repetitions (default 3) and prints a Markdown table with
ratios.  Environment: ``KB_BENCH_TRAINS`` (default 20), ``KB_BENCH_FRAME``
(``16,512,1024``), ``KB_BENCH_DIR`` (default a new directory under /tmp,
deleted afterwards).
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
NTRAINS = int(os.environ.get("KB_BENCH_TRAINS", "20"))
FRAME = tuple(int(x) for x in os.environ.get("KB_BENCH_FRAME", "16,512,1024").split(","))
WARMUP = 3
MODULES = 8

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
for _ in range(ntrains):
    s.recv()
    frames = []
    for a in arrays:
        frames += [header, header, header, a]
    s.send_multipart(frames, copy=False)
s.close(linger=-1); ctx.term()
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
    d = make_demo_run(Path(directory) / chunking, NTRAINS, frame_shape=FRAME, modules=MODULES,
                      chunking=chunking, gain_mask=False, trains_per_file=NTRAINS)
    for p in Path(d).glob("*.h5"):  # into the page cache
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return d


# The client runs in a process of its own too: process-wide settings of one client
# (kbstream.Client keeps freed receive buffers, see kbstream.keep_large_buffers) must not
# help another.  It prints one JSON line: trains/s and GB/s over the trains after the
# warm-up ones, and the server's peak RSS (VmHWM, read after every train).
_CLIENT = """
import json, sys, time
kind, ep, nrecv, warmup, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, {src!r})

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
        nbytes = 0
    nbytes += nxt()
    peak = peak_rss() or peak
dt = time.perf_counter() - t0
print(json.dumps({{"trains_per_s": (nrecv - warmup) / dt, "gb_per_s": nbytes / dt / 1e9,
                  "peak_rss": peak}}))
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
                    "--prefetch", str(prefetch)], NTRAINS, client=client)


def case_extra_data(rundir):
    # By module, not by console script: once kbstream is installed, the
    # karabo-bridge-serve-files script may be kbstream's own.
    return measure([sys.executable, "-m", "extra_data.cli.serve_files", str(rundir), "{ep}", "--source", "SPB_IRDA_JF4M/DET/JNGFR*",
                    "--key", "data.adc"], NTRAINS, client="karabo_bridge")


def case_raw_pyzmq():
    return measure([sys.executable, "-c", _SERVER_RAW, "{ep}", str(NTRAINS), str(MODULES),
                    ",".join(map(str, FRAME))], NTRAINS, client="raw")


TRAIN_BYTES = MODULES * 2 * FRAME[0] * FRAME[1] * FRAME[2]


@pytest.fixture(scope="module")
def runs():
    pytest.importorskip("karabo_bridge")
    pytest.importorskip("extra_data")
    base = os.environ.get("KB_BENCH_DIR") or tempfile.mkdtemp(prefix="kbbench-", dir="/tmp")
    try:
        yield {c: make_run(base, c) for c in ("small", "train")}
    finally:
        if not os.environ.get("KB_BENCH_DIR"):
            shutil.rmtree(base, ignore_errors=True)


#: (label, function(rundir or None)) of every contender; kbstream's server is measured with
#: kbstream's client (the product) and with karabo_bridge's (the server alone).
CASES = {
    "extra_data + karabo_bridge.Client": lambda d: case_extra_data(d),
    "kbstream + kbstream.Client": lambda d: case_kbstream(d, client="kbstream"),
    "kbstream + karabo_bridge.Client": lambda d: case_kbstream(d, client="karabo_bridge"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunking", ["small", "train"])
def test_replay(benchmark, runs, case, chunking):
    """One round per case.  The figure is the client's own ``trains_per_s`` (in
    extra_info, as ``main()`` prints it): the time column also holds the start of the
    server and client processes, which differ between cases."""
    benchmark.group = f"replay JF4M data.adc, {chunking} chunks"
    res = benchmark.pedantic(CASES[case], args=(runs[chunking],), rounds=1, iterations=1)
    benchmark.extra_info.update(res, library=case, bytes_per_train=TRAIN_BYTES,
                                metric="trains_per_s (the time column includes start-up)",
                                correct=res["gb_per_s"] > 0)
    assert res["gb_per_s"] > 0


def test_raw_pyzmq(benchmark):
    pytest.importorskip("karabo_bridge")
    benchmark.group = "replay JF4M data.adc, raw pyzmq"
    res = benchmark.pedantic(case_raw_pyzmq, rounds=1, iterations=1)
    benchmark.extra_info.update(res, library="pyzmq", bytes_per_train=TRAIN_BYTES,
                                metric="trains_per_s (the time column includes start-up)",
                                correct=True)
    assert res["gb_per_s"] > 0


def main():
    """Every case once per repetition, repetitions interleaved (the machine's load drifts);
    prints medians and ratios as Markdown."""
    base = os.environ.get("KB_BENCH_DIR") or tempfile.mkdtemp(prefix="kbbench-", dir="/tmp")
    reps = int(os.environ.get("KB_BENCH_REPEAT", "3"))
    rows = {"raw pyzmq": []}
    try:
        dirs = {c: make_run(base, c) for c in ("small", "train")}
        names = list(CASES)
        for rep in range(reps):
            rows["raw pyzmq"].append(case_raw_pyzmq())
            for chunking, d in dirs.items():
                # rotate the order: whoever runs right after another server (memory just
                # freed, huge pages being compacted) changes from one repetition to the next
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    rows.setdefault(f"{name}, {chunking} chunks", []).append(CASES[name](d))
    finally:
        if not os.environ.get("KB_BENCH_DIR"):
            shutil.rmtree(base, ignore_errors=True)

    def med(xs, k):
        v = sorted(x[k] for x in xs if x[k] is not None)
        return v[len(v) // 2] if v else float("nan")

    print(f"JF4M train = {TRAIN_BYTES / 2**20:.0f} MiB, {NTRAINS} trains per pass "
          f"({WARMUP} not timed), {reps} interleaved repetitions, medians")
    print("| server + client | trains/s | GB/s | server peak RSS / train | all trains/s |")
    print("|---|---:|---:|---:|---|")
    for name, xs in rows.items():
        rss = med(xs, "peak_rss")
        every = ", ".join(f"{x['trains_per_s']:.1f}" for x in xs)
        print(f"| {name} | {med(xs, 'trains_per_s'):.1f} | {med(xs, 'gb_per_s'):.2f} | "
              f"{rss / TRAIN_BYTES:.2f} | {every} |")
    rawv = med(rows["raw pyzmq"], "trains_per_s")
    for c in ("small", "train"):
        e = med(rows[f"extra_data + karabo_bridge.Client, {c} chunks"], "trains_per_s")
        for name in ("kbstream + kbstream.Client", "kbstream + karabo_bridge.Client"):
            k = med(rows[f"{name}, {c} chunks"], "trains_per_s")
            print(f"{c} chunks, {name}: {k / e:.2f}x extra_data, {k / rawv:.2f}x raw pyzmq")


if __name__ == "__main__":
    main()
