"""Reading rows of one HDF5 dataset by the fastest strategy its layout allows.

Reading strategy per dataset (decided once, when first used):

``memory``
    Small datasets (control data, per-frame scalars: up to
    :data:`SMALL_DATASET_BYTES`) are read whole once and indexed in memory.
``rows``
    Unfiltered contiguous datasets, and unfiltered chunked datasets whose
    chunk holds whole rows (e.g. one chunk per train): the rows of a train are
    contiguous bytes in the file, read with ``os.preadv`` straight into the
    output buffer (a slot's reused buffer).  This is what ``H5Dread_chunk``
    (``read_direct_chunk``) would return, minus the HDF5 call: no filter
    pipeline, no extra copy, and the GIL is released during the read so the
    sender thread keeps running.
``tiles``
    Unfiltered chunked datasets with smaller chunks (h5py's automatic
    chunking): the rows wanted from each chunk are read with ``os.preadv``
    into a small staging buffer and put in place by numpy (GIL released
    during the copy), without HDF5's chunk cache and selection machinery.
``h5py``
    Anything else (compressed, virtual, external, non-numeric, userblock):
    ``Dataset.read_direct`` into the output buffer.

Offsets come from HDF5 itself (``get_offset``, ``chunk_iter``) and every read
is checked for its length, so a truncated file raises
:class:`~kbstream.replay.errors.TruncatedFileError` instead of returning
garbage or crashing.  Nothing is read through a file mapping: touching a mapping
of a file that was truncated after it was mapped raises SIGBUS, which ends the
process, and the reads here may meet files truncated at any moment.  The file's
descriptor comes from the :class:`~kbstream.replay.runfile.RunFile` the dataset
belongs to.
"""

import os
import threading

import numpy as np

from ._h5 import h5py as _h5py
from .errors import TruncatedFileError

__all__ = ["SMALL_DATASET_BYTES"]

#: Datasets up to this size are read whole on first use and served from memory.
SMALL_DATASET_BYTES = 8 << 20


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
            self._read_tiles_pread(first, count, out)
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
