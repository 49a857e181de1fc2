"""Karabo timestamps: seconds, attoseconds and train id (``sec``/``frac``/``tid`` attributes)."""

import time

__all__ = ["Timestamp"]


class Timestamp:
    """A Karabo timestamp: seconds, attoseconds and train id.

    Parameters
    ----------
    sec : int
        Seconds since the Unix epoch.
    frac : int
        Fraction of the second in attoseconds (10**-18 s).
    tid : int
        Train id.
    """

    __slots__ = ("sec", "frac", "tid")

    def __init__(self, sec=0, frac=0, tid=0):
        self.sec = int(sec)
        self.frac = int(frac)
        self.tid = int(tid)
        if not 0 <= self.frac < 10**18:
            raise ValueError(f"frac is in attoseconds, 0 <= frac < 10**18, got {self.frac}")

    @classmethod
    def now(cls, tid=0):
        """The current time (nanosecond resolution) with the given train id."""
        ns = time.time_ns()
        return cls(ns // 10**9, (ns % 10**9) * 10**9, tid)

    @classmethod
    def from_time(cls, seconds, tid=0):
        """From a float of seconds since the epoch (microsecond resolution)."""
        us = round(seconds * 1e6)
        return cls(us // 10**6, (us % 10**6) * 10**12, tid)

    @property
    def time(self):
        """Seconds since the epoch as a float."""
        return self.sec + self.frac * 1e-18

    def __eq__(self, other):
        if not isinstance(other, Timestamp):
            return NotImplemented
        return (self.sec, self.frac, self.tid) == (other.sec, other.frac, other.tid)

    def __hash__(self):
        return hash((self.sec, self.frac, self.tid))

    def __repr__(self):
        return f"Timestamp(sec={self.sec}, frac={self.frac}, tid={self.tid})"
