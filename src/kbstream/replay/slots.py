"""Output buffers of trains, reused from train to train in a bounded pool.

A slot (:class:`Slot`) holds the arrays of one train and is reused once the
sender has released it; a :class:`SlotPool` has a fixed number of slots, so
memory stays bounded by that number (prefetch depth + 1).
"""

import queue

import numpy as np

__all__ = ["Slot", "SlotPool"]


class Slot:
    """The output buffers of one train, reused from train to train."""

    __slots__ = ("index", "buffers")

    def __init__(self, index):
        self.index = index
        self.buffers = {}

    def buffer(self, name, shape, dtype):
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.empty(shape, dtype)
            self.buffers[name] = buf
        return buf

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers.values())


class SlotPool:
    """A fixed number of :class:`Slot` objects: bounds the trains in memory.

    A slot is taken before a train is read and given back only after the
    transport has released every frame pointing into it.  ValueError for
    fewer than one slot.
    """

    def __init__(self, nslots):
        if nslots < 1:
            raise ValueError(f"need at least one slot, not {nslots}")
        self._free = queue.SimpleQueue()
        self.slots = [Slot(i) for i in range(nslots)]
        for s in self.slots:
            self._free.put(s)

    def acquire(self, stop_event=None, poll=0.1):
        """Wait for a free slot; None if ``stop_event`` is set meanwhile."""
        while True:
            try:
                return self._free.get(timeout=poll)
            except queue.Empty:
                if stop_event is not None and stop_event.is_set():
                    return None

    def release(self, slot):
        self._free.put(slot)

    @property
    def nbytes(self):
        return sum(s.nbytes for s in self.slots)
