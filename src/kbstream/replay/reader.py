"""Read European XFEL run files train by train, into reused buffers.

Layout (``shared/specs/euxfel-run-files.md``): ``INDEX/trainId`` lists a
file's trains; ``INDEX/<source>[/<group>]/{first,count}`` (or the older
``first/last/status``) give each train's rows of every dataset of that source
group; ``CONTROL`` holds one row per train, ``RUN`` one row per run,
``INSTRUMENT`` one row per reading.  A run is several aggregator files, each
split into sequence files; trains are merged by id.

Reading strategy per dataset (decided once, when first used):

``memory``
    Small datasets (control data, per-frame scalars: up to
    :data:`SMALL_DATASET_BYTES`) are read whole once and indexed in memory.
``rows``
    Unfiltered contiguous datasets, and unfiltered chunked datasets whose
    chunk holds whole rows (e.g. one chunk per train): the rows of a train are
    contiguous bytes in the file.  By default (:attr:`RunReader.use_mmap`)
    they are mapped read-only (``mmap`` with ``MAP_POPULATE``, in the reader
    thread) and the mapping itself goes to ZeroMQ: no copy in user space at
    all, and the mapping is dropped once libzmq has released the frame.
    Otherwise they are read with ``os.preadv`` straight into the output
    buffer.  This is what ``H5Dread_chunk`` (``read_direct_chunk``)
    would return, minus the HDF5 call: no filter pipeline, no extra copy, and
    the GIL is released during the read so the sender thread keeps running.
``tiles``
    Unfiltered chunked datasets with smaller chunks (h5py's automatic
    chunking): each chunk's bytes are mapped (``mmap``) and the train's part of
    each chunk is copied into the output buffer by numpy (GIL released during
    the copy), without HDF5's chunk cache and selection machinery.
``h5py``
    Anything else (compressed, virtual, external, non-numeric, userblock):
    ``Dataset.read_direct`` into the output buffer.

Offsets come from HDF5 itself (``get_offset``, ``chunk_iter``) and every read
is checked against the file size, so a truncated file raises
:class:`~kbstream.replay.errors.TruncatedFileError` instead of returning
garbage or crashing.

Output buffers belong to *slots* (:class:`SlotPool`): a slot holds the arrays
of one train and is reused once the sender has released it, so memory stays
bounded by the number of slots (prefetch depth + 1).
"""

import logging
import mmap
import os
import queue
import re
import threading
from dataclasses import dataclass, field

import numpy as np

from .errors import RunFileError, TruncatedFileError

__all__ = [
    "RunFile",
    "RunReader",
    "Slot",
    "SlotPool",
    "TrainData",
    "Prefetcher",
    "SMALL_DATASET_BYTES",
]

log = logging.getLogger(__name__)

#: Datasets up to this size are read whole on first use and served from memory.
SMALL_DATASET_BYTES = 8 << 20

_INSTRUMENT_SRC_RE = re.compile(r"^([^:]+:[^/]+)/(.+)$")


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("kbstream.replay needs h5py: pip install 'kbstream[replay]'") from e
    return h5py


def _str(x):
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


class RunFile:
    """One HDF5 file of a run: its trains, sources, index and keys.

    Parameters
    ----------
    path : str or path
        The ``.h5`` file.

    Raises
    ------
    RunFileError
        The file cannot be opened or lacks ``INDEX/trainId`` / ``METADATA``.
    """

    def __init__(self, path):
        h5py = _h5py()
        self.path = os.fspath(path)
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
        self._pos = {int(t): i for i, t in enumerate(self.train_ids)}

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
        self._index[k] = res
        return res

    def keys(self, source):
        """Sorted keys of ``source`` (``a.b.value`` style for control data)."""
        try:
            return self._keys[source]
        except KeyError:
            pass
        h5py = _h5py()
        keys = []

        def collect(prefix, group):
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    keys.append(prefix + name.replace("/", "."))
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
        """The :class:`_Dataset` reader of ``source``/``key``."""
        k = (section, source, key)
        try:
            return self._datasets[k]
        except KeyError:
            pass
        if section is None:
            section = "CONTROL" if source in self.control_sources else "INSTRUMENT"
        path = f"{section}/{source}/{key.replace('.', '/')}"
        try:
            ds = self.h5[path]
        except KeyError:
            raise KeyError(f"{source}: no key {key!r} in {self.path}") from None
        self._datasets[k] = res = _Dataset(self, ds)
        return res

    # -- raw access -------------------------------------------------------
    def fd(self):
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def map_region(self, addr, nbytes, populate=False):
        """A read-only uint8 array over file bytes ``addr:addr+nbytes`` (mmap).

        The mapping is undone when the array and every view of it are gone.
        ``populate`` faults the pages in now (``MAP_POPULATE``), in the
        calling thread with the GIL released, instead of in whoever touches
        them first (the ZeroMQ I/O thread).

        Raises
        ------
        TruncatedFileError
            The region lies beyond the current end of the file (checked with
            ``fstat`` at each call: touching a mapping past the end of a file
            would kill the process with SIGBUS).
        """
        fd = self.fd()
        size = os.fstat(fd).st_size
        if addr + nbytes > size:
            raise TruncatedFileError(
                f"{self.path}: data at byte {addr}+{nbytes} lies beyond the end of the file "
                f"({size} bytes); the file is truncated", self.path)
        start = addr - addr % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED
        if populate and hasattr(mmap, "MAP_POPULATE"):
            flags |= mmap.MAP_POPULATE
        m = mmap.mmap(fd, addr - start + nbytes, flags=flags, prot=mmap.PROT_READ,
                      offset=start)
        return np.frombuffer(m, np.uint8, nbytes, addr - start)

    def close(self):
        self._datasets.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.h5.close()


class _Dataset:
    """Reads rows of one HDF5 dataset by the fastest strategy its layout allows."""

    def __init__(self, rf, ds):
        h5py = _h5py()
        self.rf = rf
        self.ds = ds
        self.name = ds.name
        self.shape = ds.shape
        self.dtype = ds.dtype
        self.entry_shape = tuple(ds.shape[1:])
        self.cache = None
        self.mode = "h5py"
        if ds.shape == ():
            self.mode = "memory"
            return
        nbytes = ds.size * ds.dtype.itemsize
        if ds.dtype.hasobject or nbytes <= SMALL_DATASET_BYTES:
            self.mode = "memory"
            return
        self.row_bytes = int(np.prod(self.entry_shape, dtype=np.int64)) * ds.dtype.itemsize
        if ds.dtype.kind not in "iufc" or rf.h5.userblock_size:
            return
        plist = ds.id.get_create_plist()
        if plist.get_nfilters() or plist.get_external_count():
            return
        layout = plist.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            off = ds.id.get_offset()
            if off is not None:
                self.offset = off
                self.mode = "rows"
                self.chunks = None
        elif layout == h5py.h5d.CHUNKED and ds.chunks is not None:
            self.chunks = ds.chunks
            self.mode = "rows" if tuple(ds.chunks[1:]) == self.entry_shape else "tiles"
            self._chunk_addr = None
            self._block_addr_cache = {}
            self._staging_tls = threading.local()

    def _chunk_map(self):
        if self._chunk_addr is None:
            addr = {}

            def cb(info):
                addr[info.chunk_offset] = (info.byte_offset, info.size)

            self.ds.id.chunk_iter(cb)
            self._chunk_addr = addr
        return self._chunk_addr

    def fill(self, out):
        fv = self.ds.fillvalue
        out[...] = fv if fv is not None else 0

    def read(self, first, count, out):
        """Read rows ``first:first+count`` into ``out`` (shape ``(count,)+entry``)."""
        if first + count > self.shape[0]:
            raise TruncatedFileError(
                f"{self.rf.path}: {self.name} has {self.shape[0]} rows, index refers to "
                f"{first}:{first + count}", self.rf.path)
        if self.mode == "memory":
            if self.cache is None:
                self.cache = self.ds[()]
            out[...] = self.cache[first:first + count]
        elif self.mode == "rows":
            self._read_rows(first, count, out)
        elif self.mode == "tiles":
            if self.tile_reads == "pread":
                self._read_tiles_pread(first, count, out)
            else:
                self._read_tiles(first, count, out)
        else:
            self.ds.read_direct(out, np.s_[first:first + count])
        return out

    def get(self, first, count=1):
        """Rows from the in-memory copy (mode ``memory`` only)."""
        if self.cache is None:
            self.cache = self.ds[()]
        if first + count > self.shape[0]:
            raise TruncatedFileError(
                f"{self.rf.path}: {self.name} has {self.shape[0]} rows, index refers to "
                f"{first}:{first + count}", self.rf.path)
        return self.cache

    def _pread(self, addr, nbytes, dest):
        """File bytes ``addr:addr+nbytes`` into ``dest``.  A read past the end of the file
        is short (never a fault): only then is the file's current size looked up, to say
        whether it was truncated, even after it was opened."""
        fd = self.rf.fd()
        got = os.preadv(fd, [dest], addr)
        if got != nbytes:
            size = os.fstat(fd).st_size
            if addr + nbytes > size:
                raise TruncatedFileError(
                    f"{self.rf.path}: {self.name} data at byte {addr}+{nbytes} lies beyond "
                    f"the end of the file ({size} bytes); the file is truncated", self.rf.path)
            raise TruncatedFileError(
                f"{self.rf.path}: short read of {self.name} ({got} of {nbytes} bytes)",
                self.rf.path)

    def _read_rows(self, first, count, out):
        flat = out.reshape(-1).view(np.uint8)
        rb = self.row_bytes
        if self.chunks is None:
            self._pread(self.offset + first * rb, count * rb, flat[: count * rb])
            return
        c0 = self.chunks[0]
        cmap = self._chunk_map()
        r = first
        end = first + count
        zeros = (0,) * len(self.entry_shape)
        while r < end:
            k = (r // c0) * c0
            stop = min(end, k + c0)
            dest = flat[(r - first) * rb:(stop - first) * rb]
            loc = cmap.get((k,) + zeros)
            if loc is None:  # never written: the fill value
                self.fill(out[r - first:stop - first])
            else:
                self._pread(loc[0] + (r - k) * rb, (stop - r) * rb, dest)
            r = stop

    def _tiles(self):
        try:
            return self._tile_list
        except AttributeError:
            pass
        # One entry per chunk column of a row: (chunk offset suffix, crop
        # of the chunk, destination slice within one row).
        grid = []
        for dim, c in zip(self.entry_shape, self.chunks[1:]):
            grid.append([(s, min(c, dim - s)) for s in range(0, dim, c)])
        tiles = []
        for combo in np.ndindex(*[len(g) for g in grid]):
            starts = tuple(grid[d][i][0] for d, i in enumerate(combo))
            sizes = tuple(grid[d][i][1] for d, i in enumerate(combo))
            crop = tuple(slice(0, n) for n in sizes)
            dest = tuple(slice(s, s + n) for s, n in zip(starts, sizes))
            tiles.append((starts, crop, dest))
        self._tile_list = tiles
        return tiles

    #: How small chunks are read: "pread" (only the rows wanted, from each chunk, into a
    #: small staging buffer) or "mmap" (map each row block, copy out of the mapping).
    tile_reads = "pread"

    def _segments(self):
        """The tiles in runs along the last grid axis: [(first tile index, run length)]."""
        try:
            return self._segment_list
        except AttributeError:
            pass
        glast = -(-self.entry_shape[-1] // self.chunks[-1])
        ntiles = len(self._tiles())
        self._segment_list = [(i, min(glast, ntiles - i)) for i in range(0, ntiles, glast)]
        return self._segment_list

    def _block_addresses(self, k):
        """File offsets of the chunks of row block ``k`` in tile order (-1: not written)."""
        cache = self._block_addr_cache
        addrs = cache.get(k)
        if addrs is None:
            cmap = self._chunk_map()
            addrs = []
            for starts, _, _ in self._tiles():
                loc = cmap.get((k,) + starts)
                addrs.append(-1 if loc is None else loc[0])
            if len(cache) > 4096:
                cache.clear()
            cache[k] = addrs
        return addrs

    #: Upper bound of the staging buffer of the pread path (bytes); rows of a row block
    #: beyond what fits are read in several passes.
    STAGING_BYTES = 8 << 20

    def _staging_rows(self, tile_bytes):
        """How many rows of one chunk the staging buffer holds (1 .. c0)."""
        glast = self._segments()[0][1]
        return max(1, min(self.chunks[0], self.STAGING_BYTES // (glast * tile_bytes)))

    def _staging(self, nrows, tile_bytes):
        """(array (G, nrows) + chunk tile, [memoryview of tile j]), views on one buffer of
        :meth:`_staging_rows` rows per tile, owned by the calling thread (so that reads of
        one dataset from several threads need no lock around the I/O)."""
        tls = self._staging_tls
        cache = getattr(tls, "cache", None)
        if cache is None:
            cache = tls.cache = {}
        st = cache.get(nrows)
        if st is None:
            glast = self._segments()[0][1]
            tile = tuple(self.chunks[1:])
            base = cache.get("buffer")
            if base is None:
                base = cache["buffer"] = np.empty(
                    (glast, self._staging_rows(tile_bytes)) + tile, self.dtype)
            arr = base[:, :nrows]
            views = []
            for j in range(glast):
                tile_rows = arr[j]
                if not tile_rows.flags.c_contiguous:  # pragma: no cover - by construction
                    raise AssertionError("staging rows of a tile must be contiguous")
                views.append(memoryview(tile_rows.reshape(-1).view(np.uint8)))
            st = cache[nrows] = (arr, views)
        return st

    def _read_tiles_pread(self, first, count, out):
        """Small chunks without mapping the file.

        A chunk holds ``c0`` consecutive rows (trains) of one tile; the rows wanted from it
        are contiguous bytes in the chunk, so one ``os.preadv`` per chunk reads exactly
        them (the kernel copies from the page cache: no page faults, no other trains'
        bytes) into a staging buffer that holds one run of chunks along the last grid
        axis, and one strided copy puts the run in place (or one copy per tile where the
        chunks do not tile the entry evenly).
        """
        chunks = self.chunks
        c0 = chunks[0]
        tile_bytes = int(np.prod(chunks[1:], dtype=np.int64)) * self.dtype.itemsize
        tiles = self._tiles()
        nd = len(chunks) - 1
        last_e, last_c = self.entry_shape[-1], chunks[-1]
        even = all(e % c == 0 for e, c in zip(self.entry_shape, chunks[1:]))
        # staging axes (G, rows, C1 .. C_{nd-1}, C_nd) -> (rows, C1 .. C_{nd-1}, G, C_nd)
        order = (1,) + tuple(range(2, nd + 1)) + (0, nd + 1)
        r = first
        end = first + count
        batch = self._staging_rows(tile_bytes)
        while r < end:
            k = (r // c0) * c0
            stop = min(end, k + c0, r + batch)
            nr = stop - r
            skip = (r - k) * tile_bytes
            want = nr * tile_bytes
            dst_rows = out[r - first:stop - first]
            addrs = self._block_addresses(k)
            staging, views = self._staging(nr, tile_bytes)
            for t0, n in self._segments():
                missing = None
                for j in range(n):
                    a = addrs[t0 + j]
                    if a < 0:
                        if missing is None:
                            missing = []
                        missing.append(j)
                    else:
                        self._pread(a + skip, want, views[j])
                for j in missing or ():  # never written: the fill value
                    self.fill(staging[j, :nr])
                src = staging[:n, :nr]
                if even and n * last_c == last_e:
                    dest = tiles[t0][2]
                    dst = dst_rows[(slice(None),) + dest[:-1] + (slice(None),)]
                    dst = dst.reshape(dst.shape[:-1] + (n, last_c))
                    np.copyto(dst, src.transpose(order))
                else:
                    for j in range(n):
                        _, crop, dest = tiles[t0 + j]
                        np.copyto(dst_rows[(slice(None),) + dest],
                                  src[j][(slice(None),) + crop])
            r = stop

    def _read_tiles(self, first, count, out):
        cmap = self._chunk_map()
        chunks = self.chunks
        c0 = chunks[0]
        cbytes = int(np.prod(chunks, dtype=np.int64)) * self.dtype.itemsize
        tiles = self._tiles()
        r = first
        end = first + count
        while r < end:
            k = (r // c0) * c0
            stop = min(end, k + c0)
            dst_rows = out[r - first:stop - first]
            located = []
            for starts, crop, dest in tiles:
                loc = cmap.get((k,) + starts)
                target = dst_rows[(slice(None),) + dest]
                if loc is None:  # never written: the fill value
                    fv = self.ds.fillvalue
                    target[...] = fv if fv is not None else 0
                else:
                    located.append((loc[0], crop, target, dest))
            if located:
                # Map the chunks of this row block only, and unmap them right
                # after copying, so that resident memory does not grow with
                # the file (pages of a whole-file map would all count).
                addrs = [x[0] for x in located]
                lo = min(addrs)
                hi = max(addrs) + cbytes
                region = self.rf.map_region(lo, hi - lo)
                rows = (slice(r - k, stop - k),)
                grid = self._regular_grid(addrs, len(located), lo, cbytes)
                if grid is not None:
                    # Chunks stored back to back in grid order (how HDF5
                    # allocates them when a row block is written at once): one
                    # strided numpy copy per row instead of one per chunk.
                    nd = len(chunks) - 1
                    blocks = region.view(self.dtype).reshape(grid + tuple(chunks))
                    # src axes: grid (nd), then chunk dims (nd); interleave them
                    order = [a for d in range(nd) for a in (d, nd + d)]
                    split = tuple(x for d in range(nd) for x in (grid[d], chunks[1 + d]))
                    for i in range(stop - r):
                        src = blocks[(Ellipsis, r - k + i) + (slice(None),) * nd]
                        np.copyto(dst_rows[i].reshape(split), src.transpose(order))
                    del blocks, src
                else:
                    self._copy_segments(located, region, lo, cbytes, rows, dst_rows)
                del region
            r = stop

    def _copy_segments(self, located, region, lo, cbytes, rows, dst_rows):
        """Copy tiles, one numpy call per run of chunks along the last grid axis.

        ``located`` follows the C order of the chunk grid.  HDF5 usually
        stores a row block's chunks in that order with an index node here and
        there, so the ``G`` chunks along the last axis are mostly back to
        back: each such run is one strided copy; the others go chunk by chunk.
        """
        chunks = self.chunks
        nd = len(chunks) - 1
        last_e, last_c = self.entry_shape[-1], chunks[-1]
        glast = -(-last_e // last_c)
        whole = (len(located) == len(self._tiles()) and last_e % last_c == 0)
        # src axes (G, rows, C1 .. C_{nd-1}, C_nd) -> (rows, C1 .. C_{nd-1}, G, C_nd)
        order = (1,) + tuple(range(2, nd + 1)) + (0, nd + 1)
        i = 0
        n = len(located)
        while i < n:
            seg = located[i:i + glast] if whole else ()
            if (len(seg) == glast and glast > 1
                    and all(seg[j + 1][0] - seg[j][0] == cbytes for j in range(glast - 1))):
                a0 = seg[0][0] - lo
                src = region[a0:a0 + glast * cbytes].view(self.dtype)
                src = src.reshape((glast,) + tuple(chunks))[(slice(None),) + rows]
                dst = dst_rows[(slice(None),) + seg[0][3][:-1] + (slice(None),)]
                dst = dst.reshape(dst.shape[:-1] + (glast, last_c))
                np.copyto(dst, src.transpose(order))
                i += glast
                continue
            addr, crop, target, _ = located[i]
            chunk = region[addr - lo:addr - lo + cbytes].view(self.dtype).reshape(chunks)
            np.copyto(target, chunk[rows + crop])
            i += 1

    def _regular_grid(self, addrs, n, lo, cbytes):
        """Chunk grid shape if this row block's chunks are back to back in grid order."""
        if any(e % c for e, c in zip(self.entry_shape, self.chunks[1:])):
            return None  # edge chunks: crops needed
        grid = tuple(e // c for e, c in zip(self.entry_shape, self.chunks[1:]))
        if n != int(np.prod(grid)):
            return None
        a = np.fromiter(addrs, np.int64, n)
        if a[0] != lo or np.any(np.diff(a) != cbytes):
            return None
        return grid

    def map_rows(self, first, count):
        """Rows ``first:first+count`` as a read-only array mapped from the file, or None.

        Only for mode ``rows`` when the rows are contiguous in the file (one
        chunk, or contiguous storage): then the array *is* the page cache,
        and ZeroMQ sends it with no copy in user space at all.
        """
        if self.mode != "rows" or count == 0:
            return None
        if first + count > self.shape[0]:
            raise TruncatedFileError(
                f"{self.rf.path}: {self.name} has {self.shape[0]} rows, index refers to "
                f"{first}:{first + count}", self.rf.path)
        rb = self.row_bytes
        if self.chunks is None:
            addr = self.offset + first * rb
        else:
            c0 = self.chunks[0]
            k = (first // c0) * c0
            if (first + count - 1) // c0 != first // c0:
                return None
            loc = self._chunk_map().get((k,) + (0,) * len(self.entry_shape))
            if loc is None:
                return None
            addr = loc[0] + (first - k) * rb
        try:
            region = self.rf.map_region(addr, count * rb, populate=True)
        except TruncatedFileError as e:
            raise TruncatedFileError(f"{self.rf.path}: {self.name}: {e}", self.rf.path) from None
        return region.view(self.dtype).reshape((count,) + self.entry_shape)


class Slot:
    """The output buffers of one train, reused from train to train."""

    __slots__ = ("index", "buffers", "maps")

    def __init__(self, index):
        self.index = index
        self.buffers = {}
        self.maps = []  # file-mapped arrays of the current train, dropped on release

    def buffer(self, name, shape, dtype):
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = np.empty(shape, dtype)
            self.buffers[name] = buf
        return buf

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self.buffers.values())


class SlotPool:
    """A fixed number of :class:`Slot` objects: bounds the trains in memory.

    A slot is taken before a train is read and given back only after the
    transport has released every frame pointing into it.
    """

    def __init__(self, nslots):
        if nslots < 1:
            raise ValueError(f"need at least one slot, not {nslots}")
        self._free = queue.SimpleQueue()
        self.slots = [Slot(i) for i in range(nslots)]
        for s in self.slots:
            self._free.put(s)

    def acquire(self, stop_event=None, poll=0.1):
        """Wait for a free slot; None if ``stop_event`` is set meanwhile."""
        while True:
            try:
                return self._free.get(timeout=poll)
            except queue.Empty:
                if stop_event is not None and stop_event.is_set():
                    return None

    def release(self, slot):
        slot.maps.clear()  # unmaps once nothing else (zmq) holds the arrays
        self._free.put(slot)

    @property
    def nbytes(self):
        return sum(s.nbytes for s in self.slots)


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


def _timestamp_meta(source, tid, ns):
    meta = {"source": source}
    if ns:
        ns = int(ns)
        meta["timestamp"] = ns / 1e9
        meta["timestamp.sec"] = str(ns // 1_000_000_000)
        # 18 digits of attoseconds, from integer nanoseconds: no float rounding.
        meta["timestamp.frac"] = f"{(ns % 1_000_000_000) * 1_000_000_000:018d}"
    meta["timestamp.tid"] = int(tid)
    return meta


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
        """Sorted keys of ``source`` over all its files."""
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
            res.metadata[source] = _timestamp_meta(source, send_tid, ns)
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


class Prefetcher:
    """Read trains ahead in a thread, into a bounded pool of slots.

    Iterating yields :class:`TrainData` in order; the consumer must call
    :meth:`release` with each item once the transport no longer needs its
    buffers.  At most ``depth + 1`` trains exist at a time (read ahead,
    being read, and sent but not yet released).

    Parameters
    ----------
    reader : RunReader
    selection : dict
        {source: [keys]}.
    trains : iterable of (file train id, train id to send)
        May be endless (``--loop``).
    depth : int
        Trains read ahead of the sender.
    transform : callable, optional
        Applied to each :class:`TrainData` in the reader thread (e.g. stacking
        detector modules).
    """

    def __init__(self, reader, selection, trains, depth=4, transform=None, timestamps=True):
        self.reader = reader
        self.selection = selection
        self.trains = trains
        self.pool = SlotPool(depth + 1)
        self.transform = transform
        self.timestamps = timestamps
        self._queue = queue.Queue(maxsize=depth + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kbstream-prefetch", daemon=True)
        self._started = False

    _END = object()

    def _run(self):
        try:
            for tid, send_tid in self.trains:
                slot = self.pool.acquire(self._stop)
                if slot is None:
                    return
                try:
                    item = self.reader.read_train(tid, self.selection, slot, send_tid,
                                                  timestamps=self.timestamps)
                    if self.transform is not None:
                        item = self.transform(item)
                except (OSError, KeyError, ValueError) as e:
                    # One bad train (truncated file, corrupt dataset) is reported
                    # and skipped; the stream goes on.
                    item = TrainData(int(send_tid), int(tid), slot=slot, error=e)
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(TrainData(-1, -1, error=e))
        finally:
            self._put(self._END)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def start(self):
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def get(self, timeout=None):
        """Next :class:`TrainData`, None at the end; raises queue.Empty on timeout."""
        self.start()
        item = self._queue.get(timeout=timeout)
        if item is self._END:
            self._queue.put(self._END)  # stay at the end for further calls
            return None
        if item.train_id == -1 and item.error is not None and item.slot is None:
            raise item.error
        return item

    def __iter__(self):
        while True:
            item = self.get()
            if item is None:
                return
            yield item

    def release(self, item):
        # Drop the arrays first: file mappings are unmapped with their last reference.
        item.data = item.metadata = None
        if item.slot is not None:
            self.pool.release(item.slot)
            item.slot = None

    def close(self):
        self._stop.set()
        if self._started:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
