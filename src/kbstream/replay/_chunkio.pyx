# cython: boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Chunk bytes into array buffers, without the GIL: the compiled core of the replay reader.

Pure functions on buffers and a file descriptor (no sockets, no HDF5 calls, no
Python objects inside the loops):

- :func:`read_tiles` reads, for a list of chunks of one row block, the rows
  wanted from each chunk (``pread`` at the chunk's file offset) and puts the
  crop of each chunk in place in the output rows;
- :func:`unshuffle` undoes HDF5's shuffle filter (bytes grouped by their
  position in the element) into a buffer;
- :func:`scatter` puts the rows and crop of one decoded chunk in place.

Geometry (all in bytes, rows excluded): a chunk holds ``nr`` rows of a C-ordered
tile of shape ``tile``; the output holds ``nr`` rows of a C-ordered entry.  The
crop of tile ``i`` (its sizes, smaller than the tile at the far edges) starts at
byte ``dst_off[i]`` of the first output row.  Every offset and size is checked
against the buffers before anything is copied (ValueError), so a caller's
mistake can never write outside them.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport INT64_MAX, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from posix.types cimport off_t
from posix.unistd cimport pread

__all__ = ["read_tiles", "unshuffle", "scatter"]

DEF MAXDIM = 32

#: Largest tile or entry (bytes): products of sizes stay far from int64 overflow.
cdef int64_t _MAX_BYTES = 1LL << 46


cdef int64_t _read_full(int fd, char* buf, int64_t n, int64_t off) noexcept nogil:
    """Read ``n`` bytes at ``off``; the number read (short only at the end of the file),
    or -errno on an error."""
    cdef int64_t got = 0
    cdef Py_ssize_t r
    while got < n:
        r = pread(fd, buf + got, <size_t>(n - got), <off_t>(off + got))
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            break
        got += r
    return got


cdef inline void _copy_pieces(char* t, const char* s, int64_t m, int64_t sstride,
                              int64_t dstride, int64_t inner) noexcept nogil:
    """``m`` pieces of ``inner`` contiguous bytes, ``sstride`` / ``dstride`` apart.  (Fixed
    64-byte copies the compiler inlines were tried for rows of 64..1024 bytes: faster
    from a chunk in the cache, slower end to end; the library's ``memcpy`` is kept.)"""
    cdef int64_t j
    for j in range(m):
        memcpy(t, s, <size_t>inner)
        s += sstride
        t += dstride


cdef void _copy_crop(const char* src, char* dst, int nd, const int64_t* size,
                     const int64_t* sstride, const int64_t* dstride,
                     int64_t inner) noexcept nogil:
    """Copy an ``nd``-dimensional crop whose last dimension is ``inner`` contiguous bytes
    (``size[nd-1]`` is not used); strides in bytes."""
    cdef int64_t idx[MAXDIM]
    cdef int d
    cdef const char* s = src
    cdef char* t = dst
    if nd <= 1:
        memcpy(dst, src, <size_t>inner)
        return
    for d in range(nd):
        idx[d] = 0
        if d < nd - 1 and size[d] <= 0:
            return
    while True:
        # the pieces of the innermost dimension but the contiguous one, then the rest
        _copy_pieces(t, s, size[nd - 2], sstride[nd - 2], dstride[nd - 2], inner)
        d = nd - 3
        while d >= 0:
            idx[d] += 1
            s += sstride[d]
            t += dstride[d]
            if idx[d] < size[d]:
                break
            s -= sstride[d] * size[d]
            t -= dstride[d] * size[d]
            idx[d] = 0
            d -= 1
        if d < 0:
            return


cdef int _geometry(int nd, const int64_t[::1] tile, const int64_t[::1] entry, int64_t itemsize,
                   int64_t* tstride, int64_t* estride) except -1:
    """Byte strides of a C-ordered tile and entry (rows excluded)."""
    cdef int d
    if nd < 1 or nd + 1 > MAXDIM or tile.shape[0] != nd or entry.shape[0] != nd:
        raise ValueError("tile and entry need the same number of dimensions (1..31)")
    if itemsize < 1:
        raise ValueError("itemsize must be positive")
    tstride[nd - 1] = itemsize
    estride[nd - 1] = itemsize
    for d in range(nd - 1, 0, -1):
        if tile[d] < 1 or entry[d] < 1:
            raise ValueError("tile and entry sizes must be positive")
        if tstride[d] > _MAX_BYTES // tile[d] or estride[d] > _MAX_BYTES // entry[d]:
            raise ValueError("tile or entry too large")
        tstride[d - 1] = tstride[d] * tile[d]
        estride[d - 1] = estride[d] * entry[d]
    if tile[0] < 1 or entry[0] < 1:
        raise ValueError("tile and entry sizes must be positive")
    if tstride[0] > _MAX_BYTES // tile[0] or estride[0] > _MAX_BYTES // entry[0]:
        raise ValueError("tile or entry too large")
    return 0


cdef int _check_crop(int nd, const int64_t[::1] tile, const int64_t[::1] entry,
                    const int64_t* estride, int64_t off, const int64_t* crop) except -1:
    """A crop lies inside its tile and, from its offset, inside one entry."""
    cdef int d
    cdef int64_t rest = off, pos
    if rest < 0:
        raise ValueError("negative destination offset")
    for d in range(nd):
        pos = rest // estride[d]
        rest -= pos * estride[d]
        if crop[d] < 1 or crop[d] > tile[d] or pos + crop[d] > entry[d]:
            raise ValueError("a crop does not fit its tile or the entry")
    if rest:
        raise ValueError("destination offset not on an element")
    return 0


cdef inline void _put_tile(const char* src, char* dst, int nd, int64_t nr, int64_t itemsize,
                           const int64_t[:, ::1] crop, Py_ssize_t i, int64_t* size,
                           const int64_t* sstr, const int64_t* dstr) noexcept nogil:
    """Copy the crop of tile ``i`` (``nr`` rows at ``src``) to ``dst``."""
    cdef int d
    size[0] = nr
    for d in range(nd - 1):
        size[d + 1] = crop[i, d]
    _copy_crop(src, dst, nd + 1, size, sstr, dstr, crop[i, nd - 1] * itemsize)


cdef Py_ssize_t _span(const int64_t[::1] addrs, Py_ssize_t i, int64_t lead, int64_t want,
                     int64_t limit, int64_t cap, int64_t gap_bytes,
                     int64_t* end_out) noexcept nogil:
    """The end (exclusive) ``j`` of the run of chunks from ``i`` (``addrs[i]`` written and
    readable) read as one span, and the span's end in the file (``*end_out``)."""
    cdef Py_ssize_t n = addrs.shape[0], j = i + 1
    cdef int64_t start = addrs[i] + lead, end = start + want, wanted = want, s, e
    while j < n and cap > want and wanted < cap:
        if addrs[j] < 0:
            j += 1
            continue
        if addrs[j] > limit:
            break
        s = addrs[j] + lead
        if s < start or s - end > gap_bytes:
            break
        e = s + want if s + want > end else end
        if e - start > cap or e - start > 2 * (wanted + want):
            break
        end = e
        wanted += want
        j += 1
    end_out[0] = end
    return j


def read_tiles(int fd, const int64_t[::1] addrs, int64_t skip, int nr, out,
               const int64_t[::1] tile, const int64_t[::1] entry, int64_t itemsize,
               const int64_t[::1] dst_off, const int64_t[:, ::1] crop,
               int64_t span_bytes=0, int64_t gap_bytes=0, int64_t[::1] counts=None):
    """Read rows ``skip .. skip + nr`` of each chunk at file offset ``addrs[i]`` (chunks
    of ``tile`` elements per row; -1: not written, left alone) and put each chunk's crop
    in place in ``out`` (``nr`` rows of ``entry`` elements, writable, contiguous).

    Coalescing: consecutive chunks (in the order given) whose wanted bytes lie in
    ascending, near-adjacent file ranges are read with one ``pread`` of the whole span
    and put in place from it.  A span grows by the next chunk only while its start is
    not before the span's start, it begins at most ``gap_bytes`` after the span's end
    (overlaps allowed), the span stays within ``span_bytes`` and within twice the bytes
    wanted from its chunks; so a sparse or hostile chunk index never makes a read much
    larger than what it needs.  ``span_bytes`` <= the bytes of one chunk's rows: one
    ``pread`` per chunk.  A span read short (the file ends inside it) is read again
    chunk by chunk, which finds the first chunk that is short.

    The reads run without the GIL: other Python threads (the sender, other readers of
    the same pool) run meanwhile.  The staging buffer is as large as the largest span
    formed (at most ``span_bytes``), or one chunk's rows when none is.  ``counts``
    (optional, 3 int64): reads made (one ``pread``, repeated only if the kernel returns
    less), bytes asked for and the
    largest single read are added to it.

    Returns
    -------
    (int, int, int)
        ``(-1, 0, 0)`` when every chunk was read in full; else ``(i, wanted, got)`` for
        the first chunk ``i`` (in the order of reading) that was read short (``got`` >=
        0: the file ends early; an offset too large for a file offset reads 0 bytes)
        or failed (``got`` = -errno).

    Raises
    ------
    ValueError
        The geometry does not fit ``out`` (nothing is read then).
    """
    cdef int nd = tile.shape[0]
    cdef int64_t tstride[MAXDIM]
    cdef int64_t estride[MAXDIM]
    cdef int64_t size[MAXDIM]
    cdef int64_t sstr[MAXDIM]
    cdef int64_t dstr[MAXDIM]
    cdef Py_ssize_t n = addrs.shape[0], i, j, k
    cdef int d
    cdef int64_t tile_bytes, row_bytes, want, got = 0, bad = -1, cap, lead
    cdef int64_t start, end, limit, size_staging
    cdef int64_t ncalls = 0, nbytes = 0, largest = 0
    cdef char* staging
    cdef unsigned char[::1] o = out
    cdef char* dst
    _geometry(nd, tile, entry, itemsize, tstride, estride)
    if crop.shape[0] != n or crop.shape[1] != nd or dst_off.shape[0] != n:
        raise ValueError("one offset and one crop of ndim sizes per tile")
    for i in range(n):
        _check_crop(nd, tile, entry, estride, dst_off[i], &crop[i, 0])
    tile_bytes = tstride[0] * tile[0]
    row_bytes = estride[0] * entry[0]
    if nr < 1 or skip < 0 or o.shape[0] < nr * row_bytes:
        raise ValueError("out is smaller than nr rows of the entry")
    if skip > _MAX_BYTES // tile_bytes or nr > _MAX_BYTES // tile_bytes:
        raise ValueError("rows beyond any chunk")
    if gap_bytes < 0:
        gap_bytes = 0
    want = nr * tile_bytes
    lead = skip * tile_bytes
    # a chunk whose wanted bytes would end past this offset cannot be read (off_t)
    limit = INT64_MAX - want - lead
    if counts is not None and counts.shape[0] < 3:
        raise ValueError("counts needs 3 entries")
    if n == 0:
        return (-1, 0, 0)
    # a span holds at most twice the bytes wanted from its chunks: no larger buffer
    cap = span_bytes if span_bytes // (2 * want) < n else 2 * n * want
    if cap < want:
        cap = want
    # the staging buffer: as large as the largest span these chunks make (one chunk's
    # rows when nothing is coalesced)
    size_staging = want
    if cap > want:
        with nogil:
            i = 0
            while i < n:
                if addrs[i] < 0 or addrs[i] > limit:
                    i += 1
                    continue
                j = _span(addrs, i, lead, want, limit, cap, gap_bytes, &end)
                if j > i + 1 and end - (addrs[i] + lead) > size_staging:
                    size_staging = end - (addrs[i] + lead)
                i = j
    staging = <char*>malloc(<size_t>size_staging)
    if staging == NULL:
        raise MemoryError()
    dst = <char*>&o[0]
    # dims of the copy: rows, then the tile's dims but the last (contiguous bytes)
    sstr[0] = tile_bytes
    dstr[0] = row_bytes
    for d in range(nd - 1):
        sstr[d + 1] = tstride[d]
        dstr[d + 1] = estride[d]
    try:
        with nogil:
            i = 0
            while i < n:
                if addrs[i] < 0:
                    i += 1
                    continue
                if addrs[i] > limit:
                    bad = i
                    got = 0
                    break
                start = addrs[i] + lead
                j = _span(addrs, i, lead, want, limit, cap, gap_bytes, &end)
                if j > i + 1:
                    ncalls += 1
                    nbytes += end - start
                    if end - start > largest:
                        largest = end - start
                    got = _read_full(fd, staging, end - start, start)
                    if got == end - start:
                        for k in range(i, j):
                            if addrs[k] >= 0:
                                _put_tile(staging + (addrs[k] + lead - start), dst + dst_off[k],
                                          nd, nr, itemsize, crop, k, size, sstr, dstr)
                        i = j
                        continue
                # one chunk, or a span read short: chunk by chunk
                for k in range(i, j):
                    if addrs[k] < 0:
                        continue
                    ncalls += 1
                    nbytes += want
                    if want > largest:
                        largest = want
                    got = _read_full(fd, staging, want, addrs[k] + lead)
                    if got != want:
                        bad = k
                        break
                    _put_tile(staging, dst + dst_off[k], nd, nr, itemsize, crop, k, size,
                              sstr, dstr)
                if bad >= 0:
                    break
                i = j
    finally:
        free(staging)
        if counts is not None:
            counts[0] += ncalls
            counts[1] += nbytes
            if largest > counts[2]:
                counts[2] = largest
    if bad >= 0:
        return (int(bad), int(want), int(got))
    return (-1, 0, 0)


def scatter(src, int64_t skip, int nr, out, const int64_t[::1] tile,
            const int64_t[::1] entry, int64_t itemsize, int64_t dst_off,
            const int64_t[::1] crop):
    """Put rows ``skip .. skip + nr`` of one decoded chunk ``src`` (rows of ``tile``
    elements, C order) in place in ``out`` (``nr`` rows of ``entry``), the crop
    ``crop`` starting at byte ``dst_off`` of the first row.  Without the GIL.

    Raises
    ------
    ValueError
        ``src`` holds fewer rows than ``skip + nr``, or the crop does not fit.
    """
    cdef int nd = tile.shape[0]
    cdef int64_t tstride[MAXDIM]
    cdef int64_t estride[MAXDIM]
    cdef int64_t size[MAXDIM]
    cdef int64_t sstr[MAXDIM]
    cdef int64_t dstr[MAXDIM]
    cdef int d
    cdef int64_t tile_bytes, row_bytes, inner
    cdef const unsigned char[::1] s = src
    cdef unsigned char[::1] o = out
    _geometry(nd, tile, entry, itemsize, tstride, estride)
    if crop.shape[0] != nd:
        raise ValueError("one crop size per dimension")
    _check_crop(nd, tile, entry, estride, dst_off, &crop[0])
    tile_bytes = tstride[0] * tile[0]
    row_bytes = estride[0] * entry[0]
    if nr < 1 or skip < 0 or s.shape[0] < (skip + nr) * tile_bytes:
        raise ValueError("the decoded chunk holds fewer rows than asked for")
    if o.shape[0] < nr * row_bytes:
        raise ValueError("out is smaller than nr rows of the entry")
    sstr[0] = tile_bytes
    dstr[0] = row_bytes
    size[0] = nr
    for d in range(nd - 1):
        sstr[d + 1] = tstride[d]
        dstr[d + 1] = estride[d]
        size[d + 1] = crop[d]
    inner = crop[nd - 1] * itemsize
    with nogil:
        _copy_crop(<const char*>&s[0] + skip * tile_bytes, <char*>&o[0] + dst_off, nd + 1, size,
                   sstr, dstr, inner)


def unshuffle(src, out, int64_t itemsize):
    """Undo HDF5's shuffle filter: ``src`` holds byte 0 of every element, then byte 1 of
    every element, ...; ``out`` (writable, at least as long) gets the elements.  A tail
    shorter than one element per byte plane is copied as it is (as HDF5 does).  Without
    the GIL.

    Raises
    ------
    ValueError
        ``out`` is shorter than ``src`` or ``itemsize`` is not positive.
    """
    cdef const unsigned char[::1] s = src
    cdef unsigned char[::1] o = out
    cdef Py_ssize_t n = s.shape[0], nel, i, b, tail
    cdef const unsigned char* sp
    cdef unsigned char* op
    if itemsize < 1:
        raise ValueError("itemsize must be positive")
    if o.shape[0] < n:
        raise ValueError("out is shorter than the shuffled bytes")
    if n == 0:
        return
    sp = &s[0]
    op = &o[0]
    nel = n // itemsize
    tail = n - nel * itemsize
    with nogil:
        if itemsize == 1 or nel == 0:
            memcpy(op, sp, <size_t>n)
        elif itemsize == 2:
            for i in range(nel):
                op[2 * i] = sp[i]
                op[2 * i + 1] = sp[nel + i]
        elif itemsize == 4:
            for i in range(nel):
                op[4 * i] = sp[i]
                op[4 * i + 1] = sp[nel + i]
                op[4 * i + 2] = sp[2 * nel + i]
                op[4 * i + 3] = sp[3 * nel + i]
        else:
            for b in range(itemsize):
                for i in range(nel):
                    op[i * itemsize + b] = sp[b * nel + i]
        if tail:
            memcpy(op + nel * itemsize, sp + nel * itemsize, <size_t>tail)
