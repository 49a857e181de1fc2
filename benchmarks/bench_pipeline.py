"""Pipeline channel throughput: kbstream and Karabo's C++ channels, same run.

16 MiB items (uint16 (16, 512, 1024) + 20 scalars), copy / wait, sender and
receiver in separate processes on one host.  Pairs: kbstream -> kbstream (its
same-host shared-memory path, and over tcp loopback alone: KBSTREAM_NO_SHM=1 in
the receiver), kbstream -> karabind, karabind -> kbstream, karabind -> karabind
(tcp loopback), and one kbstream output -> 4 shared kbstream inputs (aggregate,
a group of its own).  Each round streams
``KB_PIPE_ITEMS`` items (default 100) and ends with the end of stream; the
rate is items / (time of the round).  The Karabo side runs in the side
environment (tests/peers/pipeline_driver.py, driven by benchmarks/_karabo_pipeline.py);
run with ``scripts/bench.sh``.
"""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from _karabo_pipeline import KaraboPipelineInput, KaraboPipelineOutput, karabo_python, pipeline_item
from kbhash import Hash
from kbstream.pipeline import InputChannel, OutputChannel

N = int(os.environ.get("KB_PIPE_ITEMS", "100"))
ROUNDS = int(os.environ.get("KB_PIPE_ROUNDS", "3"))
SHAPE = (16, 512, 1024)
ITEM_BYTES = 16 * 1024 * 1024
GROUP = "pipeline-16MiB-copy-wait"
SHARED_GROUP = "pipeline-16MiB-shared-wait"

RECEIVER = r"""
import json, sys, threading, time
from kbstream.pipeline import InputChannel
port, iid, dist = int(sys.argv[1]), sys.argv[2], sys.argv[3]
inp = InputChannel(iid, onSlowness="wait", dataDistribution=dist).start()
n = 0; first = last = None; done = threading.Event()
def on_data(d, m):
    global n, first, last
    n += 1; last = time.time(); first = first or last
inp.register_data_handler(on_data)
inp.register_end_of_stream_handler(lambda ch: done.set())
inp.connect({"hostname": "127.0.0.1", "port": port}, "bench:output")
print(json.dumps({"ready": True}), flush=True)
done.wait(600)
print(json.dumps({"count": n, "first_t": first, "last_t": last}), flush=True)
inp.close()
"""


def need_karabo():
    if karabo_python() is None:
        pytest.skip("!!! Karabo side environment missing: run benchmarks with scripts/bench.sh !!!")


def item_hash(i, frame):
    h = Hash("index", i, "data.image", frame)
    for k in range(20):
        h[f"header.k{k:02d}"] = k
    return h


def kb_receivers(port, ids, dist="copy", tcp_only=False):
    env = dict(os.environ, KBSTREAM_NO_SHM="1") if tcp_only else None
    procs = []
    for iid in ids:
        p = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port), iid, dist],
                             stdout=subprocess.PIPE, text=True, env=env)
        assert json.loads(p.stdout.readline())["ready"]
        procs.append(p)
    return procs


def kb_stream(out, n, before_eos=None):
    frame = np.ones(SHAPE, np.uint16)
    for i in range(n):
        out.write(item_hash(i, frame), {"tid": i})
        out.update()
    if before_eos is not None:
        before_eos()
    out.signal_end_of_stream()


def _record(benchmark, pair, counts):
    benchmark.extra_info.update(library=pair.split("->")[0], op=f"send {pair}", items=N,
                                bytes=N * ITEM_BYTES, correct=all(c == N for c in counts))


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_kbstream_to_kbstream(benchmark, path):
    counts = []
    shm_items = []

    def setup():
        out = OutputChannel("bench:output", hostname="127.0.0.1").start()
        procs = kb_receivers(out.port, ["bench:input"], tcp_only=path == "tcp")
        out.wait_for_inputs(copy=["bench:input"])
        return (out, procs), {}

    def run(out, procs):
        # the input leaves after the end of stream: its counters are read before
        kb_stream(out, N, lambda: shm_items.append(out.stats()["bench:input"]["shm"]))
        for p in procs:
            counts.append(json.loads(p.communicate(timeout=600)[0].splitlines()[-1])["count"])
        out.close()

    benchmark.group = GROUP
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    _record(benchmark, f"kbstream->kbstream ({path})", counts)
    benchmark.extra_info["items_per_s"] = N / benchmark.stats.stats.median
    # the path measured is the one named
    assert all((n > 0) if path == "shm" else (n == 0) for n in shm_items), shm_items


def test_kbstream_to_4_shared_kbstream(benchmark):
    counts = []
    ids = [f"bench{k}:input" for k in range(4)]

    def setup():
        out = OutputChannel("bench:output", hostname="127.0.0.1", noInputShared="wait").start()
        procs = kb_receivers(out.port, ids, "shared")
        out.wait_for_inputs(shared=ids)
        return (out, procs), {}

    def run(out, procs):
        kb_stream(out, N)
        counts.append(sum(json.loads(p.communicate(timeout=600)[0].splitlines()[-1])["count"] for p in procs))
        out.close()

    benchmark.group = SHARED_GROUP
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    _record(benchmark, "kbstream->4 shared kbstream", counts)
    benchmark.extra_info["items_per_s"] = N / benchmark.stats.stats.median


def test_kbstream_to_karabind(benchmark):
    need_karabo()
    counts = []

    def setup():
        out = OutputChannel("bench:output", hostname="127.0.0.1").start()
        peer = KaraboPipelineInput(["bench:output"], quiet=True, checksum=False)
        peer.connect(out.port, output="bench:output")
        out.wait_for_inputs(copy=["peerReceiver:input"])
        return (out, peer), {}

    def run(out, peer):
        kb_stream(out, N)
        counts.append(peer.wait_stats()["count"])
        peer.close()
        out.close()

    benchmark.group = GROUP
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    _record(benchmark, "kbstream->karabind", counts)
    benchmark.extra_info["items_per_s"] = N / benchmark.stats.stats.median


def _karabind_item():
    return pipeline_item(0, frames=list(SHAPE), fill="const", scalars=20)


def test_karabind_to_kbstream(benchmark):
    need_karabo()
    counts = []

    def setup():
        peer = KaraboPipelineOutput(instance="bench", channel="output")
        inp = InputChannel("kbIn:input", onSlowness="wait").start()
        state = {"n": 0}
        done = threading.Event()
        inp.register_data_handler(lambda d, m: state.__setitem__("n", state["n"] + 1))
        inp.register_end_of_stream_handler(lambda ch: done.set())
        inp.connect(peer.info, "bench:output")
        peer.wait_inputs(copy=["kbIn:input"])
        return (peer, inp, state, done), {}

    def run(peer, inp, state, done):
        peer.stream(N, _karabind_item(), eos=True, timeout=600)
        done.wait(600)
        counts.append(state["n"])
        inp.close()
        peer.close()

    benchmark.group = GROUP
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    _record(benchmark, "karabind->kbstream", counts)
    benchmark.extra_info["items_per_s"] = N / benchmark.stats.stats.median


def test_karabind_to_karabind(benchmark):
    need_karabo()
    counts = []

    def setup():
        peer = KaraboPipelineOutput(instance="bench", channel="output")
        sink = KaraboPipelineInput(["bench:output"], quiet=True, checksum=False)
        sink.connect(peer.port, output="bench:output")
        peer.wait_inputs(copy=["peerReceiver:input"])
        return (peer, sink), {}

    def run(peer, sink):
        peer.stream(N, _karabind_item(), eos=True, timeout=600)
        counts.append(sink.wait_stats()["count"])
        sink.close()
        peer.close()

    benchmark.group = GROUP
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    _record(benchmark, "karabind->karabind", counts)
    benchmark.extra_info["items_per_s"] = N / benchmark.stats.stats.median
