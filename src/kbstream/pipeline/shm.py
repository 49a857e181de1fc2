"""Same-host shared-memory data path between kbstream channels (Linux).

Over TCP every payload byte is copied twice by the kernel (into the socket, out of
it).  When a kbstream input and a kbstream output run on the same machine, the output
copies each large message once into a reusable shared-memory slot and sends only the
header over TCP, with a ``kbShmFd`` entry naming the slot; the input decodes the items
straight from its mapping of the slot and returns the slot (``kbRelease``) once nothing
references those arrays any more.

No file name ever travels, and nothing is ever opened on a peer's word:

1. An input whose TCP peer is on this host (loopback, or the same address as its own
   end) listens on a Unix-domain socket in the abstract namespace and offers it in its
   hello: ``kbShmFd = {socket: "kbstream-<pid>-<16 hex>", key: <32 hex>}``.
2. The output connects to that socket, checks with SO_PEERCRED that the listener runs
   under its own user id, and sends the key first (so the input knows the connection
   belongs to this TCP connection).  The input accepts only a connection from its own
   user id that sends the key.  No offer, a remote peer or any failed check: TCP.
3. A slot is a memfd the output made (``memfd_create``, ``posix_fallocate``d, sealed
   against shrinking and growing).  The first time a slot is used, its file descriptor
   goes to the input over the Unix socket (SCM_RIGHTS) with ``(slot, generation, size)``,
   just before the TCP header that refers to it; later headers name ``(slot,
   generation)`` only.
4. The input takes only a regular file of its own user id carrying F_SEAL_SHRINK, of the
   announced size: its mapping can never lose pages under it (no SIGBUS), whatever the
   output does later.  It maps it private (copy on write): a handler may write into
   its arrays, but nothing reaches the output's memory; the private pages are
   discarded (MADV_DONTNEED) when the slot is released, so the next message in that
   slot is seen as the output wrote it.

Everything is memory of the two processes: no file in /dev/shm, nothing to clean up,
nothing outlives them.  An output bounds its slots and their bytes over all its inputs
(:data:`OUTPUT_MAX_SLOTS`, :data:`OUTPUT_MAX_BYTES`); beyond, and for an input that
keeps its slots, messages go over TCP.  docs/safety-shm.md has the details.

A Karabo peer never sees any of this: its hello has no ``kbShmFd``, so it gets plain
TCP messages.
"""

import errno
import fcntl
import hmac
import ipaddress
import mmap
import os
import re
import secrets
import select
import socket
import stat
import struct
import sys
import threading
import time

import numpy as np

from .errors import ConnectionLost, PipelineProtocolError

__all__ = ["available", "is_local_peer", "connect_input", "SlotBudget", "SlotRing", "SlotMapper"]

#: Messages smaller than this go over TCP (copying them is cheaper than a slot).
MIN_SHM_MESSAGE = 256 * 1024
#: All inputs of one output together: at most this many slots...
OUTPUT_MAX_SLOTS = 64
#: ...of at most this many bytes (a message that does not fit goes over TCP).
OUTPUT_MAX_BYTES = 2 << 30
#: Slots one input may hold beyond its credit window: the items its queue and its
#: handlers still reference (a train matcher keeps each source's items in its input
#: queue, in trains waiting for other sources, in its output queue and in the send of
#: a train: about 16 with the default depths).  A ring grows only while every slot is
#: referenced, and never beyond the output's budget; past this, messages go over TCP.
INPUT_EXTRA_SLOTS = 24
#: Seconds the handshake on the Unix socket may take (the output connects before it
#: sends any data, so in practice everything is there already).
HANDSHAKE_TIMEOUT = 5.0
_ROUND = 1 << 20
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL if hasattr(fcntl, "F_SEAL_SHRINK") else 0
_SOCKET_NAME = re.compile(r"kbstream-[0-9]{1,10}-[0-9a-f]{16}\Z")
_KEY = re.compile(r"[0-9a-f]{32}\Z")
#: The datagram that carries a slot's descriptor: slot, generation, segment size.
_FD_MSG = struct.Struct("<IQQ")
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)  # a closed peer is an OSError, never SIGPIPE
#: madvise advice that faults a whole range in for writing in one call (Linux 5.14+; the
#: value of <linux/mman.h>, which Python's mmap module lacks before 3.13).  Older kernels
#: answer EINVAL: the pages are then faulted in one by one on first use, as before.  (The
#: input does not need its read counterpart: read faults on its mapping already map 64 KiB
#: at a time, and its mapping of a slot serves every later message in that slot.)
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_populate_ok = sys.platform.startswith("linux")


def _populate(mm, advice):
    """Fault all pages of ``mm`` in at once (one system call instead of a page fault per
    4 KiB).  Best effort: a kernel without the advice (EINVAL) turns it off for the
    process; any other failure (ENOMEM, EFAULT) leaves the pages to be faulted in on
    first use, where the same failure is handled as without it."""
    global _populate_ok
    if _populate_ok:
        try:
            mm.madvise(advice)
        except OSError as e:
            if e.errno == errno.EINVAL:
                _populate_ok = False
        except ValueError:  # closed meanwhile
            pass


def available():
    """Whether this process can use the shared-memory path (Linux, not KBSTREAM_NO_SHM)."""
    return (sys.platform.startswith("linux") and not os.environ.get("KBSTREAM_NO_SHM")
            and hasattr(os, "memfd_create") and hasattr(socket, "send_fds")
            and hasattr(socket, "SO_PEERCRED") and _SEALS != 0)


def is_local_peer(sock):
    """Whether the TCP peer of ``sock`` is on this host (loopback or our own address)."""
    try:
        peer = sock.getpeername()[0]
        own = sock.getsockname()[0]
        return peer == own or ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except (OSError, ValueError, TypeError, IndexError):
        return False


def _peer_uid(sock):
    return _CREDS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))[1]


def _unix_socket():
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def _close(sock):
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- output side


def connect_input(tcp_sock, offer, send_timeout):
    """The output's half of the handshake for an input whose hello offered ``offer``.

    Returns the connected Unix socket, or None when the input gets TCP (it is not on this
    host, runs under another user id, or cannot be reached).  A malformed offer (no
    kbstream input sends one) raises PipelineProtocolError.
    """
    try:
        name, key = offer.get("socket"), offer.get("key")
    except AttributeError:
        raise PipelineProtocolError("kbShmFd offer is not a Hash") from None
    if not isinstance(name, str) or not isinstance(key, str) \
            or not _SOCKET_NAME.match(name) or not _KEY.match(key):
        raise PipelineProtocolError("malformed kbShmFd offer")
    if not is_local_peer(tcp_sock):
        return None
    sock = None
    try:
        sock = _unix_socket()
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.connect("\0" + name)
        if _peer_uid(sock) != os.geteuid():
            _close(sock)
            return None
        sock.sendall(key.encode(), _NOSIGNAL)
        sock.settimeout(send_timeout)
        return sock
    except OSError:
        _close(sock)
        return None


class SlotBudget:
    """Slots and bytes all rings of one output may hold together (thread-safe)."""

    def __init__(self, max_slots=None, max_bytes=None):
        self.max_slots = OUTPUT_MAX_SLOTS if max_slots is None else max_slots
        self.max_bytes = OUTPUT_MAX_BYTES if max_bytes is None else max_bytes
        self.slots = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def take(self, slots, nbytes):
        """Reserve ``slots`` more slots and ``nbytes`` more bytes; False if over budget."""
        with self._lock:
            if self.slots + slots > self.max_slots or self.bytes + nbytes > self.max_bytes:
                return False
            self.slots += slots
            self.bytes += nbytes
            return True

    def give(self, slots, nbytes):
        with self._lock:
            self.slots -= slots
            self.bytes -= nbytes


class _Segment:
    """One slot's memory: a sealed memfd, mapped shared (the output writes it)."""

    __slots__ = ("gen", "fd", "size", "mm", "view", "busy")

    def __init__(self, size, gen):
        fd = os.memfd_create("kbstream-slot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # reserve the pages now: a full memory cgroup gives OSError here (the caller
            # then uses TCP), never a signal on the first write into the mapping
            os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd  # open until it has been passed to the input
        self.gen = gen
        self.size = size
        self.view = memoryview(self.mm)
        self.busy = False

    def close_fd(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def close(self):
        self.close_fd()
        self.view.release()
        try:
            self.mm.close()
        except BufferError:  # still exported somewhere: the mapping goes with the process
            pass


class SlotRing:
    """The output's reusable slots for one input (guarded by the output's lock, except
    :meth:`place`, which only the input's one sender calls, and :meth:`close`)."""

    def __init__(self, peer, budget, max_slots):
        self.peer = peer  # the Unix socket descriptors go through
        self.budget = budget
        self.max_slots = max_slots
        self.slots = []
        self._gen = 0

    def _new(self, size):
        self._gen += 1
        return _Segment(size, self._gen)

    def acquire(self, size):
        """A free slot ``(index, segment)`` of at least ``size`` bytes, or None (then send over TCP).

        Slot indices are stable: a slot that is too small is replaced in
        place, so the input's releases always name the right slot.
        """
        best = None
        for i, seg in enumerate(self.slots):
            if not seg.busy and seg.size >= size and (best is None or seg.size < self.slots[best].size):
                best = i
        if best is None:
            want = -(-size // _ROUND) * _ROUND
            if len(self.slots) < self.max_slots:
                if not self.budget.take(1, want):
                    return None
                try:
                    self.slots.append(self._new(want))
                except OSError:
                    self.budget.give(1, want)
                    return None
                best = len(self.slots) - 1
            else:
                free = [i for i, seg in enumerate(self.slots) if not seg.busy]
                if not free:
                    return None
                best = free[0]
                old = self.slots[best]
                if not self.budget.take(0, want - old.size):
                    return None
                try:
                    new = self._new(want)  # first: it may fail
                except OSError:
                    self.budget.give(0, want - old.size)
                    return None
                old.close()
                self.slots[best] = new
        seg = self.slots[best]
        seg.busy = True
        return best, seg

    def release(self, index):
        if 0 <= index < len(self.slots):
            self.slots[index].busy = False

    def place(self, slot, msg):
        """Put ``msg``'s body into ``slot`` (from :meth:`acquire`); the header to send.

        A slot used for the first time passes its descriptor to the input first.
        Raises OSError when the Unix socket fails (the connection is then dropped).
        """
        index, seg = slot
        if seg.fd >= 0:
            # first use of this segment (its mapping lives as long as the slot): set up
            # its page table entries in one call, not by a write fault per 4 KiB during
            # the copy; here rather than in acquire(), which runs under the output's lock
            _populate(seg.mm, _POPULATE_WRITE)
        fill(seg, msg.body)  # the one copy of this message
        if seg.fd >= 0:
            socket.send_fds(self.peer, [_FD_MSG.pack(index, seg.gen, seg.size)], [seg.fd], _NOSIGNAL)
            seg.close_fd()
        return msg.via_shm(index, seg.gen)

    def close(self):
        _close(self.peer)
        slots, self.slots = self.slots, []
        for seg in slots:
            seg.close()
        if slots:
            self.budget.give(len(slots), sum(seg.size for seg in slots))


def fill(seg, buffers):
    """Copy the message body (all item buffers back to back) into the slot."""
    pos = 0
    view = seg.view
    for b in buffers:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        view[pos:pos + n] = mv
        pos += n
    return pos


# ---------------------------------------------------------------- input side


_pagemap = (None, None)  # (pid, descriptor of its /proc/<pid>/pagemap; -1 if unreadable)
_PM_PRESENT = np.uint64(1 << 63)
_PM_SWAPPED = np.uint64(1 << 62)
_PM_FILE = np.uint64(1 << 61)  # a page of the file (or shared), not a private copy


def _has_private_pages(addr, npages):
    """Whether a page of ``npages`` at ``addr`` is a private copy (a handler wrote into
    it); None when the kernel does not say (then assume so)."""
    global _pagemap
    pid, fd = _pagemap
    if pid != os.getpid():  # first use, or a forked child: the parent's map is not ours
        if fd is not None and fd >= 0:
            os.close(fd)
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        _pagemap = (os.getpid(), fd)
    if fd < 0:
        return None
    try:
        raw = os.pread(fd, npages * 8, addr // mmap.PAGESIZE * 8)
    except OSError:
        return None
    if len(raw) != npages * 8:
        return None
    e = np.frombuffer(raw, np.uint64)
    return bool(((e & _PM_SWAPPED) != 0).any() or ((e & (_PM_PRESENT | _PM_FILE)) == _PM_PRESENT).any())


class _Mapping:
    """The input's private mapping of one slot's memfd."""

    __slots__ = ("gen", "mm", "arr", "addr", "size", "broken")

    def __init__(self, gen, mm, size):
        self.gen = gen
        self.mm = mm
        self.size = size
        self.arr = np.frombuffer(mm, np.uint8)
        self.addr = self.arr.__array_interface__["data"][0]
        self.broken = False

    def discard(self, nbytes):
        """Forget what a handler wrote into the first ``nbytes`` (back to the output's data).

        Only when something was written (the page map says so: a cheap look), since
        dropping the pages makes the next message fault them in again."""
        n = min(self.size, -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE)
        if n and _has_private_pages(self.addr, n // mmap.PAGESIZE) is not False:
            try:
                self.mm.madvise(mmap.MADV_DONTNEED, 0, n)
            except (OSError, ValueError):
                self.broken = True  # the next message in this slot ends the connection


def _check_segment(fd, size, needed, limit):
    """Refuse a descriptor that is not a sealed memfd of ours of the announced size."""
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        raise PipelineProtocolError(f"shared-memory descriptor refused: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PipelineProtocolError("shared-memory descriptor refused: not a regular file")
    if st.st_uid != os.geteuid():
        raise PipelineProtocolError(f"shared-memory descriptor refused: owned by uid {st.st_uid}")
    if not seals & fcntl.F_SEAL_SHRINK:
        raise PipelineProtocolError("shared-memory descriptor refused: not sealed against shrinking")
    if st.st_size != size or not needed <= size <= limit or size == 0:
        raise PipelineProtocolError(f"shared-memory descriptor refused: {st.st_size} bytes, announced {size}, "
                                    f"message needs {needed}, at most {limit}")


class SlotMapper:
    """The input's side of one connection: the offer, the Unix socket, the mappings, and
    which slots are still referenced.

    Mappings are kept per slot index (the output replaces a slot's segment in place), so
    their number is bounded.  :meth:`open` runs in the receiving thread only;
    :meth:`message_view` and :meth:`releasable` under the connection's lock.
    """

    MAX_SLOTS = 256

    def __init__(self, max_message_size):
        self.limit = min(max_message_size, 0xFFFFFFFF) + _ROUND
        self.socket_name = f"kbstream-{os.getpid()}-{secrets.token_hex(8)}"
        self.key = secrets.token_hex(16)
        self.listener = _unix_socket()
        try:
            self.listener.bind("\0" + self.socket_name)
            self.listener.listen(8)
        except OSError:
            _close(self.listener)
            raise
        self.peer = None
        self.closing = False
        self.maps = {}  # slot index -> _Mapping
        self.held = []  # (slot index, per-message view, _Mapping) awaiting release

    @property
    def offer(self):
        """``(socket name, key)`` for the hello's kbShmFd."""
        return self.socket_name, self.key

    def _failed(self, what):
        if self.closing:
            return ConnectionLost("input closed")
        return PipelineProtocolError(what)

    def _wait(self, sock, deadline, what):
        """Until ``sock`` is readable; in short slices, so that :meth:`interrupt` is seen
        (shutting a listening socket down does not wake a waiting accept)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while True:
            if self.closing:
                raise ConnectionLost("input closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PipelineProtocolError(what)
            if poller.poll(max(1, int(min(left, 0.05) * 1000))):
                return

    def _accept(self):
        """The output's connection: our user id, and it knows the key."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        what = "the output did not connect its shared-memory socket"
        want = self.key.encode()
        while True:
            self._wait(self.listener, deadline, what)
            try:
                self.listener.settimeout(0.05)
                sock, _ = self.listener.accept()
            except OSError:
                continue  # gone meanwhile: wait on
            try:
                if _peer_uid(sock) == os.geteuid():
                    self._wait(sock, deadline, what)
                    sock.settimeout(0.05)
                    if hmac.compare_digest(sock.recv(64), want):
                        self.peer = sock
                        _close(self.listener)
                        return
            except OSError:
                pass
            except BaseException:
                _close(sock)
                raise
            _close(sock)  # somebody else: wait for the output

    def _next_fd(self):
        if self.peer is None:
            self._accept()
        self._wait(self.peer, time.monotonic() + HANDSHAKE_TIMEOUT,
                   "the output did not pass the descriptor of a new slot")
        try:
            self.peer.settimeout(0.05)
            data, fds, flags, _ = socket.recv_fds(self.peer, 64, 4, socket.MSG_CMSG_CLOEXEC)
        except OSError as e:
            raise self._failed(f"shared-memory socket: {e}") from None
        if len(fds) == 1 and len(data) == _FD_MSG.size and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            return fds[0], _FD_MSG.unpack(data)
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            raise self._failed("the output closed its shared-memory socket")
        raise PipelineProtocolError("malformed shared-memory descriptor message")

    def open(self, slot, gen, size):
        """The mapping of slot ``slot`` (generation ``gen``) for a message of ``size`` bytes.

        A new generation takes the next descriptor from the Unix socket (the output sends
        it before the header).  Anything no kbstream output would send raises
        PipelineProtocolError.
        """
        if not 0 <= slot < self.MAX_SLOTS:
            raise PipelineProtocolError(f"slot {slot} out of range")
        have = self.maps.get(slot)
        if have is not None and have.gen == gen:
            if size > have.size or have.broken:
                raise PipelineProtocolError(f"message of {size} bytes in a slot of {have.size}")
            return have
        fd, (fslot, fgen, fsize) = self._next_fd()
        try:
            if (fslot, fgen) != (slot, gen):
                raise PipelineProtocolError(f"descriptor for slot {fslot} generation {fgen} when "
                                            f"slot {slot} generation {gen} was referenced")
            _check_segment(fd, fsize, size, self.limit)
            try:
                mm = mmap.mmap(fd, fsize, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise PipelineProtocolError(f"cannot map shared memory: {e}") from None
        finally:
            os.close(fd)
        have = self.maps[slot] = _Mapping(gen, mm, fsize)  # an old mapping lives on while arrays view it
        return have

    def message_view(self, slot, mapping, size):
        """A view for one message; the slot is free again once nothing references it."""
        view = mapping.arr[:size]
        self.held.append((slot, view, mapping))
        return view

    def releasable(self):
        """Slots whose message nobody references any more (removed from tracking); what
        handlers wrote into them is discarded first."""
        free = []
        keep = []
        for entry in self.held:
            view = entry[1]
            # references: the tuple in the list, ``view`` and getrefcount's argument
            if sys.getrefcount(view) <= 3:
                entry[2].discard(view.size)
                free.append(entry[0])
            else:
                keep.append(entry)
        view = entry = None
        self.held = keep
        return free

    def interrupt(self):
        """Wake the receiving thread if it waits on the Unix socket (any thread)."""
        self.closing = True
        for sock in (self.listener, self.peer):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        """Close the sockets and drop this side's references to the mappings: a mapping
        (and its memfd) stays exactly while arrays use it, and goes with the last of them
        rather than with a later garbage collection of the closed connection."""
        self.closing = True
        _close(self.listener)
        _close(self.peer)
        self.maps = {}
        self.held = []
