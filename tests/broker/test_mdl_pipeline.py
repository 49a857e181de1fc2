"""kbstream and Karabo's asyncio middle layer exchange pipeline data by name (issue 13).

Real ``karabo-middlelayerserver`` processes (karabo-karathon 3.1.2) with the devices of
tests/peers/mdl on the suite's private RabbitMQ:

* a ``KbMdlSink`` device's default ``InputChannel`` (``raw=False``: the middle layer asks
  kbstream's ``slotGetSchema`` for ``output.schema`` and delivers only declared keys)
  connected to a kbstream output by name receives every item, every key, the train ids
  and the end of stream;
* a kbstream ``InputChannel`` connected by name to a ``KbMdlSource`` output receives its
  items (types, train ids) and end of stream.
"""

import json
import threading

import numpy as np
import pytest

from kbhash import Hash, HashType

from broker_stack import wait_until
from mdl_stack import mdl_server, probe  # noqa: F401  (fixtures)

pytestmark = pytest.mark.karabo


def item(i):
    h = Hash()
    h.set("node.int32", i, type=HashType.INT32)
    h.set("node.string", f"kb {i}")
    h.set("node.vecInt64", [i, -i, 2 * i], type=HashType.VECTOR_INT64)
    h.set("node.ndarray", np.arange(20, dtype=np.float32).reshape(4, 5) + i)
    h.set("trainIdCopy", 5000 + i, type=HashType.UINT64)
    return h


def item_schema():
    from kbstream.pipeline import DataSchema
    return DataSchema({"node.int32": HashType.INT32, "node.string": HashType.STRING,
                       "node.vecInt64": HashType.VECTOR_INT64,
                       "node.ndarray": ("float32", (4, 5)),
                       "trainIdCopy": HashType.UINT64})


def records(path):
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_until_sent(out, input_id, data, meta, tries=400):
    """Write one item again until ``input_id`` was sent it (an input that connected but has
    not granted credit yet gets nothing: Karabo's default ``onSlowness`` for it)."""
    for _ in range(tries):
        before = out.stats().get(input_id, {}).get("sent", 0)
        out.write(data, meta)
        out.update(timeout=10)
        if out.stats()[input_id]["sent"] > before:
            return
        threading.Event().wait(0.025)
    pytest.fail(f"item never sent to {input_id}: {out.stats()}")


def test_mdl_default_input_receives_every_item_of_kbstream_output(broker_env, mdl_server,
                                                                  tmp_path):
    from kbstream.broker import BrokerInstance
    from kbstream.pipeline import OutputChannel

    record = tmp_path / "sink.jsonl"
    out = OutputChannel("kbPeer:output", hostname="127.0.0.1", schema=item_schema()).start()
    peer = BrokerInstance("kbPeer", heartbeat_interval=10)
    try:
        peer.add_output_channel("output", out)
        peer.start()
        mdl_server({"mdlSink": {"classId": "KbMdlSink", "recordPath": str(record),
                                "input": {"connectedOutputChannels": ["kbPeer:output"],
                                          "onSlowness": "wait"}}},
                   ["KbMdlSink"])
        out.wait_for_inputs(copy=["mdlSink:input"], timeout=60)
        n = 5
        for i in range(1, n + 1):
            write_until_sent(out, "mdlSink:input", item(i), {"tid": 7000 + i})
        out.signal_end_of_stream(timeout=20)
        wait_until(lambda: any("endOfStream" in r for r in records(record)), 60,
                   interval=0.2, what="end of stream at the middle-layer sink")
    finally:
        out.close()
        peer.stop()

    got = records(record)
    items = [r for r in got if "data" in r]
    assert [r["trainId"] for r in items] == [7001, 7002, 7003, 7004, 7005]
    assert got[-1] == {"endOfStream": "kbPeer:output"}
    for i, r in enumerate(items, 1):
        assert r["source"] == "kbPeer:output"
        d = r["data"]
        # every key of the item, with its value: nothing undeclared was dropped
        assert set(d) == {"node.int32", "node.string", "node.vecInt64", "node.ndarray",
                          "trainIdCopy"}
        assert d["node.int32"] == i
        assert d["node.string"] == f"kb {i}"
        # the middle layer hands a VECTOR_INT64 over as a numpy array
        assert d["node.vecInt64"] == {"dtype": "int64", "shape": [3], "values": [i, -i, 2 * i]}
        assert d["trainIdCopy"] == 5000 + i
        assert d["node.ndarray"] == {"dtype": "float32", "shape": [4, 5],
                                     "values": (np.arange(20) + i).tolist()}


def test_kbstream_input_reads_mdl_output_by_name(broker_env, mdl_server, probe):
    from kbstream.broker import BrokerInstance
    from kbstream.pipeline import InputChannel

    mdl_server({"mdlSrc": {"classId": "KbMdlSource", "output": {"hostname": "127.0.0.1"}}},
               ["KbMdlSource"])
    peer = BrokerInstance("kbReader", heartbeat_interval=10)
    got, eos = [], []
    inp = InputChannel("kbReader:input", connectedOutputChannels=["mdlSrc:output"],
                       resolver=peer.resolver, onSlowness="wait", reconnect_interval=2.0)
    inp.register_data_handler(lambda data, meta: got.append((Hash(data), meta)))
    inp.register_end_of_stream_handler(lambda ch: eos.append(1))
    peer.add_input_channel(inp)
    try:
        peer.start()
        inp.start()
        inp.wait_connected(["mdlSrc:output"], timeout=60)
        # the middle-layer output registers the connection after reading the hello
        n = 3
        wait_until(lambda: _write_and_count(peer, got) >= 1, 60, interval=0.5,
                   what="first item from the middle-layer output")
        while len(got) < n:
            before = len(got)
            peer.request("mdlSrc", "writeOutput", timeout=20)
            wait_until(lambda: len(got) > before, 30, what="next item")
        peer.request("mdlSrc", "eosOutput", timeout=20)
        wait_until(lambda: eos, 30, what="end of stream from the middle-layer output")
    finally:
        inp.close()
        peer.stop()

    counters = [int(d["node.int32"]) for d, _ in got]
    # the first writes may have gone out before the connection was registered
    assert counters == list(range(counters[0], counters[0] + len(counters)))
    for data, meta in got:
        k = int(data["node.int32"])
        assert data.get_type("node.int32") == HashType.INT32
        assert data["node.string"] == f"item {k}"
        assert data.get_type("node.vecInt64") == HashType.VECTOR_INT64
        assert list(data["node.vecInt64"]) == [k, 2 * k, 3 * k]
        arr = data["node.ndarray"]
        assert arr.dtype == np.float32 and arr.shape == (4, 5)
        assert (arr == k).all()
        assert meta.source == "mdlSrc:output"
        assert meta.tid == 1000 + k
    assert eos == [1]


def _write_and_count(peer, got):
    """One ``writeOutput``; the number of items received within 2 s after it."""
    peer.request("mdlSrc", "writeOutput", timeout=20)
    try:
        wait_until(lambda: got, 2, what="an item")
    except TimeoutError:
        pass
    return len(got)
