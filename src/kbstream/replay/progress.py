"""Progress of one replay: counters, the progress bar on stderr, and the final summary."""

import collections
import sys
import time

__all__ = ["ReplayStats"]


class ReplayStats:
    """Counters of one replay, and the progress bar on stderr.

    ``sent``: trains handed to a peer; ``dropped``: PUB trains published while
    nobody subscribed; ``skipped``: trains that could not be read or
    serialized.  ``total`` (None when endless) counts sent and dropped trains.
    """

    def __init__(self, total, stream=None, progress=True, interval=0.25):
        self.total = total  # None when endless
        self.stream = stream if stream is not None else sys.stderr
        self.progress = progress
        self.interval = interval
        self.sent = 0
        self.dropped = 0
        self.skipped = 0
        self.bytes = 0
        self.last_tid = None
        self.start = time.perf_counter()
        self._last_print = float("-inf")  # the first train is always drawn
        self._drawn = None   # (sent, dropped, skipped) of the last line drawn
        self._window = collections.deque(maxlen=20)
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def sent_train(self, tid, nbytes):
        now = time.perf_counter()
        self.sent += 1
        self.bytes += nbytes
        self.last_tid = tid
        self._window.append((now, nbytes))
        if self.progress and now - self._last_print >= self.interval:
            self._last_print = now
            self._draw(now)

    def dropped_train(self, tid):
        now = time.perf_counter()
        self.dropped += 1
        self.last_tid = tid
        if self.progress and now - self._last_print >= self.interval:
            self._last_print = now
            self._draw(now)

    def _rates(self, now=None):
        now = now if now is not None else time.perf_counter()
        w = self._window
        if len(w) >= 2 and w[-1][0] > w[0][0]:
            dt = w[-1][0] - w[0][0]
            return (len(w) - 1) / dt, sum(b for _, b in list(w)[1:]) / dt
        dt = now - self.start
        return (self.sent / dt, self.bytes / dt) if dt > 0 else (0.0, 0.0)

    def _draw(self, now):
        tps, bps = self._rates(now)
        handled = self.sent + self.dropped
        if self.total:
            frac = min(1.0, handled / self.total)
            bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
            count = f"{handled}/{self.total}"
        else:
            bar, count = "~" * 30, f"{handled}"
        line = (f"[{bar}] {count} trains  {tps:6.1f} trains/s  {bps / 1e9:5.2f} GB/s  "
                f"train {self.last_tid}")
        if self.dropped:
            line += f"  ({self.dropped} dropped)"
        if self.skipped:
            line += f"  ({self.skipped} skipped)"
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        self.stream.flush()
        self._drawn = (self.sent, self.dropped, self.skipped)

    def finish(self):
        # the final state, unless a log (not a terminal) already has that very line
        if self.progress and (self.sent or self.dropped) and (
                self._tty or self._drawn != (self.sent, self.dropped, self.skipped)):
            self._draw(time.perf_counter())
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()

    @property
    def elapsed(self):
        return time.perf_counter() - self.start

    def summary(self):
        dt = self.elapsed
        tps = self.sent / dt if dt > 0 else 0.0
        gbs = self.bytes / dt / 1e9 if dt > 0 else 0.0
        text = (f"Sent {self.sent} trains ({self.bytes / 1e9:.3f} GB) in {dt:.2f} s: "
                f"{tps:.1f} trains/s, {gbs:.2f} GB/s")
        if self.dropped:
            text += f"; dropped {self.dropped} trains nobody subscribed to"
        if self.skipped:
            text += f"; skipped {self.skipped} unreadable trains"
        return text
