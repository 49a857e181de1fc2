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
from .errors import RunFileError
from .progress import Problems
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
    problems : Problems, optional
        Where trains and keys left out are reported (:attr:`problems`; a new
        :class:`~kbstream.replay.progress.Problems` by default).
    """

    def __init__(self, paths, skip_bad_files=False, override=(), problems=None):
        self.problems = problems if problems is not None else Problems()
        self.files = []
        self.bad_files = []
        override = sorted(os.fspath(p) for p in override)
        n_base = None
        for p in sorted(os.fspath(p) for p in paths) + [None] + override:
            if p is None:
                n_base = len(self.files)
                continue
            try:
                self.files.append(RunFile(p, self.problems))
            except RunFileError as e:
                if not skip_bad_files:
                    self.close()
                    raise
                self.problems.bad_file(p, f"skipping unreadable file: {e}")
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
        """``(RunFile, position)`` holding ``source`` for train ``tid``, or (None, None).

        A train id listed more than once (in one ``INDEX/trainId`` or in several files of
        the source) is read from its first place, as extra_data does; the others are
        reported once per source.
        """
        table = self._lookup.get(source)
        if table is None:
            table = {}
            repeats = []
            for rf in self._source_files.get(source, ()):
                for i, t in enumerate(rf.train_ids.tolist()):
                    where = table.setdefault(t, (rf, i))
                    if where != (rf, i):
                        repeats.append((t, where, (rf, i)))
            if repeats:
                t, (rf0, i0), (rf1, i1) = repeats[0]
                self.problems.index_problem(
                    source, "repeated train id",
                    f"{source}: {len(repeats)} train id(s) appear more than once in "
                    f"INDEX/trainId (e.g. train {t}: {rf0.path} row {i0} and {rf1.path} row "
                    f"{i1}); each is sent once, with the data of its first place; the rows of "
                    f"the other places are not sent", len(repeats))
            self._lookup[source] = table
        return table.get(int(tid), (None, None))

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

    #: Kept for old callers: files are never mapped any more (``docs/run-files.md``,
    #: section 8); every read copies into the slot's buffers with ``pread``.
    use_mmap = False

    def read_train(self, tid, selection, slot=None, send_tid=None, timestamps=True):
        """Read train ``tid`` for ``selection`` ({source: [keys]}).

        Large arrays go into ``slot``'s buffers (fresh arrays without a slot);
        small data come from each dataset's in-memory copy.  Every selected
        source appears, with its ``'metadata'`` entry only when it has no data in
        this train (as extra_data's ``trains()``).

        Keys that cannot go on the wire are left out of the train and reported to
        :attr:`problems` (once per key and cause, counted per train): arrays of
        variable-length strings (as extra_data's commands drop them, with the
        ``.timestamp`` of a control ``.value``) and compound or opaque dtypes.

        Returns
        -------
        TrainData

        Raises
        ------
        RunFileError
            A key of this train cannot be read (:class:`TruncatedFileError` for data
            past the end of its file); ``source``, ``key`` and ``train_id`` say which.
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
                meta = source_metadata(source, send_tid, sec, rest * 1_000_000_000)
            else:
                meta = source_metadata(source, send_tid)
            res.metadata[source] = meta
            d = res.data[source] = {"metadata": meta}
            if rf is None:
                continue
            control = self.is_control(source)
            dropped = None
            for key in keys:
                try:
                    got = self._read_key(rf, pos, source, key, control, slot, tid)
                except RunFileError as e:
                    if e.source is None:
                        e.source, e.key, e.train_id = source, key, int(tid)
                    raise
                except (OSError, ValueError, RuntimeError, TypeError) as e:
                    # h5py / HDF5: a corrupt chunk, a failing filter, a damaged B-tree
                    raise RunFileError(
                        f"{rf.path}: cannot read {source} {key}: {type(e).__name__}: {e}",
                        rf.path, source=source, key=key, train_id=int(tid)) from e
                if got is None:
                    continue
                value, dsr = got
                if isinstance(value, np.ndarray):
                    if value.dtype.hasobject:
                        # arrays of strings: not serializable (extra_data drops them too)
                        if dropped is None:
                            dropped = []
                        dropped.append(key)
                        self._leave_out(source, key, "variable-length strings", dsr, rf, tid)
                        continue
                    nbytes += value.nbytes
                # numpy scalars stay numpy scalars (np.bool_ too): kbstream's codec sends
                # them as extra_data's serializer does (2.2: the Python value, 1.0:
                # msgpack_numpy's form)
                d[key] = value
            for key in dropped or ():
                if key.endswith(".value"):
                    d.pop(key[:-6] + ".timestamp", None)
        res.nbytes = nbytes
        return res

    def _read_key(self, rf, pos, source, key, control, slot, tid):
        """``(value, dataset)`` of ``key`` in this train, or None when there is none (no
        rows, the key only in another sequence file, or a dtype that cannot be sent)."""
        group = "" if control else self.key_group(key)
        if not control and group not in rf.instrument_sources.get(source, ()):
            return None
        first, count = rf.index(source, group)
        first, count = int(first[pos]), int(count[pos])
        if count == 0:
            return None
        try:
            dsr = rf.dataset(source, key)
        except KeyError:
            return None  # key only in another sequence file
        if dsr.dtype.kind == "V":
            self._leave_out(source, key, "compound dtype" if dsr.dtype.names else
                            "opaque dtype", dsr, rf, tid)
            return None
        if control:
            count = 1  # one value per train, the first row (as extra_data)
        if dsr.mode == "memory":
            cache = dsr.get(first, count)
            value = cache[first] if (control or count == 1) else cache[first:first + count]
            return value, dsr
        shape = (count,) + dsr.entry_shape
        if slot is not None:
            buf = slot.buffer((source, key), shape, dsr.dtype)
        else:
            buf = np.empty(shape, dsr.dtype)
        dsr.read(first, count, buf)
        return (buf[0] if (control or count == 1) else buf), dsr

    def _leave_out(self, source, key, cause, dsr, rf, tid):
        what = {"compound dtype": "a compound dtype cannot be put on the wire",
                "opaque dtype": "an opaque dtype cannot be put on the wire",
                "variable-length strings": "arrays of variable-length strings cannot be put "
                                           "on the wire (extra_data's commands drop them too)"}
        self.problems.left_out(
            f"{source} {key}", cause,
            f"{source} {key}: {cause} {dsr.dtype} ({rf.path}, first in train {int(tid)}): "
            f"{what[cause]}; this key is left out of every train that has it, the rest is "
            f"sent")
