"""The prefetch thread: reads trains ahead of the sender into a bounded pool of slots.

:class:`Prefetcher` follows kbstream's one life cycle (``docs/conventions.md``,
:class:`kbstream._lifecycle.Lifecycle`): constructing it starts no thread,
``start()`` starts the reader thread and returns the prefetcher, ``close()``
(= ``stop()``) ends the thread within a bounded time and may be called again,
and ``with Prefetcher(...) as pf:`` starts it and closes it on exit.
"""

import logging
import queue
import threading
import time

from .._lifecycle import Lifecycle
from ..errors import ChannelTimeout
from .reader import TrainData
from .slots import SlotPool

__all__ = ["Prefetcher"]

log = logging.getLogger(__name__)


class Prefetcher(Lifecycle):
    """Read trains ahead in a thread, into a bounded pool of slots.

    After :meth:`start`, iterating yields :class:`TrainData` in order; the
    consumer must call :meth:`release` with each item once the transport no
    longer needs its buffers.  At most ``depth + 1`` trains exist at a time
    (read ahead, being read, and sent but not yet released).

    Parameters
    ----------
    reader : RunReader
    selection : dict
        {source: [keys]}.
    trains : iterable of (file train id, train id to send)
        May be endless (``--loop``).
    depth : int
        Trains read ahead of the sender (at least 0).
    transform : callable, optional
        Applied to each :class:`TrainData` in the reader thread (e.g. stacking
        detector modules).
    timestamps : bool
        Send the files' ``INDEX/timestamp`` (see :meth:`RunReader.read_train`).

    Raises
    ------
    ValueError
        ``depth`` is negative.
    """

    #: Seconds :meth:`close` waits for the reader thread (which stops after the
    #: train it is reading); past this it logs a warning and leaves the daemon thread.
    close_timeout = 10.0

    def __init__(self, reader, selection, trains, depth=4, transform=None, timestamps=True):
        Lifecycle.__init__(self)
        if depth < 0:
            raise ValueError(f"depth must be at least 0, not {depth}")
        self.reader = reader
        self.selection = selection
        self.trains = trains
        self.pool = SlotPool(depth + 1)
        self.transform = transform
        self.timestamps = timestamps
        self._queue = queue.Queue(maxsize=depth + 1)
        self._stop = threading.Event()
        self._thread = None

    _END = object()

    def _run(self):
        try:
            for tid, send_tid in self.trains:
                slot = self.pool.acquire(self._stop)
                if slot is None:
                    return
                try:
                    item = self.reader.read_train(tid, self.selection, slot, send_tid,
                                                  timestamps=self.timestamps)
                    if self.transform is not None:
                        item = self.transform(item)
                except Exception as e:  # noqa: BLE001 - the consumer reports it
                    # One bad train (truncated file, corrupt dataset, modules that do
                    # not stack) is handed on as an error, reported and skipped; the
                    # stream goes on.
                    item = TrainData(int(send_tid), int(tid), slot=slot, error=e)
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(TrainData(-1, -1, error=e))
        finally:
            self._put(self._END)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _start(self):
        self._thread = threading.Thread(target=self._run, name="kbstream-prefetch", daemon=True)
        self._thread.start()

    def get(self, timeout=None):
        """Next :class:`TrainData`, None at the end.

        Raises
        ------
        ChannelTimeout
            No train within ``timeout`` seconds (a ``TimeoutError``).
        StateError
            Before :meth:`start` or after :meth:`close`.
        """
        self._check_started("get()")
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise ChannelTimeout(f"no train read within {timeout} s", None, timeout) from None
        if item is self._END:
            self._queue.put(self._END)  # stay at the end for further calls
            return None
        if item.train_id == -1 and item.error is not None and item.slot is None:
            raise item.error
        return item

    def __iter__(self):
        while True:
            item = self.get()
            if item is None:
                return
            yield item

    def release(self, item):
        """Give ``item``'s slot back to the pool (also after :meth:`close`)."""
        # Drop the arrays first: the slot's buffers are refilled by the next train.
        item.data = item.metadata = None
        if item.slot is not None:
            self.pool.release(item.slot)
            item.slot = None

    def _close(self):
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + self.close_timeout
        while thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("the prefetch thread is still reading after %.1f s; leaving it",
                        self.close_timeout)
