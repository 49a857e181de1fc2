"""kbstream output -> kbstream input over TCP loopback, for every channel option."""

import socket
from pathlib import Path
import struct
import threading
import time

import numpy as np
import pytest

import kbhash
from kbhash import Hash, HashType, Timestamp
from kbstream.errors import BindError, EncodeError, KbStreamError, StateError
from kbstream.pipeline import (
    ChannelClosed,
    ChannelTimeout,
    ConnectionLost,
    ConnectionStatus,
    ConnectTimeout,
    DataSchema,
    InputChannel,
    OutputChannel,
    PipelineConfigError,
    PipelineError,
    SchemaError,
    wire,
)
from kbstream.pipeline import shm as pshm

TIMEOUT = 20


class Collector:
    """Records what an input's handlers see."""

    def __init__(self, inp, delay=0.0):
        self.items = []
        self.batches = []
        self.eos = 0
        self.delay = delay
        self.cond = threading.Condition()
        self.tracker = []
        inp.register_data_handler(self.on_data)
        inp.register_end_of_stream_handler(self.on_eos)
        inp.register_input_handler(lambda batch: self.batches.append(batch.size()))
        inp.register_connection_tracker(lambda oid, st: self.tracker.append((oid, st)))

    def on_data(self, data, meta):
        if self.delay:
            time.sleep(self.delay)
        with self.cond:
            self.items.append((data["index"], meta.tid, meta.source, data))
            self.cond.notify_all()

    def on_eos(self, ch):
        with self.cond:
            self.eos += 1
            self.cond.notify_all()

    def wait_eos(self, n=1, timeout=TIMEOUT):
        with self.cond:
            assert self.cond.wait_for(lambda: self.eos >= n, timeout), f"EOS {self.eos} < {n}"

    def indices(self):
        return [i for i, *_ in self.items]


@pytest.fixture
def channels():
    made = []

    def make_output(cid="sender:output", **kw):
        out = OutputChannel(cid, hostname="127.0.0.1", **kw)
        made.append(out)
        return out.start()

    def make_input(cid="receiver:input", start=True, **kw):
        inp = InputChannel(cid, reconnect_interval=0.2, **kw)
        made.append(inp)
        return inp.start() if start else inp

    yield make_output, make_input
    for ch in reversed(made):
        ch.close()


def copy_pair(channels, **input_options):
    """An output and one copy input connected to it, with a Collector on the input."""
    make_output, make_input = channels
    out = make_output()
    inp = make_input(**input_options)
    col = Collector(inp)
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    return out, inp, col


def send(out, n, start=0, shape=(4, 8)):
    frame = np.zeros(shape, np.uint16)
    for i in range(start, start + n):
        frame[...] = i
        out.write({"index": i, "image": frame}, {"tid": 10_000 + i, "timestamp": 1700000000.0})
        out.update(timeout=TIMEOUT)


def test_copy_wait_delivers_everything_in_order_to_a_slow_consumer(channels):
    make_output, make_input = channels
    out = make_output()
    inp = make_input(onSlowness="wait")
    col = Collector(inp, delay=0.01)
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    send(out, 40)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.indices() == list(range(40))
    for i, tid, source, data in col.items:
        assert tid == 10_000 + i and source == "sender:output"
        assert data["image"].dtype == np.uint16 and data["image"].shape == (4, 8)
        assert (data["image"] == i).all()
    st = out.stats()["receiver:input"]
    assert st["sent"] == 41 and st["dropped"] == 0  # 40 messages + EOS


@pytest.mark.parametrize("policy", ["drop", "queueDrop"])
def test_drop_policies_account_for_every_item(channels, policy):
    make_output, make_input = channels
    out = make_output()
    inp = make_input(onSlowness=policy, maxQueueLength=2)
    col = Collector(inp, delay=0.02)
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    n = 60
    send(out, n)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    st = out.stats()["receiver:input"]
    got = col.indices()
    assert got == sorted(got) and len(set(got)) == len(got)
    assert len(got) + st["dropped"] == n
    assert st["dropped"] > 0  # the consumer is 20x slower than the sender
    if policy == "queueDrop":
        assert got[-1] == n - 1  # the oldest are dropped, the newest survive


def test_scatter_one_output_many_copy_inputs(channels):
    make_output, make_input = channels
    out = make_output()
    ids = [f"r{k}:input" for k in range(3)]
    cols = []
    for iid in ids:
        inp = make_input(iid, onSlowness="wait")
        cols.append(Collector(inp))
        inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=ids)
    send(out, 10)
    out.signal_end_of_stream(timeout=TIMEOUT)
    for col in cols:
        col.wait_eos()
        assert col.indices() == list(range(10))


def test_gather_many_outputs_one_input_eos_for_every_stream(channels):
    make_output, make_input = channels
    outs = [make_output(f"s{k}:output") for k in range(3)]
    inp = make_input(onSlowness="wait")
    col = Collector(inp)
    for out in outs:
        inp.connect(out.info, out.channel_id)
    for out in outs:
        out.wait_for_inputs(copy=["receiver:input"])
    for stream in range(2):
        for k, out in enumerate(outs):
            send(out, 3, start=100 * k + 10 * stream)
        for k, out in enumerate(outs):
            out.signal_end_of_stream(timeout=TIMEOUT)
            if k < 2:
                time.sleep(0.1)
                assert col.eos == stream  # not before every output has ended
        col.wait_eos(stream + 1)
    assert col.eos == 2
    assert sorted(col.indices()) == sorted(100 * k + 10 * s + j for k in range(3) for s in range(2) for j in range(3))
    assert {src for _, _, src, _ in col.items} == {"s0:output", "s1:output", "s2:output"}


def _shared_setup(channels, n_inputs=2, delay=0.0, **out_kw):
    make_output, make_input = channels
    out = make_output(**out_kw)
    ids = [f"w{k}:input" for k in range(n_inputs)]
    cols = []
    for iid in ids:
        inp = make_input(iid, dataDistribution="shared")
        cols.append(Collector(inp, delay=delay))
        inp.connect(out.info, "sender:output")
    out.wait_for_inputs(shared=ids)
    return out, ids, cols


def test_shared_load_balanced_wait_splits_without_loss(channels):
    out, ids, cols = _shared_setup(channels, noInputShared="wait", delay=0.005)
    send(out, 40)
    out.signal_end_of_stream(timeout=TIMEOUT)
    for col in cols:
        col.wait_eos()  # every shared input gets the end of stream
    got = sorted(i for col in cols for i in col.indices())
    assert got == list(range(40))
    assert all(col.items for col in cols)


def test_shared_round_robin(channels):
    out, ids, cols = _shared_setup(channels, noInputShared="wait", distributionMode="round-robin")
    send(out, 20)
    out.signal_end_of_stream(timeout=TIMEOUT)
    for col in cols:
        col.wait_eos()
    assert cols[0].indices() == list(range(0, 20, 2))
    assert cols[1].indices() == list(range(1, 20, 2))


def test_shared_custom_selector(channels):
    out, ids, cols = _shared_setup(channels, noInputShared="wait", shared_selector=lambda ids_: "w1:input")
    send(out, 10)
    out.signal_end_of_stream(timeout=TIMEOUT)
    for col in cols:
        col.wait_eos()
    assert cols[0].indices() == [] and cols[1].indices() == list(range(10))


def test_shared_selector_unknown_id_drops(channels):
    out, ids, cols = _shared_setup(channels, shared_selector=lambda ids_: "")
    send(out, 5)
    out.signal_end_of_stream(timeout=TIMEOUT)
    for col in cols:
        col.wait_eos()
    assert out.stats()["__shared__"]["dropped"] == 5 and not any(c.items for c in cols)


@pytest.mark.parametrize("policy", ["drop", "queueDrop"])
def test_no_input_shared_accounting(channels, policy):
    out, ids, cols = _shared_setup(channels, noInputShared=policy, delay=0.02, sharedQueueLength=3)
    n = 50
    send(out, n)
    out.signal_end_of_stream(timeout=TIMEOUT)
    for col in cols:
        col.wait_eos()
    st = out.stats()
    got = [i for col in cols for i in col.indices()]
    dropped = st["__shared__"]["dropped"] + sum(st[i]["dropped"] for i in ids)
    assert len(got) == len(set(got)) and len(got) + dropped == n and dropped > 0


def test_min_data_batches(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait", minData=3)
    send(out, 10)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.batches == [3, 3, 3, 1]  # the last round is short: end of stream
    assert col.indices() == list(range(10))


def test_min_data_zero_collects_until_end_of_stream(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait", minData=0)
    send(out, 12)
    time.sleep(0.2)
    assert col.items == []  # nothing handled before the end of stream
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.batches == [12] and col.indices() == list(range(12))


def test_respond_to_end_of_stream_false(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait", respondToEndOfStream=False)
    send(out, 3)
    out.signal_end_of_stream(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while inp.eos_count < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inp.eos_count == 1 and col.eos == 0 and col.indices() == [0, 1, 2]


def test_delay_on_input_still_delivers(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait", delayOnInput=20)
    send(out, 5)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.indices() == list(range(5))


def test_wait_update_times_out_on_a_stuck_consumer(channels):
    make_output, make_input = channels
    out = make_output()
    inp = make_input(onSlowness="wait", minData=1)
    block = threading.Event()
    inp.register_data_handler(lambda d, m: block.wait(TIMEOUT))
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    with pytest.raises(ChannelTimeout):
        for i in range(50):
            out.write({"index": i})
            out.update(timeout=0.5)
    block.set()


def test_concurrent_writers(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait")

    def writer(k):
        for j in range(25):
            out.write({"index": 1000 * k + j})
            out.update(timeout=TIMEOUT)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    got = col.indices()
    assert sorted(got) == sorted(1000 * k + j for k in range(4) for j in range(25))
    for k in range(4):  # each writer's items stay in its order
        mine = [i for i in got if i // 1000 == k]
        assert mine == sorted(mine)


def test_reconnects_when_the_output_comes_back(channels):
    make_output, make_input = channels
    out = make_output()
    mapping = {"sender:output": out.info}
    inp = make_input(connectedOutputChannels=["sender:output"], onSlowness="wait", resolver=mapping, start=False)
    col = Collector(inp)  # its tracker sees every status change
    inp.start()
    out.wait_for_inputs(copy=["receiver:input"])
    send(out, 3)
    out.close()
    deadline = time.monotonic() + TIMEOUT
    while inp.connection_status()["sender:output"] != ConnectionStatus.DISCONNECTED:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    out2 = make_output()
    mapping["sender:output"] = out2.info  # new port
    out2.wait_for_inputs(copy=["receiver:input"], timeout=TIMEOUT)
    send(out2, 3, start=3)
    out2.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.indices() == list(range(6))
    statuses = [st for _, st in col.tracker]
    assert statuses.count(ConnectionStatus.CONNECTED) >= 2 and ConnectionStatus.DISCONNECTED in statuses


def test_input_resolver_returning_none_retries(channels):
    make_output, make_input = channels
    out = make_output()
    calls = []

    def resolver(oid):
        calls.append(oid)
        return out.info if len(calls) >= 3 else None

    inp = make_input(connectedOutputChannels=["sender:output"], onSlowness="wait", resolver=resolver, start=False)
    col = Collector(inp)
    inp.start()
    out.wait_for_inputs(copy=["receiver:input"], timeout=TIMEOUT)
    send(out, 2)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert len(calls) >= 3 and col.indices() == [0, 1]


def _fake_output(script):
    """A TCP server that reads the hello and then sends ``script(sock)``; returns its info."""
    srv = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def recv_exactly(s, n):
        buf = b""
        while len(buf) < n:
            part = s.recv(n - len(buf))
            if not part:  # the input went away before its hello was complete
                return None
            buf += part
        return buf

    def run():
        srv.settimeout(TIMEOUT)
        try:
            while True:
                s, _ = srv.accept()
                accepted.append(s)
                with s:
                    try:
                        head = recv_exactly(s, 4)
                        if head is None or recv_exactly(s, struct.unpack("<I", head)[0]) is None:
                            continue
                        script(s)
                    except OSError:
                        pass
        except OSError:
            pass

    threading.Thread(target=run, daemon=True).start()
    return {"hostname": "127.0.0.1", "port": srv.getsockname()[1]}, srv, accepted


def _against_fake_output(make_input, frame, connections=2, **input_options):
    """An input connected to a _fake_output that sends ``frame`` after each hello, until
    the input has connected ``connections`` times (it came back after each connection the
    output broke); returns its Collector."""
    info, srv, accepted = _fake_output(lambda s: s.sendall(frame))
    inp = make_input(**input_options)
    col = Collector(inp)
    inp.connect(info, "fake:output")
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(accepted) < connections:
            assert time.monotonic() < deadline, f"the input connected {len(accepted)} times"
            time.sleep(0.01)
    finally:
        srv.close()
    return col


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # absurd header length
        struct.pack("<I", 8) + b"garbage!" + struct.pack("<I", 0),  # not a Hash
        wire.eos_message()[:-4] + struct.pack("<I", 0xFFFFFFF0),  # body size beyond max_message_size
        (lambda m: m[0][:-4] + struct.pack("<I", 100))(wire.data_message([(Hash("a", 1), wire.ChannelMetaData("x"))])),
    ],
    ids=["header-size", "not-a-hash", "absurd-body", "sizes-disagree"],
)
def test_input_closes_garbage_connections_and_reconnects(channels, payload, caplog):
    make_output, make_input = channels
    col = _against_fake_output(make_input, payload, onSlowness="wait", max_message_size=1 << 30)
    assert col.items == []
    assert any("closing connection to fake:output" in r.message or "lost" in r.message for r in caplog.records)


def test_input_survives_a_peer_that_dies_mid_message(channels):
    make_output, make_input = channels
    msg = b"".join(bytes(b) for b in wire.data_message(
        [(Hash("index", 1, "arr", np.zeros(1000, np.uint8)), wire.ChannelMetaData("x"))]))
    col = _against_fake_output(make_input, msg[: len(msg) - 500], onSlowness="wait")
    assert col.items == []


def test_output_closes_bad_inputs_and_keeps_serving(channels):
    make_output, make_input = channels
    out = make_output()
    good = make_input(onSlowness="wait")
    col = Collector(good)
    good.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    for junk in (b"\xff\xff\xff\xff", struct.pack("<I", 4) + b"junk",
                 wire.update("nobody:input"),  # update before hello
                 wire.hello("local:input", memory_location="local")):
        s = socket.create_connection(("127.0.0.1", out.port))
        s.sendall(junk)
        s.settimeout(TIMEOUT)
        assert s.recv(1) == b""  # closed by the output
        s.close()
    send(out, 3)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.indices() == [0, 1, 2]
    assert out.input_ids() == ["receiver:input"]


def _raw_input(port, instance_id):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(TIMEOUT)
    s.sendall(wire.hello(instance_id, "copy", "wait", 2))
    return s


def test_hello_with_known_id_replaces_old_connection(channels):
    make_output, _ = channels
    out = make_output()
    a = _raw_input(out.port, "twin:input")
    try:
        out.wait_for_inputs(copy=["twin:input"])
        b = _raw_input(out.port, "twin:input")
        try:
            assert a.recv(1) == b""  # the output closed the old connection
            out.write({"index": 1})
            out.update(timeout=TIMEOUT)
            hlen = struct.unpack("<I", b.recv(4))[0]  # the new one gets the data
            assert 0 < hlen < wire.MAX_HEADER_SIZE
            assert out.input_ids() == ["twin:input"]
        finally:
            b.close()
    finally:
        a.close()


def test_output_schema_validation(channels):
    make_output, _ = channels
    schema = DataSchema({"image": ("uint16", (4, 8)), "index": HashType.INT32})
    out = make_output(schema=schema)
    out.write({"index": 1, "image": np.zeros((4, 8), np.uint16)})
    with pytest.raises(SchemaError, match=r"'image' has dtype float64, expected uint16"):
        out.write({"index": 1, "image": np.zeros((4, 8))})
    with pytest.raises(SchemaError, match=r"'index' is missing"):
        out.write({"image": np.zeros((4, 8), np.uint16)})
    with pytest.raises(SchemaError, match=r"'image' has shape \(2, 8\)"):
        out.write({"index": 1, "image": np.zeros((2, 8), np.uint16)})


def test_input_schema_reports_mismatches(channels):
    make_output, make_input = channels
    out = make_output()
    seen = []
    inp = make_input(onSlowness="wait", schema=DataSchema({"image": ("uint16", (None, 8))}),
                     on_schema_mismatch=lambda data, problems: seen.append(problems))
    col = Collector(inp)
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    send(out, 2)  # matches
    out.write({"index": 2, "image": np.zeros((4, 8), np.float32)})
    out.update(timeout=TIMEOUT)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.indices() == [0, 1, 2]  # delivered, and reported
    assert inp.schema_mismatches == 1 and seen == [["'image' has dtype float32, expected uint16"]]


def test_closed_channels(channels):
    make_output, _ = channels
    out = make_output()
    out.close()
    with pytest.raises(ChannelClosed):
        out.write({"a": 1})


def test_imagedata_and_timestamps_travel(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait")
    img = kbhash.ImageData(np.arange(12, dtype=np.uint16).reshape(3, 4))
    h = Hash("index", 7, "data.img", img)
    h.set("data.trainId", 2**40, type=HashType.UINT64)
    out.write(h, wire.ChannelMetaData("custom/source", Timestamp(1700000001, 25 * 10**16, 99)))
    out.update(timeout=TIMEOUT)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    (index, tid, source, data), = col.items
    assert (index, tid, source) == (7, 99, "custom/source")
    assert data["data.img"] == img and data.get_type("data.trainId") == HashType.UINT64


# ------------------------------------------------------- same-host shared-memory path

BIG_FRAME = (8, 256, 256)  # 1 MiB of uint16: above the shared-memory threshold
needs_shm = pytest.mark.skipif(not pshm.available(), reason="no shared memory on this platform")


def _shm_files():
    import os

    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(f"kbstream-{os.getpid()}-"))


def _slot_fds():
    """This process's open descriptors of slot memfds."""
    import os

    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:kbstream-slot"):
                out.append(fd)
        except OSError:
            pass
    return out


@needs_shm
def test_a_slot_that_cannot_be_allocated_falls_back_to_tcp_and_leaves_nothing(monkeypatch):
    """No memory for a slot: acquire() says None (the caller sends over TCP), the memfd it
    began is closed, the budget is untouched, and a slot being replaced stays usable."""
    import errno
    import gc
    import os

    # slot memfds of earlier tests' channels that only a cyclic collection frees are not
    # this test's business: collect them, and count from what is left
    gc.collect()
    base = _slot_fds()
    budget = pshm.SlotBudget()
    ring = pshm.SlotRing(None, budget, 1)
    index, seg = ring.acquire(1 << 16)
    ring.release(index)
    fds = _slot_fds()   # the slot's memfd (until passed to an input) and its mapping's
    assert len(fds) > len(base)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert ring.acquire(4 << 20) is None          # would replace the free slot: fails first
    assert _slot_fds() == fds                     # no descriptor left behind
    assert (budget.slots, budget.bytes) == (1, seg.size)
    got = ring.acquire(1 << 10)
    assert got is not None and got[1] is seg      # the old slot is still usable
    got[1].view[:4] = b"abcd"
    ring.close()
    assert (budget.slots, budget.bytes) == (0, 0)
    assert _slot_fds() == base                    # the slot's own memfd is closed too


@needs_shm
def test_a_slot_the_system_refuses_never_kills_the_sender():
    """In a child whose file size limit is 2 MiB (RLIMIT_FSIZE, which memfds obey): a
    4 MiB slot is refused (acquire() gives None, the message would go over TCP) instead of
    being mapped and then killing the process with a signal when written; a slot that
    fits works."""
    import subprocess
    import sys

    script = f"""
import resource, sys
sys.path.insert(0, {str(Path(pshm.__file__).parents[2])!r})
from kbstream.pipeline import shm
resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
ring = shm.SlotRing(None, shm.SlotBudget(), 4)
assert ring.acquire(4 << 20) is None
assert ring.budget.slots == 0 and ring.slots == []
index, seg = ring.acquire(1 << 20)
seg.view[:] = b"x" * seg.size
ring.close()
print("ok", seg.size)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["ok", str(1 << 20)]


@needs_shm
def test_shared_memory_path_is_used_and_slots_are_not_reused_while_held(channels):
    make_output, make_input = channels
    out = make_output()
    inp = make_input(onSlowness="wait")
    kept = []
    done = threading.Event()
    inp.register_data_handler(lambda d, m: kept.append((d["index"], d["image"])))
    inp.register_end_of_stream_handler(lambda ch: done.set())
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    n = 30
    send(out, n, shape=BIG_FRAME)
    out.signal_end_of_stream(timeout=TIMEOUT)
    assert done.wait(TIMEOUT)
    st = out.stats()["receiver:input"]
    assert st["shm"] > 0  # big messages went through shared memory
    # every array we kept still holds its own values: no slot was reused under it
    assert [i for i, _ in kept] == list(range(n))
    for i, arr in kept:
        assert arr.shape == BIG_FRAME and (arr == i).all()
    assert _shm_files() == []  # slots are memfds: never a file in /dev/shm


@needs_shm
def test_shared_memory_slots_are_recycled_when_released(channels):
    make_output, make_input = channels
    out = make_output()
    inp = make_input(onSlowness="wait")
    col = Collector(inp)  # keeps the data Hashes: drop them to let slots go
    inp.register_data_handler(lambda d, m: col.on_data(Hash("index", d["index"], "sum", int(d["image"].sum())), m))
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    n = 40
    send(out, n, shape=BIG_FRAME)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    st = out.stats()["receiver:input"]
    assert col.indices() == list(range(n))
    assert [d["sum"] for *_, d in col.items] == [i * int(np.prod(BIG_FRAME)) for i in range(n)]
    assert st["shm"] == n  # released slots were reused: no fallback to TCP was needed
    with out._lock:
        assert len(out._inputs["receiver:input"].ring.slots) <= 12


@needs_shm
def test_messages_queued_for_a_slow_input_still_travel_through_shared_memory(channels):
    """queueDrop keeps messages the input has no credit for; sent later, they still go
    through shared memory (and hold the values of when they were written)."""
    make_output, make_input = channels
    out = make_output()
    inp = make_input(onSlowness="queueDrop", maxQueueLength=50)
    col = Collector(inp)

    def slow(d, m):
        time.sleep(0.01)
        col.on_data(Hash("index", d["index"], "sum", int(d["image"].sum())), m)

    inp.register_data_handler(slow)
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    n = 30
    send(out, n, shape=BIG_FRAME)   # one frame array, overwritten for every message
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    st = out.stats()["receiver:input"]
    assert col.indices() == list(range(n)) and st["dropped"] == 0
    assert [d["sum"] for *_, d in col.items] == [i * int(np.prod(BIG_FRAME)) for i in range(n)]
    assert st["shm"] == n


def test_serving_an_input_never_waits_behind_a_send_in_flight(channels):
    """While a send to an input is in flight (a slow one can last send_timeout), what is
    handed out to it after waits for that sender: the I/O thread asked to serve it
    returns at once and goes on serving everybody else; the copy goes out, in order,
    when the send in flight ends."""
    from kbstream.pipeline import output as poutput

    make_output, make_input = channels
    out, inp, col = copy_pair(channels, onSlowness="queueDrop")
    conn = out._inputs["receiver:input"]
    with out._lock:   # this test is the sender of the first end of stream
        first = out._policy.offer([wire.eos_message()], eos=True)
        in_flight = out._policy.next_send(conn)
        second = out._policy.offer([wire.eos_message()], eos=True)
        assert out._policy.detach(conn, second.entry, queued_only=True) is not None  # a copy now
        assert not out._dispatch([conn])  # its sender is busy: nothing for the I/O thread
        out._kick.add(conn)  # ask anyway
    out._wake()
    assert in_flight is first.entry and first.serve == [conn] and second.done
    other = RawInput(out.port, "other:input", slow="drop")  # the I/O thread still serves others
    try:
        out.wait_for_inputs(copy=["other:input"], timeout=TIMEOUT)
        assert col.eos == 0
        tx, error = out._start_tx(conn, in_flight, None)
        assert error is None and poutput._push(conn.sock, tx) is None and not tx.views
        assert out._finish(conn, tx, None)  # the copy is next: the I/O thread sends it
        out._wake()
        col.wait_eos(2)
        deadline = time.monotonic() + TIMEOUT
        while out.stats()["receiver:input"]["sent"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # the I/O thread counts it once the socket took it all
        assert out.stats()["receiver:input"]["sent"] == 2
    finally:
        other.close()


def test_input_without_shared_memory_gets_tcp(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait", use_shm=False)
    send(out, 5, shape=BIG_FRAME)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.indices() == list(range(5)) and out.stats()["receiver:input"]["shm"] == 0


@needs_shm
@pytest.mark.parametrize("key, ref, why", [
    ("kbShm", {"name": "/etc/passwd", "slot": 0}, "by file name (kbShm) is never accepted"),
    ("kbShm", {"name": "kbstream-does-not-exist", "slot": 0}, "by file name (kbShm) is never accepted"),
    # a reference without the descriptor: this output never connected the Unix socket
    ("kbShmFd", {"slot": 0, "gen": 1}, "did not connect its shared-memory socket"),
    ("kbShmFd", {"slot": 300, "gen": 1}, "slot 300 out of range"),
    ("kbShmFd", {"slot": 0, "gen": 0}, "malformed kbShmFd reference"),
])
def test_input_refuses_bad_shared_memory_references(channels, key, ref, why, caplog, monkeypatch):
    make_output, make_input = channels
    monkeypatch.setattr(pshm, "HANDSHAKE_TIMEOUT", 0.2)
    caplog.set_level("INFO", logger="kbstream.pipeline")
    msg = wire.data_message([(Hash("a", 1), wire.ChannelMetaData("x"))])
    h = Hash(msg.header)
    r = Hash()
    for k, v in ref.items():
        r.set(k, v, type=HashType.UINT32 if k == "slot" else HashType.UINT64 if k == "gen" else HashType.STRING)
    r.set("size", msg.body_size, type=HashType.UINT64)
    h[key] = r
    hb = kbhash.encode_bytes(h)
    frame = struct.pack("<I", len(hb)) + hb + struct.pack("<I", 0)
    col = _against_fake_output(make_input, frame, onSlowness="wait")
    assert col.items == []
    # the connection ended for the reason wanted (not some other error of the message)
    assert any(why in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


# ------------------------------------------------------- regressions (review findings)


class RawInput:
    """A hand-driven input: sends the hello and updates when told, reads messages."""

    def __init__(self, port, iid, dist="copy", slow="queueDrop", max_queue=2, window=1):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.iid = iid
        self.sock.sendall(wire.hello(iid, dist, slow, max_queue, credit_window=window))

    def update(self):
        self.sock.sendall(wire.update(self.iid))

    def _exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def read(self):
        """One message: 'EOS' or the list of item indices."""
        h = struct.unpack("<I", self._exact(4))[0]
        header = kbhash.decode(self._exact(h))
        body = self._exact(struct.unpack("<I", self._exact(4))[0])
        if header.get("endOfStream", False):
            return "EOS"
        out, pos = [], 0
        for size in header["byteSizes"]:
            out.append(kbhash.decode(body[pos:pos + int(size)])["index"])
            pos += int(size)
        return out

    def read_all(self, quiet=0.3):
        self.sock.settimeout(quiet)
        got = []
        try:
            while True:
                got.append(self.read())
        except (socket.timeout, TimeoutError):
            pass
        self.sock.settimeout(TIMEOUT)
        return got

    def close(self):
        self.sock.close()


def _one(out, i):
    out.write({"index": i})
    out.update(timeout=TIMEOUT)


def test_queued_end_of_stream_is_never_evicted_by_the_next_stream(channels):
    make_output, _ = channels
    out = make_output()
    raw = RawInput(out.port, "raw:input", slow="queueDrop", max_queue=1)
    try:
        out.wait_for_inputs(copy=["raw:input"])
        _one(out, 0)  # takes the hello's credit
        out.signal_end_of_stream(timeout=TIMEOUT)  # queued
        _one(out, 100)  # next stream, queued behind the EOS
        _one(out, 101)  # the queue holds 1 data message: 100 is dropped, never the EOS
        got = raw.read_all()
        for _ in range(3):
            raw.update()
        got += raw.read_all()
        assert got == [[0], "EOS", [101]]
        assert out.stats()["raw:input"]["dropped"] == 1
    finally:
        raw.close()


def test_shared_end_of_stream_is_not_overtaken_by_the_next_stream(channels):
    make_output, _ = channels
    out = make_output(noInputShared="queueDrop", sharedQueueLength=10)
    raw = RawInput(out.port, "raw:input", dist="shared")
    try:
        out.wait_for_inputs(shared=["raw:input"])
        _one(out, 0)
        _one(out, 1)  # queued in the shared queue
        out.signal_end_of_stream(timeout=TIMEOUT)
        _one(out, 2)  # next stream
        got = raw.read_all()
        for _ in range(4):
            raw.update()
            got += raw.read_all(0.1)
        assert got == [[0], [1], "EOS", [2]]
    finally:
        raw.close()


def test_timeout_on_one_wait_input_does_not_cost_the_others(channels):
    make_output, _ = channels
    out = make_output()
    stuck = RawInput(out.port, "stuck:input", slow="wait")
    fast = RawInput(out.port, "fast:input", slow="drop", window=8)
    try:
        out.wait_for_inputs(copy=["stuck:input", "fast:input"])
        _one(out, 0)
        for i in (1, 2):
            out.write({"index": i})
            with pytest.raises(ChannelTimeout, match="stuck:input"):
                out.update(timeout=0.2)
        with pytest.raises(ChannelTimeout):
            out.signal_end_of_stream(timeout=0.2)
        assert fast.read_all() == [[0], [1], [2], "EOS"]
        st = out.stats()
        assert st["stuck:input"]["dropped"] == 2 and st["stuck:input"]["queued"] == 1  # the EOS waits
        stuck.update()
        assert stuck.read_all() == [[0], "EOS"]
    finally:
        stuck.close()
        fast.close()


def test_a_stalled_input_with_credit_is_disconnected_after_send_timeout(channels):
    make_output, _ = channels
    out = make_output(send_timeout=1.0)
    stalled = RawInput(out.port, "stalled:input", slow="drop", window=64)  # never reads
    try:
        out.wait_for_inputs(copy=["stalled:input"])
        big = np.zeros(4 << 20, np.uint8)
        for i in range(8):  # 32 MiB: more than the socket buffers hold
            out.write({"index": i, "blob": big})
            out.update(timeout=TIMEOUT)  # returns: the rest goes on in the background
        deadline = time.monotonic() + TIMEOUT
        while out.input_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.input_ids() == []  # dropped as stalled
    finally:
        stalled.close()


@pytest.mark.parametrize(
    "layout",
    [
        {"byteSizes": ([-5], HashType.VECTOR_INT32)},
        {"byteSizes": (["a"], HashType.VECTOR_STRING)},
        {"_bufferSetLayout_": ([Hash("sizes", "x")], HashType.VECTOR_HASH), "byteSizes": ([1], HashType.VECTOR_UINT32)},
        {"byteSizes": (5, HashType.INT32)},
    ],
    ids=["negative", "strings", "layout-not-sizes", "scalar"],
)
def test_malformed_sizes_close_the_connection_and_the_input_retries(channels, layout, caplog):
    make_output, make_input = channels
    h = Hash()
    h.set("sourceInfo", [wire.ChannelMetaData("x").to_hash()], type=HashType.VECTOR_HASH)
    for k, (v, t) in layout.items():
        h.set(k, v, type=t)
    hb = kbhash.encode_bytes(h)
    frame = struct.pack("<I", len(hb)) + hb + struct.pack("<I", 1) + b"\0"
    with pytest.raises(wire.PipelineProtocolError):
        wire.parse_header(hb, 1)
    col = _against_fake_output(make_input, frame, connections=3, onSlowness="wait")
    assert col.items == []
    # refused as a protocol error (a warning), not as a failure of the input (an error)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("closing connection to fake:output" in m for m in msgs), msgs
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@needs_shm
def test_replaced_shared_memory_slots_keep_held_arrays_intact(channels):
    """Growing messages make the output replace slots; arrays held meanwhile must not change."""
    make_output, make_input = channels
    out = make_output()
    inp = make_input(onSlowness="wait")
    held = {}
    done = threading.Event()

    def on_data(d, m):
        i = d["index"]
        if i in (3, 4):
            held[i] = d["blob"]  # keep these two for ever

    inp.register_data_handler(on_data)
    inp.register_end_of_stream_handler(lambda ch: done.set())
    inp.connect(out.info, "sender:output")
    out.wait_for_inputs(copy=["receiver:input"])
    for i in range(30):
        out.write({"index": i, "blob": np.full((i % 12 + 1) << 20, i % 251, np.uint8)})
        out.update(timeout=TIMEOUT)
    out.signal_end_of_stream(timeout=TIMEOUT)
    assert done.wait(TIMEOUT)
    assert out.stats()["receiver:input"]["shm"] > 0
    assert sorted(held) == [3, 4]
    for i, arr in held.items():
        assert arr.size == (i % 12 + 1) << 20 and (arr == i % 251).all()


# ------------------------------------------------------- life cycle and errors


def _threads(prefix):
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def test_output_binds_in_its_constructor_and_accepts_after_start():
    out = OutputChannel("lc:output", hostname="127.0.0.1")
    raw = None
    try:
        assert out.port > 0 and out.info["port"] == out.port  # known before start()
        assert _threads("lc:output") == [] and not out.started
        with pytest.raises(StateError, match="before start"):
            out.write({"index": 0})
        with pytest.raises(StateError, match="before start"):
            out.wait_for_inputs(copy=["early:input"])
        raw = RawInput(out.port, "early:input", slow="wait")  # the kernel holds it until start()
        assert out.start() is out
        out.wait_for_inputs(copy=["early:input"])
        assert _threads("lc:output-io") != []
        with pytest.raises(StateError, match="already started"):
            out.start()
    finally:
        if raw is not None:
            raw.close()
        out.close()
    out.close()  # idempotent
    out.stop()   # the same call
    assert out.closed and _threads("lc:output") == []
    with pytest.raises(StateError):
        out.start()
    with pytest.raises(ChannelClosed):
        out.write({"index": 0})
    with pytest.raises(ChannelClosed):
        out.update()


def test_input_starts_its_threads_in_start_and_with_starts_it(channels):
    make_output, _ = channels
    out = make_output()
    inp = InputChannel("lc:input", onSlowness="wait")
    col = Collector(inp)
    assert inp.connect(out.info, "sender:output") == "sender:output"  # made at start()
    assert _threads("lc:input") == [] and out.input_ids() == []
    with pytest.raises(StateError, match="before start"):
        inp.wait_connected(timeout=0.1)
    with inp as same:
        assert same is inp and inp.started
        inp.wait_connected(timeout=TIMEOUT)
        out.wait_for_inputs(copy=["lc:input"])
        send(out, 2)
        out.signal_end_of_stream(timeout=TIMEOUT)
        col.wait_eos()
    assert inp.closed and col.indices() == [0, 1] and _threads("lc:input") == []
    inp.stop()  # idempotent
    with pytest.raises(ChannelClosed):
        inp.connect(out.info, "sender:output")
    with pytest.raises(StateError):
        inp.start()


def test_channel_errors_sit_in_the_kbstream_tree():
    assert issubclass(ChannelClosed, StateError) and issubclass(ChannelClosed, RuntimeError)
    assert issubclass(ConnectTimeout, ChannelTimeout) and issubclass(ConnectTimeout, TimeoutError)
    assert issubclass(PipelineConfigError, ValueError)
    for cls in (ChannelClosed, ConnectTimeout, PipelineConfigError, ConnectionLost, SchemaError):
        assert issubclass(cls, PipelineError) and issubclass(cls, KbStreamError)


def test_wait_connected_raises_connect_timeout(channels):
    _, make_input = channels
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there
    inp = make_input()
    inp.connect({"hostname": "127.0.0.1", "port": port}, "nowhere:output")
    with pytest.raises(ConnectTimeout, match="nowhere:output") as e:
        inp.wait_connected(timeout=0.2)
    assert isinstance(e.value, TimeoutError) and e.value.timeout == 0.2


def test_an_unencodable_item_raises_kbstream_encode_error_and_the_channel_goes_on(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait")
    out.write({"index": 0, "bad": object()})
    with pytest.raises(EncodeError, match="cannot be encoded") as e:
        out.update(timeout=TIMEOUT)
    assert isinstance(e.value.__cause__, kbhash.EncodeError) and isinstance(e.value, TypeError)
    send(out, 1, start=1)
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert col.indices() == [1]


def test_unusable_metadata_raises_encode_error(channels):
    make_output, _ = channels
    out = make_output()
    with pytest.raises(EncodeError, match="metadata") as e:
        out.write({"index": 0}, 3.5)
    assert isinstance(e.value, TypeError)
    with pytest.raises(EncodeError):
        out.write({"index": 0}, {"tid": "not a number"})


@pytest.mark.parametrize("make", [
    lambda: OutputChannel("x:output", noInputShared="later"),
    lambda: OutputChannel("x:output", distributionMode="random"),
    lambda: OutputChannel("x:output", validateSchema="never"),
    lambda: InputChannel("x:input", onSlowness="later"),
    lambda: InputChannel("x:input", dataDistribution="broadcast"),
    lambda: OutputChannel("x:output", sharedQueueLength="many"),
    lambda: InputChannel("x:input", minData=None),
], ids=["noInputShared", "distributionMode", "validateSchema", "onSlowness", "dataDistribution",
        "sharedQueueLength", "minData"])
def test_unknown_options_raise_config_errors(make):
    with pytest.raises(PipelineConfigError):
        make()


def test_a_port_in_use_raises_bind_error(channels):
    make_output, _ = channels
    out = make_output()
    with pytest.raises(BindError, match=str(out.port)) as e:
        OutputChannel("other:output", hostname="127.0.0.1", port=out.port)
    assert isinstance(e.value, OSError)


def test_stats_count_every_message_once(channels):
    make_output, _ = channels
    out = make_output()
    raw = RawInput(out.port, "raw:input", slow="queueDrop", max_queue=2)
    try:
        out.wait_for_inputs(copy=["raw:input"])
        for i in range(6):
            _one(out, i)
        st = out.stats()["raw:input"]
        assert (st["sent"], st["dropped"], st["queued"], st["sending"]) == (1, 3, 2, 0)
        assert st["queued_bytes"] > 0 and out.stats()["__shared__"]["queued"] == 0
        raw.update()
        raw.update()
        assert raw.read_all() == [[0], [4], [5]]
        deadline = time.monotonic() + TIMEOUT  # a send is counted once sendmsg returned
        while out.stats()["raw:input"]["sending"] and time.monotonic() < deadline:
            time.sleep(0.01)
        st = out.stats()["raw:input"]
        assert (st["sent"], st["dropped"], st["queued"], st["queued_bytes"]) == (3, 3, 0, 0)
    finally:
        raw.close()


def test_add_and_remove_outputs_by_name_while_running(channels):
    """add_output / remove_output change one connection and keep the others as they are;
    a removed output's connection is closed (the output sees its input go)."""
    make_output, make_input = channels
    outs = {f"s{k}:output": make_output(f"s{k}:output") for k in range(3)}
    mapping = {oid: out.info for oid, out in outs.items()}
    inp = make_input(connectedOutputChannels=["s0:output", "s1:output"], onSlowness="wait",
                     resolver=mapping)
    col = Collector(inp)
    inp.wait_connected(["s0:output", "s1:output"], timeout=TIMEOUT)
    kept = dict(inp._conns)
    inp.add_output("s2:output")
    inp.add_output("s2:output")  # listed once, connected once
    inp.wait_connected(["s2:output"], timeout=TIMEOUT)
    assert inp.connected_output_channels == ["s0:output", "s1:output", "s2:output"]
    assert all(inp._conns[oid] is conn for oid, conn in kept.items())  # untouched
    outs["s2:output"].wait_for_inputs(copy=["receiver:input"])
    third = inp._conns["s2:output"]
    assert inp.remove_output("s0:output") is True
    assert "s0:output" not in inp.connection_status()
    assert inp.connected_output_channels == ["s1:output", "s2:output"]
    assert not kept["s0:output"].thread.is_alive()
    deadline = time.monotonic() + TIMEOUT
    while outs["s0:output"].input_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outs["s0:output"].input_ids() == []  # the connection was closed
    assert inp._conns["s1:output"] is kept["s1:output"] and inp._conns["s2:output"] is third
    assert inp.remove_output("s0:output") is False  # nothing left to remove
    send(outs["s1:output"], 2)
    send(outs["s2:output"], 2, start=10)
    for oid in ("s1:output", "s2:output"):
        outs[oid].signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    assert sorted(col.indices()) == [0, 1, 10, 11]
    with pytest.raises(PipelineConfigError):
        inp.add_output("")
    inp.close()
    with pytest.raises(ChannelClosed):
        inp.add_output("s0:output")


def test_outputs_added_before_start_connect_at_start(channels):
    make_output, make_input = channels
    out = make_output()
    inp = make_input(resolver={"sender:output": out.info}, start=False)
    inp.add_output("sender:output")
    assert inp.connection_status() == {}  # nothing before start()
    inp.start()
    inp.wait_connected(["sender:output"], timeout=TIMEOUT)
    out.wait_for_inputs(copy=["receiver:input"])


def test_output_counts_the_bytes_of_each_input(channels):
    out, inp, col = copy_pair(channels, onSlowness="wait", use_shm=False)
    first = out.stats()["receiver:input"]
    assert first["bytes_read"] > 0 and first["bytes_written"] == 0  # the hello came
    send(out, 3, shape=(64, 64))
    out.signal_end_of_stream(timeout=TIMEOUT)
    col.wait_eos()
    st = out.stats()["receiver:input"]
    assert st["bytes_written"] > 3 * 64 * 64 * 2  # the arrays and their headers
    assert st["bytes_read"] > first["bytes_read"]  # the inputs' updates
    assert st["address"][0] == "127.0.0.1"
