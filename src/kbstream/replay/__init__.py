"""Replay saved European XFEL runs over the Karabo bridge protocol.

- :mod:`.runs`: find a run (proposal + run number, directory, single file);
- :mod:`.runfile`: one run file's layout (trains, sources, index, keys, bytes);
- :mod:`.dataset`: reading a dataset's rows (in memory, ``pread`` of rows or chunk
  tiles straight into reused buffers, or h5py); files are never mapped;
- :mod:`.slots`: the reused output buffers of trains, in a bounded pool;
- :mod:`.reader`: a run's files merged by train id; selecting and reading trains;
- :mod:`.prefetch`: the thread reading trains ahead of the sender;
- :mod:`.select`: ``SRC`` / ``SRC[key]`` include and exclude patterns;
- :mod:`.demo`: write a realistic JUNGFRAU 4M demo run;
- :mod:`.detectors`: stacking a detector's module sources into one source;
- :mod:`.progress`: counters, progress bar and summary of a replay, and
  :class:`~.progress.Problems`, what was skipped or left out and why;
- :mod:`.serve`: :func:`~.serve.serve_data`, streaming a selection on a socket;
- :mod:`.cli`: ``karabo-bridge-serve-run`` and ``karabo-bridge-serve-files``.

h5py is needed (``pip install 'kbstream[replay]'``); it is imported when a
file is opened, not at package import.
"""

from .errors import (BindError, NoMatchError, PatternError, ReplayError, RunFileError,
                     RunNotFoundError, TruncatedFileError)
from .prefetch import Prefetcher
from .reader import RunReader, TrainData
from .runfile import RunFile
from .runs import data_root, files_for_run, find_proposal, find_run, run_files
from .select import parse_pattern, select_sources

__all__ = [
    "ReplayError", "RunNotFoundError", "RunFileError", "TruncatedFileError",
    "PatternError", "NoMatchError", "BindError",
    "RunFile", "RunReader", "Prefetcher", "TrainData",
    "data_root", "find_proposal", "find_run", "run_files", "files_for_run",
    "parse_pattern", "select_sources",
    "make_demo_run", "open_run",
]


def make_demo_run(*args, **kwargs):
    """See :func:`kbstream.replay.demo.make_demo_run`."""
    from .demo import make_demo_run as impl
    return impl(*args, **kwargs)


def open_run(proposal, run, data="all", skip_bad_files=False):
    """A :class:`RunReader` on ``proposal``/``run`` (raw + proc by default)."""
    files, override = files_for_run(proposal, run, data)
    return RunReader(files, override=override, skip_bad_files=skip_bad_files)
