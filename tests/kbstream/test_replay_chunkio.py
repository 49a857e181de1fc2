"""The compiled core of the replay reader (kbstream.replay._chunkio): exact against numpy,
and a geometry that does not fit its buffers is a ValueError before anything is touched."""

import os

import numpy as np
import pytest

from kbstream.replay import _chunkio


def _i64(*xs):
    return np.array(xs, np.int64)


@pytest.mark.parametrize("itemsize", [1, 2, 3, 4, 8, 16])
def test_unshuffle_equals_numpy(itemsize):
    rng = np.random.default_rng(itemsize)
    for n in [0, 1, itemsize - 1, itemsize, 7 * itemsize + 3, 4096 * itemsize, 4099]:
        nel = n // itemsize
        data = rng.integers(0, 256, n, dtype=np.uint8)
        # shuffled: byte b of every element, then the tail as it is
        shuffled = np.concatenate([data[:nel * itemsize].reshape(nel, itemsize).T.reshape(-1),
                                   data[nel * itemsize:]])
        out = np.full(n + 5, 0xAB, np.uint8)
        _chunkio.unshuffle(shuffled.tobytes(), out, itemsize)
        np.testing.assert_array_equal(out[:n], data)
        assert (out[n:] == 0xAB).all()  # nothing written past the data


def test_unshuffle_refuses_short_output_and_bad_itemsize():
    with pytest.raises(ValueError):
        _chunkio.unshuffle(b"abcd", np.empty(3, np.uint8), 2)
    with pytest.raises(ValueError):
        _chunkio.unshuffle(b"abcd", np.empty(4, np.uint8), 0)


def _reference(chunk_rows, skip, nr, entry, starts, crop, out):
    sl = (slice(None),) + tuple(slice(s, s + c) for s, c in zip(starts, crop))
    out[sl] = chunk_rows[(slice(skip, skip + nr),) + tuple(slice(0, c) for c in crop)]


def test_scatter_and_read_tiles_equal_numpy_on_random_geometry(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "chunks"
    for _ in range(200):
        nd = int(rng.integers(1, 4))
        tile = tuple(int(x) for x in rng.integers(1, 6, nd))
        entry = tuple(int(t * rng.integers(1, 3) + rng.integers(0, t)) for t in tile)
        starts = tuple(int(rng.integers(0, e // t + (e % t > 0))) * t for e, t in zip(entry, tile))
        crop = tuple(min(t, e - s) for t, e, s in zip(tile, entry, starts))
        c0 = int(rng.integers(1, 4))
        skip = int(rng.integers(0, c0))
        nr = int(rng.integers(1, c0 - skip + 1))
        dtype = rng.choice([np.uint8, np.uint16, np.float64])
        item = np.dtype(dtype).itemsize
        chunk = rng.integers(0, 200, (c0,) + tile).astype(dtype)
        estride = np.cumprod((1,) + entry[:0:-1])[::-1] * item
        off = int(np.dot(starts, estride))
        expect = np.zeros((nr,) + entry, dtype)
        _reference(chunk, skip, nr, entry, starts, crop, expect)
        out = np.zeros((nr,) + entry, dtype)
        _chunkio.scatter(chunk.tobytes(), skip, nr, out.reshape(-1).view(np.uint8),
                         _i64(*tile), _i64(*entry), item, off, _i64(*crop))
        np.testing.assert_array_equal(out, expect)
        pad = int(rng.integers(0, 64))
        path.write_bytes(bytes(pad) + chunk.tobytes())
        fd = os.open(path, os.O_RDONLY)
        try:
            out = np.zeros((nr,) + entry, dtype)
            res = _chunkio.read_tiles(fd, _i64(pad), skip, nr, out.reshape(-1).view(np.uint8),
                                      _i64(*tile), _i64(*entry), item, _i64(off),
                                      _i64(*crop).reshape(1, nd))
            assert res == (-1, 0, 0)
            np.testing.assert_array_equal(out, expect)
            # a chunk past the end of the file: read short, said, nothing else touched
            res = _chunkio.read_tiles(fd, _i64(pad + 1), skip, nr,
                                      out.reshape(-1).view(np.uint8), _i64(*tile),
                                      _i64(*entry), item, _i64(off), _i64(*crop).reshape(1, nd))
            want = nr * int(np.prod(tile)) * item
            if skip + nr == c0:  # the last row ends one byte past the end of the file
                assert res == (0, want, want - 1)
            else:  # rows before the end of the chunk are still all there
                assert res == (-1, 0, 0)
        finally:
            os.close(fd)


@pytest.mark.parametrize("case", ["crop-past-entry", "crop-past-tile", "offset-off-element",
                                  "negative-offset", "out-too-small", "src-too-small",
                                  "ndim-mismatch", "zero-size"])
def test_geometry_that_does_not_fit_is_refused(tmp_path, case):
    tile, entry, crop, off, skip, nr = [2, 4], [4, 8], [2, 4], 0, 0, 1
    out = np.zeros(4 * 8 * 2, np.uint8)
    src = bytes(2 * 4 * 2)
    if case == "crop-past-entry":
        off = (3 * 8 + 6) * 2  # row 3, column 6: a 2x4 crop runs past the entry
    elif case == "crop-past-tile":
        crop = [3, 4]
    elif case == "offset-off-element":
        off = 1
    elif case == "negative-offset":
        off = -2
    elif case == "out-too-small":
        out = out[:-1]
    elif case == "src-too-small":
        src = src[:-1]
    elif case == "ndim-mismatch":
        crop = [2, 4, 1]
    elif case == "zero-size":
        tile = [0, 4]
    before = out.copy()
    with pytest.raises(ValueError):
        _chunkio.scatter(src, skip, nr, out, _i64(*tile), _i64(*entry), 2, off, _i64(*crop))
    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        if case != "src-too-small":
            with pytest.raises(ValueError):
                _chunkio.read_tiles(fd, _i64(0), skip, nr, out, _i64(*tile), _i64(*entry), 2,
                                    _i64(off), _i64(*crop).reshape(1, -1))
    finally:
        os.close(fd)
    np.testing.assert_array_equal(out, before)


# --- coalesced reads: several chunks by one pread of their span ---------------------

_TILE, _ENTRY = (4, 8), (16, 32)      # 16 tiles of 4 x 8 per row


def _tiles_geometry():
    grid = [(a, b) for a in range(0, _ENTRY[0], _TILE[0]) for b in range(0, _ENTRY[1], _TILE[1])]
    off = _i64(*[(a * _ENTRY[1] + b) * 2 for a, b in grid])
    crop = np.array([_TILE] * len(grid), np.int64)
    return grid, off, crop


def _expected(filebytes, addrs, grid, c0, skip, nr):
    """What every chunk read on its own gives: the rows of each tile from the file's bytes
    at its offset (tiles at -1 keep the initial 0xFFFF)."""
    out = np.full((nr,) + _ENTRY, 0xFFFF, np.uint16)
    tb = _TILE[0] * _TILE[1] * 2
    for (a, b), addr in zip(grid, addrs):
        if addr < 0:
            continue
        chunk = np.frombuffer(filebytes[addr:addr + c0 * tb], np.uint16).reshape((c0,) + _TILE)
        out[:, a:a + _TILE[0], b:b + _TILE[1]] = chunk[skip:skip + nr]
    return out


def _read(fd, addrs, c0, skip, nr, span, gap, guard=16):
    _, off, crop = _tiles_geometry()
    buf = np.full(nr * _ENTRY[0] * _ENTRY[1] + guard, 0xFFFF, np.uint16)
    counts = np.zeros(3, np.int64)
    res = _chunkio.read_tiles(fd, _i64(*addrs), skip, nr, buf.view(np.uint8)[:-2 * guard],
                              _i64(*_TILE), _i64(*_ENTRY), 2, off, crop, span, gap, counts)
    assert (buf[-guard:] == 0xFFFF).all()   # nothing written past the output
    return res, buf[:-guard].reshape((nr,) + _ENTRY), counts


def _layout(kind, rng, n, cb):
    """File offsets of ``n`` chunks of ``cb`` bytes."""
    base = int(rng.integers(0, 300))
    if kind == "contiguous":
        return [base + i * cb for i in range(n)]
    if kind == "reversed":
        return [base + (n - 1 - i) * cb for i in range(n)]
    if kind == "interleaved":   # two datasets' chunks written alternately
        return [base + 2 * i * cb for i in range(n)]
    if kind == "gaps":
        pos, out = base, []
        for _ in range(n):
            out.append(pos)
            pos += cb + int(rng.choice([0, 0, 1, 2, 50, 700, 5000]))
        return out
    if kind == "shuffled":
        return [base + int(i) * cb for i in rng.permutation(n)]
    if kind == "overlapping":   # a lying index: chunks sharing bytes, duplicates
        return sorted(base + int(x) for x in rng.integers(0, n * cb // 2, n))
    if kind == "holes":         # some chunks never written
        return [-1 if rng.random() < 0.3 else base + i * cb for i in range(n)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["contiguous", "reversed", "interleaved", "gaps", "shuffled",
                                  "overlapping", "holes"])
def test_coalesced_reads_equal_chunk_by_chunk(tmp_path, kind):
    """Whatever the layout, reading spans gives exactly what one read per chunk gives; a
    read never exceeds the span limit nor twice the bytes wanted, and contiguous chunks
    take fewer reads than chunks (both paths checked by counting the reads)."""
    rng = np.random.default_rng(sum(map(ord, kind)))
    grid, _, _ = _tiles_geometry()
    n = len(grid)
    path = tmp_path / "chunks"
    for c0 in (1, 2, 3):
        tb = _TILE[0] * _TILE[1] * 2
        cb = c0 * tb
        addrs = _layout(kind, rng, n, cb)
        filebytes = rng.integers(0, 1 << 16, (max(addrs) + cb) // 2 + 1,
                                 dtype=np.uint16).tobytes()
        path.write_bytes(filebytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            for skip in range(c0):
                for nr in range(1, c0 - skip + 1):
                    want = nr * tb
                    nvalid = sum(a >= 0 for a in addrs)
                    expect = _expected(filebytes, addrs, grid, c0, skip, nr)
                    res, out, counts = _read(fd, addrs, c0, skip, nr, 0, 0)
                    assert res == (-1, 0, 0)
                    np.testing.assert_array_equal(out, expect)
                    assert counts[0] == nvalid and counts[2] == want   # chunk by chunk
                    for span, gap in [(1 << 20, 8 << 10), (3 * want, 0), (want + 1, 1 << 20),
                                      (5 * want, tb)]:
                        res, out, counts = _read(fd, addrs, c0, skip, nr, span, gap)
                        assert res == (-1, 0, 0)
                        np.testing.assert_array_equal(out, expect)
                        assert counts[2] <= max(span, want)
                        assert counts[1] <= 2 * nvalid * want
                    res, out, counts = _read(fd, addrs, c0, skip, nr, 1 << 20, 8 << 10)
                    if kind == "contiguous" and nr == c0:
                        assert counts[0] == 1 and counts[1] == nvalid * want
                    elif kind == "reversed":
                        assert counts[0] == nvalid   # descending offsets: one read each
                    elif kind == "interleaved" and nr == c0:   # a chunk's gap after each:
                        assert counts[0] == 1                   # a span of twice the bytes
        finally:
            os.close(fd)


def test_coalesced_read_past_end_of_file_names_the_first_short_chunk(tmp_path):
    """A span that runs past the end of the file is read again chunk by chunk: the
    result names the first chunk that is short, with the bytes it got; no signal."""
    grid, _, _ = _tiles_geometry()
    n = len(grid)
    tb = _TILE[0] * _TILE[1] * 2
    path = tmp_path / "chunks"
    addrs = [i * tb for i in range(n)]
    size = 9 * tb + 10                      # chunk 9 has 10 bytes, 10.. none
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_RDONLY)
    try:
        for span in (0, 1 << 20, 4 * tb):
            res, _, counts = _read(fd, addrs, 1, 0, 1, span, 8 << 10)
            assert res == (9, tb, 10)
            assert counts[2] <= max(span, tb)
    finally:
        os.close(fd)


@pytest.mark.parametrize("bad", [2 ** 62, 2 ** 63 - 1, 2 ** 63 - 100, 10 ** 15])
def test_coalesced_read_of_huge_offsets_is_a_short_read(tmp_path, bad):
    """Offsets far past the end of the file, up to the largest int64 (where offset plus
    length would overflow): reported as read short (0 bytes), never a fault, and the
    chunks before it are put in place."""
    grid, _, _ = _tiles_geometry()
    n = len(grid)
    tb = _TILE[0] * _TILE[1] * 2
    path = tmp_path / "chunks"
    filebytes = np.arange(n * tb // 2, dtype=np.uint16).tobytes()
    path.write_bytes(filebytes)
    addrs = [i * tb for i in range(n)]
    addrs[5] = bad
    expect = _expected(filebytes, addrs[:5] + [-1] * (n - 5), grid, 1, 0, 1)
    fd = os.open(path, os.O_RDONLY)
    try:
        for span in (0, 1 << 20):
            res, out, counts = _read(fd, addrs, 1, 0, 1, span, 8 << 10)
            assert res == (5, tb, 0)
            np.testing.assert_array_equal(out[:, :4, :], expect[:, :4, :])   # tiles 0..3
            assert counts[2] <= max(span, tb)
    finally:
        os.close(fd)


def test_coalesced_read_of_duplicate_offsets_stays_bounded(tmp_path):
    """A lying index pointing every chunk at the same bytes: each gets those bytes, and
    the staging buffer and every read stay within the limits (no read of n chunks'
    worth from one span of one chunk)."""
    grid, _, _ = _tiles_geometry()
    n = len(grid)
    tb = _TILE[0] * _TILE[1] * 2
    path = tmp_path / "chunks"
    filebytes = np.arange(tb, dtype=np.uint16).tobytes()
    path.write_bytes(filebytes)
    addrs = [0] * n
    expect = _expected(filebytes + bytes(tb), addrs, grid, 1, 0, 1)
    fd = os.open(path, os.O_RDONLY)
    try:
        res, out, counts = _read(fd, addrs, 1, 0, 1, 1 << 40, 1 << 40)   # absurd limits
        assert res == (-1, 0, 0)
        np.testing.assert_array_equal(out, expect)
        assert counts[2] == tb and counts[1] <= n * tb
    finally:
        os.close(fd)


def test_read_tiles_refuses_absurd_tile_sizes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(64))
    fd = os.open(path, os.O_RDONLY)
    try:
        out = np.zeros(64, np.uint8)
        with pytest.raises(ValueError):
            _chunkio.read_tiles(fd, _i64(0), 0, 1, out, _i64(1 << 40, 1 << 40), _i64(1, 1), 2,
                                _i64(0), _i64(1, 1).reshape(1, 2))
        with pytest.raises(ValueError):
            _chunkio.read_tiles(fd, _i64(0), 1 << 60, 1, out, _i64(2, 4), _i64(2, 4), 2,
                                _i64(0), _i64(2, 4).reshape(1, 2), 1 << 20, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize("inner", [64, 128, 192, 256, 1024, 1088, 4096, 100])
def test_scatter_pieces_of_every_width(inner):
    """Tile rows of many widths (pieces of the copy), with edge crops: equal to numpy,
    nothing written outside the crop."""
    rng = np.random.default_rng(inner)
    width = inner // 2                      # uint16 elements per tile row
    tile, entry = (3, 5, width), (7, 11, 2 * width + 3)
    chunk = rng.integers(0, 1 << 16, (2,) + tile, dtype=np.uint16)
    for starts in [(0, 0, 0), (3, 5, width), (6, 10, 2 * width)]:
        crop = tuple(min(t, e - s) for t, e, s in zip(tile, entry, starts))
        estride = np.cumprod((1,) + entry[:0:-1])[::-1] * 2
        off = int(np.dot(starts, estride))
        expect = np.full((2,) + entry, 0xABCD, np.uint16)
        _reference(chunk, 0, 2, entry, starts, crop, expect)
        out = np.full((2,) + entry, 0xABCD, np.uint16)
        _chunkio.scatter(chunk.tobytes(), 0, 2, out.reshape(-1).view(np.uint8), _i64(*tile),
                         _i64(*entry), 2, off, _i64(*crop))
        np.testing.assert_array_equal(out, expect)
