"""Hostile peers against the same-host shared-memory path (kbstream.pipeline.shm).

A fake output (or input) speaking the pipeline protocol on this host tries what
docs/safety-shm.md lists: make the input open a path it names (a symlink, a file of
another user), truncate a segment under the input's mapping (SIGBUS), hand over
descriptors that are not sealed memfds, make the output delete files in /dev/shm, pin
slots without end, or leave segments behind when killed.  Each test fails on the
version that followed /dev/shm paths; the input must refuse with a logged, typed
protocol error and survive, the output must stay within its budget.
"""

import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import kbhash
from kbhash import Hash, HashType
from kbstream.pipeline import InputChannel, OutputChannel, wire
from kbstream.pipeline import shm as pshm
from kbstream.pipeline.errors import PipelineProtocolError

TIMEOUT = 20
SRC = str(Path(pshm.__file__).parents[2])
HERE = str(Path(__file__).parent)
SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

pytestmark = pytest.mark.skipif(not pshm.available(), reason="no shared memory on this platform")


# ------------------------------------------------------------------ fakes and tools


def wait_until(pred, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def recv_exactly(sock, n):
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed")
        buf += part
    return bytes(buf)


def read_frame(sock):
    return recv_exactly(sock, struct.unpack("<I", recv_exactly(sock, 4))[0])


def item(value, n=64 * 1024):
    return Hash("index", int(value), "arr", np.full(n, value, np.uint16))


def body_of(h):
    """The bytes of one item's archive: what a message body holds for it."""
    return b"".join(bytes(memoryview(b).cast("B")) for b in kbhash.encode(h))


def ref_frame(h, key, **ref):
    """A data message for ``h`` whose body is said to be in shared memory (``key`` node)."""
    msg = wire.data_message([(h, wire.ChannelMetaData("fake:output"))])
    hh = Hash(msg.header)
    r = Hash()
    for k, v in ref.items():
        if isinstance(v, str):
            r[k] = v
        else:
            r.set(k, v, type=HashType.UINT32 if k == "slot" else HashType.UINT64)
    r.set("size", msg.body_size, type=HashType.UINT64)
    hh[key] = r
    hb = kbhash.encode_bytes(hh)
    return struct.pack("<I", len(hb)) + hb + struct.pack("<I", 0)


def legacy_token():
    """What inputs used to send as ``kbShm`` (and outputs compared with their own)."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return f"{boot}:{os.stat('/dev/shm').st_dev}"


def unix_seqpacket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


#: Unix sockets fake outputs opened (closed by FakeOutput.close, whatever a script did).
OPEN_UNIX = []


def handshake(hello):
    """The output's half of the Unix-socket handshake, as any output on this host can do it."""
    offer = hello["kbShmFd"]
    u = unix_seqpacket()
    OPEN_UNIX.append(u)
    try:
        u.connect("\0" + offer["socket"])
        u.sendall(offer["key"].encode())
    except OSError:
        u.close()
        raise
    return u


def pass_fd(u, fd, slot, gen, size):
    socket.send_fds(u, [struct.pack("<IQQ", slot, gen, size)], [fd])


def memfd(data, size, seals=SEALED):
    fd = os.memfd_create("fake-slot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class FakeOutput:
    """A TCP server on 127.0.0.1 that reads each hello and runs ``script(sock, hello)``;
    connections stay open until :meth:`close`."""

    def __init__(self, script):
        self.script = script
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.hellos = []
        self.raw_hellos = []
        self.errors = []
        self.keep = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def info(self):
        return {"hostname": "127.0.0.1", "port": self.srv.getsockname()[1]}

    def _run(self):
        while True:
            try:
                s, _ = self.srv.accept()
            except OSError:
                return
            self.keep.append(s)
            try:
                raw = read_frame(s)
                self.raw_hellos.append(raw)
                hello = wire.parse_control(raw)[1]
                self.hellos.append(hello)
                got = self.script(s, hello)
                if got is not None:
                    self.keep.append(got)
            except Exception as e:  # recorded: a test may look at it
                self.errors.append(e)

    def close(self):
        try:
            self.srv.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self.srv.close()
        self.thread.join(TIMEOUT)
        for s in self.keep + OPEN_UNIX:
            s.close()
        OPEN_UNIX.clear()


class Received:
    """Records what an input's data handler saw; writes into the array in place if asked."""

    def __init__(self, inp, write=None):
        self.items = []
        self.write = write
        inp.register_data_handler(self.on_data)

    def on_data(self, d, m):
        arr = d["arr"]
        self.items.append((d["index"], int(arr.min()), int(arr.max()), arr.flags.writeable))
        if self.write is not None:
            arr[...] = self.write


def against(fake_script, write=None, connections=2, **options):
    """An input connected to a FakeOutput running ``fake_script``, until it has connected
    ``connections`` times (it closed the others) or received an item; closed again."""
    fake = FakeOutput(fake_script)
    inp = InputChannel("victim:input", onSlowness="wait", reconnect_interval=0.1, **options)
    got = Received(inp, write)
    try:
        inp.start()
        inp.connect(fake.info, "fake:output")
        wait_until(lambda: len(fake.hellos) >= connections or got.items)
        time.sleep(0.1)  # a handler that was going to run has run
    finally:
        inp.close()
        fake.close()
    return fake, got


def messages(caplog):
    return [r.getMessage() for r in caplog.records]


def refused(caplog, why):
    return any("closing connection to fake:output" in m and why in m for m in messages(caplog))


def _nobody_python():
    """A Python that user 65534 may run (for the other-user tests), or skip."""
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the other-user tests need root (to act as uid 65534)")
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and subprocess.run([exe, "-c", "pass"], user=65534, capture_output=True).returncode == 0:
            return exe
    pytest.skip("LOUD SKIP: no Python that uid 65534 can run")


# ------------------------------------------------------------------ the input opens nothing


def test_a_dev_shm_symlink_is_never_followed_and_handler_writes_reach_no_file(tmp_path, caplog):
    """A reference to /dev/shm/kbstream-* that is a symlink to another file: refused; the
    file is neither mapped nor changed by a handler writing into its array."""
    caplog.set_level("INFO", logger="kbstream.pipeline")
    h = item(5)
    body = body_of(h)
    victim = tmp_path / "victim"
    victim.write_bytes(body)
    name = f"kbstream-{os.getpid()}-{secrets.token_hex(8)}"
    link = Path("/dev/shm") / name
    link.symlink_to(victim)
    try:
        fake, got = against(lambda s, hello: s.sendall(ref_frame(h, "kbShm", name=name, slot=0)),
                            write=0xABCD)
    finally:
        link.unlink()
    assert victim.read_bytes() == body
    assert got.items == []
    assert refused(caplog, "by file name (kbShm) is never accepted"), messages(caplog)


def test_a_segment_of_another_user_is_refused(caplog):
    """A world-writable /dev/shm/kbstream-* file owned by another user: refused, unchanged."""
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: needs root to give the file to uid 65534")
    caplog.set_level("INFO", logger="kbstream.pipeline")
    h = item(6)
    body = body_of(h)
    name = f"kbstream-{os.getpid()}-{secrets.token_hex(8)}"
    path = Path("/dev/shm") / name
    path.write_bytes(body)
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o666)
    try:
        fake, got = against(lambda s, hello: s.sendall(ref_frame(h, "kbShm", name=name, slot=0)),
                            write=0xABCD)
        assert path.read_bytes() == body
    finally:
        path.unlink()
    assert got.items == []
    assert refused(caplog, "never accepted"), messages(caplog)


_TRUNCATE_CHILD = r"""
import json, logging, os, secrets, sys, time
sys.path[:0] = [sys.argv[2], sys.argv[3]]
import numpy as np
import test_pipeline_shm_security as t
from kbstream.pipeline import InputChannel

mode = sys.argv[1]
log = []
class Keep(logging.Handler):
    def emit(self, record):
        log.append(record.getMessage())
logging.getLogger("kbstream.pipeline").addHandler(Keep())
logging.getLogger("kbstream.pipeline").setLevel(logging.INFO)

h = t.item(3, n=512 * 1024)          # 1 MiB of array
body = t.body_of(h)
size = 2 << 20
if mode == "legacy":
    path = f"/dev/shm/kbstream-{os.getpid()}-{secrets.token_hex(8)}"
    with open(path, "wb") as f:
        f.write(body)
    truncate = lambda: os.truncate(path, 0)
    script = lambda s, hello: s.sendall(t.ref_frame(h, "kbShm", name=os.path.basename(path), slot=0))
else:
    fd = t.memfd(body, size, t.SEALED if mode == "sealed" else 0)
    truncate = lambda: os.ftruncate(fd, 0)
    def script(s, hello):
        u = t.handshake(hello)
        t.pass_fd(u, fd, 0, 1, size)
        s.sendall(t.ref_frame(h, "kbShmFd", slot=0, gen=1))
        return u
out = {"items": [], "truncate": None}
def on_data(d, m):
    try:
        truncate()       # the output shrinks the segment under the input's mapping
        out["truncate"] = "done"
    except OSError as e:
        out["truncate"] = e.strerror
    out["items"].append(int(d["arr"].astype(np.int64).sum()))   # reads every page
fake = t.FakeOutput(script)
inp = InputChannel("victim:input", onSlowness="wait", reconnect_interval=0.1)
inp.register_data_handler(on_data)
inp.start()
inp.connect(fake.info, "fake:output")
t.wait_until(lambda: len(fake.hellos) >= 2 or out["items"])
time.sleep(0.1)
inp.close()
fake.close()
if mode == "legacy":
    os.unlink(path)
out["log"] = log
print(json.dumps(out))
"""


@pytest.mark.parametrize("mode", ["legacy", "unsealed", "sealed"])
def test_a_segment_shrunk_under_the_input_never_kills_it(mode):
    """The output shrinks the segment after the input mapped it, then the handler reads the
    array (in a child: a SIGBUS would kill it).  A file by name and an unsealed memfd are
    refused before anything is mapped; a sealed memfd cannot be shrunk, so the item is read
    whole."""
    r = subprocess.run([sys.executable, "-c", _TRUNCATE_CHILD, mode, SRC, HERE], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    out = json.loads(r.stdout.splitlines()[-1])
    if mode == "sealed":
        assert out["truncate"] == "Operation not permitted"
        assert out["items"] == [3 * 512 * 1024]
    else:
        why = {"legacy": "never accepted", "unsealed": "not sealed against shrinking"}[mode]
        assert out["items"] == []
        assert any("closing connection to fake:output" in m and why in m for m in out["log"]), out["log"]


@pytest.mark.parametrize("kind, why", [
    ("regular-file", "descriptor refused"),               # not shmem: no seals at all
    ("dev-shm-file", "not sealed against shrinking"),     # shmem, but never sealable
    ("pipe", "descriptor refused"),
    ("wrong-size", "announced"),                          # sealed memfd, smaller than said
    ("two-descriptors", "malformed shared-memory descriptor message"),
    ("wrong-slot", "when slot 0 generation 1 was referenced"),
])
def test_descriptors_that_are_not_sealed_memfds_are_refused(kind, why, tmp_path, caplog):
    caplog.set_level("INFO", logger="kbstream.pipeline")
    h = item(9)
    body = body_of(h)
    size = 1 << 20
    made = []

    def script(s, hello):
        u = handshake(hello)
        slot = 0
        if kind == "regular-file":
            fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
            os.pwrite(fd, body, 0)
            os.ftruncate(fd, size)
        elif kind == "dev-shm-file":
            path = f"/dev/shm/kbstream-{os.getpid()}-{secrets.token_hex(8)}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(path)
            os.ftruncate(fd, size)
            os.pwrite(fd, body, 0)
        elif kind == "pipe":
            fd, w = os.pipe()
            made.append(w)
        elif kind == "wrong-size":
            fd = memfd(body, len(body))
        else:
            fd = memfd(body, size)
            slot = 1 if kind == "wrong-slot" else 0
        made.append(fd)
        fds = [fd, memfd(b"", size)] if kind == "two-descriptors" else [fd]
        made.extend(fds[1:])
        socket.send_fds(u, [struct.pack("<IQQ", slot, 1, size)], fds)
        s.sendall(ref_frame(h, "kbShmFd", slot=0, gen=1))
        return u

    try:
        fake, got = against(script)
    finally:
        for fd in made:
            os.close(fd)
    assert got.items == []
    assert refused(caplog, why), messages(caplog)


def test_a_memfd_of_another_user_is_refused(caplog):
    """A sealed memfd that uid 65534 made, handed over by an output: refused."""
    exe = _nobody_python()
    caplog.set_level("INFO", logger="kbstream.pipeline")
    h = item(4)
    body = body_of(h)
    size = 1 << 20
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    maker = f"""
import fcntl, os, socket, sys
s = socket.socket(fileno={b.fileno()})
fd = os.memfd_create("other", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, {size})
os.pwrite(fd, sys.stdin.buffer.read(), 0)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, {SEALED})
socket.send_fds(s, [b"x"], [fd])
"""
    r = subprocess.run([exe, "-c", maker], user=65534, pass_fds=[b.fileno()], input=body, capture_output=True,
                       timeout=60)
    b.close()
    assert r.returncode == 0, r.stderr
    _, (theirs,), _, _ = socket.recv_fds(a, 16, 1)
    a.close()
    assert os.fstat(theirs).st_uid == 65534

    def script(s, hello):
        u = handshake(hello)
        pass_fd(u, theirs, 0, 1, size)
        s.sendall(ref_frame(h, "kbShmFd", slot=0, gen=1))
        return u

    try:
        fake, got = against(script)
    finally:
        os.close(theirs)
    assert got.items == []
    assert refused(caplog, "owned by uid 65534"), messages(caplog)


_NOBODY_CONNECTS = r"""
import socket, sys
u = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
u.connect("\0" + sys.argv[1])
u.sendall(sys.argv[2].encode())
print("connected", flush=True)
"""


@pytest.mark.parametrize("genuine", [True, False])
def test_the_input_takes_its_unix_connection_only_from_its_own_user(genuine, caplog, monkeypatch):
    """Another user connects to the input's socket first, even with the right key: ignored.
    The output that then shakes hands is served; without it, the reference is refused."""
    exe = _nobody_python()
    monkeypatch.setattr(pshm, "HANDSHAKE_TIMEOUT", 1.0)
    caplog.set_level("INFO", logger="kbstream.pipeline")
    h = item(2)
    size = 1 << 20
    fd = memfd(body_of(h), size)

    def script(s, hello):
        offer = hello["kbShmFd"]
        r = subprocess.run([exe, "-c", _NOBODY_CONNECTS, offer["socket"], offer["key"]], user=65534,
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.split() == ["connected"], r.stderr
        u = handshake(hello) if genuine else None
        if genuine:
            pass_fd(u, fd, 0, 1, size)
        s.sendall(ref_frame(h, "kbShmFd", slot=0, gen=1))
        return u

    try:
        fake, got = against(script)
    finally:
        os.close(fd)
    assert not fake.errors, fake.errors
    if genuine:
        assert got.items and got.items[0] == (2, 2, 2, True)
    else:
        assert got.items == []
        assert refused(caplog, "did not connect its shared-memory socket"), messages(caplog)


def test_closing_an_input_that_waits_for_a_descriptor_ends_its_thread(monkeypatch):
    """An output that references a slot and never shakes hands: the input waits at most
    HANDSHAKE_TIMEOUT, and close() does not leave its receiving thread behind meanwhile."""
    monkeypatch.setattr(pshm, "HANDSHAKE_TIMEOUT", 600.0)
    sent = threading.Event()

    def script(s, hello):
        s.sendall(ref_frame(item(1), "kbShmFd", slot=0, gen=1))
        sent.set()

    fake = FakeOutput(script)
    inp = InputChannel("waiting:input", reconnect_interval=0.1)
    try:
        inp.start()
        inp.connect(fake.info, "fake:output")
        assert sent.wait(TIMEOUT)
        time.sleep(0.2)  # the input has read the reference and waits for the descriptor
        receiving = [t for t in threading.enumerate() if t.name == "waiting:input<-fake:output"]
        assert receiving
    finally:
        inp.close()
        fake.close()
    assert not any(t.is_alive() for t in receiving)


# ------------------------------------------------------------------ only this host, no host identity


def test_the_hello_names_no_host_and_only_a_local_output_is_offered_shared_memory(monkeypatch, caplog):
    caplog.set_level("INFO", logger="kbstream.pipeline")
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    fake, got = against(lambda s, hello: None, connections=1)
    (hello,), (raw,) = fake.hellos, fake.raw_hellos
    assert "kbShm" not in hello and boot.encode() not in raw
    assert "kbShmFd" in hello  # 127.0.0.1: this host

    # an output the input does not see on this host: no offer, and a reference is refused
    monkeypatch.setattr(pshm, "is_local_peer", lambda sock: False)
    h = item(1)
    fake, got = against(lambda s, hello: s.sendall(ref_frame(h, "kbShmFd", slot=0, gen=1)))
    assert all("kbShmFd" not in x and "kbShm" not in x for x in fake.hellos)
    assert got.items == []
    assert refused(caplog, "did not offer it"), messages(caplog)


class _FakeSock:
    def __init__(self, peer, own):
        self.peer, self.own = peer, own

    def getpeername(self):
        return self.peer

    def getsockname(self):
        return self.own


@pytest.mark.parametrize("peer, own, local", [
    (("127.0.0.1", 5), ("127.0.0.1", 6), True),
    (("127.0.0.2", 5), ("127.0.0.1", 6), True),
    (("::1", 5, 0, 0), ("::1", 6, 0, 0), True),
    (("10.0.0.7", 5), ("10.0.0.7", 6), True),       # connected to our own address
    (("10.0.0.8", 5), ("10.0.0.7", 6), False),      # another machine
    (("fe80::1%eth0", 5, 0, 2), ("fe80::2%eth0", 6, 0, 2), False),
])
def test_which_tcp_peers_are_on_this_host(peer, own, local):
    assert pshm.is_local_peer(_FakeSock(peer, own)) is local


# ------------------------------------------------------------------ outputs: no clean-up, caps, lifetime


class RawInput:
    """A hand-driven input that offers shared memory both ways kbstream inputs ever did (a
    ``kbShm`` host token, a ``kbShmFd`` socket), credits every message and never releases
    a slot (nor says it mapped one)."""

    def __init__(self, port, iid, window=8, listener_name=None):
        self.iid = iid
        self.key = secrets.token_hex(16)
        self.listener = None
        if listener_name is None:
            listener_name = f"kbstream-{os.getpid()}-{secrets.token_hex(8)}"
            self.listener = unix_seqpacket()
            self.listener.bind("\0" + listener_name)
            self.listener.listen(4)
        self.peer = None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        h = Hash("reason", "hello", "instanceId", iid, "memoryLocation", "remote", "dataDistribution", "copy",
                 "onSlowness", "wait")
        h.set("maxQueueLength", 2, type=HashType.UINT32)
        h.set("kbCreditWindow", window, type=HashType.UINT32)
        h["kbShm"] = legacy_token()
        offer = Hash("socket", listener_name, "key", self.key)
        h["kbShmFd"] = offer
        hb = kbhash.encode_bytes(h)
        self.sock.sendall(struct.pack("<I", len(hb)) + hb)
        for _ in range(window):
            self.update()
        self.shm = self.tcp = 0

    def update(self):
        self.sock.sendall(wire.update(self.iid))

    def read_message(self):
        """One message: True if it came in shared memory (its descriptor is closed at once)."""
        hdata = read_frame(self.sock)
        blen = struct.unpack("<I", recv_exactly(self.sock, 4))[0]
        h = kbhash.decode(hdata)
        if blen:
            recv_exactly(self.sock, blen)
            self.tcp += 1
            return False
        if "kbShmFd" in h and self.listener is not None:
            if self.peer is None:
                self.listener.settimeout(TIMEOUT)
                self.peer, _ = self.listener.accept()
                assert self.peer.recv(64) == self.key.encode()
                self.peer.settimeout(0.5)
            try:
                _, fds, _, _ = socket.recv_fds(self.peer, 64, 4)
            except TimeoutError:  # a slot passed earlier
                fds = []
            for fd in fds:
                os.close(fd)
        self.shm += 1
        return True

    def close(self):
        for s in (self.sock, self.listener, self.peer):
            if s is not None:
                s.close()


def test_a_hello_never_makes_the_output_remove_files_from_dev_shm():
    """A peer's hello used to trigger a clean-up of "stale" kbstream-<dead pid>-* files,
    whoever owned them; an output now never removes anything from /dev/shm."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    paths = [Path("/dev/shm") / f"kbstream-{p.pid}-x", Path("/dev/shm") / f"kbstream-{p.pid}-{secrets.token_hex(8)}"]
    for path in paths:
        path.write_bytes(b"not yours")
        if os.geteuid() == 0:
            os.chown(path, 65534, 65534)
    out = OutputChannel("clean:output", hostname="127.0.0.1").start()
    raw = RawInput(out.port, "raw:input")
    try:
        out.wait_for_inputs(copy=["raw:input"], timeout=TIMEOUT)
        out.write({"a": np.zeros(1 << 19, np.uint8)})
        out.update(timeout=TIMEOUT)
        assert raw.read_message()
        assert all(path.exists() for path in paths)
    finally:
        raw.close()
        out.close()
        for path in paths:
            path.unlink(missing_ok=True)


def test_slot_budget_bounds_slots_and_bytes_over_all_rings():
    budget = pshm.SlotBudget(max_slots=5, max_bytes=3 << 20)
    a = pshm.SlotRing(None, budget, max_slots=10)
    b = pshm.SlotRing(None, budget, max_slots=10)
    try:
        assert a.acquire(1 << 20) and a.acquire(1 << 20)
        assert b.acquire(1 << 20)
        assert b.acquire(1 << 20) is None        # 3 MiB used: over the byte budget
        assert (budget.slots, budget.bytes) == (3, 3 << 20)
        a.close()
        assert (budget.slots, budget.bytes) == (1, 1 << 20)
        assert b.acquire(2 << 20) is not None
        assert b.acquire(10) is None             # 3 MiB again
    finally:
        a.close()
        b.close()
    assert (budget.slots, budget.bytes) == (0, 0)


def test_inputs_that_never_release_pin_a_bounded_number_of_slots_per_output():
    """Three inputs with the largest window that never give a slot back: the output's slots
    over all of them stay within its budget, and every message still arrives (over TCP)."""
    out = OutputChannel("caps:output", hostname="127.0.0.1", noInputShared="wait").start()
    raws = [RawInput(out.port, f"raw{k}:input", window=64) for k in range(3)]
    n = 100
    counts = [0] * len(raws)
    peak = [0]

    def reader(k):
        for _ in range(n):
            raws[k].read_message()
            counts[k] += 1
            raws[k].update()

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(len(raws))]
    for t in threads:
        t.start()
    try:
        out.wait_for_inputs(copy=[r.iid for r in raws], timeout=TIMEOUT)
        frame = np.zeros(300 * 1024, np.uint8)
        for i in range(n):
            frame[:] = i % 256
            out.write({"index": i, "a": frame})
            out.update(timeout=TIMEOUT)
            with out._lock:
                slots = [len(c.ring.slots) for c in out._inputs.values() if c.ring is not None]
            peak[0] = max(peak[0], sum(slots))
        for t in threads:
            t.join(TIMEOUT)
        assert counts == [n] * len(raws)
        assert 0 < peak[0] <= pshm.OUTPUT_MAX_SLOTS
        shm = [out.stats()[r.iid]["shm"] for r in raws]
        assert sum(shm) <= pshm.OUTPUT_MAX_SLOTS and all(r.tcp > 0 for r in raws)
    finally:
        for r in raws:
            r.close()
        out.close()


def test_one_input_that_never_releases_holds_window_plus_extra_slots_then_gets_tcp():
    """The per-input bound: credit window + INPUT_EXTRA_SLOTS slots, then TCP (a consumer
    such as the train matcher holds many items; beyond that bound they still arrive)."""
    out = OutputChannel("cap1:output", hostname="127.0.0.1").start()
    raw = RawInput(out.port, "raw:input", window=4)
    n = 4 + pshm.INPUT_EXTRA_SLOTS + 6
    got = []

    def reader():
        for _ in range(n):
            got.append(raw.read_message())
            raw.update()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        out.wait_for_inputs(copy=[raw.iid], timeout=TIMEOUT)
        frame = np.zeros(300 * 1024, np.uint8)
        for i in range(n):
            frame[:] = i % 256
            out.write({"index": i, "a": frame})
            out.update(timeout=TIMEOUT)
        t.join(TIMEOUT)
        assert len(got) == n
        with out._lock:
            slots = len(out._inputs[raw.iid].ring.slots)
        assert slots == 4 + pshm.INPUT_EXTRA_SLOTS
        assert (raw.shm, raw.tcp) == (slots, n - slots) and got == [True] * slots + [False] * (n - slots)
    finally:
        raw.close()
        out.close()


def test_the_output_never_hands_its_key_to_a_socket_of_another_user():
    """The hello names a socket another user listens on: the output sees it is not its own
    user's (SO_PEERCRED), sends it nothing and serves this input over TCP."""
    exe = _nobody_python()
    name = f"kbstream-{os.getpid()}-{secrets.token_hex(8)}"
    listen = r"""
import socket, sys
l = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
l.bind("\0" + sys.argv[1])
l.listen(4)
print("listening", flush=True)
l.settimeout(30)
c, _ = l.accept()
c.settimeout(30)
print("got", len(c.recv(64)), flush=True)
"""
    other = subprocess.Popen([exe, "-c", listen, name], user=65534, stdout=subprocess.PIPE, text=True)
    out = raw = None
    try:
        assert other.stdout.readline().split() == ["listening"]
        out = OutputChannel("keys:output", hostname="127.0.0.1").start()
        raw = RawInput(out.port, "raw:input", listener_name=name)
        out.wait_for_inputs(copy=["raw:input"], timeout=TIMEOUT)
        out.write({"a": np.zeros(1 << 19, np.uint8)})
        out.update(timeout=TIMEOUT)
        assert raw.read_message() is False       # the body came over TCP
        assert other.communicate(timeout=60)[0].split() == ["got", "0"]
        assert out.stats()["raw:input"]["shm"] == 0
    finally:
        other.kill()
        other.wait()
        if raw is not None:
            raw.close()
        if out is not None:
            out.close()


_OUTPUT_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from kbstream.pipeline import OutputChannel
out = OutputChannel("doomed:output", hostname="127.0.0.1").start()
print(out.port, flush=True)
out.wait_for_inputs(copy=["raw:input"], timeout=60)
for i in range(5):
    out.write({"a": np.full(300 * 1024, i, np.uint8)})
    out.update(timeout=60)
print("sent", out.stats()["raw:input"]["shm"], flush=True)
time.sleep(600)
"""


def test_a_killed_output_leaves_no_segment_behind():
    """An output killed with SIGKILL while an input holds (and never maps) its slots: no
    segment of it remains anywhere to clean up."""
    child = subprocess.Popen([sys.executable, "-c", _OUTPUT_CHILD, SRC], stdout=subprocess.PIPE, text=True)
    pattern = f"kbstream-{child.pid}-"
    raw = None
    try:
        raw = RawInput(int(child.stdout.readline()), "raw:input", window=8)
        for _ in range(5):
            assert raw.read_message()
        assert child.stdout.readline().split() == ["sent", "5"]
        alive = [f for f in os.listdir("/dev/shm") if f.startswith(pattern)]
        child.send_signal(signal.SIGKILL)
        child.wait(TIMEOUT)
        left = [f for f in os.listdir("/dev/shm") if f.startswith(pattern)]
        assert (alive, left) == ([], [])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        if raw is not None:
            raw.close()
        for f in os.listdir("/dev/shm"):
            if f.startswith(pattern):
                os.unlink(f"/dev/shm/{f}")


# ------------------------------------------------------------------ handler writes stay private


@pytest.mark.parametrize("page_map", [True, False], ids=["page-map", "no-page-map"])
def test_handler_writes_never_reach_the_output_and_the_slot_reads_true_afterwards(page_map, monkeypatch):
    """A handler writes into its (writable) array: the output's slot keeps what the output
    wrote; the next message in the same slot is seen as sent, not as the handler left it
    (with the kernel's page map telling which pages were written, and without)."""
    if not page_map:
        monkeypatch.setattr(pshm, "_pagemap", (os.getpid(), -1))
    out = OutputChannel("priv:output", hostname="127.0.0.1").start()
    inp = InputChannel("priv:input", onSlowness="wait", credit_window=1)
    got = Received(inp, write=0xABCD)
    try:
        inp.start()
        inp.connect(out.info, "priv:output")
        out.wait_for_inputs(copy=["priv:input"], timeout=TIMEOUT)
        first = item(7, n=1 << 19)
        out.write(first)
        out.update(timeout=TIMEOUT)
        assert wait_until(lambda: len(got.items) == 1)
        with out._lock:
            ring = out._inputs["priv:input"].ring
        assert wait_until(lambda: not ring.slots[0].busy)  # released by the input
        sent = body_of(first)
        assert bytes(ring.slots[0].view[:len(sent)]) == sent
        out.write(item(8, n=1 << 19))
        out.update(timeout=TIMEOUT)
        assert wait_until(lambda: len(got.items) == 2)
        assert len(ring.slots) == 1 and out.stats()["priv:input"]["shm"] == 2
        assert got.items == [(7, 7, 7, True), (8, 8, 8, True)]
    finally:
        inp.close()
        out.close()


def test_the_page_map_tells_which_pages_a_handler_wrote():
    import mmap

    fd = memfd(b"\1" * (1 << 20), 1 << 20)
    try:
        m = pshm._Mapping(1, mmap.mmap(fd, 1 << 20, access=mmap.ACCESS_COPY), 1 << 20)
    finally:
        os.close(fd)
    pages = (1 << 20) // mmap.PAGESIZE
    if pshm._has_private_pages(m.addr, pages) is None:
        pytest.skip("LOUD SKIP: /proc/self/pagemap cannot be read here")
    assert int(m.arr.sum()) == 1 << 20                         # read: still the file's pages
    assert pshm._has_private_pages(m.addr, pages) is False
    m.arr[5000] = 7                                            # written: a private copy
    assert pshm._has_private_pages(m.addr, pages) is True
    m.discard(1 << 20)
    assert pshm._has_private_pages(m.addr, pages) is False and m.arr[5000] == 1
    m.arr = None
    m.mm.close()


@pytest.mark.parametrize("populate", [True, False], ids=["populate", "kernel-without-populate"])
def test_populated_mappings_keep_the_outputs_pages_and_handler_writes_private(populate, monkeypatch):
    """The output faults a slot in at once (MADV_POPULATE_WRITE where the kernel has it):
    the input's mapping shows the output's pages, sees what the output writes into the
    slot later, and a handler's write stays a private copy."""
    import mmap

    if not populate:
        monkeypatch.setattr(pshm, "_populate_ok", False)
    seg = pshm._Segment(1 << 20, 1)
    try:
        pshm._populate(seg.mm, pshm._POPULATE_WRITE)             # as SlotRing.place on first use
        seg.view[:] = b"\1" * (1 << 20)
        m = pshm._Mapping(1, mmap.mmap(seg.fd, 1 << 20, access=mmap.ACCESS_COPY), 1 << 20)
        pages = (1 << 20) // mmap.PAGESIZE
        if pshm._has_private_pages(m.addr, pages) is None:
            pytest.skip("LOUD SKIP: /proc/self/pagemap cannot be read here")
        assert pshm._has_private_pages(m.addr, pages) is False   # no private copy made
        assert int(m.arr.sum()) == 1 << 20
        seg.view[:] = b"\2" * (1 << 20)                           # the next message in the slot
        assert int(m.arr.sum()) == 2 << 20
        m.arr[100] = 9                                            # a handler writes
        assert seg.view[100] == 2 and pshm._has_private_pages(m.addr, pages) is True
        m.discard(1 << 20)
        assert m.arr[100] == 2 and pshm._has_private_pages(m.addr, pages) is False
        m.arr = None
        m.mm.close()
    finally:
        seg.close()


def test_populate_is_turned_off_only_by_a_kernel_without_it(monkeypatch):
    import errno

    class Refusing:
        def __init__(self, code):
            self.code = code
            self.calls = 0

        def madvise(self, advice):
            self.calls += 1
            raise OSError(self.code, os.strerror(self.code))

    monkeypatch.setattr(pshm, "_populate_ok", True)
    busy = Refusing(errno.ENOMEM)
    pshm._populate(busy, pshm._POPULATE_WRITE)         # a passing failure: tried again next time
    assert pshm._populate_ok is True
    old = Refusing(errno.EINVAL)
    pshm._populate(old, pshm._POPULATE_WRITE)          # the kernel has no such advice: off
    assert pshm._populate_ok is False
    pshm._populate(old, pshm._POPULATE_WRITE)
    assert (busy.calls, old.calls) == (1, 1)


_FORKED_PAGE_MAP = r"""
import mmap, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_pipeline_shm_security as t
from kbstream.pipeline import shm

def written_after_a_write():
    fd = t.memfd(b"\1" * (1 << 20), 1 << 20)
    m = shm._Mapping(1, mmap.mmap(fd, 1 << 20, access=mmap.ACCESS_COPY), 1 << 20)
    os.close(fd)
    m.arr[5000] = 7
    return shm._has_private_pages(m.addr, (1 << 20) // mmap.PAGESIZE)

print("parent", written_after_a_write(), flush=True)   # opens the parent's page map
pid = os.fork()
if pid == 0:
    print("child", written_after_a_write(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_child_reads_its_own_page_map():
    r = subprocess.run([sys.executable, "-c", _FORKED_PAGE_MAP, SRC, HERE], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = sorted(r.stdout.split("\n")[:2])
    if "None" in r.stdout:
        pytest.skip("LOUD SKIP: /proc/self/pagemap cannot be read here")
    assert lines == ["child True", "parent True"]


# ------------------------------------------------------------------ wire


def test_wire_refuses_references_by_name_and_malformed_ones():
    h = item(1, n=4)
    for frame, why in [
        (ref_frame(h, "kbShm", name="kbstream-1-x", slot=0), "never accepted"),
        (ref_frame(h, "kbShmFd", slot=0, gen=0), "malformed kbShmFd"),
        (ref_frame(h, "kbShmFd", slot=0, gen="1"), "malformed kbShmFd"),
    ]:
        hdata = frame[4:-4]
        with pytest.raises(PipelineProtocolError, match=why):
            wire.parse_header(hdata, 0)
    assert wire.parse_header(ref_frame(h, "kbShmFd", slot=3, gen=9)[4:-4], 0).shm == (3, 9, len(body_of(h)))


def test_the_output_refuses_a_malformed_offer():
    out = OutputChannel("offer:output", hostname="127.0.0.1").start()
    try:
        for offer in (Hash("socket", "/tmp/x", "key", "0" * 32), Hash("socket", "kbstream-1-" + "0" * 16),
                      "kbstream-1-0000000000000000"):
            s = socket.create_connection(("127.0.0.1", out.port), timeout=TIMEOUT)
            h = Hash("reason", "hello", "instanceId", "bad:input")
            h["kbShmFd"] = offer
            hb = kbhash.encode_bytes(h)
            s.sendall(struct.pack("<I", len(hb)) + hb)
            assert s.recv(1) == b""  # closed by the output
            s.close()
        assert out.input_ids() == []
    finally:
        out.close()
