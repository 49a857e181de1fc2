"""Progress of one replay: counters, the progress bar on stderr, what was left out, and the
final summary."""

import collections
import logging
import sys
import threading
import time

__all__ = ["ReplayStats", "Problems"]

log = logging.getLogger("kbstream.replay")


class Problems:
    """What a replay left out, and why: said once, counted always.

    Three kinds of entries, each under a *subject* (a source, ``"source key"``, or a file)
    and a *cause* (a short phrase such as ``"truncated file"``):

    ``train``
        a whole train was not sent (:meth:`skipped_train`).  Every skipped train is
        logged, naming its file, source and train, up to :attr:`train_messages` per
        subject and cause; further ones are only counted.
    ``key``
        a key (or a whole source) was left out of a train that was sent
        (:meth:`left_out`); logged once per subject and cause, counted per train.
    ``index``
        something in a file's index that changes what is sent (overlapping rows,
        duplicate train ids; :meth:`index_problem`); logged once per subject and cause
        with the number of trains it concerns.
    ``file``
        a file of the run that cannot be opened and is left out (:meth:`bad_file`).

    :meth:`summary` makes the one line the replay ends with.  Thread-safe: the reader
    thread and the sending thread both report.
    """

    #: per subject and cause, how many skipped trains are logged one by one
    train_messages = 10

    def __init__(self, logger=None):
        self.log = logger if logger is not None else log
        self._lock = threading.Lock()
        self._counts = {}  # (kind, subject, cause) -> count, in the order first seen

    def _count(self, kind, subject, cause, n):
        key = (kind, subject, cause)
        with self._lock:
            before = self._counts.get(key, 0)
            self._counts[key] = before + n
        return before

    def skipped_train(self, subject, cause, message):
        """A train was not sent; ``message`` names the file, source and train."""
        before = self._count("train", subject, cause, 1)
        if before < self.train_messages:
            self.log.warning("%s", message)
        elif before == self.train_messages:
            self.log.warning("%s (further trains skipped for this reason, %s, are only "
                             "counted in the summary)", message, subject)

    def left_out(self, subject, cause, message, n=1):
        """``subject`` (``"source key"`` or a source) was left out of ``n`` sent trains."""
        if self._count("key", subject, cause, n) == 0:
            self.log.warning("%s", message)

    def index_problem(self, subject, cause, message, n):
        """An index anomaly of ``subject`` concerning ``n`` trains."""
        if self._count("index", subject, cause, n) == 0:
            self.log.warning("%s", message)

    def bad_file(self, path, message):
        """A file of the run cannot be opened; the run is read without it."""
        if self._count("file", path, "unreadable file", 1) == 0:
            self.log.warning("%s", message)

    def counts(self, kind=None):
        """``{(kind, subject, cause): count}`` (only ``kind`` when given)."""
        with self._lock:
            return {k: v for k, v in self._counts.items() if kind is None or k[0] == kind}

    def summary(self):
        """One line: trains skipped by cause, what was left out of how many trains, and the
        index problems met; empty when there were none."""
        counts = self.counts()
        parts = []
        by_cause = collections.Counter()
        for (kind, _, cause), n in counts.items():
            if kind == "train":
                by_cause[cause] += n
        if by_cause:
            total = sum(by_cause.values())
            parts.append(f"skipped {total} train{'s' * (total != 1)} ("
                         + ", ".join(f"{c}: {n}" for c, n in by_cause.items()) + ")")
        left = [f"{subject} from {n} train{'s' * (n != 1)} ({cause})"
                for (kind, subject, cause), n in counts.items() if kind == "key"]
        if left:
            parts.append("left out " + ", ".join(left))
        index = [f"{subject}: {cause} in {n} train{'s' * (n != 1)}"
                 for (kind, subject, cause), n in counts.items() if kind == "index"]
        if index:
            parts.append("index problems: " + ", ".join(index))
        files = [subject for (kind, subject, _), n in counts.items() if kind == "file"]
        if files:
            parts.append("unreadable files left out: " + ", ".join(files))
        if not parts:
            return ""
        text = "; ".join(parts)
        return text[0].upper() + text[1:]


class ReplayStats:
    """Counters of one replay, and the progress bar on stderr.

    ``sent``: trains handed to a peer; ``dropped``: PUB trains published while
    nobody subscribed; ``skipped``: trains that could not be read or
    serialized.  ``total`` (None when endless) counts sent and dropped trains.
    ``problems`` (:class:`Problems`) says what was skipped or left out and why; its
    line follows the summary.
    """

    def __init__(self, total, stream=None, progress=True, interval=0.25, problems=None):
        self.problems = problems if problems is not None else Problems()
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
        more = self.problems.summary()
        if self.skipped and not more:
            more = f"Skipped {self.skipped} trains"
        if more:
            text += "\n" + more
        return text
