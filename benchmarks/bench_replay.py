"""Replay benchmark: kbstream serve-files vs extra_data's serve-files vs raw pyzmq.

Same JF4M run for every server (8 JUNGFRAU modules, ``data.adc`` uint16
(16, 512, 1024) per train = 128 MiB), files in the page cache, server in its
own process, REQ client = the measuring process, ``tcp://127.0.0.1``.
Each case times trains ``WARMUP+1 .. N`` of one pass over the run.

Run with pytest (``pytest benchmarks/bench_replay.py``) or as a script
(``python benchmarks/bench_replay.py``) which prints a Markdown table with
ratios.  Environment: ``KB_BENCH_TRAINS`` (default 20), ``KB_BENCH_FRAME``
(``16,512,1024``), ``KB_BENCH_DIR`` (default a new directory under /tmp,
deleted afterwards).

Until ``kbstream.serialize`` is built, kbstream's server uses the reference
``karabo_bridge.serialize`` (same frames; about 75 us per JF4M train).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NTRAINS = int(os.environ.get("KB_BENCH_TRAINS", "20"))
FRAME = tuple(int(x) for x in os.environ.get("KB_BENCH_FRAME", "16,512,1024").split(","))
WARMUP = 3
MODULES = 8

_SERVER_KBSTREAM = """
import sys, types
sys.path.insert(0, {src!r})
try:
    import kbstream
except ImportError:
    kbstream = types.ModuleType("kbstream"); kbstream.__path__ = [{pkg!r}]
    sys.modules["kbstream"] = kbstream
from kbstream.replay import serve
if not hasattr(kbstream, "serialize"):
    import karabo_bridge
    serve._default_serialize = lambda: karabo_bridge.serialize
sys.exit(serve.serve_files_main(sys.argv[1:]))
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


def _peak_rss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


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


class _RawClient:
    """REQ socket receiving raw frames (for the raw pyzmq server)."""

    def __init__(self, ep):
        import zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.linger = 0
        self.sock.connect(ep)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()
        self.ctx.term()

    def next(self):
        self.sock.send(b"next")
        frames = self.sock.recv_multipart(copy=False)
        return {"raw": {i: memoryview(f.buffer) for i, f in enumerate(frames)}}, {}


def measure(argv, nrecv, env=None, raw=False):
    """Start a server process, receive ``nrecv`` trains, time all but the warm-up ones."""
    import karabo_bridge

    port = _free_port()
    ep = f"tcp://127.0.0.1:{port}"
    argv = [a.replace("{ep}", ep) for a in argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **(env or {})))
    nbytes = 0
    peak = None
    try:
        client = _RawClient(ep) if raw else karabo_bridge.Client(ep, timeout=120)
        with client as c:
            for i in range(nrecv):
                if i == WARMUP:
                    t0 = time.perf_counter()
                    nbytes = 0
                data, _ = c.next()
                for src in data.values():
                    for v in src.values():
                        nbytes += getattr(v, "nbytes", 0)
                peak = _peak_rss(proc.pid) or peak
            dt = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    n = nrecv - WARMUP
    return {"trains_per_s": n / dt, "gb_per_s": nbytes / dt / 1e9, "peak_rss": peak}


def case_kbstream(rundir, prefetch=4):
    script = _SERVER_KBSTREAM.format(src=str(ROOT / "src"), pkg=str(ROOT / "src" / "kbstream"))
    return measure([sys.executable, "-c", script, str(rundir), "{ep}", "--include",
                    "SPB_IRDA_JF4M/DET/JNGFR*:daqOutput[data.adc]", "--no-progress",
                    "--prefetch", str(prefetch)], NTRAINS)


def case_extra_data(rundir):
    # By module, not by console script: once kbstream is installed, the
    # karabo-bridge-serve-files script may be kbstream's own.
    return measure([sys.executable, "-m", "extra_data.cli.serve_files", str(rundir), "{ep}", "--source", "SPB_IRDA_JF4M/DET/JNGFR*",
                    "--key", "data.adc"], NTRAINS)


def case_raw_pyzmq():
    return measure([sys.executable, "-c", _SERVER_RAW, "{ep}", str(NTRAINS), str(MODULES),
                    ",".join(map(str, FRAME))], NTRAINS, raw=True)


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


@pytest.mark.parametrize("server", ["kbstream", "extra_data"])
@pytest.mark.parametrize("chunking", ["small", "train"])
def test_replay(benchmark, runs, server, chunking):
    benchmark.group = f"replay JF4M data.adc, {chunking} chunks"
    fn = case_kbstream if server == "kbstream" else case_extra_data
    res = benchmark.pedantic(fn, args=(runs[chunking],), rounds=1, iterations=1)
    benchmark.extra_info.update(res, library=server, bytes_per_train=TRAIN_BYTES,
                                correct=res["gb_per_s"] > 0)


def test_raw_pyzmq(benchmark):
    pytest.importorskip("karabo_bridge")
    benchmark.group = "replay JF4M data.adc, raw pyzmq"
    res = benchmark.pedantic(case_raw_pyzmq, rounds=1, iterations=1)
    benchmark.extra_info.update(res, library="pyzmq", bytes_per_train=TRAIN_BYTES, correct=True)


def main():
    base = os.environ.get("KB_BENCH_DIR") or tempfile.mkdtemp(prefix="kbbench-", dir="/tmp")
    reps = int(os.environ.get("KB_BENCH_REPEAT", "3"))
    try:
        rows = {}
        raw = [case_raw_pyzmq() for _ in range(reps)]
        rows["raw pyzmq"] = raw
        for chunking in ("small", "train"):
            d = make_run(base, chunking)
            rows[f"extra_data, {chunking} chunks"] = [case_extra_data(d) for _ in range(reps)]
            rows[f"kbstream, {chunking} chunks"] = [case_kbstream(d) for _ in range(reps)]
            shutil.rmtree(d, ignore_errors=True)
    finally:
        if not os.environ.get("KB_BENCH_DIR"):
            shutil.rmtree(base, ignore_errors=True)

    def med(xs, k):
        v = sorted(x[k] for x in xs if x[k] is not None)
        return v[len(v) // 2] if v else float("nan")

    print(f"JF4M train = {TRAIN_BYTES / 2**20:.0f} MiB, {NTRAINS} trains per pass, "
          f"{reps} passes, medians")
    print("| case | trains/s | GB/s | server peak RSS / train |")
    print("|---|---:|---:|---:|")
    for name, xs in rows.items():
        rss = med(xs, "peak_rss")
        print(f"| {name} | {med(xs, 'trains_per_s'):.1f} | {med(xs, 'gb_per_s'):.2f} | "
              f"{rss / TRAIN_BYTES:.2f} |")
    rawv = med(rows["raw pyzmq"], "trains_per_s")
    for c in ("small", "train"):
        k = med(rows[f"kbstream, {c} chunks"], "trains_per_s")
        e = med(rows[f"extra_data, {c} chunks"], "trains_per_s")
        print(f"ratio kbstream / extra_data ({c} chunks): {k / e:.2f}; "
              f"kbstream / raw pyzmq: {k / rawv:.2f}")


if __name__ == "__main__":
    main()
