"""Keep large receive buffers in the process instead of returning them to the kernel.

libzmq allocates every received frame with ``malloc`` in its I/O thread.  A JUNGFRAU
module frame is 16 MiB; with glibc's defaults the freed frames of one train are given back
to the kernel (the block was ``mmap``-ed on its own, the heap is trimmed, or a thread
arena's 64 MiB heap that became empty is unmapped), so every frame of the next train is
page-faulted and zero-filled again by the kernel before libzmq can copy data into it.  On
the project's machine a JF4M client spent 55 ms of system time per train, a third of it in
these page faults, and the receiver is what limits a loopback link.

:func:`keep_large_buffers` sets, with ``mallopt``:

* ``M_MMAP_THRESHOLD`` to its maximum (32 MiB on 64-bit): frames up to that size come from
  the heap;
* ``M_TRIM_THRESHOLD`` to 1 GiB: freed frames stay in the heap;
* ``M_ARENA_MAX`` to 1: threads created afterwards (libzmq's I/O thread) allocate from the
  main heap, which grows as needed, instead of from 64 MiB thread heaps that glibc unmaps
  as soon as they are empty.

Then the frames of one train are reused by the next: no page faults at all (measured: 8409
faults and 55 ms of system time per JF4M train before, 0 and 33 ms after).  This is
process-wide: memory freed by the process is kept up to 1 GiB instead of being returned at
once, and new threads share one heap.  It only affects threads that have not allocated yet,
so call it before creating the ``zmq.Context`` (``kbstream.Client`` calls it first thing,
which is early enough when it makes its own context).  Frames above 32 MiB (an AGIPD
module with 352 cells, 46 MiB) are still ``mmap``-ed by glibc whatever the settings.  It
does nothing on other C libraries.

:class:`kbstream.Client` calls it when it is created, unless told not to
(``Client(..., keep_buffers=False)``) or the environment sets
``KBSTREAM_KEEP_BUFFERS=0``.
"""

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

__all__ = ["keep_large_buffers", "MMAP_THRESHOLD_MAX"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: glibc refuses mmap thresholds above this (32 MiB where a C long is 64 bits).
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
_DEFAULT_TRIM = 1 << 30

_lock = threading.Lock()
_applied = None   # None: not tried yet; else the result of the first call


def _glibc_mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def keep_large_buffers(mmap_threshold=MMAP_THRESHOLD_MAX, trim_threshold=_DEFAULT_TRIM):
    """Tune glibc's allocator so that freed frames up to ``mmap_threshold`` bytes are reused.

    Returns True if the settings were applied (now or by an earlier call), False if this is
    not glibc or ``KBSTREAM_KEEP_BUFFERS=0`` is set.  Only the first call in a process acts.
    """
    global _applied
    with _lock:
        if _applied is not None:
            return _applied
        if os.environ.get("KBSTREAM_KEEP_BUFFERS", "1") == "0":
            _applied = False
            return False
        mallopt = _glibc_mallopt()
        if mallopt is None:
            _applied = False
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        threshold = min(int(mmap_threshold), MMAP_THRESHOLD_MAX)
        trim = min(int(trim_threshold), 2**31 - 1)
        ok = (bool(mallopt(_M_MMAP_THRESHOLD, threshold))
              and bool(mallopt(_M_TRIM_THRESHOLD, trim))
              and bool(mallopt(_M_ARENA_MAX, 1)))
        log.debug("malloc tuning for large frames (mmap threshold %d, trim threshold %d): %s",
                  threshold, trim, "applied" if ok else "refused")
        _applied = ok
        return ok
