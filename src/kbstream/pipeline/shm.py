"""Same-host shared-memory data path between kbstream channels (Linux).

Over TCP every payload byte is copied twice by the kernel (into the socket,
out of it).  When a kbstream input and a kbstream output run on the same
machine, the input says so in its hello (``kbShm``: a token naming this
kernel boot and this /dev/shm); the output then copies each large message
once into a reusable shared-memory slot and sends only the header over TCP,
with a ``kbShm`` entry saying where the body is.  The input decodes the items
straight from the mapped slot (the arrays are views on it) and returns the
slot (``kbRelease``) once nothing references those arrays any more.

A Karabo peer never sees any of this: its hello has no ``kbShm``, so it gets
plain TCP messages.  Segments are files in /dev/shm, unlinked as soon as the
input has mapped them (``kbShmMapped``), so they disappear with the processes.
"""

import mmap
import os
import secrets
import sys

import numpy as np

from .errors import PipelineProtocolError

__all__ = ["host_token", "SlotRing", "SlotMapper"]

SHM_DIR = "/dev/shm"
#: Messages smaller than this go over TCP (copying them is cheaper than a slot).
MIN_SHM_MESSAGE = 256 * 1024
_ROUND = 1 << 20


def host_token():
    """Identifies this kernel boot and /dev/shm; None where shared memory is not used."""
    if not sys.platform.startswith("linux") or os.environ.get("KBSTREAM_NO_SHM"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}:{os.stat(SHM_DIR).st_dev}"
    except OSError:
        return None


class _Segment:
    __slots__ = ("name", "path", "size", "mm", "view", "busy", "mapped_by_peer")

    def __init__(self, size):
        self.name = f"kbstream-{os.getpid()}-{secrets.token_hex(8)}"
        self.path = os.path.join(SHM_DIR, self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # tmpfs reserves nothing on ftruncate: without the allocation, a full /dev/shm
            # would kill the process with SIGBUS on the first write into the mapping.
            # posix_fallocate raises OSError (ENOSPC) instead, and the caller uses TCP.
            os.posix_fallocate(fd, 0, size)
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            self.unlink()
            raise
        finally:
            os.close(fd)
        self.size = size
        self.view = memoryview(self.mm)
        self.busy = False
        self.mapped_by_peer = False

    def unlink(self):
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self):
        self.unlink()
        self.view.release()
        try:
            self.mm.close()
        except BufferError:  # still exported somewhere: the mapping goes with the process
            pass


class SlotRing:
    """The output's reusable slots for one input (guarded by the output's lock)."""

    def __init__(self, max_slots):
        self.max_slots = max_slots
        self.slots = []
        cleanup_stale()

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
            try:
                if len(self.slots) < self.max_slots:
                    self.slots.append(_Segment(-(-size // _ROUND) * _ROUND))
                    best = len(self.slots) - 1
                else:
                    free = [i for i, seg in enumerate(self.slots) if not seg.busy]
                    if not free:
                        return None
                    best = free[0]
                    new = _Segment(-(-size // _ROUND) * _ROUND)   # first: it may fail
                    self.slots[best].close()
                    self.slots[best] = new
            except OSError:
                return None
        seg = self.slots[best]
        seg.busy = True
        return best, seg

    def release(self, index):
        if 0 <= index < len(self.slots):
            self.slots[index].busy = False

    def mapped(self, name):
        for seg in self.slots:
            if seg.name == name:
                seg.unlink()
                seg.mapped_by_peer = True

    def close(self):
        for seg in self.slots:
            seg.close()
        self.slots = []


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


class SlotMapper:
    """The input's side: maps each slot's segment, tracks which slots are still referenced.

    Mappings are kept per slot index (the output replaces a slot's segment in
    place), so their number is bounded by the output's ring.
    """

    MAX_SLOTS = 256

    def __init__(self):
        self.maps = {}  # slot index -> (segment name, numpy uint8 array over the mapping)
        self.held = []  # (slot index, per-message view) awaiting release

    def open(self, slot, name, size):
        """The mapping of slot ``slot`` (segment ``name``); True if it was mapped now.

        A reference no kbstream output would send raises PipelineProtocolError; a segment
        that cannot be opened, OSError.
        """
        if not 0 <= slot < self.MAX_SLOTS:
            raise PipelineProtocolError(f"slot {slot} out of range")
        have = self.maps.get(slot)
        if have is not None and have[0] == name and have[1].size >= size:
            return have[1], False
        base = os.path.basename(name)
        if base != name or not base.startswith("kbstream-"):
            raise PipelineProtocolError(f"refusing shared memory segment {name!r}")
        fd = os.open(os.path.join(SHM_DIR, base), os.O_RDWR)
        try:
            length = os.fstat(fd).st_size
            if length < size:
                raise PipelineProtocolError(f"segment {name} has {length} bytes, message needs {size}")
            mm = mmap.mmap(fd, length)
        finally:
            os.close(fd)
        arr = np.frombuffer(mm, np.uint8)
        self.maps[slot] = (name, arr)  # an old mapping lives on while arrays view it
        return arr, True

    def message_view(self, slot, arr, size):
        """A view for one message; the slot is free again once nothing references it."""
        view = arr[:size]
        self.held.append((slot, view))
        return view

    def releasable(self):
        """Slots whose message nobody references any more (removed from tracking)."""
        free = []
        keep = []
        for slot, view in self.held:
            # references: the tuple in the list, ``view`` and getrefcount's argument
            if sys.getrefcount(view) <= 3:
                free.append(slot)
            else:
                keep.append((slot, view))
        self.held = keep
        return free


def cleanup_stale():
    """Remove segments left in /dev/shm by kbstream processes that no longer exist."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "kbstream" or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                pass
        except PermissionError:
            pass
