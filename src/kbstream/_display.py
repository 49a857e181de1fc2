"""Progress shown while a command works: a rich bar on a terminal, plain lines in a log.

:class:`ProgressLine` is what the replay (``serve-run``/``serve-files``), the demo and
``make-demo-run`` draw with.  On a terminal it is a `rich <https://rich.readthedocs.io>`_
progress bar redrawn in place; when the stream is not a terminal (a pipe, a file, a CI
log) every drawn state is one plain line ending in a newline, without control
characters.  The caller decides when to draw (at most once per interval: see
:meth:`ProgressLine.due`), so nothing runs in a thread of its own and a fast loop pays
one clock reading per step.
"""

import sys
import time

__all__ = ["ProgressLine", "is_terminal"]


def is_terminal(stream):
    """True when ``stream`` is an interactive terminal."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed file
        return False


class ProgressLine:
    """One progress display of ``label`` on ``stream`` (stderr by default).

    Parameters
    ----------
    label : str
        Words in front of the bar (a terminal) or of each line (a log).
    total : int or None
        The number of steps, or None when unknown (the bar then pulses).
    stream : file, optional
        Where to draw; stderr by default.
    interval : float
        Seconds between two drawn states (:meth:`due`).
    terminal : bool, optional
        Force the terminal (True) or log (False) form; by default the stream decides.
    """

    def __init__(self, label, total=None, stream=None, interval=0.25, terminal=None):
        self.label = label
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.terminal = is_terminal(self.stream) if terminal is None else terminal
        self._next = float("-inf")   # the first state is always due
        self._progress = None        # rich.progress.Progress, on a terminal
        self._task = None

    def due(self, now=None):
        """True (and the next state is an interval away) when a state should be drawn."""
        now = time.perf_counter() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval
        return True

    def draw(self, completed, text):
        """Show ``completed`` steps and ``text`` (counts, rates; one line, no newline)."""
        if self.terminal:
            if self._progress is None:
                self._start()
            self._progress.update(self._task, completed=completed, text=text)
            self._progress.refresh()
        else:
            self.stream.write(f"{self.label}: {text}\n")
            self.stream.flush()

    def close(self, completed=None, text=None):
        """Draw the final state (when ``text`` is given) and end the bar: a terminal keeps
        its last state on a line of its own."""
        if text is not None:
            self.draw(completed, text)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _start(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        console = Console(file=self.stream, force_terminal=True)
        self._progress = Progress(
            TextColumn(self.label), BarColumn(), TextColumn("{task.fields[text]}"),
            console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total, text="")
