"""Our reader against extra_data's, over every layout and format version."""

import os
import threading

import numpy as np
import pytest

extra_data = pytest.importorskip("extra_data")

from kbstream.replay import (Prefetcher, RunFileError, RunReader, TruncatedFileError,
                             run_files, select_sources)
from kbstream.replay import dataset as dataset_mod
from kbstream.replay.demo import make_demo_run
from kbstream.replay.runfile import RunFile
from kbstream.replay.slots import Slot

SHAPE = (4, 16, 32)
SRC1 = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"


def assert_same_train(got, ref, tid):
    """``got`` (TrainData) holds exactly what extra_data's ``trains()`` gave for ``tid``."""
    assert got.file_train_id == tid
    assert sorted(got.data) == sorted(ref)
    for src, values in ref.items():
        assert set(got.data[src]) == set(values), src
        keys = set(values) - {"metadata"}
        assert got.metadata[src]["timestamp.tid"] == tid
        assert got.metadata[src]["source"] == src
        # the 'metadata' entry extra_data leaves in each source is the header's metadata
        assert got.data[src]["metadata"] is got.metadata[src]
        assert {k: got.metadata[src][k] for k in values["metadata"]} == values["metadata"]
        for k in keys:
            a, b = got.data[src][k], values[k]
            if isinstance(b, np.ndarray):
                assert isinstance(a, np.ndarray), (src, k)
                assert (a.dtype, a.shape) == (b.dtype, b.shape), (src, k)
                np.testing.assert_array_equal(a, b)
            else:
                assert type(a) is type(b) and a == b, (src, k, a, b)


@pytest.fixture(params=[0, dataset_mod.SMALL_DATASET_BYTES], ids=["direct", "memory"])
def threshold(request, monkeypatch):
    # 0 forces every numeric dataset through the direct (pread rows / tiles) paths.
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("chunking", ["train", "small", "contiguous"])
@pytest.mark.parametrize("fmt", ["0.5", "1.0", "1.2"])
def test_every_train_equals_extra_data(tmp_path, threshold, chunking, fmt):
    d = make_demo_run(tmp_path, 5, frame_shape=(16, 64, 128), chunking=chunking, format_version=fmt,
                      trains_per_file=2, missing=True)
    ref_run = extra_data.RunDirectory(str(d))
    with RunReader(run_files(d)) as r:
        sel = select_sources(r)
        assert sorted(sel) == sorted(ref_run.all_sources)
        np.testing.assert_array_equal(r.train_ids, ref_run.train_ids)
        slot = Slot(0)
        n = 0
        for tid, ref in ref_run.trains():
            assert_same_train(r.read_train(tid, sel, slot), ref, tid)
            n += 1
        assert n == 5
        modes = {ds.mode for rf in r.files for ds in rf._datasets.values()}
        if threshold == 0:
            assert modes >= ({"rows", "tiles"} if chunking == "small" else {"rows"})
        else:
            assert modes == {"memory"}


def test_require_all_and_any_match_extra_data(tmp_path):
    d = make_demo_run(tmp_path, 5, frame_shape=SHAPE, missing=True, trains_per_file=2)
    ref_run = extra_data.RunDirectory(str(d))
    pats = [("*JNGFR0[78]*", "data.adc"), ("*XGM*:output", "*")]
    with RunReader(run_files(d)) as r:
        sel = select_sources(r, ["*JNGFR0[78]*[data.adc]", "*XGM*:output"])
        for require, kw in (("all", {"require_all": True}), ("any", {"require_any": True})):
            ref = ref_run.select(pats, **kw).train_ids
            assert r.select_trains(sel, require).tolist() == list(ref)
        assert r.select_trains(sel, "all").tolist() == [10000, 10003, 10004]


def test_timestamps_from_index(tmp_path):
    d = make_demo_run(tmp_path, 2, frame_shape=SHAPE, modules=1)
    with RunReader(run_files(d)) as r:
        meta = r.read_train(10001, select_sources(r, ["*JNGFR01*"])).metadata
        assert meta["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"] == {
            "source": "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput", "timestamp": 1700000000.1,
            "timestamp.sec": "1700000000", "timestamp.frac": "100000000000000000",
            "timestamp.tid": 10001}
        meta = r.read_train(10001, select_sources(r, ["*JNGFR01*"]), timestamps=False).metadata
        assert list(meta["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"]) == ["source", "timestamp.tid"]
    d = make_demo_run(tmp_path / "old", 2, frame_shape=SHAPE, modules=1, format_version="0.5")
    with RunReader(run_files(d)) as r:
        meta = r.read_train(10001, select_sources(r, ["*JNGFR01*"])).metadata
        assert "timestamp" not in meta["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"]


def test_run_values(tmp_path):
    d = make_demo_run(tmp_path, 3, frame_shape=SHAPE, modules=1)
    with RunReader(run_files(d)) as r:
        vals = r.run_values("SPB_IRDA_JF4M/MOTOR/Y")
        assert vals["actualPosition.value"] == 1.5
        assert vals["state.value"] == b"ON"
        assert r.run_values("SPB_IRDA_JF4M/DET/JNGFR01:daqOutput") == {}


def _truncate_inside_adc(d, monkeypatch):
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    path = d / "RAW-R0012-JNGFR01-S00001.h5"
    import h5py
    with h5py.File(path, "r") as f:
        ds = f["INSTRUMENT/SPB_IRDA_JF4M/DET/JNGFR01:daqOutput/data/adc"]
        info = ds.id.get_chunk_info_by_coord((0, 0, 0, 0))
    os.truncate(path, info.byte_offset + 100)
    return path


@pytest.mark.parametrize("chunking", ["train", "small"])
def test_truncated_file_raises_typed_error(tmp_path, monkeypatch, chunking):
    d = make_demo_run(tmp_path, 4, frame_shape=SHAPE, modules=1, chunking=chunking,
                      trains_per_file=2)
    with RunReader(run_files(d)) as r:
        # Truncated after opening (HDF5 itself refuses to open a file shorter
        # than its superblock says: see test_unreadable_file).
        path = _truncate_inside_adc(d, monkeypatch)
        sel = select_sources(r, ["*JNGFR01*[data.adc]"])
        r.read_train(10000, sel)  # other files are fine
        with pytest.raises(TruncatedFileError, match=r"the file is truncated$") as info:
            r.read_train(10002, sel)
        assert info.value.path == str(path)
        assert (info.value.source, info.value.key, info.value.train_id) == (
            "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput", "data.adc", 10002)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "RAW-R0001-DA01-S00000.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(RunFileError, match=r"^cannot open .*RAW-R0001-DA01-S00000.h5 as HDF5"):
        RunReader([bad])
    import h5py
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(RunFileError, match=r"is not a readable EuXFEL run file"):
        RunReader([tmp_path / "empty.h5"])
    d = make_demo_run(tmp_path / "run", 2, frame_shape=SHAPE, modules=1)
    short = d / "RAW-R0012-JNGFR01-S00000.h5"
    os.truncate(short, short.stat().st_size - 1000)
    with pytest.raises(RunFileError, match=r"^cannot open .* as HDF5: .*truncated file"):
        RunReader([short])
    with RunReader(run_files(d) + [bad], skip_bad_files=True) as r:
        assert [p for p, _ in r.bad_files] == sorted([str(bad), str(short)])
        assert len(r.train_ids) == 2


def test_prefetcher_keeps_memory_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    d = make_demo_run(tmp_path, 8, frame_shape=SHAPE, modules=2)
    with RunReader(run_files(d)) as r:
        sel = select_sources(r, ["*JNGFR*[data.adc]"])
        pf = Prefetcher(r, sel, ((t, t + 100) for t in r.train_ids.tolist()), depth=2).start()
        held = []
        got = []
        for item in pf:
            got.append(item.train_id)
            held.append(item)
            # Never more than depth + 1 trains unreleased: the reader waits for a slot.
            assert len(held) <= 3
            # The arrays are the slot's own buffers (copies), never file mappings.
            adc = item.data[SRC1]["data.adc"]
            assert any(np.shares_memory(adc, b) for b in item.slot.buffers.values())
            if len(held) == 3:
                pf.release(held.pop(0))
        pf.close()
        assert got == list(range(10100, 10108))
        assert len(pf.pool.slots) == 3
        # Reused buffers: one adc array per module and slot, nothing more.
        assert all(s.nbytes == 2 * 4 * 16 * 32 * 2 for s in pf.pool.slots)
        for item in held:
            pf.release(item)


def test_prefetcher_reports_bad_train_and_goes_on(tmp_path, monkeypatch):
    d = make_demo_run(tmp_path, 4, frame_shape=SHAPE, modules=1, trains_per_file=2)
    with RunReader(run_files(d)) as r:
        _truncate_inside_adc(d, monkeypatch)
        sel = select_sources(r, ["*JNGFR01*[data.adc]"])
        with Prefetcher(r, sel, ((t, t) for t in r.train_ids.tolist()), depth=1) as pf:
            items = list(_drain(pf))
    assert [i.train_id for i in items] == [10000, 10001, 10002, 10003]
    assert [type(i.error) for i in items] == [type(None)] * 2 + [TruncatedFileError] * 2


def _drain(pf):
    for item in pf:
        pf.release(item)
        yield item


def test_prefetcher_close_stops_reader_thread(tmp_path):
    d = make_demo_run(tmp_path, 2, frame_shape=SHAPE, modules=1)
    with RunReader(run_files(d)) as r:
        sel = select_sources(r, ["*JNGFR01*[data.adc]"])

        def endless():
            while True:
                yield 10000, 10000

        pf = Prefetcher(r, sel, endless(), depth=1).start()
        first = pf.get(timeout=10)
        assert first.train_id == 10000
        pf.close()
        assert not pf._thread.is_alive()
        assert threading.active_count() >= 1


def test_prefetcher_life_cycle(tmp_path):
    """No thread before start(); start() returns the prefetcher; wrong order raises
    StateError; close() is idempotent, stop() is close(), and `with` starts."""
    from kbstream.errors import StateError
    d = make_demo_run(tmp_path, 2, frame_shape=SHAPE, modules=1)
    with RunReader(run_files(d)) as r:
        sel = select_sources(r, ["*JNGFR01*[data.adc]"])
        trains = [(t, t) for t in r.train_ids.tolist()]
        before = threading.active_count()
        pf = Prefetcher(r, sel, iter(trains), depth=1)
        assert threading.active_count() <= before and pf._thread is None and not pf.started
        with pytest.raises(StateError):
            pf.get()
        assert pf.start() is pf
        with pytest.raises(StateError):
            pf.start()
        item = pf.get(timeout=10)
        assert item.train_id == trains[0][1]
        pf.close()
        pf.close()
        pf.stop()
        assert pf.closed and not pf._thread.is_alive()
        pf.release(item)  # slots can be given back after close
        assert item.slot is None
        with pytest.raises(StateError):
            pf.get()
        with pytest.raises(StateError):
            pf.start()

        never = Prefetcher(r, sel, iter(trains), depth=1)
        never.close()  # never started: nothing to stop
        assert never._thread is None

        with Prefetcher(r, sel, iter(trains), depth=1) as pf2:
            assert pf2.started
            assert [i.train_id for i in _drain(pf2)] == [t for _, t in trains]
        assert pf2.closed and not pf2._thread.is_alive()


def test_prefetcher_get_timeout_is_a_timeout_error(tmp_path):
    from kbstream.errors import ChannelTimeout
    d = make_demo_run(tmp_path, 1, frame_shape=SHAPE, modules=1)
    gate = threading.Event()

    def held_back():
        gate.wait(30)
        yield from ()

    with RunReader(run_files(d)) as r:
        sel = select_sources(r, ["*JNGFR01*[data.adc]"])
        with Prefetcher(r, sel, held_back(), depth=1) as pf:
            with pytest.raises(ChannelTimeout) as info:
                pf.get(timeout=0.05)
            assert isinstance(info.value, TimeoutError)
            gate.set()
            assert pf.get(timeout=30) is None


@pytest.mark.parametrize("case", ["regular", "reversed", "edges"])
def test_tile_reads_equal_h5py(tmp_path, monkeypatch, case):
    """Small chunks (the pread path, the only one), stored in grid order, in reverse grid
    order, and with edge chunks: every row range equals h5py."""
    import h5py
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    shape = (6, 4, 16, 32) if case != "edges" else (6, 5, 17, 30)
    data = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("d", shape, np.uint16, chunks=(4, 2, 8, 16))
        if case == "reversed":  # chunks allocated in reverse grid order
            for a in range(shape[1] - 2, -1, -2):
                for b in range(shape[2] - 8, -1, -8):
                    for c in range(shape[3] - 16, -1, -16):
                        ds[:, a:a + 2, b:b + 8, c:c + 16] = data[:, a:a + 2, b:b + 8, c:c + 16]
        else:
            ds[:4] = data[:4]
            ds[4:] = data[4:]
    with h5py.File(path, "r") as h5:
        dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5["d"])
        assert dsr.mode == "tiles"
        for first, count in [(0, 1), (3, 2), (5, 1), (0, 6)]:
            out = np.empty((count,) + shape[1:], np.uint16)
            dsr.read(first, count, out)
            np.testing.assert_array_equal(out, data[first:first + count])
        os.close(dsr.rf._fd)


def _tiled_file(path, shape, chunks, data, written=None):
    import h5py
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("d", shape, data.dtype, chunks=chunks, fillvalue=7)
        if written is None:
            ds[:] = data
        else:
            for sl in written:
                ds[sl] = data[sl]


class _FakeRunFile:
    def __init__(self, h5, path):
        self.h5, self.path, self._fd = h5, str(path), None

    fd = RunFile.fd


@pytest.mark.parametrize("shape, chunks", [
    ((7, 4, 16, 32), (3, 2, 8, 16)),      # chunks tile the entry: one copy per run
    ((7, 5, 17, 30), (3, 2, 8, 16)),      # edge chunks: cropped copies
    ((5, 6, 64), (2, 6, 16)),             # 2-d entries
    ((9, 40), (4, 8)),                    # 1-d entries
])
@pytest.mark.parametrize("threads", [1, 3])
def test_pread_tile_reads_equal_h5py(tmp_path, monkeypatch, shape, chunks, threads):
    """Small chunks read with one pread per chunk (only the wanted rows, in the compiled
    core) equal h5py, for every row range, including ranges across row blocks and
    partial last blocks, with the chunks of a block read by one thread or shared out
    over three."""
    import h5py
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    monkeypatch.setattr(dataset_mod, "READ_THREADS", threads)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    path = tmp_path / "f.h5"
    _tiled_file(path, shape, chunks, data)
    reads = []
    real = dataset_mod._chunkio.read_tiles
    monkeypatch.setattr(dataset_mod._chunkio, "read_tiles",
                        lambda *a: (reads.append(threading.get_ident()), real(*a))[1])
    with h5py.File(path, "r") as h5:
        dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5["d"])
        assert dsr.mode == "tiles"
        for first, count in [(0, 1), (2, 1), (3, 1), (2, 3), (0, shape[0]), (shape[0] - 1, 1)]:
            out = np.full((count,) + shape[1:], -1, np.int32)
            dsr.read(first, count, out)
            np.testing.assert_array_equal(out, data[first:first + count])
        os.close(dsr.rf._fd)
    assert reads, "the compiled pread path was not used"
    # the chunks of a row block are shared out: by the calling thread and the pool's
    assert len(set(reads)) == 1 if threads == 1 else len(set(reads)) >= 2


def test_pread_tile_reads_fill_unwritten_chunks(tmp_path, monkeypatch):
    import h5py
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    shape, chunks = (6, 4, 16, 32), (3, 2, 8, 16)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    path = tmp_path / "f.h5"
    # only some tiles of the first row block are ever written
    _tiled_file(path, shape, chunks, data, written=[np.s_[0:3, 0:2, 0:8, 0:32]])
    expected = np.full(shape, 7, np.int32)
    expected[0:3, 0:2, 0:8, 0:32] = data[0:3, 0:2, 0:8, 0:32]
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["d"][:], expected)
        dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5["d"])
        for first in range(shape[0]):
            out = np.empty((1,) + shape[1:], np.int32)
            dsr.read(first, 1, out)
            np.testing.assert_array_equal(out, expected[first:first + 1])
        os.close(dsr.rf._fd)


def test_pread_tile_reads_truncated_file(tmp_path, monkeypatch):
    import h5py
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    shape, chunks = (6, 4, 16, 32), (3, 2, 8, 16)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    path = tmp_path / "f.h5"
    _tiled_file(path, shape, chunks, data)
    with h5py.File(path, "r") as h5:
        dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5["d"])
        last = max(dsr._block_locations(3)[0])
        out = np.empty((1,) + shape[1:], np.int32)
        dsr.read(0, 1, out)
        os.truncate(path, last + 10)   # cut inside the last chunk of the second block
        with pytest.raises(TruncatedFileError, match="the file is truncated"):
            dsr.read(3, 1, out)
        os.close(dsr.rf._fd)


def test_pread_tile_reads_from_two_threads_at_once(tmp_path, monkeypatch):
    """Each thread stages through its own buffer: concurrent reads of one dataset stay
    exact without a lock around the file reads."""
    import h5py
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    shape, chunks = (9, 4, 16, 32), (3, 2, 8, 16)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    path = tmp_path / "f.h5"
    _tiled_file(path, shape, chunks, data)
    errors = []
    with h5py.File(path, "r") as h5:
        dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5["d"])
        dsr.rf.fd()   # open the file descriptor before the threads share it

        def reader(rows):
            out = np.empty((1,) + shape[1:], np.int32)
            try:
                for _ in range(50):
                    for r in rows:
                        dsr.read(r, 1, out)
                        if not np.array_equal(out[0], data[r]):
                            errors.append(r)
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(rows,))
                   for rows in (range(0, 9, 2), range(1, 9, 2))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        os.close(dsr.rf._fd)
    assert errors == []


def _write_layout(path, layout, shape, chunks, data):
    """Two datasets ``a`` and ``b`` (``b`` = ``a`` + 1) with the same chunks, written so
    that the chunks of a train lie in one span of the file (``train-order``), alternate
    between the datasets (``interleaved``: every other chunk of the file is ``b``'s),
    or lie in reverse train order with each row's tiles written last to first
    (``reverse``: descending offsets, 4-d shapes only)."""
    import h5py
    with h5py.File(path, "w") as f:
        a = f.create_dataset("a", shape, data.dtype, chunks=chunks)
        b = f.create_dataset("b", shape, data.dtype, chunks=chunks)
        if layout == "train-order":
            for r in range(shape[0]):
                a[r] = data[r]
                b[r] = data[r] + 1
            return
        tiles = [(c, y, x) for c in range(shape[1]) for y in range(0, shape[2], chunks[2])
                 for x in range(0, shape[3], chunks[3])]
        rows = range(shape[0])
        if layout == "reverse":
            rows, tiles = reversed(rows), tiles[::-1]
        for r in rows:
            for c, y, x in tiles:   # stored at once (no chunk cache deciding the order)
                tile = np.ascontiguousarray(data[r, c, y:y + chunks[2], x:x + chunks[3]])
                a.id.write_direct_chunk((r, c, y, x), tile.tobytes())
                if layout == "interleaved":
                    b.id.write_direct_chunk((r, c, y, x), (tile + 1).tobytes())
        if layout == "reverse":
            b[:] = data + 1


@pytest.mark.parametrize("layout", ["train-order", "interleaved", "reverse"])
@pytest.mark.parametrize("chunk_kib", [2, 16])
def test_tile_reads_coalesce_adjacent_chunks(tmp_path, monkeypatch, layout, chunk_kib):
    """One chunk per train and tile: chunks adjacent in the file are read by one pread
    of their span, also when stored in reverse order (read in the order of their
    offsets); chunks apart (another dataset's chunk between, larger than the gap limit)
    one by one; every value equals h5py either way."""
    import h5py
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    monkeypatch.setattr(dataset_mod, "READ_THREADS", 1)
    ty, tx = (32, 32) if chunk_kib == 2 else (64, 128)     # tile of int16
    shape, chunks = (5, 2, 128, 256), (1, 1, ty, tx)
    data = np.random.default_rng(5).integers(-999, 999, shape).astype(np.int16)
    path = tmp_path / "f.h5"
    _write_layout(path, layout, shape, chunks, data)
    counts = np.zeros(3, np.int64)
    real = dataset_mod._chunkio.read_tiles
    monkeypatch.setattr(dataset_mod._chunkio, "read_tiles",
                        lambda *a: real(*a, counts=counts))
    ntiles = 2 * (128 // ty) * (256 // tx)
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["a"][:], data)
        for name, expect in (("a", data), ("b", data + 1)):
            dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5[name])
            assert dsr.mode == "tiles"
            for first in (0, 3, 4):
                counts[:] = 0
                out = np.zeros((1,) + shape[1:], np.int16)
                dsr.read(first, 1, out)
                np.testing.assert_array_equal(out, expect[first:first + 1])
                assert counts[2] <= max(dataset_mod.COALESCE_SPAN_BYTES, chunk_kib << 10)
                gap = chunk_kib << 10        # interleaved: one chunk of the other dataset
                if layout == "reverse" and name == "a":
                    assert dsr._block_locations(first)[2] is not None   # reordered
                if layout != "interleaved" or gap <= dataset_mod.COALESCE_GAP_BYTES:
                    assert counts[0] < ntiles          # spans
                    assert counts[1] <= 2 * ntiles * (chunk_kib << 10)
                elif name == "a":                      # apart: one read per chunk
                    assert counts[0] == ntiles
            os.close(dsr.rf._fd)
            dsr.rf._fd = None
        # the same reads with coalescing off: one read per chunk, same values
        monkeypatch.setattr(dataset_mod, "COALESCE_SPAN_BYTES", 0)
        dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5["a"])
        counts[:] = 0
        out = np.zeros((1,) + shape[1:], np.int16)
        dsr.read(2, 1, out)
        np.testing.assert_array_equal(out, data[2:3])
        assert counts[0] == ntiles
        os.close(dsr.rf._fd)


def test_tile_reads_coalesced_truncated_file(tmp_path, monkeypatch):
    """A file cut inside a span of adjacent chunks: the typed error, naming the file."""
    import h5py
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    shape, chunks = (4, 2, 128, 256), (1, 1, 32, 32)
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    path = tmp_path / "f.h5"
    _write_layout(path, "train-order", shape, chunks, data)
    with h5py.File(path, "r") as h5:
        dsr = dataset_mod._Dataset(_FakeRunFile(h5, path), h5["a"])
        addrs = np.sort(dsr._block_locations(3)[0])
        out = np.empty((1,) + shape[1:], np.int32)
        dsr.read(3, 1, out)
        np.testing.assert_array_equal(out, data[3:4])
        os.truncate(path, int(addrs[len(addrs) // 2]) + 100)   # mid-span
        with pytest.raises(TruncatedFileError, match="the file is truncated") as info:
            dsr.read(3, 1, out)
        assert str(path) in str(info.value)
        os.close(dsr.rf._fd)
