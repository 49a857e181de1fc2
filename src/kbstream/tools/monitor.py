"""``kbstream monitor ENDPOINT``: a live view of a Karabo Bridge stream.

Shows trains/s and GB/s (over the last few seconds), the last train id, train ids missed
between received trains (gaps), trains that went backwards, and per source how many trains
carried it and how many lacked it (a source counts as expected once it has been seen).
On a terminal the table refreshes in place (rich); in a log it prints one line per
interval.  Ctrl-C (or ``--ntrains N``, as in ``karabo-bridge-monitor``) ends it with a
summary.  ``-z`` names the *server's* socket type, as in the peer's command.
"""

import argparse
import collections
import sys
import time

from ..errors import ChannelTimeout, ProtocolError
from ._client import connect, train_id, train_nbytes

__all__ = ["main", "StreamStats"]


class StreamStats:
    """Counters of a bridge stream, fed one train at a time."""

    def __init__(self, window=5.0):
        self.trains = 0
        self.bytes = 0
        self.gaps = 0          # train ids skipped between consecutive received trains
        self.backwards = 0     # trains whose id was not above the previous one
        self.errors = 0        # malformed messages
        self.last_tid = None
        self.first_tid = None
        self.sources = collections.Counter()   # trains that carried each source
        self.missing = collections.Counter()   # trains that lacked a source seen before
        self.start = time.monotonic()
        self._window = collections.deque()
        self._span = window

    def add(self, data, meta, now=None):
        now = time.monotonic() if now is None else now
        nbytes = train_nbytes(data)
        self.trains += 1
        self.bytes += nbytes
        tid = train_id(meta)
        if tid is not None:
            if self.first_tid is None:
                self.first_tid = tid
            if self.last_tid is not None:
                if tid > self.last_tid:
                    self.gaps += tid - self.last_tid - 1
                else:
                    self.backwards += 1
            self.last_tid = tid
        for src in data:
            self.sources[src] += 1
        for src in self.sources:
            if src not in data:
                self.missing[src] += 1
        self._window.append((now, nbytes))
        while self._window and now - self._window[0][0] > self._span:
            self._window.popleft()

    def rates(self, now=None):
        """(trains/s, GB/s) over the window."""
        now = time.monotonic() if now is None else now
        w = self._window
        if len(w) < 2 or w[-1][0] <= w[0][0]:
            dt = now - self.start
            return (self.trains / dt, self.bytes / dt / 1e9) if dt > 0 else (0.0, 0.0)
        dt = w[-1][0] - w[0][0]
        return (len(w) - 1) / dt, sum(b for _, b in list(w)[1:]) / dt / 1e9

    def line(self):
        tps, gbs = self.rates()
        return (f"{self.trains} trains  {tps:6.1f} trains/s  {gbs:6.3f} GB/s  "
                f"train {self.last_tid}  gaps {self.gaps}  backwards {self.backwards}  "
                f"sources {len(self.sources)}  missing {sum(self.missing.values())}")

    def table(self):
        from rich.table import Table

        tps, gbs = self.rates()
        t = Table(title=f"{self.trains} trains, {tps:.1f} trains/s, {gbs:.3f} GB/s, "
                        f"train {self.last_tid}, {self.gaps} ids missed, "
                        f"{self.backwards} backwards", title_justify="left")
        t.add_column("source")
        t.add_column("trains", justify="right")
        t.add_column("missing", justify="right")
        for src in sorted(self.sources):
            t.add_row(src, str(self.sources[src]), str(self.missing[src]))
        return t

    def summary(self):
        dt = time.monotonic() - self.start
        lines = [f"Received {self.trains} trains ({self.bytes / 1e9:.3f} GB) in {dt:.1f} s"
                 + (f": {self.trains / dt:.1f} trains/s, {self.bytes / dt / 1e9:.3f} GB/s" if dt > 0 else ""),
                 f"train ids {self.first_tid}..{self.last_tid}, {self.gaps} missed, "
                 f"{self.backwards} backwards, {self.errors} malformed messages"]
        for src in sorted(self.sources):
            lines.append(f"  {src}: {self.sources[src]} trains, missing from {self.missing[src]}")
        return "\n".join(lines)


def main(argv=None, out=None):
    """Watch the stream at ENDPOINT; returns the exit status."""
    out = sys.stdout if out is None else out
    ap = argparse.ArgumentParser(prog="kbstream monitor",
                                 description="Monitor a Karabo bridge stream.")
    ap.add_argument("endpoint", help="ZeroMQ endpoint of the server, e.g. tcp://localhost:4545")
    ap.add_argument("-z", "--server-socket", choices=["REP", "PUB", "PUSH"], default="REP",
                    help="socket type of the server (default REP)")
    ap.add_argument("--ntrains", type=int, default=None, metavar="N", help="stop after N trains")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="seconds between refreshes (default 1)")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="accepted for compatibility with karabo-bridge-monitor")
    args = ap.parse_args(argv)
    stats = StreamStats()
    tty = hasattr(out, "isatty") and out.isatty()
    live = None
    if tty:
        from rich.console import Console
        from rich.live import Live

        live = Live(stats.table(), console=Console(file=out), refresh_per_second=4)
        live.start()
    last = time.monotonic()
    try:
        with connect(args.endpoint, args.server_socket, timeout=args.interval) as client:
            while args.ntrains is None or stats.trains < args.ntrains:
                try:
                    data, meta = client.next()
                    stats.add(data, meta)
                except ChannelTimeout:
                    pass
                except ProtocolError as e:
                    stats.errors += 1
                    print(f"malformed message: {e}", file=sys.stderr)
                now = time.monotonic()
                if now - last >= args.interval:
                    last = now
                    if live is not None:
                        live.update(stats.table())
                    else:
                        print(stats.line(), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.update(stats.table())
            live.stop()
    print(stats.summary(), file=out)
    return 0
