"""Pipeline channels against hostile peers: fake inputs and fake outputs on raw sockets.

Each test plays a peer that speaks Karabo's pipeline protocol but abuses it (never says
hello, lies in its hello, never grants credit, reads slowly, ignores credit, sends a
header that decodes into millions of nodes) and checks that the channel stays within
its bounds: threads, connections, bytes queued, items received, memory.  Memory is
measured in a child process (its VmHWM / VmRSS), never by timing; waits that must end
have generous bounds.
"""

import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import kbhash
from kbhash import Hash, HashType
from kbstream.pipeline import ChannelTimeout, InputChannel, OutputChannel, wire

TIMEOUT = 20
MiB = 1 << 20


# ------------------------------------------------------- fake peers


def _frame(h):
    data = kbhash.encode_bytes(h)
    return struct.pack("<I", len(data)) + data


def _hello(iid, **fields):
    """A framed hello; ``fields`` are ``key: value`` or ``key: (value, HashType)``."""
    h = Hash()
    base = {"reason": "hello", "instanceId": iid, "memoryLocation": "remote", "dataDistribution": "copy",
            "onSlowness": "drop", "maxQueueLength": (2, HashType.UINT32)}
    for k, v in (base | fields).items():
        if isinstance(v, tuple):
            h.set(k, v[0], type=v[1])
        else:
            h[k] = v
    return _frame(h)


def _wait_for(predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _closed_by_peer(sock, timeout=TIMEOUT):
    """True once the other side closed ``sock`` (reads and discards what comes first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


class SlowReader:
    """A fake input: hello with a large credit window, then it reads ``chunk`` bytes
    every ``pause`` seconds from a small receive buffer (slow but steady), or, once
    ``fast`` is set, as fast as it can.  ``got`` counts the bytes read."""

    def __init__(self, port, iid, slow, chunk=32 * 1024, pause=0.1, window=64, max_queue=2):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(wire.hello(iid, "copy", slow, max_queue, credit_window=window))
        self.chunk = chunk
        self.pause = pause
        self.got = 0
        self.data = bytearray()
        self.keep = False
        self.fast = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.sock.settimeout(0.5)
        while not self.stop.is_set():
            try:
                part = self.sock.recv(self.chunk if not self.fast.is_set() else 1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not part:
                return
            self.got += len(part)
            if self.keep:
                self.data += part
            if not self.fast.is_set():
                self.stop.wait(self.pause)

    def close(self):
        self.stop.set()
        self.sock.close()
        self.thread.join(TIMEOUT)


def _complete(data):
    """True when ``data`` holds at least one whole message."""
    if len(data) < 4:
        return False
    h = struct.unpack_from("<I", data)[0]
    if len(data) < 8 + h:
        return False
    return len(data) >= 8 + h + struct.unpack_from("<I", data, 4 + h)[0]


def _messages(data):
    """Split what an input read into (header Hash, body bytes) messages."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        h = struct.unpack_from("<I", data, pos)[0]
        header = kbhash.decode(bytes(data[pos + 4:pos + 4 + h]))
        b = struct.unpack_from("<I", data, pos + 4 + h)[0]
        out.append((header, bytes(data[pos + 8 + h:pos + 8 + h + b])))
        pos += 8 + h + b
    return out


@pytest.fixture
def output():
    made = []

    def make(cid="sender:output", **kw):
        out = OutputChannel(cid, hostname="127.0.0.1", **kw)
        made.append(out)
        return out.start()

    yield make
    for out in made:
        out.close()


def _threads(prefix):
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def _offered_adds_up(st, offered):
    return st["sent"] + st["dropped"] + st["queued"] + st["sending"] == offered


# ------------------------------------------------------- output: connections


def test_idle_connections_cost_no_thread_each(output):
    out = output("idle:output")
    idle = [socket.create_connection(("127.0.0.1", out.port)) for _ in range(50)]
    last = socket.create_connection(("127.0.0.1", out.port))
    try:
        last.sendall(_hello("last:input"))
        out.wait_for_inputs(copy=["last:input"], timeout=TIMEOUT)  # accepted after the 50 idle ones
        assert len(_threads("idle:output")) <= 2, [t.name for t in _threads("idle:output")]
        assert out.connection_count() == 51
    finally:
        for s in idle + [last]:
            s.close()


def test_a_connection_without_hello_is_closed_after_hello_timeout(output, caplog):
    out = output(hello_timeout=0.5)
    silent = socket.create_connection(("127.0.0.1", out.port))
    partial = socket.create_connection(("127.0.0.1", out.port))
    partial.sendall(_hello("partial:input")[:20])  # a hello that never completes
    try:
        assert _closed_by_peer(silent) and _closed_by_peer(partial)
        assert sum("no hello within" in r.getMessage() for r in caplog.records) == 2
        good = socket.create_connection(("127.0.0.1", out.port))  # others still get in
        good.sendall(_hello("good:input"))
        out.wait_for_inputs(copy=["good:input"], timeout=TIMEOUT)
        good.close()
    finally:
        silent.close()
        partial.close()


def test_connections_are_capped_and_a_closed_one_frees_its_place(output, caplog):
    out = output(max_connections=8)
    socks = []
    try:
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", out.port))
            s.sendall(_hello(f"in{i}:input"))
            socks.append(s)
        out.wait_for_inputs(copy=[f"in{i}:input" for i in range(8)], timeout=TIMEOUT)
        assert all(_closed_by_peer(s) for s in socks[8:])  # refused at once
        assert sorted(out.input_ids()) == sorted(f"in{i}:input" for i in range(8))
        assert any("max_connections" in r.getMessage() for r in caplog.records)
        socks[0].close()
        _wait_for(lambda: "in0:input" not in out.input_ids(), "the closed input stays registered")
        s = socket.create_connection(("127.0.0.1", out.port))
        socks.append(s)
        s.sendall(_hello("late:input"))
        out.wait_for_inputs(copy=["late:input"], timeout=TIMEOUT)
        assert len(out.input_ids()) == 8
    finally:
        for s in socks:
            s.close()


def test_close_returns_whatever_the_peers_do(output):
    out = output("closing:output", send_timeout=60)
    silent = [socket.create_connection(("127.0.0.1", out.port)) for _ in range(4)]
    stuck = SlowReader(out.port, "stuck:input", "wait", chunk=1, pause=5)  # all but reads nothing
    writer_error = []

    def write():
        try:
            while True:
                out.write({"blob": np.zeros(16 * MiB, np.uint8)})
                out.update()  # waits for the stuck wait input
        except Exception as e:  # what close() makes of it
            writer_error.append(e)

    try:
        out.wait_for_inputs(copy=["stuck:input"], timeout=TIMEOUT)
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        _wait_for(lambda: out.stats()["stuck:input"]["sending"] > 0, "the writer is not sending")
        closer = threading.Thread(target=out.close, daemon=True)
        closer.start()
        closer.join(10)
        writer.join(10)
        assert not closer.is_alive() and not writer.is_alive()
        assert writer_error and isinstance(writer_error[0], RuntimeError), writer_error  # ChannelClosed
        assert _threads("closing:output") == []
    finally:
        stuck.close()
        for s in silent:
            s.close()


# ------------------------------------------------------- output: hello values


@pytest.mark.parametrize("fields", [
    {"maxQueueLength": (math.inf, HashType.DOUBLE)},
    {"maxQueueLength": (math.nan, HashType.DOUBLE)},
    {"maxQueueLength": (2.5, HashType.FLOAT)},
    {"maxQueueLength": (-1, HashType.INT32)},
    {"maxQueueLength": ("10", HashType.STRING)},
    {"maxQueueLength": (True, HashType.BOOL)},
    {"kbCreditWindow": (math.inf, HashType.DOUBLE)},
    {"kbCreditWindow": (-3, HashType.INT64)},
    {"instanceId": (5, HashType.INT32)},
    {"instanceId": ("x" * 5000, HashType.STRING)},
    {"onSlowness": (7, HashType.INT32)},
    {"dataDistribution": (["copy"], HashType.VECTOR_STRING)},
    {"memoryLocation": ("elsewhere", HashType.STRING)},
    {"kbShmFd": (12, HashType.INT32)},
], ids=lambda f: "-".join(f"{k}={str(v[0])[:8]}" for k, v in f.items()))
def test_a_hello_with_a_bad_value_is_a_protocol_error(output, fields, caplog):
    out = output()
    s = socket.create_connection(("127.0.0.1", out.port))
    try:
        s.sendall(_hello("bad:input", **fields))
        assert _closed_by_peer(s)
        assert out.input_ids() == []
        msgs = [r.getMessage() for r in caplog.records]
        assert any("closing connection from" in m for m in msgs), msgs
        assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no "internal error"
    finally:
        s.close()


def test_hello_values_beyond_the_caps_are_cut(output):
    out = output()
    s = socket.create_connection(("127.0.0.1", out.port))
    try:
        s.sendall(_hello("greedy:input", onSlowness="queueDrop", maxQueueLength=(10**9, HashType.UINT32),
                         kbCreditWindow=(2**63, HashType.UINT64)))
        out.wait_for_inputs(copy=["greedy:input"], timeout=TIMEOUT)
        st = out.stats()["greedy:input"]
        assert st["maxQueueLength"] == wire.MAX_QUEUE_LENGTH == 10_000
        assert st["credit_window"] == wire.MAX_CREDIT_WINDOW
    finally:
        s.close()


# ------------------------------------------------------- output: queues bounded in bytes


def _mib_message(out, i, nbytes=MiB):
    out.write({"index": i, "blob": np.full(nbytes, i % 251, np.uint8)})
    out.update(timeout=TIMEOUT)


def test_a_queue_drop_input_that_never_grants_credit_is_bounded_in_bytes(output):
    out = output(max_queue_bytes=4 * MiB)
    greedy = SlowReader(out.port, "greedy:input", "queueDrop", max_queue=10**9 % 2**32, window=1, pause=3600)
    try:
        out.wait_for_inputs(copy=["greedy:input"], timeout=TIMEOUT)
        for i in range(40):
            _mib_message(out, i)
        st = out.stats()["greedy:input"]
        assert st["queued_bytes"] <= 4 * MiB and 2 <= st["queued"] <= 4, st
        assert st["dropped"] >= 30 and _offered_adds_up(st, 40), st
        _mib_message(out, 40, 6 * MiB)  # alone larger than the cap: the newest always stays
        st = out.stats()["greedy:input"]
        assert st["queued"] == 1 and st["queued_bytes"] > 6 * MiB and _offered_adds_up(st, 41), st
    finally:
        greedy.close()


def test_all_queues_together_are_bounded_in_bytes(output):
    out = output(max_queue_bytes=64 * MiB, max_total_queue_bytes=6 * MiB, noInputShared="queueDrop",
                 sharedQueueLength=100)
    peers = [SlowReader(out.port, f"q{k}:input", "queueDrop", max_queue=100, window=1, pause=3600) for k in range(2)]
    shared = socket.create_connection(("127.0.0.1", out.port))
    try:
        shared.sendall(_hello("s:input", dataDistribution="shared"))  # never grants credit, never reads
        out.wait_for_inputs(copy=["q0:input", "q1:input"], shared=["s:input"], timeout=TIMEOUT)
        for i in range(30):
            _mib_message(out, i)
        st = out.stats()
        queued = sum(st[k]["queued_bytes"] for k in ("q0:input", "q1:input", "s:input", "__shared__"))
        assert queued <= 6 * MiB + 4 * (MiB + 4096), st  # the total, plus the newest message of each queue
        for k in ("q0:input", "q1:input"):
            assert st[k]["queued"] >= 1 and _offered_adds_up(st[k], 30), st
        shared_taken = st["s:input"]["sent"] + st["s:input"]["sending"]
        assert shared_taken + st["__shared__"]["queued"] + st["__shared__"]["dropped"] == 30, st
    finally:
        shared.close()
        for p in peers:
            p.close()


_QUEUE_CHILD = r"""
import json, socket, sys, time
import numpy as np
from kbstream.pipeline import OutputChannel, wire

def rss():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}

out = OutputChannel("mem:output", hostname="127.0.0.1", max_queue_bytes=8 << 20).start()
s = socket.create_connection(("127.0.0.1", out.port))
s.sendall(wire.hello("greedy:input", "copy", "queueDrop", 10**9))   # never reads, never grants credit
out.wait_for_inputs(copy=["greedy:input"], timeout=20)
blob = np.ones(1 << 20, np.uint8)
out.write({"blob": blob}); out.update(timeout=20)   # the hello's credit
before = rss()
for i in range(150):
    out.write({"blob": blob}); out.update(timeout=20)
after = rss()
print(json.dumps({"before": before, "after": after, "stats": out.stats()["greedy:input"]}))
s.close(); out.close()
"""


def _child(script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_a_greedy_queue_costs_the_output_bounded_memory():
    """The issue's case: 150 messages of 1 MiB for a queueDrop input with
    maxQueueLength=10**9 that never grants credit (before: +150 MiB)."""
    r = _child(_QUEUE_CHILD)
    grown = r["after"]["VmHWM"] - r["before"]["VmRSS"]
    assert r["stats"]["queued_bytes"] <= 8 * MiB, r
    assert grown < 40 * MiB, r


# ------------------------------------------------------- output: slow inputs


@pytest.mark.parametrize("slow", ["drop", "queueDrop"])
def test_a_slow_input_costs_only_itself(output, slow):
    """The issue's case: a slow but steady reader (64 KiB receive buffer, 32 KiB every
    0.1 s) with credit for every message held update() until it had read them all (as
    long as it takes: send_timeout never fired), and the other input got nothing
    meanwhile.  Now update() goes on: the slow input gets what its policy says."""
    out = output(send_timeout=2)
    slow_in = SlowReader(out.port, "slow:input", slow, max_queue=3)
    fast = InputChannel("fast:input", onSlowness="wait", reconnect_interval=0.2)
    got = []
    done = threading.Event()
    fast.register_data_handler(lambda d, m: got.append(d["index"]))
    fast.register_end_of_stream_handler(lambda ch: done.set())
    try:
        fast.start().connect(out.info, "sender:output")
        out.wait_for_inputs(copy=["slow:input", "fast:input"], timeout=TIMEOUT)
        for i in range(20):
            _mib_message(out, i)
        out.signal_end_of_stream(timeout=TIMEOUT)
        read_by_slow = slow_in.got
        assert done.wait(TIMEOUT) and got == list(range(20))
        # the 20 MiB went out while the slow reader took only a few hundred KiB (before:
        # update() returned only after it had read all but the socket buffers, > 10 MiB)
        assert read_by_slow < 4 * MiB, read_by_slow
        st = out.stats()["slow:input"]
        assert _offered_adds_up(st, 21) and st["dropped"] > 0, st  # 20 messages and the end of stream
        assert st["queued"] <= 3 + 1, st
    finally:
        fast.close()
        slow_in.close()


def test_a_slow_wait_input_holds_update_only_until_its_timeout_and_still_gets_the_message(output):
    """A wait input may hold the writer, until update()'s timeout; what it is reading
    then goes on in the background, from a copy: the writer may reuse its arrays."""
    out = output(send_timeout=10)
    slow_in = SlowReader(out.port, "slow:input", "wait")
    slow_in.keep = True
    try:
        out.wait_for_inputs(copy=["slow:input"], timeout=TIMEOUT)
        blob = np.full(24 * MiB, 7, np.uint8)  # more than the socket buffers hold
        out.write({"index": 1, "blob": blob})
        out.update(timeout=1.0)  # returns although the input is still reading
        read_by_slow = slow_in.got
        blob[:] = 9  # the writer reuses its array
        assert read_by_slow < 8 * MiB, read_by_slow
        slow_in.fast.set()
        _wait_for(lambda: out.stats()["slow:input"]["sent"] == 1, "the message never got through")
        _wait_for(lambda: _complete(bytes(slow_in.data)), "the message never arrived whole")
        (header, body), = _messages(slow_in.data)
        item = kbhash.decode(body)
        assert item["index"] == 1 and item["blob"].size == 24 * MiB and (item["blob"] == 7).all()
    finally:
        slow_in.close()


# ------------------------------------------------------- input: hostile outputs


class FakeOutput:
    """A fake output: accepts inputs, reads their hello, then runs ``script(sock)``."""

    def __init__(self, script):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(TIMEOUT)
        self.script = script
        self.results = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def info(self):
        return {"hostname": "127.0.0.1", "port": self.srv.getsockname()[1]}

    def _run(self):
        try:
            s, _ = self.srv.accept()
        except OSError:
            return
        with s:
            n = struct.unpack("<I", s.recv(4, socket.MSG_WAITALL))[0]
            s.recv(n, socket.MSG_WAITALL)
            try:
                self.results.append(self.script(s))
            except OSError as e:
                self.results.append(e)

    def close(self):
        self.srv.close()
        self.thread.join(TIMEOUT)


def test_an_output_that_ignores_credit_is_disconnected(caplog):
    """The issue's case: an output that keeps sending without credit made the input
    queue 177 items against a capacity of 4."""
    item = wire.data_message([(Hash("index", 0, "blob", np.zeros(64 * 1024, np.uint8)), wire.ChannelMetaData("x"))])
    frame = b"".join(bytes(memoryview(b).cast("B")) for b in item)

    def flood(sock):
        sent = 0
        sock.settimeout(TIMEOUT)
        try:
            for _ in range(300):
                sock.sendall(frame)
                sent += 1
        except OSError:
            pass
        return sent

    fake = FakeOutput(flood)
    inp = InputChannel("victim:input", onSlowness="wait", reconnect_interval=60)
    release = threading.Event()
    inp.register_data_handler(lambda d, m: release.wait(TIMEOUT))  # a busy handler: no more credit
    try:
        inp.start().connect(fake.info, "fake:output")
        _wait_for(lambda: fake.results, "the flood was never stopped")
        assert fake.results[0] < 300, fake.results  # the input closed the connection
        # the hello's window, one update per item while its queue had room: nothing else
        assert inp.received <= inp.capacity + 2 * inp.credit_window + 1, (inp.received, inp.capacity)
        msgs = [r.getMessage() for r in caplog.records]
        assert any("closing connection to fake:output" in m and "credits" in m for m in msgs), msgs
    finally:
        release.set()
        inp.close()
        fake.close()


def _empty_hashes_header(n):
    """A data header for one 4-byte item whose extra key holds ``n`` empty Hashes (about
    4 bytes each on the wire)."""
    h = Hash()
    h.set("sourceInfo", [wire.ChannelMetaData("x").to_hash()], type=HashType.VECTOR_HASH)
    h.set("byteSizes", [4], type=HashType.VECTOR_UINT32)
    h.set("junk", [Hash()], type=HashType.VECTOR_HASH)  # the last node: u32 count, then u32 0 per Hash
    one = kbhash.encode_bytes(h)
    assert one.endswith(struct.pack("<II", 1, 0))
    return one[:-8] + struct.pack("<I", n) + bytes(4 * n)


def _kbhash_bounds_nodes():
    """Whether kbhash refuses an archive that decodes into far more nodes than its bytes
    (its bound on decoded nodes per input byte)."""
    try:
        kbhash.decode(_empty_hashes_header(200_000))
    except kbhash.DecodeError:
        return True
    return False


_HEADER_CHILD = r"""
import json, socket, struct, sys, threading, time
from kbstream.pipeline import InputChannel

header = open(sys.argv[1], "rb").read()
body = open(sys.argv[2], "rb").read()
srv = socket.create_server(("127.0.0.1", 0))
closed = threading.Event()

def serve():
    s, _ = srv.accept()
    n = struct.unpack("<I", s.recv(4, socket.MSG_WAITALL))[0]
    s.recv(n, socket.MSG_WAITALL)
    s.sendall(struct.pack("<I", len(header)) + header + struct.pack("<I", len(body)) + body)
    s.settimeout(60)
    try:
        while s.recv(4096):   # updates, until the input closes the connection
            pass
    except OSError:
        pass
    closed.set()

def rss():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}

threading.Thread(target=serve, daemon=True).start()
delivered = []
inp = InputChannel("victim:input", reconnect_interval=60)
inp.register_data_handler(lambda d, m: delivered.append(1))
before = rss()
inp.start().connect({"hostname": "127.0.0.1", "port": srv.getsockname()[1]}, "fake:output")
closed.wait(60)
time.sleep(0.2)   # a delivered item reaches the handler thread
print(json.dumps({"before": before, "after": rss(), "delivered": len(delivered), "closed": closed.is_set(),
                  "received": inp.received}))
inp.close()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_a_header_of_millions_of_empty_hashes_is_refused(tmp_path):
    """The issue's case: a 9.5 MiB header carrying 2.5 M empty Hashes made the input
    allocate +811 MiB (85 times its bytes), and the item was delivered."""
    header = _empty_hashes_header(2_500_000)
    assert 9 * MiB < len(header) < 11 * MiB
    (tmp_path / "header").write_bytes(header)
    (tmp_path / "body").write_bytes(kbhash.encode_bytes(Hash()))
    assert len((tmp_path / "body").read_bytes()) == 4
    r = _child(_HEADER_CHILD, tmp_path / "header", tmp_path / "body")
    assert r["closed"] and r["delivered"] == 0 and r["received"] == 0, r  # a protocol error
    if not _kbhash_bounds_nodes():
        pytest.skip("the input's memory stays bounded only once kbhash bounds the nodes it decodes per input "
                    "byte (kbhash.decode raising kbhash.DecodeError beyond the limit); this kbhash has no "
                    f"such limit yet (the header cost {(r['after']['VmHWM'] - r['before']['VmRSS']) >> 20} MiB)")
    assert r["after"]["VmHWM"] - r["before"]["VmRSS"] < 200 * MiB, r


# ------------------------------------------------------- wire: hello and header checks


def test_parse_hello_takes_what_karabo_and_kbstream_send():
    with open(os.path.join(os.path.dirname(__file__), "..", "data", "karabo_pipeline_session.json")) as f:
        session = json.load(f)
    stream = bytes.fromhex(session["variants"]["remote"]["input_to_output"]["hex"])
    n = struct.unpack_from("<I", stream)[0]
    kind, h = wire.parse_control(stream[4:4 + n])  # the real C++ input's hello
    hello = wire.parse_hello(h)
    assert kind == "hello" and (hello.instance_id, hello.data_distribution, hello.on_slowness) == (
        "capReceiver:input", "copy", "wait")
    assert (hello.max_queue_length, hello.credit_window) == (2, 1)
    ours = wire.hello("k:in", "shared", "queueDrop", 0, credit_window=8, shm_offer=("kbstream-x", "k"))
    hello = wire.parse_hello(wire.parse_control(ours[4:])[1])
    assert (hello.max_queue_length, hello.credit_window) == (1, 8)  # 0 counts as 1


def test_headers_of_many_items_pass_and_padded_ones_do_not():
    items = [(Hash("i", k), wire.ChannelMetaData(f"a_long/source/name_{k:05d}" * 4)) for k in range(2000)]
    msg = wire.data_message(items)
    hlen = struct.unpack_from("<I", msg[0])[0]
    header = msg[0][4:4 + hlen]
    m = wire.parse_header(header, msg.body_size)  # about 300 bytes per item: far below the room
    assert len(m.metas) == 2000
    padded = _empty_hashes_header((wire.HEADER_ROOM + wire.HEADER_ROOM_PER_ITEM) // 4)  # one item, 5 KiB of {}
    with pytest.raises(wire.PipelineProtocolError, match="more than"):
        wire.parse_header(padded, 4)
    assert wire.parse_header(_empty_hashes_header(100), 4).buffers == [[4]]


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("repeat", range(3))
def test_close_during_background_sends_leaves_no_socket_open(repeat):
    """close() while slow inputs are sent to in the background: every socket is closed."""
    before = len(os.listdir("/proc/self/fd"))
    out = OutputChannel("fd:output", hostname="127.0.0.1").start()
    slow = [SlowReader(out.port, f"slow{k}:input", "drop", pause=3600) for k in range(3)]
    try:
        out.wait_for_inputs(copy=[f"slow{k}:input" for k in range(3)], timeout=TIMEOUT)
        for i in range(4):
            out.write({"index": i, "blob": np.zeros(16 * MiB, np.uint8)})
            out.update(timeout=TIMEOUT)
        assert all(st["background"] for k, st in out.stats().items() if k != "__shared__")
    finally:
        out.close()
        for s in slow:
            s.close()
    assert len(os.listdir("/proc/self/fd")) <= before
