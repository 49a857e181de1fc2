"""Compressed datasets: every value equals h5py's own read, for every filter combination;
damaged compressed chunks are skipped and said, never a crash or a signal.

Deflate (gzip) with or without the shuffle filter is decoded by kbstream itself
(``filtered`` mode: raw chunk bytes, ``zlib`` and the compiled core, in parallel);
every other filter (bitshuffle/LZ4, LZ4, Blosc, Zstd through hdf5plugin; fletcher32)
is read through h5py, with one warning per filter combination.
"""

import logging
import os
import subprocess
import sys
import textwrap
import threading
import zlib

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
import hdf5plugin  # noqa: E402  (the test extra installs it)

from kbstream.replay import RunFileError, RunReader, TruncatedFileError  # noqa: E402
from kbstream.replay import dataset as dataset_mod  # noqa: E402
from kbstream.replay.demo import make_demo_run  # noqa: E402
from kbstream.replay.runfile import RunFile  # noqa: E402

FILTERS = {
    "gzip": dict(compression="gzip", compression_opts=4),
    "shuffle+gzip": dict(compression="gzip", compression_opts=1, shuffle=True),
    "shuffle": dict(shuffle=True),
    "gzip+fletcher32": dict(compression="gzip", fletcher32=True),
    "bitshuffle-lz4": dict(hdf5plugin.Bitshuffle(cname="lz4")),
    "lz4": dict(hdf5plugin.LZ4()),
    "blosc-lz4-shuffle": dict(hdf5plugin.Blosc(cname="lz4", shuffle=hdf5plugin.Blosc.SHUFFLE)),
    "blosc-zstd-bitshuffle": dict(hdf5plugin.Blosc(cname="zstd", clevel=5,
                                                   shuffle=hdf5plugin.Blosc.BITSHUFFLE)),
    "blosc-blosclz-noshuffle": dict(hdf5plugin.Blosc(cname="blosclz",
                                                     shuffle=hdf5plugin.Blosc.NOSHUFFLE)),
    "zstd": dict(hdf5plugin.Zstd()),
}
NATIVE = {"gzip", "shuffle+gzip", "shuffle"}

LAYOUTS = [
    ((7, 5, 17, 30), (3, 2, 8, 16)),   # several rows per chunk, cropped edge chunks
    ((6, 4, 16, 32), (1, 1, 16, 32)),  # one chunk per frame
    ((9, 40), (4, 8)),                 # 1-d entries
    ((300,), (64,)),                   # rows of scalars
]
DTYPES = [np.uint16, np.float32, np.int64, np.uint8]


class _File:
    """The part of a RunFile a dataset reader uses."""

    def __init__(self, h5, path):
        self.h5, self.path, self._fd = h5, str(path), None

    fd = RunFile.fd

    def close(self):
        if self._fd is not None:
            os.close(self._fd)


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    base = np.arange(np.prod(shape)).reshape(shape) % 251 + rng.integers(0, 4, shape)
    return (base * (1.5 if np.dtype(dtype).kind == "f" else 1)).astype(dtype)


def _write(path, shape, chunks, dtype, opts, data, written=None, fillvalue=None):
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("d", shape, dtype, chunks=chunks, fillvalue=fillvalue, **opts)
        if written is None:
            ds[...] = data
        else:
            for sl in written:
                ds[sl] = data[sl]


def _ranges(n):
    return [(0, 1), (1, 1), (2, 1), (3, 1), (2, 3), (0, n), (n - 1, 1)] + \
        [(r, 1) for r in range(n)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape, chunks", LAYOUTS, ids=lambda x: "x".join(map(str, x)))
@pytest.mark.parametrize("filters", list(FILTERS))
def test_every_value_equals_h5py(tmp_path, monkeypatch, filters, shape, chunks, dtype):
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    data = _data(shape, dtype)
    path = tmp_path / "f.h5"
    _write(path, shape, chunks, dtype, FILTERS[filters], data)
    with h5py.File(path, "r") as h5:
        rf = _File(h5, path)
        dsr = dataset_mod._Dataset(rf, h5["d"])
        assert dsr.mode == ("filtered" if filters in NATIVE else "h5py")
        n = shape[0]
        for first, count in _ranges(n):
            out = np.full((count,) + shape[1:], 99, dtype)
            dsr.read(first, count, out)
            np.testing.assert_array_equal(out, h5["d"][first:first + count])
            np.testing.assert_array_equal(out, data[first:first + count])
        rf.close()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("keep", [True, False], ids=["block-kept", "block-decoded-per-read"])
def test_deflate_chunks_spread_over_threads_and_unwritten_chunks(tmp_path, monkeypatch,
                                                                 threads, keep):
    """The chunks of a row block decoded by 1 or 3 threads, the decoded block kept for the
    following rows or decoded again per read; chunks never written read as the fill
    value."""
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    monkeypatch.setattr(dataset_mod, "READ_THREADS", threads)
    if not keep:
        monkeypatch.setattr(dataset_mod, "DECODED_BLOCK_BYTES", 0)
    shape, chunks = (9, 4, 16, 32), (3, 2, 8, 16)
    data = _data(shape, np.int32)
    path = tmp_path / "f.h5"
    _write(path, shape, chunks, np.int32, FILTERS["shuffle+gzip"], data,
           written=[np.s_[0:3, 0:2, 0:8, :], np.s_[6:9]], fillvalue=7)
    decodes = []
    real = dataset_mod._Dataset._decode
    monkeypatch.setattr(dataset_mod._Dataset, "_decode", lambda self, loc: (
        decodes.append((loc[0], threading.get_ident())), real(self, loc))[1])
    with h5py.File(path, "r") as h5:
        expect = h5["d"][:]
        assert (expect[3:6] == 7).all() and (expect[0:3, 2:] == 7).all()
        rf = _File(h5, path)
        dsr = dataset_mod._Dataset(rf, h5["d"])
        for r in range(shape[0]):
            out = np.empty((1,) + shape[1:], np.int32)
            dsr.read(r, 1, out)
            np.testing.assert_array_equal(out[0], expect[r])
        rf.close()
    written_chunks = 2 + 8  # block 0: 2 chunks written, block 6: all 8
    assert len(decodes) == (written_chunks if keep else 3 * written_chunks)
    # one thread, or the calling thread and the pool's sharing the chunks of a block
    idents = {ident for _, ident in decodes}
    assert len(idents) == 1 if threads == 1 else len(idents) >= 2


def test_demo_run_gzip_layout_equals_h5py(tmp_path, monkeypatch):
    """A whole run in the gzip layout (one shuffled+deflated chunk per frame), read train
    by train into reused slots, equals h5py."""
    from kbstream.replay.slots import Slot
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    d = make_demo_run(tmp_path / "run", 6, frame_shape=(4, 32, 64), modules=2,
                      chunking="gzip", gain_mask=True)
    src = "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"
    keys = ["data.adc", "data.gain", "data.mask"]
    with RunReader(sorted(d.glob("*.h5"))) as r:
        slot = Slot(0)
        for tid in r.train_ids:
            got = r.read_train(tid, {src: keys}, slot)
            rf, pos = r._where(src, tid)
            for k in keys:
                ds = rf.h5[f"INSTRUMENT/{src}/{k.replace('.', '/')}"]
                assert rf.dataset(src, k).mode == "filtered"
                np.testing.assert_array_equal(got.data[src][k], ds[pos])


def test_other_filters_said_once(tmp_path, monkeypatch, caplog):
    """Filters decoded by HDF5 (serially) are said once per filter combination."""
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    monkeypatch.setattr(dataset_mod, "_reported_filters", set())
    shape, chunks = (6, 4, 16, 32), (1, 1, 16, 32)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        for name in ("a", "b"):
            f.create_dataset(name, data=_data(shape, np.uint16), chunks=chunks,
                             **FILTERS["bitshuffle-lz4"])
        f.create_dataset("c", data=_data(shape, np.uint16), chunks=chunks, **FILTERS["lz4"])
    with caplog.at_level(logging.WARNING, logger="kbstream.replay.dataset"):
        with h5py.File(path, "r") as h5:
            rf = _File(h5, path)
            for name in ("a", "b", "c", "a"):
                assert dataset_mod._Dataset(rf, h5[name]).mode == "h5py"
            rf.close()
    said = [r.getMessage() for r in caplog.records if "decoded by HDF5" in r.getMessage()]
    assert len(said) == 2, said
    assert "bitshuffle" in said[0] and "/a" in said[0] and "lz4" in said[1]


# -- damaged compressed chunks ----------------------------------------------------------

SHAPE, CHUNKS = (6, 4, 16, 32), (2, 4, 16, 32)  # row blocks 0-1, 2-3, 4-5; one chunk each


def _damaged(tmp_path, payload, filters="shuffle+gzip"):
    """A file whose row block 2 (rows 2, 3) has ``payload`` as its stored chunk bytes."""
    data = _data(SHAPE, np.uint16)
    path = tmp_path / "f.h5"
    _write(path, SHAPE, CHUNKS, np.uint16, FILTERS[filters], data)
    with h5py.File(path, "r+") as f:
        f["d"].id.write_direct_chunk((2, 0, 0, 0), payload)
    return path, data


def _chunk_bytes():
    return int(np.prod(CHUNKS)) * 2


def _good_stream():
    return zlib.compress(bytes(_chunk_bytes()), 1)


@pytest.mark.parametrize("payload, match", [
    (b"this is not a deflate stream" * 10, "does not decode"),
    (_good_stream()[:20], "incomplete"),
    (zlib.compress(bytes(_chunk_bytes() // 2)), f"decodes to {_chunk_bytes() // 2} bytes"),
    (zlib.compress(bytes(_chunk_bytes() * 64)), "decodes to more than"),
    (b"\x78", "does not decode|incomplete"),
], ids=["garbage", "truncated-stream", "too-short", "inflates-too-far", "one-byte"])
def test_damaged_deflate_chunk_is_a_typed_error_for_its_rows_only(tmp_path, monkeypatch,
                                                                   payload, match):
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    path, data = _damaged(tmp_path, payload)
    with h5py.File(path, "r") as h5:
        rf = _File(h5, path)
        dsr = dataset_mod._Dataset(rf, h5["d"])
        assert dsr.mode == "filtered"
        out = np.empty((1,) + SHAPE[1:], np.uint16)
        for r in (0, 1, 4, 5):
            dsr.read(r, 1, out)
            np.testing.assert_array_equal(out[0], data[r])
        for r in (2, 3):
            with pytest.raises(RunFileError, match=match) as e:
                dsr.read(r, 1, out)
            assert str(path) in str(e.value) and "/d" in str(e.value)
        rf.close()


def test_decoding_allocates_at_most_one_chunk(tmp_path, monkeypatch):
    """A stream that would inflate to 64 chunks is cut after one chunk + 1 byte."""
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    path, _ = _damaged(tmp_path, zlib.compress(bytes(_chunk_bytes() * 64)))
    asked = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self):
            self.d = real()
            self.eof = False

        def decompress(self, data, max_length=0):
            asked.append(max_length)
            out = self.d.decompress(data, max_length)
            self.eof = self.d.eof
            return out

    monkeypatch.setattr(dataset_mod.zlib, "decompressobj", Counting)
    with h5py.File(path, "r") as h5:
        rf = _File(h5, path)
        dsr = dataset_mod._Dataset(rf, h5["d"])
        with pytest.raises(RunFileError, match="more than"):
            dsr.read(2, 1, np.empty((1,) + SHAPE[1:], np.uint16))
        rf.close()
    assert asked == [_chunk_bytes() + 1]


def test_chunk_index_claiming_a_huge_size_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    path, _ = _damaged(tmp_path, _good_stream())
    reads = []
    real = os.pread
    monkeypatch.setattr(dataset_mod.os, "pread", lambda *a: (reads.append(a[1]), real(*a))[1])
    with h5py.File(path, "r") as h5:
        rf = _File(h5, path)
        dsr = dataset_mod._Dataset(rf, h5["d"])
        with pytest.raises(RunFileError, match="chunk index is damaged"):
            dsr._decode((4096, 1 << 40, 0))
        rf.close()
    assert reads == []


def test_file_truncated_inside_a_compressed_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    data = _data(SHAPE, np.uint16)
    path = tmp_path / "f.h5"
    _write(path, SHAPE, CHUNKS, np.uint16, FILTERS["gzip"], data)
    with h5py.File(path, "r") as h5:
        info = h5["d"].id.get_chunk_info_by_coord((4, 0, 0, 0))
        rf = _File(h5, path)
        dsr = dataset_mod._Dataset(rf, h5["d"])
        out = np.empty((1,) + SHAPE[1:], np.uint16)
        dsr.read(0, 1, out)
        os.truncate(path, info.byte_offset + info.size // 2)
        with pytest.raises(TruncatedFileError, match="the file is truncated"):
            dsr.read(4, 1, out)
        rf.close()


_SERVE_DAMAGED = """
import sys
from kbstream.replay import dataset
dataset.SMALL_DATASET_BYTES = 0
from kbstream.replay.cli import serve_files_main
sys.exit(serve_files_main(sys.argv[1:]))
"""


@pytest.mark.parametrize("filters", ["shuffle+gzip", "bitshuffle-lz4", "blosc-lz4-shuffle",
                                     "lz4", "zstd"])
def test_server_skips_and_says_damaged_chunks(tmp_path, filters):
    """A run whose module 1 has one damaged compressed chunk (garbage bytes, train 10002):
    the server (its own process) sends every other train exactly, skips that one with a
    message naming file, source and train, and ends normally (never by a signal) -- for
    the filters kbstream decodes and for those HDF5's plugins decode."""
    karabo_bridge = pytest.importorskip("karabo_bridge")
    import signal
    import time
    d = make_demo_run(tmp_path / "run", 6, frame_shape=(4, 32, 64), modules=1,
                      chunking="train", gain_mask=False, trains_per_file=6)
    src = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
    path = d / "RAW-R0012-JNGFR01-S00000.h5"
    name = f"INSTRUMENT/{src}/data/adc"
    with h5py.File(path, "r+") as f:
        adc = f[name][:]
        del f[name]
        ds = f.create_dataset(name, data=adc, chunks=(1,) + adc.shape[1:],
                              **FILTERS[filters])
        ds.id.write_direct_chunk((2, 0, 0, 0), bytes(range(256)) * 8)
    ep = f"ipc://{tmp_path}/bridge"
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_DAMAGED, str(d), ep, "--include",
                             f"{src}[data.adc]", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got = {}
    client = karabo_bridge.Client(ep, timeout=0.5)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None:
            try:
                data, meta = client.next()
            except TimeoutError:
                continue
            got[meta[src]["timestamp.tid"]] = data[src]["data.adc"]
    finally:
        client.__exit__(None, None, None)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    rc = proc.returncode
    assert rc >= 0, f"the server died by signal {signal.Signals(-rc).name}: {err[-3000:]}"
    assert rc == 0, err[-3000:]
    assert sorted(got) == [10000, 10001, 10003, 10004, 10005], err[-3000:]
    for tid, value in got.items():
        np.testing.assert_array_equal(value, adc[tid - 10000])
    assert f"skipped train 10002: {src} data.adc: {path}" in err, err[-3000:]
    assert "Skipped 1 train" in out and "unreadable data: 1" in out, out


# -- memory: bounded by the prefetch depth (RSS of a child process) ---------------------

_MEMORY = textwrap.dedent("""
    import json, sys
    import numpy as np
    from kbstream.replay import RunReader, Prefetcher, dataset
    from kbstream.replay.runs import run_files
    dataset.SMALL_DATASET_BYTES = 0

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    rundir, depth = sys.argv[1], int(sys.argv[2])
    r = RunReader(run_files(rundir))
    sel = {s: ["data.adc"] for s in sorted(r.instrument_sources) if "JNGFR" in s}
    trains = [(t, t) for t in r.train_ids]
    # warm up: imports, thread pool, one train read and dropped
    with Prefetcher(r, sel, trains[:1], depth=0) as pf:
        for item in pf:
            pf.release(item)
    base = status("VmRSS")
    n = 0
    with Prefetcher(r, sel, trains, depth=depth) as pf:
        for item in pf:
            assert item.error is None, item.error
            n += 1
            pf.release(item)
    print(json.dumps({"base": base, "hwm": status("VmHWM"), "trains": n}))
""")


@pytest.mark.parametrize("chunking", ["small", "gzip"])
def test_memory_bounded_by_prefetch_depth(tmp_path, chunking):
    """Reading a 24-train run of 4 MiB module-trains (16 MiB trains) with ``--prefetch
    2`` peaks at the 3 slots (depth + 1 trains), a staging buffer or decoded chunk per
    read thread and, for compressed blocks of several rows, one decoded block per
    dataset (4 modules x 2 rows here): far below the 24 trains of the run."""
    import json
    frame = (16, 256, 512)
    d = make_demo_run(tmp_path / "run", 24, frame_shape=frame, modules=4,
                      chunking=chunking, gain_mask=False)
    if chunking == "gzip":  # blocks of 2 rows: the kept decoded block counts too
        for p in d.glob("*JNGFR*.h5"):
            with h5py.File(p, "r+") as f:
                src = next(iter(f["INSTRUMENT/SPB_IRDA_JF4M/DET"].keys()))
                g = f[f"INSTRUMENT/SPB_IRDA_JF4M/DET/{src}/data"]
                adc = g["adc"][:]
                del g["adc"]
                g.create_dataset("adc", data=adc, chunks=(2, 1) + frame[1:],
                                 **FILTERS["shuffle+gzip"])
    train = 4 * 2 * int(np.prod(frame))
    out = subprocess.run([sys.executable, "-c", _MEMORY, str(d), "2"], capture_output=True,
                         text=True, timeout=600,
                         env=dict(os.environ, PYTHONDEVMODE="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["trains"] == 24
    bound = 3 * train + (4 * 2 * train // 4 if chunking == "gzip" else 0) + (48 << 20)
    grown = res["hwm"] - res["base"]
    assert grown < bound, (grown / train, bound / train)
    assert grown < 24 * train / 3
