"""The layout of one EuXFEL run file: its trains, sources, index, keys and bytes.

Layout (``docs/run-files.md``, section 3): ``INDEX/trainId`` lists a
file's trains; ``INDEX/<source>[/<group>]/{first,count}`` (or the older
``first/last/status``) give each train's rows of every dataset of that source
group; ``CONTROL`` holds one row per train, ``RUN`` one row per run,
``INSTRUMENT`` one row per reading.  A run is several aggregator files, each
split into sequence files; :class:`~kbstream.replay.reader.RunReader` merges
them by train id.

:class:`RunFile` also owns the file's raw access for the fast readers of
:mod:`kbstream.replay.dataset`: one read-only descriptor for ``pread``.  Files are never
mapped: a mapping of a file that is truncated meanwhile kills the process with SIGBUS
when touched, and a copy being sent may be touched long after it was checked.  A read
past the end of a file is short instead, and raises
:class:`~kbstream.replay.errors.TruncatedFileError` for that train.

Index checks: an index whose rows of different trains overlap is reported once per source
(:meth:`RunFile.index`); each train is still sent with the rows its entry gives, as
extra_data reads it (``docs/run-files.md``, section 8).
"""

import os
import re

import numpy as np

from ._h5 import h5py as _h5py
from .dataset import _Dataset
from .errors import RunFileError
from .progress import Problems

__all__ = ["RunFile"]

_INSTRUMENT_SRC_RE = re.compile(r"^([^:]+:[^/]+)/(.+)$")


def _str(x):
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


class RunFile:
    """One HDF5 file of a run: its trains, sources, index and keys.

    Parameters
    ----------
    path : str or path
        The ``.h5`` file.
    problems : Problems, optional
        Where index anomalies are reported (a new :class:`Problems` by default).

    Raises
    ------
    RunFileError
        The file cannot be opened or lacks ``INDEX/trainId`` / ``METADATA``.
    """

    def __init__(self, path, problems=None):
        h5py = _h5py()
        self.path = os.fspath(path)
        self.problems = problems if problems is not None else Problems()
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise RunFileError(f"cannot open {self.path} as HDF5: {e}", self.path) from e
        try:
            self._load()
        except (KeyError, ValueError, OSError) as e:
            self.h5.close()
            raise RunFileError(f"{self.path} is not a readable EuXFEL run file: {e}",
                               self.path) from e
        self._fd = None
        self._index = {}
        self._keys = {}
        self._key_paths = {}  # (source, key) -> HDF5 path
        self._datasets = {}

    def _load(self):
        f = self.h5
        meta = f["METADATA"]
        if "dataFormatVersion" in meta:
            self.format_version = _str(meta["dataFormatVersion"][0])
        else:
            self.format_version = "0.5"
        srcgroup = meta["dataSources"] if "dataSources" in meta else meta
        ids = [_str(x) for x in srcgroup["dataSourceId"][:]]
        self.control_sources = set()
        self.instrument_sources = {}  # source -> set of index groups
        for sid in ids:
            if not sid:
                continue  # padding
            root, _, dev = sid.partition("/")
            if root == "CONTROL":
                self.control_sources.add(dev)
            elif root == "INSTRUMENT":
                m = _INSTRUMENT_SRC_RE.match(dev)
                if m:
                    src, group = m.group(1), m.group(2)
                else:
                    src, _, group = dev.rpartition("/")
                self.instrument_sources.setdefault(src, set()).add(group)
            # Other roots (Karabo_TimerServer, auxiliary sections) are not sources.
        tids = f["INDEX/trainId"][:].astype(np.uint64)
        # Zero train ids are padding: keep the rows of the real trains.
        self._rows = np.nonzero(tids)[0]
        self.train_ids = tids[self._rows]
        ts = None
        if "INDEX/timestamp" in f:
            raw = f["INDEX/timestamp"]
            if raw.shape[0] >= len(tids):
                ts = raw[:].astype(np.uint64)[self._rows]
        self.timestamps = ts
        self._pos = {}
        for i, t in enumerate(self.train_ids.tolist()):
            self._pos.setdefault(t, i)  # a repeated id: its first row (as extra_data)

    # -- index ------------------------------------------------------------
    @property
    def sources(self):
        return self.control_sources | set(self.instrument_sources)

    def position(self, train_id):
        """Row of ``train_id`` in this file's (padding-free) train list, or None."""
        return self._pos.get(int(train_id))

    def index(self, source, group=""):
        """``(first, count)`` uint64 arrays aligned with :attr:`train_ids`."""
        k = (source, group)
        try:
            return self._index[k]
        except KeyError:
            pass
        path = f"INDEX/{source}/{group}" if group else f"INDEX/{source}"
        try:
            g = self.h5[path]
            first = g["first"][:].astype(np.uint64)
            if "count" in g:
                count = g["count"][:].astype(np.uint64)
            else:
                # Older form: first, last, status.
                last = g["last"][:].astype(np.int64)
                status = g["status"][:].astype(np.int64)
                count = ((last - first.astype(np.int64) + 1) * (status != 0)).clip(0)
                count = count.astype(np.uint64)
        except (KeyError, OSError) as e:
            raise RunFileError(f"{self.path}: bad or missing index {path}: {e}", self.path) from e
        n = len(self._rows)
        if len(first) < (self._rows[-1] + 1 if n else 0) or len(count) != len(first):
            raise RunFileError(f"{self.path}: index {path} is shorter than INDEX/trainId", self.path)
        res = (first[self._rows], count[self._rows])
        self._check_overlaps(source, group, path, *res)
        self._index[k] = res
        return res

    def _check_overlaps(self, source, group, path, first, count):
        """Report trains whose rows overlap another train's (once per source and group)."""
        have = np.nonzero(count)[0]
        if len(have) < 2:
            return
        order = have[np.argsort(first[have], kind="stable")]
        starts = first[order]
        ends = np.maximum.accumulate(starts + count[order])
        clash = np.nonzero(starts[1:] < ends[:-1])[0]
        if not len(clash):
            return
        involved = set(order[clash].tolist()) | set(order[clash + 1].tolist())
        a, b = order[clash[0]], order[clash[0] + 1]
        ta, tb = int(self.train_ids[a]), int(self.train_ids[b])
        self.problems.index_problem(
            f"{source} {group}" if group else source, "overlapping index rows",
            f"{source}: in {self.path}, {path}/first,count give {len(involved)} trains rows "
            f"that another train has too (e.g. train {ta}: rows {int(first[a])}+"
            f"{int(count[a])}, train {tb}: rows {int(first[b])}+{int(count[b])}); each "
            f"train is sent with the rows its own entry gives, so these rows are sent in "
            f"more than one train", len(involved))

    def keys(self, source):
        """Sorted keys of ``source`` (``a.b.value`` style for control data).

        Raises KeyError for a source this file does not have (a lookup with a
        wrong argument), :class:`RunFileError` when the file's metadata is corrupt.
        """
        try:
            return self._keys[source]
        except KeyError:
            pass
        h5py = _h5py()
        keys = []

        def collect(prefix, group):
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    key = prefix + name.replace("/", ".")
                    keys.append(key)
                    # HDF5 names may hold dots themselves ('dataStorage.enable/value'):
                    # keep the real path, the key alone does not give it back
                    self._key_paths.setdefault((source, key), obj.name)
            group.visititems(visit)

        try:
            if source in self.control_sources:
                if f"CONTROL/{source}" in self.h5:
                    collect("", self.h5[f"CONTROL/{source}"])
            elif source in self.instrument_sources:
                for grp in sorted(self.instrument_sources[source]):
                    p = f"INSTRUMENT/{source}/{grp}"
                    if p in self.h5:
                        collect(grp.replace("/", ".") + ".", self.h5[p])
            else:
                raise KeyError(source)
        except (RuntimeError, OSError) as e:  # corrupt or truncated metadata
            raise RunFileError(f"{self.path}: cannot list the keys of {source}: {e}",
                               self.path) from e
        self._keys[source] = res = sorted(keys)
        return res

    def dataset(self, source, key, section=None):
        """The :class:`_Dataset` reader of ``source``/``key``.

        Raises KeyError when this file has no such key (it may be in another
        sequence file of the run), :class:`RunFileError` when its metadata is damaged.
        """
        k = (section, source, key)
        try:
            return self._datasets[k]
        except KeyError:
            pass
        if section is None:
            section = "CONTROL" if source in self.control_sources else "INSTRUMENT"
            if source in self.sources and source not in self._keys:
                self.keys(source)
            path = self._key_paths.get((source, key))
        else:
            path = None
        if path is None:
            path = f"{section}/{source}/{key.replace('.', '/')}"
        try:
            ds = self.h5[path]
        except KeyError as e:
            text = str(e)
            if "doesn't exist" in text or "not found" in text:
                raise KeyError(f"{source}: no key {key!r} in {self.path}") from None
            # h5py reports damaged object headers as a KeyError too
            raise RunFileError(f"{self.path}: cannot open {path}: {text}", self.path) from e
        self._datasets[k] = res = _Dataset(self, ds)
        return res

    # -- raw access -------------------------------------------------------
    def fd(self):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self):
        self._datasets.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.h5.close()
