"""The files of one run merged by train id: selecting trains and reading one train.

:class:`RunReader` opens a run's files (:class:`~kbstream.replay.runfile.RunFile`),
finds which file holds each source for each train (sequence files, proc data
overriding raw data), selects the trains to send, and reads one train of a
selection into a slot's buffers (:mod:`kbstream.replay.slots`) as a
:class:`TrainData`, each dataset by its own strategy
(:mod:`kbstream.replay.dataset`).
"""

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..bridge import source_metadata
from ._h5 import h5py as _h5py
from .errors import RunFileError, TruncatedFileError
from .runfile import RunFile
from .slots import Slot

__all__ = ["RunReader", "TrainData"]

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """One train read from the files, ready to send."""

    train_id: int  # the id as sent (shifted on repeats)
    file_train_id: int  # the id in the files
    data: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    nbytes: int = 0
    slot: Slot = None
    error: Exception = None


class RunReader:
    """The files of one run (or any set of EuXFEL files), merged by train id.

    Parameters
    ----------
    paths : iterable of str or path
        The ``.h5`` files.  A source in several files (sequence files) is
        looked up by train id; when several sources share a name, the first
        file (by path) that has a train wins, as extra_data does.
    override : iterable of str or path
        Files whose sources replace same-named sources of ``paths`` (proc
        data over raw data).
    skip_bad_files : bool
        Log and skip files that cannot be opened instead of raising
        :class:`RunFileError`.
    """

    def __init__(self, paths, skip_bad_files=False, override=()):
        self.files = []
        self.bad_files = []
        override = sorted(os.fspath(p) for p in override)
        n_base = None
        for p in sorted(os.fspath(p) for p in paths) + [None] + override:
            if p is None:
                n_base = len(self.files)
                continue
            try:
                self.files.append(RunFile(p))
            except RunFileError as e:
                if not skip_bad_files:
                    self.close()
                    raise
                log.warning("skipping unreadable file: %s", e)
                self.bad_files.append((p, e))
        if not self.files:
            raise RunFileError("no readable run files", None)
        self.control_sources = set()
        self.instrument_sources = set()
        self._source_files = {}
        overriding = set()
        for rf in self.files[n_base:]:
            overriding |= rf.sources
        for i, rf in enumerate(self.files):
            self.control_sources |= rf.control_sources
            self.instrument_sources |= set(rf.instrument_sources)
            for s in rf.sources:
                if i < n_base and s in overriding:
                    continue  # e.g. a raw source that proc data replaces
                self._source_files.setdefault(s, []).append(rf)
        self.train_ids = np.unique(np.concatenate([rf.train_ids for rf in self.files]))
        self._lookup = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for rf in self.files:
            rf.close()
        self.files = []

    @property
    def all_sources(self):
        return self.control_sources | self.instrument_sources

    def keys(self, source):
        """Sorted keys of ``source`` over all its files; KeyError for an unknown source."""
        files = self._source_files.get(source)
        if not files:
            raise KeyError(f"no source {source!r} in this run")
        keys = set()
        for rf in files:
            keys.update(rf.keys(source))
        return sorted(keys)

    def is_control(self, source):
        return source in self.control_sources

    def _where(self, source, tid):
        """``(RunFile, position)`` holding ``source`` for train ``tid``, or (None, None)."""
        table = self._lookup.get(source)
        if table is None:
            table = {}
            for rf in self._source_files.get(source, ()):
                for i, t in enumerate(rf.train_ids):
                    table.setdefault(int(t), (rf, i))
            self._lookup[source] = table
        return table.get(int(tid), (None, None))

    @staticmethod
    def _map(dsr, first, count, source, key, tid):
        try:
            return dsr.map_rows(first, count)
        except TruncatedFileError as e:
            e.source, e.key, e.train_id = source, key, int(tid)
            raise

    @staticmethod
    def key_group(key):
        return key.partition(".")[0]

    def source_train_ids(self, source, groups=None):
        """Train ids where ``source`` has data (count > 0) in any of ``groups``."""
        control = self.is_control(source)
        out = []
        for rf in self._source_files.get(source, ()):
            grps = [""] if control else (groups or rf.instrument_sources[source])
            have = np.zeros(len(rf.train_ids), bool)
            for g in grps:
                if control or g in rf.instrument_sources.get(source, ()):
                    have |= rf.index(source, g)[1] > 0
            out.append(rf.train_ids[have])
        return np.unique(np.concatenate(out)) if out else np.empty(0, np.uint64)

    def select_trains(self, selection, require=None):
        """Sorted train ids to send for ``selection`` ({source: [keys]}).

        ``require=None`` keeps every train of the run; ``'all'`` only trains
        where every selected source (and key group) has data; ``'any'``
        trains where at least one has.
        """
        if require is None:
            return self.train_ids.copy()
        result = self.train_ids if require == "all" else np.empty(0, np.uint64)
        for source, keys in selection.items():
            if self.is_control(source):
                groups = [""]
            else:
                groups = sorted({self.key_group(k) for k in keys})
            for g in groups:
                tids = self.source_train_ids(source, None if self.is_control(source) else [g])
                if require == "all":
                    result = np.intersect1d(result, tids)
                else:
                    result = np.union1d(result, tids)
        return result.astype(np.uint64)

    def run_values(self, source):
        """``{key: value}`` of the ``RUN`` section for ``source`` (empty if none)."""
        h5py = _h5py()
        for rf in self._source_files.get(source, ()):
            p = f"RUN/{source}"
            if p in rf.h5:
                res = {}

                def visit(name, obj, res=res):
                    if isinstance(obj, h5py.Dataset) and obj.shape and obj.shape[0]:
                        res[name.replace("/", ".")] = obj[0]
                rf.h5[p].visititems(visit)
                return res
        return {}

    #: Send unfiltered contiguous rows straight from a file mapping (no copy).
    use_mmap = True

    def read_train(self, tid, selection, slot=None, send_tid=None, timestamps=True):
        """Read train ``tid`` for ``selection`` ({source: [keys]}).

        Large arrays go into ``slot``'s buffers (fresh arrays without a slot);
        small data come from each dataset's in-memory copy.  Every selected
        source appears, with only metadata when it has no data in this train
        (as extra_data's ``trains()``).

        Returns
        -------
        TrainData
        """
        send_tid = tid if send_tid is None else send_tid
        res = TrainData(int(send_tid), int(tid), slot=slot)
        nbytes = 0
        for source, keys in selection.items():
            rf, pos = self._where(source, tid)
            ns = None
            if rf is not None and timestamps and rf.timestamps is not None:
                ns = rf.timestamps[pos]
            if ns:  # integer nanoseconds -> seconds + attoseconds: no float rounding
                sec, rest = divmod(int(ns), 1_000_000_000)
                res.metadata[source] = source_metadata(source, send_tid, sec,
                                                       rest * 1_000_000_000)
            else:
                res.metadata[source] = source_metadata(source, send_tid)
            d = res.data[source] = {}
            if rf is None:
                continue
            control = self.is_control(source)
            dropped = set()
            for key in keys:
                group = "" if control else self.key_group(key)
                if not control and group not in rf.instrument_sources.get(source, ()):
                    continue
                first, count = rf.index(source, group)
                first, count = int(first[pos]), int(count[pos])
                if count == 0:
                    continue
                try:
                    dsr = rf.dataset(source, key)
                except KeyError:
                    continue  # key only in another sequence file
                if control:
                    count = 1  # one value per train, the first row (as extra_data)
                if dsr.mode == "memory":
                    cache = dsr.get(first, count)
                    value = cache[first] if (control or count == 1) else cache[first:first + count]
                elif self.use_mmap and dsr.mode == "rows" and (
                        mapped := self._map(dsr, first, count, source, key, tid)) is not None:
                    if slot is not None:
                        slot.maps.append(mapped)
                    value = mapped[0] if (control or count == 1) else mapped
                else:
                    shape = (count,) + dsr.entry_shape
                    if slot is not None:
                        buf = slot.buffer((source, key), shape, dsr.dtype)
                    else:
                        buf = np.empty(shape, dsr.dtype)
                    try:
                        dsr.read(first, count, buf)
                    except TruncatedFileError as e:
                        e.source, e.key, e.train_id = source, key, int(tid)
                        raise
                    value = buf[0] if (control or count == 1) else buf
                if isinstance(value, np.ndarray):
                    if value.dtype.hasobject:
                        dropped.add(key)  # arrays of strings: not serializable
                        continue
                    nbytes += value.nbytes
                elif isinstance(value, np.bool_):
                    value = bool(value)  # np.bool_ breaks msgpack serialization
                d[key] = value
            for key in dropped:
                if key.endswith(".value"):
                    d.pop(key[:-6] + ".timestamp", None)
        res.nbytes = nbytes
        return res
