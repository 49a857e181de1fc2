"""Write a small but realistic European XFEL run with our own HDF5 writer.

The run mimics a JUNGFRAU 4M (``SPB_IRDA_JF4M``) raw run as the DAQ writes it
(file layout: ``docs/run-files.md``, sections 2, 3 and 7):

- ``RAW-R<run>-JNGFR0<n>-S<seq>.h5`` for modules 1..8: instrument source
  ``SPB_IRDA_JF4M/DET/JNGFR0<n>:daqOutput`` with ``data.adc`` (uint16, one
  (cells, slow, fast) block per train), ``data.gain`` (uint8), ``data.mask``
  (uint8), ``data.frameNumber`` (uint64), ``data.memoryCell`` (uint8),
  ``data.timestamp`` (float64) and ``data.trainId``;
- ``RAW-R<run>-DA01-S<seq>.h5``: motors ``SPB_IRDA_JF4M/MOTOR/{X,Y}`` in
  CONTROL and RUN (positions, a string ``state``), and an XGM-like device
  ``SPB_XTD9_XGM/DOOCS/MAIN`` (control keys plus ``:output`` pipeline data).

Each aggregator is split into several sequence files, at different trains for
modules and DA01, as the DAQ does.  With ``missing=True`` module 8 has no data
for the second train and the XGM pipeline none for the third, so that
"require all" selections drop trains.

Sizes: a full-size module-train is 16 MiB of ``adc`` (+ 8 MiB each of
``gain`` and ``mask`` when ``gain_mask=True``); a JF4M train 128 MiB of adc.
Tests use ``frame_shape=(16, 64, 128)`` and a few trains.
"""

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["make_demo_run", "progress_display", "JF4M_SOURCES", "main"]

log = logging.getLogger(__name__)

DETECTOR = "SPB_IRDA_JF4M"
JF4M_SOURCES = [f"{DETECTOR}/DET/JNGFR{n:02d}:daqOutput" for n in range(1, 9)]
MOTORS = [f"{DETECTOR}/MOTOR/X", f"{DETECTOR}/MOTOR/Y"]
XGM = "SPB_XTD9_XGM/DOOCS/MAIN"
XGM_OUTPUT = XGM + ":output"
CHUNKINGS = ("train", "small", "contiguous", "gzip")
_T0_NS = 1_700_000_000_000_000_000  # 2023-11-14, any fixed epoch will do


def _str_dtype():
    import h5py

    return h5py.string_dtype("utf-8")


def _write_metadata(f, sources, fmt, proposal, run, seq):
    """METADATA group: sources as (root, deviceId), run description."""
    sdt = _str_dtype()
    roots = [s.split("/", 1)[0] for s in sources]
    devices = [s.split("/", 1)[1] for s in sources]
    if fmt == "0.5":
        g = f.create_group("METADATA")
    else:
        m = f.create_group("METADATA")
        g = m.create_group("dataSources")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()).encode()
        m["dataFormatVersion"] = [fmt.encode()]
        m["creationDate"] = [stamp]
        m["updateDate"] = [stamp]
        m["daqLibrary"] = [b"1.x"]
        m["karaboFramework"] = [b"2.x"]
        m["proposalNumber"] = np.array([proposal], np.uint32)
        m["runNumber"] = np.array([run], np.uint32)
        m["sequenceNumber"] = np.array([seq], np.uint32)
        m["runType"] = [b"demo"]
        m["sample"] = [b"demo"]
    g.create_dataset("dataSourceId", data=np.array(sources, dtype=object), dtype=sdt)
    g.create_dataset("root", data=np.array(roots, dtype=object), dtype=sdt)
    g.create_dataset("deviceId", data=np.array(devices, dtype=object), dtype=sdt)


def _write_index(f, tids, fmt):
    f["INDEX/trainId"] = np.asarray(tids, np.uint64)
    if fmt != "0.5":
        n = len(tids)
        f["INDEX/flag"] = np.ones(n, np.int32)
        f["INDEX/timestamp"] = _train_ns(np.asarray(tids, np.uint64))
        if fmt >= "1.2":
            f["INDEX/origin"] = np.full(n, -1, np.int32)


def _train_ns(tids):
    # 10 Hz trains, as the facility runs.
    return (np.uint64(_T0_NS) + (tids.astype(np.uint64) - np.uint64(10000)) * np.uint64(100_000_000)).astype(np.uint64)


def _write_first_count(group, counts, old_form=False):
    counts = np.asarray(counts, np.uint64)
    first = np.zeros(len(counts), np.uint64)
    if len(counts):
        first[1:] = np.cumsum(counts)[:-1]
    if old_form:
        # Pre-1.0 form: first, last, status; count = (last - first + 1) * status.
        status = (counts > 0).astype(np.uint64)
        last = np.where(counts > 0, first + counts - 1, first)
        group["first"] = first
        group["last"] = last.astype(np.uint64)
        group["status"] = status
    else:
        group["first"] = first
        group["count"] = counts


def _create(group, name, shape, dtype, chunking):
    if chunking == "contiguous":
        return group.create_dataset(name, shape, dtype)
    maxshape = (None,) + tuple(shape[1:])
    if chunking == "gzip" and len(shape) > 2:
        # one chunk per frame, shuffled and deflated (as corrected detector data often are)
        return group.create_dataset(name, shape, dtype, chunks=(1, 1) + tuple(shape[2:]),
                                    maxshape=maxshape, compression="gzip",
                                    compression_opts=1, shuffle=True)
    if chunking == "train" and len(shape) > 1:
        chunks = (1,) + tuple(shape[1:])
    else:
        chunks = True
    return group.create_dataset(name, shape, dtype, chunks=chunks, maxshape=maxshape)


def _module_file(path, source, module, tids, present, frame_shape, chunking, fmt,
                 proposal, run, seq, gain_mask, base):
    import h5py

    cells = frame_shape[0]
    counts = [1 if p else 0 for p in present]
    nrows = sum(counts)
    with h5py.File(path, "w") as f:
        _write_metadata(f, [f"INSTRUMENT/{source}/data"], fmt, proposal, run, seq)
        _write_index(f, tids, fmt)
        _write_first_count(f.create_group(f"INDEX/{source}/data"), counts, old_form=fmt == "0.5")
        g = f.create_group(f"INSTRUMENT/{source}/data")
        adc = _create(g, "adc", (nrows,) + frame_shape, np.uint16, chunking)
        if gain_mask:
            gain = _create(g, "gain", (nrows,) + frame_shape, np.uint8, chunking)
            mask = _create(g, "mask", (nrows,) + frame_shape, np.uint8, chunking)
        fnum = np.zeros((nrows, cells), np.uint64)
        cell = np.zeros((nrows, cells), np.uint8)
        stamp = np.zeros((nrows, cells), np.float64)
        trains = np.zeros(nrows, np.uint64)
        # One buffer per dataset, refilled in place per train and written as it is (the
        # dataset's dtype: no conversion in HDF5).
        adc_buf = np.empty(frame_shape, np.uint16)
        if gain_mask:
            gain_base = (base >> 12).astype(np.uint8)
            gain_buf = np.empty(frame_shape, np.uint8)
            mask_frame = ((base & 0xFF) > 250).astype(np.uint8)
        row = 0
        for tid, p in zip(tids, present):
            if not p:
                continue
            k = int(tid) - 10000
            np.add(base, np.uint16((k * 17 + module) & 0xFFF), out=adc_buf)
            adc.write_direct(adc_buf, dest_sel=np.s_[row])
            if gain_mask:
                np.add(gain_base, np.uint8(k & 3), out=gain_buf)
                np.bitwise_and(gain_buf, np.uint8(3), out=gain_buf)
                gain.write_direct(gain_buf, dest_sel=np.s_[row])
                mask.write_direct(mask_frame, dest_sel=np.s_[row])
            fnum[row] = np.arange(k * cells, (k + 1) * cells)
            cell[row] = np.arange(cells - 1, -1, -1)
            stamp[row] = (_T0_NS / 1e9 + k * 0.1) + np.arange(cells) * 1e-6
            trains[row] = tid
            row += 1
        g["frameNumber"] = fnum
        g["memoryCell"] = cell
        g["timestamp"] = stamp
        g["trainId"] = trains
    return path


def _slow_file(path, tids, present_xgm, fmt, proposal, run, seq):
    import h5py

    sdt = _str_dtype()
    n = len(tids)
    tids_a = np.asarray(tids, np.uint64)
    ns = _train_ns(tids_a)
    k = tids_a.astype(np.float64) - 10000
    sources = [f"CONTROL/{m}" for m in MOTORS] + [f"CONTROL/{XGM}", f"INSTRUMENT/{XGM_OUTPUT}/data"]
    with h5py.File(path, "w") as f:
        _write_metadata(f, sources, fmt, proposal, run, seq)
        _write_index(f, tids, fmt)
        old = fmt == "0.5"
        for i, motor in enumerate(MOTORS):
            _write_first_count(f.create_group(f"INDEX/{motor}"), [1] * n, old_form=old)
            values = {
                "actualPosition": 1.5 * i + 0.01 * k,
                "encoderPosition": 1.5 * i + 0.01 * k + 1e-4,
                "targetPosition": np.full(n, 1.5 * i + 0.2),
                "stepSize": np.full(n, 10 + i, np.int32),
                "velocity": np.full(n, 0.5, np.float32),
            }
            for section in ("CONTROL", "RUN"):
                for key, v in values.items():
                    rows = v if section == "CONTROL" else v[:1]
                    f[f"{section}/{motor}/{key}/value"] = rows
                    f[f"{section}/{motor}/{key}/timestamp"] = ns[: len(rows)]
                st = np.array([b"ON"] * (n if section == "CONTROL" else 1), dtype=object)
                f.create_dataset(f"{section}/{motor}/state/value", data=st, dtype=sdt)
                f[f"{section}/{motor}/state/timestamp"] = ns[: len(st)]
        _write_first_count(f.create_group(f"INDEX/{XGM}"), [1] * n, old_form=old)
        xgm = {
            "pulseEnergy/photonFlux": (500 + 5 * k).astype(np.float32),
            "beamPosition/ixPos": (0.1 * np.sin(k)).astype(np.float32),
            "beamPosition/iyPos": (0.1 * np.cos(k)).astype(np.float32),
            "pulseEnergy/nummberOfBrunches": np.full(n, 352.0, np.float32),
            "pollingInterval": np.full(n, 10, np.int32),
        }
        for section in ("CONTROL", "RUN"):
            for key, v in xgm.items():
                rows = v if section == "CONTROL" else v[:1]
                f[f"{section}/{XGM}/{key}/value"] = rows
                f[f"{section}/{XGM}/{key}/timestamp"] = ns[: len(rows)]
        counts = [1 if p else 0 for p in present_xgm]
        _write_first_count(f.create_group(f"INDEX/{XGM_OUTPUT}/data"), counts, old_form=old)
        rows = [j for j, p in enumerate(present_xgm) if p]
        g = f.create_group(f"INSTRUMENT/{XGM_OUTPUT}/data")
        ramp = np.linspace(0, 1, 1000, dtype=np.float32)
        g["intensityTD"] = np.array([ramp * (100 + j) for j in rows], np.float32).reshape(len(rows), 1000)
        g["xTD"] = np.array([ramp * 0.01 * j for j in rows], np.float32).reshape(len(rows), 1000)
        g["trainId"] = tids_a[rows]
    return path


def make_demo_run(directory, ntrains=10, *, frame_shape=(16, 512, 1024), modules=8,
                  chunking="train", trains_per_file=None, first_train=10000,
                  proposal=700000, run=12, format_version="1.0", gain_mask=True,
                  missing=False, layout="run", cycle="202501", seed=0, progress=None):
    """Write a demo JF4M run and return its run directory.

    Parameters
    ----------
    directory : str or path
        With ``layout='run'``, the run directory itself (created if needed);
        with ``layout='facility'``, the data root under which
        ``SPB/<cycle>/p<proposal>/raw/r<run>`` is created (set
        ``EXTRA_DATA_DATA_ROOT`` to it to find the run by number).
    ntrains : int
        Number of trains, ids ``first_train ...``.
    frame_shape : tuple of 3 ints
        (memory cells, slow, fast) of one module-train; (16, 512, 1024) is a
        real JUNGFRAU module (16 MiB of uint16 per train).
    modules : int
        Number of JUNGFRAU modules, 1..8.
    chunking : {'train', 'small', 'contiguous', 'gzip'}
        HDF5 layout of the frame datasets: one chunk per train, h5py's
        automatic (small) chunks, contiguous storage, or one chunk per frame
        with the shuffle filter and deflate (gzip level 1).
    trains_per_file : int, optional
        Trains per sequence file of the module files (default: about a third
        of the run, so there are several sequence files); DA01 files split
        at 1.5 times that.
    format_version : str
        ``'0.5'`` (old METADATA and ``first/last/status`` index), ``'1.0'``,
        ``'1.1'`` or ``'1.2'``.
    gain_mask : bool
        Also write ``data.gain`` and ``data.mask`` (uint8 frames).
    missing : bool
        Leave out module 8's second train and the XGM output's third train.
    progress : callable, optional
        Called as ``progress(done, total)`` after each file written.

    Returns
    -------
    pathlib.Path
        The run directory.
    """
    if chunking not in CHUNKINGS:
        raise ValueError(f"chunking must be one of {CHUNKINGS}, not {chunking!r}")
    if not 1 <= modules <= 8:
        raise ValueError(f"modules must be 1..8, not {modules}")
    frame_shape = tuple(int(x) for x in frame_shape)
    if len(frame_shape) != 3:
        raise ValueError(f"frame_shape must have 3 dimensions, not {frame_shape}")
    directory = Path(directory)
    if layout == "facility":
        rundir = directory / "SPB" / cycle / f"p{int(proposal):06d}" / "raw" / f"r{int(run):04d}"
    elif layout == "run":
        rundir = directory
    else:
        raise ValueError(f"layout must be 'run' or 'facility', not {layout!r}")
    rundir.mkdir(parents=True, exist_ok=True)
    per_file = trains_per_file or max(1, -(-ntrains // 3))
    slow_per_file = max(1, (per_file * 3) // 2)
    tids = list(range(first_train, first_train + ntrains))
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2 ** 14, frame_shape, dtype=np.uint16)
    t0 = time.perf_counter()
    module_seqs = list(enumerate(range(0, ntrains, per_file)))
    slow_seqs = list(enumerate(range(0, ntrains, slow_per_file)))
    nfiles, done = modules * len(module_seqs) + len(slow_seqs), 0
    for m in range(1, modules + 1):
        source = f"{DETECTOR}/DET/JNGFR{m:02d}:daqOutput"
        for seq, start in module_seqs:
            part = tids[start:start + per_file]
            present = [not (missing and m == 8 and t == first_train + 1) for t in part]
            path = rundir / f"RAW-R{int(run):04d}-JNGFR{m:02d}-S{seq:05d}.h5"
            _module_file(path, source, m, part, present, frame_shape, chunking,
                         format_version, proposal, run, seq, gain_mask, base)
            done += 1
            if progress is not None:
                progress(done, nfiles)
    for seq, start in slow_seqs:
        part = tids[start:start + slow_per_file]
        present = [not (missing and t == first_train + 2) for t in part]
        path = rundir / f"RAW-R{int(run):04d}-DA01-S{seq:05d}.h5"
        _slow_file(path, part, present, format_version, proposal, run, seq)
        done += 1
        if progress is not None:
            progress(done, nfiles)
    log.info("wrote demo run %s (%d trains) in %.1f s", rundir, ntrains,
             time.perf_counter() - t0)
    return rundir


def progress_display(stream=None, interval=0.5):
    """A ``progress`` callable for :func:`make_demo_run` drawing on ``stream`` (stderr): a
    rich bar on a terminal, one plain line per ``interval`` in a log; call its
    ``close()`` when done."""
    from .._display import ProgressLine

    line = ProgressLine("writing demo run", None, stream, interval)

    def progress(done, total):
        line.total = total
        if done == total:
            line.close(done, f"{done}/{total} files")
        elif line.due():
            line.draw(done, f"{done}/{total} files")

    progress.close = line.close
    return progress


def _shape(text):
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CELLS,SLOW,FAST, not {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected 3 positive sizes, not {text!r}")
    return shape


def main(argv=None):
    """``kbstream make-demo-run DIR``: write a demo run; returns the exit status."""
    ap = argparse.ArgumentParser(prog="kbstream make-demo-run",
                                 description="Write a small but realistic JUNGFRAU 4M run.")
    ap.add_argument("dir", help="run directory to create (or data root with --facility-layout)")
    ap.add_argument("--trains", type=int, default=10, help="number of trains (default 10)")
    ap.add_argument("--frame-shape", type=_shape, default=(16, 512, 1024),
                    help="CELLS,SLOW,FAST of a module-train (default 16,512,1024)")
    ap.add_argument("--modules", type=int, default=8, choices=range(1, 9), metavar="1..8")
    ap.add_argument("--chunking", choices=CHUNKINGS, default="train",
                    help="one chunk per train (default), h5py's small chunks, contiguous, "
                         "or one shuffled+deflated chunk per frame (gzip)")
    ap.add_argument("--trains-per-file", type=int, default=None)
    ap.add_argument("--no-gain-mask", action="store_true", help="write data.adc frames only")
    ap.add_argument("--format-version", default="1.0", choices=["0.5", "1.0", "1.1", "1.2"])
    ap.add_argument("--facility-layout", action="store_true",
                    help="create <DIR>/SPB/202501/p700000/raw/r0012 (use with EXTRA_DATA_DATA_ROOT)")
    ap.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    progress = None if args.no_progress else progress_display()
    try:
        rundir = make_demo_run(args.dir, args.trains, frame_shape=args.frame_shape,
                               modules=args.modules, chunking=args.chunking,
                               trains_per_file=args.trains_per_file,
                               gain_mask=not args.no_gain_mask,
                               format_version=args.format_version,
                               layout="facility" if args.facility_layout else "run",
                               progress=progress)
    finally:
        if progress is not None:
            progress.close()
    size = sum(p.stat().st_size for p in Path(rundir).glob("*.h5"))
    print(f"Demo run written to {os.fspath(rundir)} ({size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
