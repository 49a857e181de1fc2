"""Karabo Bridge benchmarks: kbstream vs karabo_bridge (and raw pyzmq), in the same run.

Run (short, the machine is shared)::

    PYTHONPATH=src .venv/bin/python -m pytest benchmarks/bench_bridge.py -q \\
        --benchmark-columns=median,mean,rounds --benchmark-sort=name

Groups: ``codec-<payload>-<version>-<ser|deser>`` (libraries kbstream, kbstream-pure,
karabo_bridge) and ``e2e-jf4m-<REP|PUSH>`` (kbstream, karabo_bridge, raw pyzmq).  Each
benchmark records ``extra_info``: library, bytes per call, a correctness flag.
"""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

import kbstream
from payloads import later_train
from kbstream.bridge import _codec, _pure

kb = pytest.importorskip("karabo_bridge")

CODECS = {
    "kbstream": (kbstream.serialize, kbstream.deserialize),
    "kbstream-pure": (_pure.serialize, _pure.deserialize),
    "karabo_bridge": (kb.serialize, kb.deserialize),
}


def _frames_as_received(frames):
    """zmq.Frame objects, as a client's recv_multipart(copy=False) returns them."""
    return [zmq.Frame(bytes(f)) for f in frames]


@pytest.mark.parametrize("version", ["2.2", "1.0"])
@pytest.mark.parametrize("library", list(CODECS))
def test_serialize(benchmark, train, library, version):
    name, data, meta, nbytes = train
    if library == "kbstream-pure" and version == "1.0" and name == "jf4m":
        pytest.skip("pure twin: oracle, not a contender")
    ser, _ = CODECS[library]
    benchmark.group = f"codec-{name}-{version}-ser"
    rounds, iterations = (100, 20) if version == "2.2" else ((15 if name == "module" else 4), 1)
    frames = benchmark.pedantic(ser, args=(data, meta, version), rounds=rounds,
                                iterations=iterations, warmup_rounds=1)
    ok = [bytes(f) for f in frames] == [bytes(f) for f in kb.serialize(data, meta, version)]
    benchmark.extra_info.update(library=library, bytes=nbytes, correct=ok)
    assert ok


TRAINS = 8   # distinct 2.2 messages decoded in turn


def _received_trains(data, version, all_scalars):
    """TRAINS messages as a client receives them, each the next train of a stream (its
    train id and timestamps differ from the one before; with ``all_scalars`` every scalar
    does).  In 2.2 the array frames are shared: their bytes are the same in every train."""
    out, arrays = [], {}
    # 1.0 keeps no state between messages; one message (134 MB for JF4M) is decoded again
    for k in range(TRAINS if version == "2.2" else 1):
        d, m = later_train(data, k, all_scalars)
        frames = _codec.serialize(d, m, version)
        if version == "2.2":
            if not arrays:
                arrays = {j: zmq.Frame(bytes(f)) for j, f in enumerate(frames) if j % 4 == 3}
            frames = [arrays[j] if j in arrays else zmq.Frame(bytes(f))
                      for j, f in enumerate(frames)]
        else:
            frames = _frames_as_received(frames)
        out.append((frames, d, m))
    return out


@pytest.mark.parametrize("values", ["train-id", "all-scalars"])
@pytest.mark.parametrize("version", ["2.2", "1.0"])
@pytest.mark.parametrize("library", list(CODECS))
def test_deserialize(benchmark, train, library, version, values):
    """Decode TRAINS consecutive trains in turn.  ``train-id``: the train id and timestamps
    change from train to train, as in a live stream; ``all-scalars``: every scalar does
    (the worst case for kbstream's decoder, which shares the scalars that repeat)."""
    name, data, meta, nbytes = train
    if values == "all-scalars" and version == "1.0":
        pytest.skip("protocol 1.0 decodes every value anew in any case")
    _, deser = CODECS[library]
    suffix = "" if values == "train-id" else "-allchange"
    benchmark.group = f"codec-{name}-{version}-deser{suffix}"
    trains = _received_trains(data, version, values == "all-scalars")
    turn = itertools.cycle([t[0] for t in trains]).__next__

    def decode_next():
        return deser(turn())

    slow = version == "1.0" and library == "karabo_bridge"
    rounds, iterations = ((10 if name == "module" else 3), 1) if slow else (100, 2 * TRAINS)
    benchmark.pedantic(decode_next, rounds=rounds, iterations=iterations, warmup_rounds=1)
    ok = True
    for frames, d_sent, m_sent in trains:   # each train decoded once more, checked in full
        d, m = deser(frames)
        for src, props in d_sent.items():
            ok = ok and m[src] == m_sent[src] and set(props) <= set(d[src])
            ok = ok and all(np.array_equal(d[src][k], v) if isinstance(v, np.ndarray)
                            else d[src][k] == v for k, v in props.items())
    benchmark.extra_info.update(library=library, bytes=nbytes, correct=bool(ok))
    assert ok


# ---- end to end over tcp loopback ---------------------------------------------------------
# Each contender (server thread + client) runs in its own process (_e2e_worker.py): process-
# wide settings of one library (kbstream.Client's allocator tuning) must not help another.
# A round = one line to the worker and one train received; the pipe adds ~0.1 ms to ~60 ms.

_WORKER = Path(__file__).resolve().parent / "_e2e_worker.py"


class _Worker:
    def __init__(self, library, server_sock, client_sock, nsources=8):
        self.proc = subprocess.Popen(
            [sys.executable, str(_WORKER), library, server_sock, client_sock, str(nsources)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise RuntimeError(f"{library} worker did not start (said {line!r})")

    def next(self):
        self.proc.stdin.write("next\n")
        return int(self.proc.stdout.readline())

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.proc.stdout.close()


@pytest.mark.parametrize("library", ["kbstream", "karabo_bridge", "raw-pyzmq"])
@pytest.mark.parametrize("server_sock, client_sock", [("REP", "REQ"), ("PUSH", "PULL")])
def test_end_to_end_jf4m(benchmark, jf4m_train, library, server_sock, client_sock):
    data, _ = jf4m_train
    nbytes = sum(v.nbytes for p in data.values() for v in p.values() if isinstance(v, np.ndarray))
    benchmark.group = f"e2e-jf4m-{server_sock}"
    worker = _Worker(library, server_sock, client_sock)
    try:
        received = benchmark.pedantic(worker.next, rounds=int(os.environ.get("KB_E2E_ROUNDS", "30")),
                                      iterations=1)
    finally:
        worker.close()
    ok = received == nbytes
    benchmark.extra_info.update(library=library, bytes=nbytes, correct=ok)
    assert ok
