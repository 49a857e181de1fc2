"""Broker benchmarks: kbstream next to karabind, same broker, same run.

1. **Announcement -> connected input**: a kbstream output instance (``kbBenchOut``, a real
   ``kbstream.pipeline.OutputChannel``) announces itself; measured from just before its
   ``slotInstanceNew`` to the hello of each waiting input arriving at the output: a kbstream
   ``InputChannel`` resolving ``kbBenchOut:output`` through :mod:`kbstream.broker`, and a
   C++ PropertyTest input (``kbIn``, in a ``karabo-cppserver``) configured for the same
   output. Both wait for the same announcement; repeated ``--reps`` times.
2. **Request/reply round trip**: ``slotGetOutputChannelInformation`` to a C++ PropertyTest,
   sequential, after 20 warm-up requests: kbstream's ``BrokerInstance.request`` versus
   karabind ``SignalSlotable.request(...).waitForReply``.

Needs RabbitMQ (``scripts/rabbitmq.sh``) and the Karabo side environment (``.venv-karabo``),
kbstream importable (installed, or ``PYTHONPATH=src``) and the repository root on the import
path, for the test stack ``tests.broker.broker_stack``. Run from the repository root:
``python -m benchmarks.bench_broker [--reps 5] [--requests 500]`` (prints a Markdown
table), or through pytest: ``python -m pytest benchmarks/bench_broker.py`` (small numbers,
records the figures in ``extra_info``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.broker.broker_stack import (CppServer, RabbitMQ, karabo_bin, rabbitmq_available,
                                       run_json, wait_until)

HERE = Path(__file__).resolve().parent


def _karabo_python():
    py = os.environ.get("KBSTREAM_KARABO_PYTHON") or str(HERE.parent / ".venv-karabo" / "bin"
                                                         / "python")
    return py if Path(py).exists() else None


def _stats(ms):
    ms = sorted(ms)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {"n": len(ms), "mean": statistics.fmean(ms), "median": statistics.median(ms),
            "p99": p99, "min": ms[0], "max": ms[-1]}


def run(reps=5, requests=500, log=print):
    """Start the stack, measure, stop everything; return the figures (milliseconds)."""
    import logging

    logging.getLogger("pika").setLevel(logging.CRITICAL)
    from kbhash import Hash, HashType

    from kbstream.broker import BrokerInstance
    from kbstream.pipeline import InputChannel, OutputChannel

    kpy = _karabo_python()
    if not rabbitmq_available() or kpy is None:
        raise RuntimeError("needs RabbitMQ (scripts/rabbitmq.sh) and .venv-karabo")
    base = Path(tempfile.mkdtemp(prefix="kbbench-broker-"))
    topic = f"kbbench{os.getpid()}"
    rmq = RabbitMQ(base / "rmq")
    rmq.start()
    server = None
    made = []
    try:
        env = dict(os.environ, KARABO_BROKER=rmq.url, KARABO_BROKER_TOPIC=topic)
        server = CppServer(karabo_bin(kpy), base, rmq.url, topic, "kbBenchServer", {
            "kbDev": {"classId": "PropertyTest", "heartbeatInterval": 10,
                      "output": {"hostname": "127.0.0.1"}},
            "kbIn": {"classId": "PropertyTest", "heartbeatInterval": 10,
                     "input": {"connectedOutputChannels": ["kbBenchOut:output"]}}}).start()
        kw = dict(broker=rmq.url, topic=topic)
        asker = BrokerInstance("kbBenchAsk", **kw)
        consumer = BrokerInstance("kbBenchIn", **kw)
        made += [asker, consumer]
        inp = InputChannel("kbBenchIn:input", connectedOutputChannels=["kbBenchOut:output"],
                           resolver=consumer.resolver, onSlowness="drop")
        consumer.add_input_channel(inp)
        asker.start()
        consumer.start()
        inp.start()

        def online(iid):
            try:
                return asker.request(iid, "slotPing", 1, timeout=1.0)
            except Exception:
                return None
        wait_until(lambda: online("kbIn") and online("kbDev"), 60, 0.2, "C++ devices online")

        # ---- 1. announcement -> connected ---------------------------------------------
        ours, cpp = [], []
        for rep in range(reps):
            out = OutputChannel("kbBenchOut:output", hostname="127.0.0.1").start()
            prod = BrokerInstance("kbBenchOut", **kw)
            prod.add_output_channel("output", out)
            t_announce = []
            original = prod._announce

            def announce(original=original, t_announce=t_announce):
                t_announce.append(time.perf_counter())
                original()
            prod._announce = announce
            seen = {}
            prod.start()
            end = time.monotonic() + 30
            while len(seen) < 2 and time.monotonic() < end:
                now = time.perf_counter()
                for iid in out.input_ids():
                    seen.setdefault(iid, now)
                time.sleep(0.0005)
            if "kbBenchIn:input" in seen:
                ours.append((seen["kbBenchIn:input"] - t_announce[0]) * 1e3)
            if "kbIn:input" in seen:
                cpp.append((seen["kbIn:input"] - t_announce[0]) * 1e3)
            log(f"  rep {rep}: " + ", ".join(f"{k} {(v - t_announce[0]) * 1e3:.1f} ms"
                                             for k, v in sorted(seen.items())))
            prod.stop()
            out.close()
            time.sleep(0.5)  # both inputs notice the closed connection
        inp.close()

        # ---- 2. request/reply ---------------------------------------------------------
        arg = Hash()
        arg.set("channelId", "output")
        arg.set("processId", os.getpid(), type=HashType.INT32)
        arg.set("hostname", asker.hostname)
        for _ in range(20):
            asker.request("kbDev", "slotGetOutputChannelInformation", arg, timeout=3)
        rt = []
        for _ in range(requests):
            t0 = time.perf_counter()
            (reply,) = asker.request("kbDev", "slotGetOutputChannelInformation", arg, timeout=3)
            rt.append((time.perf_counter() - t0) * 1e3)
        assert reply["success"] is True
        kb = run_json(kpy, ["ask", "kbBenchKarabind", "kbDev:output", str(requests)], env, 300)
        assert kb["reply"]["success"] in (True, 1)
        return {"announce_to_connected": {"kbstream": _stats(ours) if ours else None,
                                          "karabind (C++ input)": _stats(cpp) if cpp else None},
                "request_reply": {"kbstream (pika thread)": _stats(rt),
                                  "karabind SignalSlotable": _stats(kb["ms"])},
                "reps": reps, "requests": requests}
    finally:
        for i in reversed(made):
            i.stop()
        if server is not None:
            server.stop()
        rmq.stop()


def markdown(res):
    lines = [f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
             f"{platform.python_version()}, loopback, RabbitMQ private node; shared machine, "
             "orders of magnitude only.", "",
             f"Announcement -> connected input ({res['reps']} reps, same announcement for both):",
             "", "| input | mean ms | median ms | min ms | max ms |", "|---|---|---|---|---|"]
    for name, s in res["announce_to_connected"].items():
        if s:
            lines.append(f"| {name} | {s['mean']:.1f} | {s['median']:.1f} | {s['min']:.1f} | "
                         f"{s['max']:.1f} |")
    lines += ["", f"slotGetOutputChannelInformation round trip to a C++ PropertyTest "
              f"({res['requests']} sequential requests after 20 warm-up):", "",
              "| client | mean ms | median ms | p99 ms | req/s |", "|---|---|---|---|---|"]
    for name, s in res["request_reply"].items():
        lines.append(f"| {name} | {s['mean']:.2f} | {s['median']:.2f} | {s['p99']:.2f} | "
                     f"{1e3 / s['mean']:.0f} |")
    return "\n".join(lines)


def test_broker_benchmark(benchmark):
    """pytest-benchmark entry: one measured run of the whole comparison (small numbers)."""
    import pytest

    if not rabbitmq_available() or _karabo_python() is None:
        pytest.skip("needs RabbitMQ (scripts/rabbitmq.sh) and .venv-karabo")
    res = benchmark.pedantic(run, kwargs={"reps": 3, "requests": 200, "log": lambda s: None},
                             rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    assert res["request_reply"]["kbstream (pika thread)"]["n"] == 200


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--requests", type=int, default=500)
    a = p.parse_args(argv)
    res = run(a.reps, a.requests)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
