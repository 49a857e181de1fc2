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
    chunking): the rows wanted from each chunk of the row block are read with
    ``pread`` into a small staging buffer and their crop put in place, all
    chunks of the block in one call of the compiled core
    (:mod:`kbstream.replay._chunkio`) without the GIL, the chunks shared out
    over :data:`READ_THREADS` threads; no HDF5 chunk cache or selection
    machinery.  Chunks whose wanted bytes lie next to each other in the file
    (HDF5 allocates chunks in the order they are first written, so the chunks
    of a row block usually follow each other) are read together, one
    ``pread`` per span of up to :data:`COALESCE_SPAN_BYTES` with gaps of at
    most :data:`COALESCE_GAP_BYTES`.
``filtered``
    Chunked datasets compressed with deflate (gzip), with or without the
    shuffle filter: the raw chunk bytes are read at their offsets, inflated
    (``zlib``, which releases the GIL) and unshuffled and put in place by the
    compiled core, the chunks of a row block shared out over
    :data:`READ_THREADS` threads instead of HDF5's serial filter pipeline.
    A row block whose chunks hold several rows is decoded once and kept for
    the following rows (at most :data:`DECODED_BLOCK_BYTES` per dataset).
    A chunk that does not decode is a :class:`RunFileError` naming the file,
    dataset and chunk (the train is skipped by the server, never a crash).
``h5py``
    Anything else (other filters, e.g. bitshuffle/LZ4 or Blosc through
    hdf5plugin; virtual, external, non-numeric, userblock):
    ``Dataset.read_direct`` into the output buffer.  A dataset read this way
    because of its filters is reported once per filter combination (a warning:
    HDF5 decodes its chunks one after the other).

Offsets come from HDF5 itself (``get_offset``, ``chunk_iter``) and every read
is checked for its length, so a truncated file raises
:class:`~kbstream.replay.errors.TruncatedFileError` instead of returning
garbage or crashing.  Nothing is read through a file mapping: touching a mapping
of a file that was truncated after it was mapped raises SIGBUS, which ends the
process, and the reads here may meet files truncated at any moment.  The file's
descriptor comes from the :class:`~kbstream.replay.runfile.RunFile` the dataset
belongs to.
"""

import logging
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import _chunkio
from ._h5 import h5py as _h5py
from .errors import RunFileError, TruncatedFileError

__all__ = ["SMALL_DATASET_BYTES", "READ_THREADS", "DECODED_BLOCK_BYTES", "COALESCE_SPAN_BYTES",
           "COALESCE_GAP_BYTES"]

log = logging.getLogger(__name__)

#: Datasets up to this size are read whole on first use and served from memory.
SMALL_DATASET_BYTES = 8 << 20

#: Threads that read (and decode) the chunks of one row block together: the calling
#: thread plus ``READ_THREADS - 1`` of a pool shared by every dataset.  Each holds one
#: staging buffer of one chunk's rows or :data:`COALESCE_SPAN_BYTES` (``tiles``) or one
#: decoded chunk (``filtered``) while it works, so the memory of a read stays bounded by
#: the slots of the prefetch depth plus ``READ_THREADS`` such buffers.
READ_THREADS = max(1, min(4, os.cpu_count() or 1))

#: ``tiles``: the largest span of the file read by one ``pread`` for several chunks
#: (the staging buffer of each reader thread; 0: one ``pread`` per chunk).  A span
#: holds at most twice the bytes wanted from its chunks.  Small enough for the span to
#: stay in the CPU's cache until its chunks are put in place (measured on 16 MiB of
#: 32 KiB chunks: 256 KiB cost less than 64 KiB, 1 MiB or 4 MiB spans).
COALESCE_SPAN_BYTES = 256 << 10

#: ``tiles``: the largest gap between the wanted bytes of two chunks read in one span.
#: Reading a gap costs the kernel's copy of its bytes; a ``pread`` call costs about as
#: much as copying 8-16 KiB, so larger gaps are cheaper read apart.
COALESCE_GAP_BYTES = 8 << 10

#: Largest decoded row block (all chunks of ``c0`` rows) a ``filtered`` dataset keeps
#: for its next rows; larger blocks are decoded again for every read.
DECODED_BLOCK_BYTES = 64 << 20

#: HDF5 filter ids decoded here (H5Z_FILTER_DEFLATE, H5Z_FILTER_SHUFFLE).
_DEFLATE, _SHUFFLE = 1, 2
_FILTER_NAMES = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit",
                 6: "scaleoffset", 32001: "blosc", 32004: "lz4", 32008: "bitshuffle",
                 32015: "zstd", 32026: "blosc2"}

_pool = None
_pool_lock = threading.Lock()
_reported_filters = set()


def _read_pool():
    """The shared pool of ``READ_THREADS - 1`` reader threads (started on first use,
    started anew when :data:`READ_THREADS` has grown)."""
    global _pool
    want = max(1, READ_THREADS - 1)
    pool = _pool
    if pool is None or pool[0] < want:
        with _pool_lock:
            pool = _pool
            if pool is None or pool[0] < want:
                if pool is not None:
                    pool[1].shutdown(wait=False)  # its threads end after their work
                pool = _pool = (want, ThreadPoolExecutor(want,
                                                         thread_name_prefix="kbstream-read"))
    return pool[1]


def _spread(fn, n):
    """Run ``fn(start, stop)`` over ``range(n)`` in up to :data:`READ_THREADS` parts, the
    first in the calling thread; re-raises the first part's error after all have ended
    (no part keeps writing into the output after the call returns)."""
    parts = min(READ_THREADS, n)
    if parts <= 1:
        return [fn(0, n)]
    bounds = [n * i // parts for i in range(parts + 1)]
    pool = _read_pool()
    futures = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    results = []
    error = None
    try:
        results.append(fn(bounds[0], bounds[1]))
    except BaseException as e:  # noqa: BLE001 - raised once every part has ended
        error = e
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as e:  # noqa: BLE001
            if error is None:
                error = e
    if error is not None:
        raise error
    return results


def _filter_names(codes):
    return "+".join(_FILTER_NAMES.get(c, f"filter {c}") for c in codes)


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
        if plist.get_external_count():
            return
        layout = plist.get_layout()
        nfilters = plist.get_nfilters()
        if nfilters:
            codes = [plist.get_filter(i)[0] for i in range(nfilters)]
            if (layout == h5py.h5d.CHUNKED and ds.chunks is not None
                    and set(codes) <= {_DEFLATE, _SHUFFLE}):
                self.mode = "filtered"
                self.chunks = ds.chunks
                self.filters = codes
                self._chunk_addr = None
                self._block_addr_cache = {}
                self._decoded = None
                self._geometry()
            else:
                names = _filter_names(codes)
                if names not in _reported_filters:
                    _reported_filters.add(names)
                    log.warning("%s (%s): filters %s are decoded by HDF5, one chunk after "
                                "the other (kbstream decodes deflate and shuffle itself, in "
                                "parallel); datasets with these filters are read more slowly",
                                self.name, rf.path, names)
            return
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
            if self.mode == "tiles":
                self._geometry()

    def _chunk_map(self):
        """{chunk offset: (file offset, stored size, filter mask)}."""
        if self._chunk_addr is None:
            addr = {}

            def cb(info):
                addr[info.chunk_offset] = (info.byte_offset, info.size, info.filter_mask)

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
            self._read_tiles(first, count, out)
        elif self.mode == "filtered":
            self._read_filtered(first, count, out)
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
        got = os.preadv(self.rf.fd(), [dest], addr)
        if got != nbytes:
            raise self._truncated(addr, nbytes, got)

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

    def _geometry(self):
        """The tiles of one row (chunk grid cells): their starts and crops, and the same as
        arrays for the compiled core (byte offset of each crop in a row, crop sizes)."""
        entry = self.entry_shape or (1,)  # rows of scalars: one-element entries
        tile = tuple(self.chunks[1:]) or (1,)
        grid = [[(s, min(c, dim - s)) for s in range(0, dim, c)] for dim, c in zip(entry, tile)]
        estride = np.cumprod((1,) + entry[:0:-1])[::-1] * self.dtype.itemsize
        tiles = []
        for combo in np.ndindex(*[len(g) for g in grid]):
            starts = tuple(grid[d][i][0] for d, i in enumerate(combo))
            sizes = tuple(grid[d][i][1] for d, i in enumerate(combo))
            tiles.append((starts, sizes))
        self._tile_list = tiles
        self._geo_tile = np.array(tile, np.int64)
        self._geo_entry = np.array(entry, np.int64)
        self._geo_off = np.array([int(np.dot(st, estride)) for st, _ in tiles], np.int64)
        self._geo_crop = np.array([sz for _, sz in tiles], np.int64).reshape(len(tiles),
                                                                               len(tile))
        self._tile_bytes = int(np.prod(tile)) * self.dtype.itemsize
        self._chunk_bytes = self.chunks[0] * self._tile_bytes

    def _block_locations(self, k):
        """``(file offsets, [(offset, size, filter mask) or None], order)`` of the chunks
        of row block ``k`` in tile order (offset -1 / None: never written); ``order``
        puts the tiles in the order of their offsets (None: they are in it already)."""
        cache = self._block_addr_cache
        got = cache.get(k)
        if got is None:
            cmap = self._chunk_map()
            ndim = len(self.chunks) - 1
            locs = [cmap.get((k,) + starts[:ndim]) for starts, _ in self._tile_list]
            addrs = np.array([-1 if loc is None else loc[0] for loc in locs], np.int64)
            order = None
            if len(addrs) > 1 and (addrs[1:] < addrs[:-1]).any():
                order = np.argsort(addrs, kind="stable")
            if len(cache) > 4096:
                cache.clear()
            got = cache[k] = (addrs, locs, order)
        return got

    def _fill_tile(self, rows, i):
        starts, sizes = self._tile_list[i]
        if not self.entry_shape:
            self.fill(rows)
            return
        self.fill(rows[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(starts, sizes))])

    def _truncated(self, addr, nbytes, got):
        """The error for a read of ``nbytes`` at ``addr`` that gave ``got`` (negative: an
        errno from the compiled core): truncated file, short read or read error."""
        fd = self.rf.fd()
        size = os.fstat(fd).st_size
        if got < 0:
            return RunFileError(f"{self.rf.path}: cannot read {self.name} at byte {addr}: "
                                f"{os.strerror(-got)}", self.rf.path)
        if addr + nbytes > size:
            return TruncatedFileError(
                f"{self.rf.path}: {self.name} data at byte {addr}+{nbytes} lies beyond the "
                f"end of the file ({size} bytes); the file is truncated", self.rf.path)
        return TruncatedFileError(
            f"{self.rf.path}: short read of {self.name} ({got} of {nbytes} bytes)",
            self.rf.path)

    def _read_tiles(self, first, count, out):
        """Small chunks, without mapping the file.

        A chunk holds ``c0`` consecutive rows (trains) of one tile; the rows wanted from it
        are contiguous bytes in the chunk, so one ``pread`` per chunk reads exactly them
        (the kernel copies from the page cache: no page faults, no other trains' bytes)
        into a staging buffer, and the crop is copied in place while the staging buffer
        is still in the CPU's cache.  Chunks whose wanted bytes are (nearly) adjacent in
        the file are read by one ``pread`` of their span (see :data:`COALESCE_SPAN_BYTES`).
        All chunks of the row block, in the order of their file offsets, go to
        :func:`kbstream.replay._chunkio.read_tiles` in :data:`READ_THREADS` parts (each a
        stretch of the file), each without the GIL.
        """
        if not out.flags.c_contiguous:  # pragma: no cover - slots are always contiguous
            self.ds.read_direct(out, np.s_[first:first + count])
            return
        c0 = self.chunks[0]
        rb = self.row_bytes
        flat = out.reshape(-1).view(np.uint8)
        fd = self.rf.fd()
        tile, entry, item = self._geo_tile, self._geo_entry, self.dtype.itemsize
        off, crop = self._geo_off, self._geo_crop
        ntiles = len(self._tile_list)
        r = first
        end = first + count
        while r < end:
            k = (r // c0) * c0
            stop = min(end, k + c0)
            nr = stop - r
            skip = r - k
            dest = flat[(r - first) * rb:(stop - first) * rb]
            addrs, _, order = self._block_locations(k)
            if order is None:
                saddrs, soff, scrop = addrs, off, crop
            else:
                saddrs, soff, scrop = addrs[order], off[order], crop[order]

            def part(a, b, saddrs=saddrs, soff=soff, scrop=scrop, skip=skip, nr=nr,
                     dest=dest):
                i, want, got = _chunkio.read_tiles(fd, saddrs[a:b], skip, nr, dest, tile,
                                                   entry, item, soff[a:b], scrop[a:b],
                                                   COALESCE_SPAN_BYTES, COALESCE_GAP_BYTES)
                return None if i < 0 else (a + i, want, got)

            for bad in _spread(part, ntiles):
                if bad is not None:
                    i, want, got = bad
                    raise self._truncated(int(saddrs[i]) + skip * self._tile_bytes, want, got)
            if (addrs < 0).any():  # never written: the fill value
                rows = out[r - first:stop - first]
                for i in np.flatnonzero(addrs < 0):
                    self._fill_tile(rows, int(i))
            r = stop

    def _decode(self, loc):
        """The decoded bytes of one chunk (``(offset, size, filter mask)``): exactly
        ``c0`` rows of one tile, or RunFileError naming the chunk."""
        addr, size, mask = loc
        expect = self._chunk_bytes
        fd = self.rf.fd()
        if size > max(2 * expect, expect + (1 << 20)):
            # deflate never grows data by more than a few bytes per 16 KiB
            raise RunFileError(f"{self.rf.path}: {self.name}: the chunk at byte {addr} "
                               f"claims {size} stored bytes for {expect} decoded ones; the "
                               f"chunk index is damaged", self.rf.path)
        data = os.pread(fd, size, addr)
        if len(data) != size:
            raise self._truncated(addr, size, len(data))
        for j in range(len(self.filters) - 1, -1, -1):
            if mask >> j & 1:
                continue  # this filter was skipped when the chunk was written
            code = self.filters[j]
            if code == _DEFLATE:
                d = zlib.decompressobj()
                try:
                    out = d.decompress(data, expect + 1)  # never more than one chunk + 1
                except zlib.error as e:
                    raise RunFileError(f"{self.rf.path}: {self.name}: the deflated chunk at "
                                       f"byte {addr} ({size} bytes) does not decode: {e}",
                                       self.rf.path) from e
                if len(out) != expect or not d.eof:
                    raise RunFileError(f"{self.rf.path}: {self.name}: the deflated chunk at "
                                       f"byte {addr} ({size} bytes) decodes to "
                                       f"{'more than ' if len(out) > expect else ''}"
                                       f"{len(out)} bytes{'' if d.eof else ' (incomplete)'}, "
                                       f"not {expect}", self.rf.path)
                data = out
            else:  # _SHUFFLE
                if len(data) != expect:
                    raise RunFileError(f"{self.rf.path}: {self.name}: the chunk at byte "
                                       f"{addr} holds {len(data)} bytes, not {expect}",
                                       self.rf.path)
                out = np.empty(expect, np.uint8)
                _chunkio.unshuffle(data, out, self.dtype.itemsize)
                data = out
        if len(data) != expect:
            raise RunFileError(f"{self.rf.path}: {self.name}: the chunk at byte {addr} holds "
                               f"{len(data)} bytes, not {expect}", self.rf.path)
        return data

    def _read_filtered(self, first, count, out):
        """Deflate (+ shuffle) chunks decoded by :data:`READ_THREADS` threads at once, each
        decoded chunk's rows and crop put in place by the compiled core."""
        if not out.flags.c_contiguous:  # pragma: no cover - slots are always contiguous
            self.ds.read_direct(out, np.s_[first:first + count])
            return
        c0 = self.chunks[0]
        rb = self.row_bytes
        flat = out.reshape(-1).view(np.uint8)
        tile, entry, item = self._geo_tile, self._geo_entry, self.dtype.itemsize
        off, crop = self._geo_off, self._geo_crop
        ntiles = len(self._tile_list)
        keep = c0 > 1 and c0 * rb <= DECODED_BLOCK_BYTES
        r = first
        end = first + count
        while r < end:
            k = (r // c0) * c0
            stop = min(end, k + c0)
            nr = stop - r
            skip = r - k
            rows = out[r - first:stop - first]
            dest = flat[(r - first) * rb:(stop - first) * rb]
            _, locs, _ = self._block_locations(k)
            cached = self._decoded
            decoded = cached[1] if cached is not None and cached[0] == k else None
            fresh = [None] * ntiles if decoded is None and keep else None

            def part(a, b, locs=locs, skip=skip, nr=nr, dest=dest, rows=rows,
                     decoded=decoded, fresh=fresh):
                for i in range(a, b):
                    if locs[i] is None:
                        self._fill_tile(rows, i)
                        continue
                    buf = decoded[i] if decoded is not None else self._decode(locs[i])
                    if fresh is not None:
                        fresh[i] = buf
                    _chunkio.scatter(buf, skip, nr, dest, tile, entry, item, int(off[i]),
                                     crop[i])

            if fresh is not None:
                self._decoded = None  # the previous block's rows are done with
            _spread(part, ntiles)
            if fresh is not None and stop < k + c0:
                self._decoded = (k, fresh)
            elif decoded is not None and stop >= k + c0:
                self._decoded = None
            r = stop
