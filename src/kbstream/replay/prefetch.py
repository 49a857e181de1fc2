"""The prefetch thread: reads trains ahead of the sender into a bounded pool of slots."""

import queue
import threading

from .reader import TrainData
from .slots import SlotPool

__all__ = ["Prefetcher"]


class Prefetcher:
    """Read trains ahead in a thread, into a bounded pool of slots.

    Iterating yields :class:`TrainData` in order; the consumer must call
    :meth:`release` with each item once the transport no longer needs its
    buffers.  At most ``depth + 1`` trains exist at a time (read ahead,
    being read, and sent but not yet released).

    Parameters
    ----------
    reader : RunReader
    selection : dict
        {source: [keys]}.
    trains : iterable of (file train id, train id to send)
        May be endless (``--loop``).
    depth : int
        Trains read ahead of the sender.
    transform : callable, optional
        Applied to each :class:`TrainData` in the reader thread (e.g. stacking
        detector modules).
    """

    def __init__(self, reader, selection, trains, depth=4, transform=None, timestamps=True):
        self.reader = reader
        self.selection = selection
        self.trains = trains
        self.pool = SlotPool(depth + 1)
        self.transform = transform
        self.timestamps = timestamps
        self._queue = queue.Queue(maxsize=depth + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kbstream-prefetch", daemon=True)
        self._started = False

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
                except (OSError, KeyError, ValueError) as e:
                    # One bad train (truncated file, corrupt dataset) is reported
                    # and skipped; the stream goes on.
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

    def start(self):
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def get(self, timeout=None):
        """Next :class:`TrainData`, None at the end; raises queue.Empty on timeout."""
        self.start()
        item = self._queue.get(timeout=timeout)
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
        # Drop the arrays first: file mappings are unmapped with their last reference.
        item.data = item.metadata = None
        if item.slot is not None:
            self.pool.release(item.slot)
            item.slot = None

    def close(self):
        self._stop.set()
        if self._started:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
