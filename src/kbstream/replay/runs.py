"""Finding runs: proposal + run number, run directory, or single file.

The lookup follows extra_data's ``open_run``: the data root is
``$EXTRA_DATA_DATA_ROOT`` (default ``/gpfs/exfel/exp``), the proposal
directory the first match of ``<root>/*/*/p<6 digits>``, the run directory
``<proposal>/<raw|proc>/r<4 digits>``.  ``data='all'`` reads raw and proc,
proc sources replacing raw sources of the same name; a missing proc
directory is not an error.
"""

import glob
import logging
import os
from pathlib import Path

from .errors import RunNotFoundError

__all__ = ["data_root", "find_proposal", "find_run", "run_files", "files_for_run", "DEFAULT_DATA_ROOT"]

log = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = "/gpfs/exfel/exp"


def data_root():
    """The data root: ``$EXTRA_DATA_DATA_ROOT`` or ``/gpfs/exfel/exp``."""
    return Path(os.environ.get("EXTRA_DATA_DATA_ROOT", DEFAULT_DATA_ROOT))


def _proposal_name(proposal):
    text = str(proposal).strip()
    if text.startswith("p"):
        text = text[1:]
    if not text.isdigit():
        raise RunNotFoundError(f"Invalid proposal {proposal!r}: expected e.g. 2012 or p002012")
    return f"p{int(text):06d}"


def _run_name(run):
    text = str(run).strip()
    if text.startswith("r"):
        text = text[1:]
    if not text.isdigit():
        raise RunNotFoundError(f"Invalid run {run!r}: expected e.g. 243 or r0243")
    return f"r{int(text):04d}"


def find_proposal(proposal, root=None):
    """The proposal directory.

    A path-like or a string containing ``/`` is taken as the directory
    itself; otherwise ``<root>/*/*/p<6 digits>`` is searched.

    Raises
    ------
    RunNotFoundError
        No such directory; the message says where it looked.
    """
    if isinstance(proposal, os.PathLike) or (isinstance(proposal, str) and "/" in proposal):
        p = Path(proposal)
        if not p.is_dir():
            raise RunNotFoundError(f"Proposal directory {p} does not exist", [str(p)])
        return p
    root = Path(root) if root is not None else data_root()
    name = _proposal_name(proposal)
    pattern = str(root / "*" / "*" / name)
    matches = sorted(glob.glob(pattern))
    if not matches:
        raise RunNotFoundError(
            f"Proposal {name} not found: nothing matches {pattern} "
            f"(data root {root}; set EXTRA_DATA_DATA_ROOT to change it)", [pattern])
    return Path(matches[0])


def find_run(proposal, run, data="all", root=None):
    """Run directories of ``proposal``/``run`` in the order they are read.

    Parameters
    ----------
    data : {'raw', 'proc', 'all', 'default'} or other subdirectory name or list
        ``'all'``: raw then proc (proc optional, its sources override raw);
        ``'default'``: the same.

    Returns
    -------
    list of pathlib.Path
        Later directories override sources of earlier ones.

    Raises
    ------
    RunNotFoundError
        The proposal or the run does not exist; lists the paths tried.
    """
    prop = find_proposal(proposal, root)
    rname = _run_name(run)
    if isinstance(data, (list, tuple)):
        origins, optional = list(data), set()
    elif data in ("all", "default"):
        origins, optional = ["raw", "proc"], {"proc"}
    else:
        origins, optional = [data], set()
    found, tried = [], []
    for origin in origins:
        d = prop / origin / rname
        tried.append(str(d))
        if d.is_dir():
            found.append(d)
        elif origin in optional and found:
            log.info("No data available for this run at origin %s", origin)
        elif origin not in optional:
            raise RunNotFoundError(f"Run {rname} of proposal {prop.name} not found: "
                                   f"{d} does not exist", tried)
    if not found:
        raise RunNotFoundError(f"Run {rname} of proposal {prop.name} not found; looked in: "
                               + ", ".join(tried), tried)
    return found


def run_files(path):
    """The ``.h5`` files of a run directory, or ``[path]`` for one file.

    Raises
    ------
    RunNotFoundError
        ``path`` does not exist or the directory holds no ``.h5`` file.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(x for x in p.glob("*.h5") if x.is_file())
        if not files:
            raise RunNotFoundError(f"No .h5 files in run directory {p}", [str(p / "*.h5")])
        return files
    if p.is_file():
        return [p]
    raise RunNotFoundError(f"{p} does not exist", [str(p)])


def files_for_run(proposal, run, data="all", root=None):
    """``(files, override_files)`` of a run for :class:`RunReader`.

    With raw + proc, the proc files are the override files: their sources
    replace raw sources of the same name.
    """
    dirs = find_run(proposal, run, data, root)
    files = run_files(dirs[0])
    override = [f for d in dirs[1:] for f in run_files(d)]
    return files, override
