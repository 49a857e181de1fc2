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
