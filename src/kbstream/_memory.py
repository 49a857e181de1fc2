"""Keep large receive buffers in the process instead of returning them to the kernel.

libzmq allocates every received frame with ``malloc``.  A JUNGFRAU module frame is 16 MiB;
with glibc's defaults the freed frames of one train are given back to the kernel (the heap
is trimmed, or the block was ``mmap``-ed on its own), so every frame of the next train is
page-faulted and zero-filled again by the kernel before libzmq can copy data into it.  On
the project's machine that was about 30 % of a receiving process's CPU time, and the
receiver is what limits a loopback link.

:func:`keep_large_buffers` raises glibc's ``M_MMAP_THRESHOLD`` (to its maximum, 32 MiB on
64-bit) and ``M_TRIM_THRESHOLD`` with ``mallopt``, so that freed frames stay in the heap and
are reused by the next train.  This is process-wide: memory freed by the process is then
kept up to the trim threshold instead of being returned at once (its peak use stays
resident).  Frames above 32 MiB (an AGIPD module with 352 cells, 46 MiB) are still
``mmap``-ed by glibc whatever the settings.  It does nothing on other C libraries.

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
        ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
            mallopt(_M_TRIM_THRESHOLD, trim))
        log.debug("malloc tuning for large frames (mmap threshold %d, trim threshold %d): %s",
                  threshold, trim, "applied" if ok else "refused")
        _applied = ok
        return ok
