"""kbstream pipeline channels against real Karabo C++ channels (karabind 3.1.2).

The Karabo side runs in separate processes of the Python 3.12 side environment
(tests/peers/pipeline_driver.py).  Both directions, for copy/wait, copy/drop,
copy/queueDrop, shared with two inputs, end of stream, NDArray and ImageData
payloads, timestamps and train ids; and the proof that kbstream's credit
window falls back to Karabo's one message in flight.
"""

import threading
import time

import numpy as np
import pytest

import kbhash
from kbhash import Hash, HashType, Timestamp
from kbstream.pipeline import ChannelMetaData, InputChannel, OutputChannel, wire
from peers.karabo import require_karabo_python
from peers.pipeline import (
    KaraboPipelineInput,
    KaraboPipelineOutput,
    array_checksum,
    expected_checksum,
    expected_image_checksum,
    expected_values,
    make_array,
    pipeline_item,
)
from peers.pipeline_driver import make_scalars
from peers.tcp_relay import TcpRelay

pytestmark = pytest.mark.karabo

TIMEOUT = 30
SEC, FRAC = 1700000000, 5 * 10**17
BIG = (16, 512, 1024)


@pytest.fixture(scope="module", autouse=True)
def side_python():
    return require_karabo_python()


class Received:
    def __init__(self, inp):
        self.items = []
        self.eos = threading.Event()
        self.cond = threading.Condition()
        inp.register_data_handler(self.on_data)
        inp.register_end_of_stream_handler(lambda ch: self.eos.set())

    def on_data(self, data, meta):
        with self.cond:
            self.items.append((data, meta))
            self.cond.notify_all()

    def wait(self, n, timeout=TIMEOUT):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.items) >= n, timeout), f"{len(self.items)} < {n}"


# ------------------------------------------------------- karabind output -> kbstream input


def _check_from_karabind(data, meta, item, source="peerSender:output"):
    assert data["index"] == item["index"] and data.get_type("index") == HashType.INT32
    arr = data["data.image"]
    assert isinstance(arr, np.ndarray) and list(arr.shape) == list(item["frames"])
    assert array_checksum(arr) == expected_checksum(item)
    assert meta.source == item.get("source", source)
    assert meta.tid == item["tid"]
    assert (meta.timestamp.sec, meta.timestamp.frac) == (item["sec"], item["frac"])
    for path, value in expected_values(item).items():
        assert data[path] == value
    if item["image"]:
        img = data["data.img"]
        assert isinstance(img, kbhash.ImageData)
        assert array_checksum(img.pixels) == expected_image_checksum(item)
        assert img.encoding == kbhash.Encoding.GRAY and img.bitsPerPixel == 16


def _items(n, **kw):
    return [pipeline_item(i, tid=1000 + i, sec=SEC, frac=FRAC, **kw) for i in range(n)]


def test_karabind_output_to_kbstream_input_copy_wait():
    with KaraboPipelineOutput() as out:
        inp = InputChannel("kbIn:input", onSlowness="wait").start()
        got = Received(inp)
        try:
            inp.connect(out.info, "peerSender:output")
            out.wait_inputs(copy=["kbIn:input"])
            items = [pipeline_item(0, frames=BIG, tid=1000, sec=SEC, frac=FRAC, image=True, scalars=20)]
            items += _items(5, scalars=3)[1:]
            for item in items:
                out.write([item])
            out.eos()
            assert got.eos.wait(TIMEOUT)
            assert len(got.items) == len(items)
            for (data, meta), item in zip(got.items, items):
                _check_from_karabind(data, meta, item)
        finally:
            inp.close()


@pytest.mark.parametrize("policy", ["drop", "queueDrop"])
def test_karabind_output_to_slow_kbstream_input(policy):
    with KaraboPipelineOutput() as out:
        inp = InputChannel("kbIn:input", onSlowness=policy, maxQueueLength=2).start()
        got = Received(inp)
        inp.register_data_handler(lambda d, m: (time.sleep(0.05), got.on_data(d, m)))
        try:
            inp.connect(out.info, "peerSender:output")
            out.wait_inputs(copy=["kbIn:input"])
            n = 30
            out.stream(n, pipeline_item(0, tid=0, sec=SEC, frac=FRAC), eos=True, timeout=TIMEOUT)
            assert got.eos.wait(TIMEOUT)
            idx = [d["index"] for d, _ in got.items]
            assert idx == sorted(idx) and idx[0] == 0 and 0 < len(idx) < n
        finally:
            inp.close()


def test_karabind_output_to_two_shared_kbstream_inputs():
    # noInputShared=wait: with the default (drop) Karabo drops a message whose
    # round-robin target has not granted credit yet
    with KaraboPipelineOutput(no_input_shared="wait") as out:
        inputs = [InputChannel(f"kbW{k}:input", dataDistribution="shared").start() for k in range(2)]
        recs = [Received(i) for i in inputs]
        try:
            for i in inputs:
                i.connect(out.info, "peerSender:output")
            out.wait_inputs(shared=["kbW0:input", "kbW1:input"])
            out.register_selector("round_robin")
            items = _items(12)
            for item in items:
                out.write([item])
            out.eos()
            for r in recs:
                assert r.eos.wait(TIMEOUT)  # both shared inputs get the end of stream
            idx = [sorted(d["index"] for d, _ in r.items) for r in recs]
            assert sorted(idx[0] + idx[1]) == list(range(12))
            assert idx == [list(range(0, 12, 2)), list(range(1, 12, 2))]
        finally:
            for i in inputs:
                i.close()


def test_credit_window_falls_back_to_one_message_in_flight_with_karabind():
    """kbstream's input asks for 4 messages in flight; Karabo's output keeps to one."""
    with KaraboPipelineOutput() as out:
        relay = TcpRelay(("127.0.0.1", out.port))
        inp = InputChannel("kbIn:input", onSlowness="wait", credit_window=4).start()
        got = Received(inp)
        slow = threading.Event()
        inp.register_data_handler(lambda d, m: (slow.wait(0.05), got.on_data(d, m)))
        try:
            inp.connect({"hostname": "127.0.0.1", "port": relay.port}, "peerSender:output")
            out.wait_inputs(copy=["kbIn:input"])
            out.stream(12, pipeline_item(0, tid=0, sec=SEC, frac=FRAC), eos=True, timeout=TIMEOUT)
            assert got.eos.wait(TIMEOUT)
            assert [d["index"] for d, _ in got.items] == list(range(12))
            conn = relay.wait_connection(0)
            # Walk the byte streams in time: every data message must be covered by a credit
            # (the hello counts as one, each update as one, never more than one outstanding).
            outstanding = 0
            s2c = c2s = b""
            sent_msgs = recv_updates = 0
            for _, direction, chunk in conn.chunks:
                if direction == "c2s":
                    c2s += chunk
                    while len(c2s) >= 4 and len(c2s) >= 4 + int.from_bytes(c2s[:4], "little"):
                        n = int.from_bytes(c2s[:4], "little")
                        reason = kbhash.decode(c2s[4:4 + n])["reason"]
                        c2s = c2s[4 + n:]
                        recv_updates += reason in ("hello", "update")
                        outstanding = 1  # Karabo: extra credits never add up
                else:
                    s2c += chunk
                    while len(s2c) >= 4:
                        h = int.from_bytes(s2c[:4], "little")
                        if len(s2c) < 8 + h:
                            break
                        b = int.from_bytes(s2c[4 + h:8 + h], "little")
                        if len(s2c) < 8 + h + b:
                            break
                        s2c = s2c[8 + h + b:]
                        sent_msgs += 1
                        # a second message before the next credit would be two in flight
                        assert outstanding == 1, f"message {sent_msgs} sent without credit"
                        outstanding = 0
            assert sent_msgs == 13  # 12 items + EOS, each after its own credit
            assert recv_updates >= sent_msgs
        finally:
            inp.close()
            relay.close()


# ------------------------------------------------------- kbstream output -> karabind input


def _our_item(item):
    """The Hash the Karabo peer's input checks (same content as its own output writes)."""
    h = Hash()
    h["index"] = item["index"]
    h["data.image"] = make_array(item["fill"], item["index"], item["frames"], item["dtype"])
    if item["image"]:
        h["data.img"] = kbhash.ImageData(make_array(item["fill"], item["index"], [32, 64], "uint16"))
    for path, tname, value in make_scalars(item["index"], item["scalars"]):
        h.set(path, value, type=HashType[tname])
    meta = ChannelMetaData(item.get("source", "kbOut:output"), Timestamp(item["sec"], item["frac"], item["tid"]))
    return h, meta


def _check_at_karabind(ev, item, source="kbOut:output"):
    assert ev["index"] == item["index"]
    assert ev["source"] == item.get("source", source)
    assert (ev["tid"], ev["sec"], ev["frac"]) == (item["tid"], item["sec"], item["frac"])
    assert ev["shape"] == list(item["frames"])
    assert ev["checksum"] == expected_checksum(item)
    assert ev["values"] == expected_values(item)
    assert ev["types"]["data.image"] == "HASH"
    if item["image"]:
        assert ev["image"]["checksum"] == expected_image_checksum(item)
        assert ev["image"]["encoding"] == "GRAY" and ev["image"]["dims"] == [32, 64]


@pytest.mark.parametrize("window", [1, 4])
def test_kbstream_output_to_karabind_input_copy_wait(window):
    out = OutputChannel("kbOut:output", hostname="127.0.0.1").start()
    try:
        with KaraboPipelineInput(["kbOut:output"], on_slowness="wait") as peer:
            peer.connect(out.port, output="kbOut:output")
            out.wait_for_inputs(copy=["peerReceiver:input"])
            items = [pipeline_item(0, frames=BIG, tid=1000, sec=SEC, frac=FRAC, image=True, scalars=20)]
            items += [pipeline_item(i, tid=1000 + i, sec=SEC, frac=FRAC + i, scalars=2) for i in range(1, 6)]
            for item in items:
                out.write(*_our_item(item))
                out.update(timeout=TIMEOUT)
            out.signal_end_of_stream(timeout=TIMEOUT)
            events, eos = peer.receive_stream(timeout=TIMEOUT)
            assert eos is not None and len(events) == len(items)
            for ev, item in zip(events, items):
                _check_at_karabind(ev, item)
    finally:
        out.close()


def test_kbstream_output_several_items_per_message_to_karabind():
    out = OutputChannel("kbOut:output", hostname="127.0.0.1").start()
    try:
        with KaraboPipelineInput(["kbOut:output"], on_slowness="wait") as peer:
            peer.connect(out.port, output="kbOut:output")
            out.wait_for_inputs(copy=["peerReceiver:input"])
            items = [pipeline_item(i, tid=7 + i, sec=SEC, frac=FRAC) for i in range(6)]
            for k in range(0, 6, 3):
                for item in items[k:k + 3]:
                    out.write(*_our_item(item))
                out.update(timeout=TIMEOUT)
            out.signal_end_of_stream(timeout=TIMEOUT)
            events, eos = peer.receive_stream(timeout=TIMEOUT)
            assert [e["index"] for e in events] == list(range(6))
            for ev, item in zip(events, items):
                _check_at_karabind(ev, item)
    finally:
        out.close()


@pytest.mark.parametrize("policy", ["drop", "queueDrop"])
def test_kbstream_output_to_slow_karabind_input(policy):
    out = OutputChannel("kbOut:output", hostname="127.0.0.1").start()
    try:
        with KaraboPipelineInput(["kbOut:output"], on_slowness=policy, sleep=0.05) as peer:
            peer.connect(out.port, output="kbOut:output")
            out.wait_for_inputs(copy=["peerReceiver:input"])
            n = 30
            for i in range(n):
                out.write(*_our_item(pipeline_item(i, tid=i, sec=SEC, frac=FRAC)))
                out.update(timeout=TIMEOUT)
            out.signal_end_of_stream(timeout=TIMEOUT)
            events, eos = peer.receive_stream(timeout=TIMEOUT)
            idx = [e["index"] for e in events]
            dropped = out.stats()["peerReceiver:input"]["dropped"]
            assert eos is not None and idx == sorted(idx) and idx[0] == 0
            assert len(idx) + dropped == n and dropped > 0
            if policy == "queueDrop":
                assert idx[-1] == n - 1  # kbstream drops the oldest queued message
    finally:
        out.close()


def test_kbstream_output_to_two_shared_karabind_inputs():
    out = OutputChannel("kbOut:output", hostname="127.0.0.1", noInputShared="wait",
                        distributionMode="round-robin").start()
    peers = [KaraboPipelineInput(["kbOut:output"], instance=f"peerW{k}", data_distribution="shared")
             for k in range(2)]
    try:
        for p in peers:
            p.connect(out.port, output="kbOut:output")
        out.wait_for_inputs(shared=["peerW0:input", "peerW1:input"])
        for i in range(10):
            out.write(*_our_item(pipeline_item(i, tid=i, sec=SEC, frac=FRAC)))
            out.update(timeout=TIMEOUT)
        out.signal_end_of_stream(timeout=TIMEOUT)
        got = []
        for p in peers:
            events, eos = p.receive_stream(timeout=TIMEOUT)
            assert eos is not None  # every shared input gets the end of stream
            got.append([e["index"] for e in events])
        assert sorted(got[0] + got[1]) == list(range(10))
        assert sorted(got, key=len) == [list(range(0, 10, 2)), list(range(1, 10, 2))] or \
            sorted(got) == [list(range(0, 10, 2)), list(range(1, 10, 2))]
    finally:
        for p in peers:
            p.close()
        out.close()


def test_kbstream_output_answers_a_karabind_hello_exactly_like_karabo():
    """What a karabind input sends is byte-identical with the captured Karabo session."""
    out = OutputChannel("kbOut:output", hostname="127.0.0.1").start()
    relay = TcpRelay(("127.0.0.1", out.port))
    try:
        with KaraboPipelineInput(["kbOut:output"], on_slowness="wait") as peer:
            peer.connect(relay.port, output="kbOut:output")
            out.wait_for_inputs(copy=["peerReceiver:input"])
            out.write(*_our_item(pipeline_item(0, tid=1, sec=SEC, frac=FRAC)))
            out.update(timeout=TIMEOUT)
            out.signal_end_of_stream(timeout=TIMEOUT)
            events, eos = peer.receive_stream(timeout=TIMEOUT)
            assert len(events) == 1 and eos is not None
            conn = relay.wait_connection(0)
            sent = conn.client_bytes()
            assert sent.startswith(wire.hello("peerReceiver:input", "copy", "wait", 2))
    finally:
        relay.close()
        out.close()
