"""Progress of one replay: counters, the progress on stderr (a rich bar on a terminal, plain
lines in a log), what was left out, and the final summary."""

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
    """Counters of one replay, and its progress on stderr.

    ``sent``: trains handed to a peer; ``dropped``: PUB trains published while
    nobody subscribed; ``skipped``: trains that could not be read or
    serialized.  ``total`` (None when endless) counts sent and dropped trains.
    ``problems`` (:class:`Problems`) says what was skipped or left out and why; its
    line follows the summary.

    The progress is a :class:`kbstream._display.ProgressLine`: a rich bar on a terminal,
    one plain line per ``interval`` in a log.  The rates of :meth:`summary` are those of
    the interval from the first train sent to the last, the interval a client measures
    from its first train received to its last (``kbstream demo`` does), so that both
    sides report the same thing; the time before the first train (waiting for a client,
    reading ahead) is said apart.
    """

    def __init__(self, total, stream=None, progress=True, interval=0.25, problems=None):
        from .._display import ProgressLine

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
        self.first_tid = None
        self.start = time.perf_counter()
        self.first_sent = None   # perf_counter() when the first train was sent
        self.last_sent = None    # ... and the last one
        self._first_nbytes = 0
        self._drawn = None   # (sent, dropped, skipped) of the last state drawn
        self._window = collections.deque(maxlen=20)
        self._line = ProgressLine("replay", total, self.stream, interval) if progress else None

    def sent_train(self, tid, nbytes):
        now = time.perf_counter()
        if self.first_sent is None:
            self.first_sent, self.first_tid, self._first_nbytes = now, tid, nbytes
        self.last_sent = now
        self.sent += 1
        self.bytes += nbytes
        self.last_tid = tid
        self._window.append((now, nbytes))
        if self._line is not None and self._line.due(now):
            self._draw(now)

    def dropped_train(self, tid):
        now = time.perf_counter()
        self.dropped += 1
        self.last_tid = tid
        if self._line is not None and self._line.due(now):
            self._draw(now)

    def _rates(self, now=None):
        now = now if now is not None else time.perf_counter()
        w = self._window
        if len(w) >= 2 and w[-1][0] > w[0][0]:
            dt = w[-1][0] - w[0][0]
            return (len(w) - 1) / dt, sum(b for _, b in list(w)[1:]) / dt
        dt = now - self.start
        return (self.sent / dt, self.bytes / dt) if dt > 0 else (0.0, 0.0)

    def _text(self, now):
        tps, bps = self._rates(now)
        handled = self.sent + self.dropped
        count = f"{handled}/{self.total}" if self.total else f"{handled}"
        line = (f"{count} trains  {tps:6.1f} trains/s  {bps / 1e9:5.2f} GB/s  "
                f"train {self.last_tid}")
        if self.dropped:
            line += f"  ({self.dropped} dropped)"
        if self.skipped:
            line += f"  ({self.skipped} skipped)"
        return line

    def _draw(self, now):
        self._line.draw(self.sent + self.dropped, self._text(now))
        self._drawn = (self.sent, self.dropped, self.skipped)

    def finish(self):
        """Draw the final state (unless a log already has that very line) and end the bar."""
        if self._line is not None:
            # a log that already has this state's line gets no second one
            if (self.sent or self.dropped) and (
                    self._line.terminal or self._drawn != (self.sent, self.dropped, self.skipped)):
                self._line.close(self.sent + self.dropped, self._text(time.perf_counter()))
            else:
                self._line.close()

    @property
    def elapsed(self):
        return time.perf_counter() - self.start

    def rates(self):
        """``(seconds, trains/s, bytes/s)`` from the first train sent to the last: ``n``
        trains make ``n - 1`` intervals, and the bytes of all but the first train are sent
        in them; ``(0.0, None, None)`` before two trains were sent."""
        if self.sent < 2 or self.last_sent <= self.first_sent:
            return 0.0, None, None
        dt = self.last_sent - self.first_sent
        return dt, (self.sent - 1) / dt, (self.bytes - self._first_nbytes) / dt

    def summary(self):
        text = f"Sent {self.sent} trains ({self.bytes / 1e9:.3f} GB)"
        if self.sent:
            text += f", train ids {self.first_tid}..{self.last_tid}"
        dt, tps, bps = self.rates()
        if tps is not None:
            text += (f"; from the first train sent to the last: {dt:.2f} s, "
                     f"{tps:.1f} trains/s, {bps / 1e9:.2f} GB/s")
        if self.first_sent is not None:
            text += f" ({self.first_sent - self.start:.2f} s before the first train)"
        if self.dropped:
            text += f"; dropped {self.dropped} trains nobody subscribed to"
        more = self.problems.summary()
        if self.skipped and not more:
            more = f"Skipped {self.skipped} trains"
        if more:
            text += "\n" + more
        return text
