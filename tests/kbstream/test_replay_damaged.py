"""Damaged run files: the server never dies, skips what it cannot send, and says so.

The run: 12 trains, two JUNGFRAU modules, each module in 3 sequence files of 4 trains
(``RAW-R0012-JNGFR0<m>-S0000<s>.h5``), plus the slow-data files.  The server is
``karabo-bridge-serve-files`` in a process of its own (its return code must not be
negative: no signal), the client a real ``karabo_bridge.Client``.  Every frame dataset is
read directly from the file (as a full-size run's are), not from a small in-memory copy.

What is sent for each kind of damage is written down in ``docs/run-files.md``, section 8.
"""

import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

karabo_bridge = pytest.importorskip("karabo_bridge")
h5py = pytest.importorskip("h5py")

from kbstream.replay import dataset as dataset_mod  # noqa: E402
from kbstream.replay import serve  # noqa: E402
from kbstream.replay.demo import make_demo_run  # noqa: E402
from kbstream.replay.reader import RunReader  # noqa: E402
from kbstream.replay.runs import run_files  # noqa: E402
from kbstream.replay.select import select_sources  # noqa: E402

SRC1 = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
SRC2 = "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"
FRAME = (8, 64, 128)  # 128 KiB of adc a train: sent zero-copy from the read buffers
TIDS = list(range(10000, 10012))

_SERVER = """
import sys
from kbstream.replay import dataset
dataset.SMALL_DATASET_BYTES = 0  # frames read from the file directly, as a real run's
from kbstream.replay.cli import serve_files_main
sys.exit(serve_files_main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_demo_run(tmp_path_factory.mktemp("pristine") / "r0012", 12, frame_shape=FRAME,
                         modules=2, trains_per_file=4, gain_mask=False)


@pytest.fixture
def rundir(pristine, tmp_path):
    d = tmp_path / "r0012"
    shutil.copytree(pristine, d)
    return d


def seqfile(d, module, seq):
    return d / f"RAW-R0012-JNGFR{module:02d}-S{seq:05d}.h5"


def expected_adc(pristine, module):
    """{train id: adc} as written."""
    out = {}
    for seq in range(3):
        with h5py.File(seqfile(pristine, module, seq), "r") as f:
            tids = f["INDEX/trainId"][:].tolist()
            adc = f[f"INSTRUMENT/SPB_IRDA_JF4M/DET/JNGFR{module:02d}:daqOutput/data/adc"][:]
            out.update(zip(tids, adc))
    return out


class Server:
    """serve-files in its own process; ``receive()`` takes trains until it exits."""

    def __init__(self, tmp_path, argv):
        self.ep = f"ipc://{tmp_path}/bridge"
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, *argv[:1], self.ep,
                                      *argv[1:], "--no-progress"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.client = karabo_bridge.Client(self.ep, timeout=0.5)

    def next(self, deadline=60):
        """The next train, or None once the server has ended."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                return self.client.next()
            except TimeoutError:
                if self.proc.poll() is not None:
                    return None
        raise AssertionError("no train and no end of the server within the deadline")

    def receive(self, limit=None):
        got = []
        while limit is None or len(got) < limit:
            t = self.next()
            if t is None:
                break
            got.append(t)
        return got

    def __enter__(self):
        return self

    def _close_client(self):
        if self.client is not None:
            self.client.__exit__(None, None, None)  # karabo_bridge.Client has no close()
            self.client = None

    def __exit__(self, *exc):
        self._close_client()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def finish(self):
        self._close_client()
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"the server did not end: {err[-3000:]}") from None
        rc = self.proc.returncode
        assert rc >= 0, f"the server died by signal {signal.Signals(-rc).name}: {err[-3000:]}"
        assert rc == 0, err[-3000:]
        return out, err


def tid(train):
    return next(iter(train[1].values()))["timestamp.tid"]


def skipped_in(err):
    """{train id: message} of the 'skipped train' warnings."""
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"skipped train (\d+): .*", err)}


def truncate_in_adc(path, module=1):
    """Cut ``path`` 100 bytes into the adc data of its first train."""
    with h5py.File(path, "r") as f:
        ds = f[f"INSTRUMENT/SPB_IRDA_JF4M/DET/JNGFR{module:02d}:daqOutput/data/adc"]
        offset = ds.id.get_chunk_info_by_coord((0,) * ds.ndim).byte_offset
    os.truncate(path, offset + 100)


# -- a sequence file truncated while the server reads ahead -----------------------------

def test_truncated_while_read_ahead_no_signal(rundir, pristine, tmp_path):
    """The third sequence file is cut short after the server has read its trains ahead
    (waiting to send them).  Formerly those trains were file mappings handed to libzmq,
    and sending them raised SIGBUS, which ended the server after 8 or 9 trains.  Now
    every train is either sent exactly as written, or skipped with a warning naming the
    file, source and train; the server ends normally."""
    want = expected_adc(pristine, 1)
    victim = seqfile(rundir, 1, 2)
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR01*[data.adc]"]) as s:
        got = s.receive(limit=8)  # sequence files 0 and 1
        time.sleep(0.5)  # let the reader thread run ahead into file 2 (not a timing assertion)
        truncate_in_adc(victim)
        got += s.receive()
        out, err = s.finish()
    sent = [tid(t) for t in got]
    assert sent[:8] == TIDS[:8]
    for t in got:
        np.testing.assert_array_equal(t[0][SRC1]["data.adc"], want[tid(t)])
    skipped = skipped_in(err)
    assert sorted(sent + list(skipped)) == TIDS, (sent, skipped)
    for t, message in skipped.items():
        assert SRC1 in message and str(victim) in message and "truncated" in message
    if skipped:
        assert f"Skipped {len(skipped)} train" in out and "truncated file" in out


def test_truncated_before_read_skips_its_trains_and_says_so(rundir, tmp_path):
    """Cut before the reader gets there: the 4 trains of that file are skipped, each with
    a warning naming file, source and train; the others are sent; the summary counts."""
    victim = seqfile(rundir, 1, 2)
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR01*[data.adc]", "--prefetch", "1"]) as s:
        got = s.receive(limit=2)
        truncate_in_adc(victim)
        got += s.receive()
        out, err = s.finish()
    assert [tid(t) for t in got] == TIDS[:8]
    skipped = skipped_in(err)
    assert sorted(skipped) == TIDS[8:]
    for t, message in skipped.items():
        assert f"skipped train {t}: {SRC1} data.adc: {victim}" in message, message
        assert "the file is truncated" in message
    assert "Skipped 4 trains (truncated file: 4)" in out


def test_files_are_never_mapped(rundir, monkeypatch):
    """No read maps a file: a mapping of a file truncated meanwhile raises SIGBUS when
    touched, so there must be none, on any path (rows, tiles, memory)."""
    import mmap

    def no_mapping(*a, **kw):
        raise AssertionError("a run file was mapped")

    monkeypatch.setattr(mmap, "mmap", no_mapping)
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    for chunking in ("train", "small", "contiguous"):
        d = make_demo_run(rundir.parent / chunking, 3, frame_shape=FRAME, modules=1,
                          chunking=chunking, gain_mask=False)
        with RunReader(run_files(d)) as r:
            sel = select_sources(r)
            for t in r.train_ids.tolist():
                item = r.read_train(t, sel)
                assert item.data[SRC1]["data.adc"].shape == FRAME


# -- data that cannot go on the wire ------------------------------------------------------

def replace_dataset(path, name, make):
    with h5py.File(path, "r+") as f:
        n = f[name].shape[0]
        del f[name]
        make(f, name, n)


def test_compound_adc_leaves_out_that_key_only(rundir, tmp_path):
    """Module 2's data.adc is a compound dtype in every file.  Formerly every train was
    lost (an EncodeError for the whole train).  Now that key is left out, said once, and
    counted; module 2's other keys and module 1 are sent in all 12 trains."""
    dt = np.dtype([("x", "f8"), ("n", "i4")])
    for seq in range(3):
        replace_dataset(seqfile(rundir, 2, seq), f"INSTRUMENT/{SRC2}/data/adc",
                        lambda f, name, n: f.create_dataset(name, data=np.zeros((n, 3), dt)))
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR0[12]*"]) as s:
        got = s.receive()
        out, err = s.finish()
    assert [tid(t) for t in got] == TIDS
    for data, _ in got:
        assert data[SRC1]["data.adc"].shape == FRAME
        assert "data.adc" not in data[SRC2]
        assert {"data.frameNumber", "data.memoryCell", "data.trainId"} <= set(data[SRC2])
    assert err.count(f"{SRC2} data.adc: compound dtype") == 1, err
    assert f"Left out {SRC2} data.adc from 12 trains (compound dtype)" in out


def test_unencodable_value_leaves_out_that_key_only(rundir, tmp_path, caplog):
    """Any value the serializer refuses (here: a serializer that refuses one key) costs
    that key of that train, not the train: the rest is sent, the key is said once and
    counted per train."""
    import kbstream

    def picky(data, metadata, protocol_version, dummy_timestamps):
        if "data.memoryCell" in data.get(SRC2, {}):
            raise kbstream.EncodeError("cannot encode data.memoryCell here")
        return kbstream.serialize(data, metadata, protocol_version, dummy_timestamps)

    ep = f"ipc://{tmp_path}/bridge"
    got, result = [], {}
    with RunReader(run_files(rundir)) as r:
        sel = select_sources(r, ["*JNGFR0[12]*"])

        def client():
            with karabo_bridge.Client(ep, timeout=30) as c:
                got.extend(c.next() for _ in range(12))

        t = threading.Thread(target=client)
        t.start()
        with caplog.at_level(logging.WARNING):
            stats = serve.serve_data(r, sel, ep, serialize=picky, progress=False,
                                     out=io.StringIO())
        t.join(30)
    assert [tid(x) for x in got] == TIDS
    for data, _ in got:
        assert "data.memoryCell" not in data[SRC2] and "data.memoryCell" in data[SRC1]
        assert data[SRC2]["data.adc"].shape == FRAME
    said = [r.getMessage() for r in caplog.records if "cannot be encoded" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"{SRC2} data.memoryCell: cannot be encoded")
    assert stats.skipped == 0
    assert f"Left out {SRC2} data.memoryCell from 12 trains (cannot be encoded)" in \
        stats.summary()


def test_variable_length_string_adc_is_said(rundir, tmp_path):
    """In the middle sequence file, module 1's data.adc holds variable-length strings.
    They cannot be sent (extra_data's commands drop them too), so they are left out of
    those 4 trains, said once, counted; everything else is sent."""
    sdt = h5py.string_dtype()
    replace_dataset(seqfile(rundir, 1, 1), f"INSTRUMENT/{SRC1}/data/adc",
                    lambda f, name, n: f.create_dataset(
                        name, data=np.array([["a", "bc"]] * n, dtype=object), dtype=sdt))
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR01*"]) as s:
        got = s.receive()
        out, err = s.finish()
    assert [tid(t) for t in got] == TIDS
    for data, meta in got:
        has = "data.adc" in data[SRC1]
        assert has == (tid((data, meta)) not in TIDS[4:8])
        assert "data.frameNumber" in data[SRC1]
    assert err.count(f"{SRC1} data.adc: variable-length strings") == 1, err
    assert f"Left out {SRC1} data.adc from 4 trains (variable-length strings)" in out


# -- index damage -------------------------------------------------------------------------

def test_overlapping_index_rows_are_said(rundir, pristine, tmp_path):
    """In the middle file, train 10005's index entry points at train 10004's row (the two
    ranges overlap).  Each train is sent with the rows its own entry gives, as extra_data
    reads it: 10005 carries 10004's data.  That is said once, with the number of trains
    concerned, and in the summary."""
    extra_data = pytest.importorskip("extra_data")
    with h5py.File(seqfile(rundir, 1, 1), "r+") as f:
        first = f[f"INDEX/{SRC1}/data/first"]
        first[1] = first[0]
    want = expected_adc(pristine, 1)
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR01*[data.adc]"]) as s:
        got = s.receive()
        out, err = s.finish()
    assert [tid(t) for t in got] == TIDS
    adc = {tid(t): t[0][SRC1]["data.adc"] for t in got}
    np.testing.assert_array_equal(adc[10005], want[10004])
    ref = extra_data.RunDirectory(str(rundir)).select(SRC1, "data.adc")
    np.testing.assert_array_equal(ref.train_from_id(10005)[1][SRC1]["data.adc"], adc[10005])
    assert err.count("that another train has too") == 1, err
    assert "give 2 trains rows that another train has too" in err
    assert f"{SRC1} data: overlapping index rows in 2 trains" in out


def test_repeated_train_id_is_said(rundir, pristine, tmp_path):
    """In the middle file, INDEX/trainId lists 10004 twice (the entry of 10005 says 10004).
    Train 10004 is sent once, with its first row (the row extra_data's lookup by train id
    finds first, though extra_data refuses to open such a run at all); the second row is
    never sent, and 10005 has no module data (its slow data still make it a train of the
    run).  Said once, counted, in the summary."""
    extra_data = pytest.importorskip("extra_data")
    with h5py.File(seqfile(rundir, 1, 1), "r+") as f:
        f["INDEX/trainId"][1] = 10004
    want = expected_adc(pristine, 1)
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR01*[data.adc]"]) as s:
        got = s.receive()
        out, err = s.finish()
    assert [tid(t) for t in got] == TIDS
    data = {tid(t): t[0][SRC1] for t in got}
    np.testing.assert_array_equal(data[10004]["data.adc"], want[10004])
    assert set(data[10005]) == {"metadata"}
    with pytest.raises(ValueError, match="conflicting data"):
        extra_data.RunDirectory(str(rundir))
    assert err.count("appear more than once in INDEX/trainId") == 1, err
    assert f"{SRC1}: repeated train id in 1 train" in out


def test_summary_counts_every_cause(rundir, tmp_path):
    """All at once: a truncated file, vlen strings, a compound key and overlapping rows;
    one summary line counts each, the server ends normally."""
    sdt = h5py.string_dtype()
    dt = np.dtype([("x", "f8"), ("n", "i4")])
    for seq in range(3):
        replace_dataset(seqfile(rundir, 2, seq), f"INSTRUMENT/{SRC2}/data/adc",
                        lambda f, name, n: f.create_dataset(name, data=np.zeros((n, 3), dt)))
    replace_dataset(seqfile(rundir, 1, 0), f"INSTRUMENT/{SRC1}/data/frameNumber",
                    lambda f, name, n: f.create_dataset(
                        name, data=np.array([["a"]] * n, dtype=object), dtype=sdt))
    with h5py.File(seqfile(rundir, 1, 1), "r+") as f:
        f[f"INDEX/{SRC1}/data/first"][3] = 0
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR0[12]*", "--prefetch", "1"]) as s:
        got = s.receive(limit=2)
        truncate_in_adc(seqfile(rundir, 1, 2))  # after the server has opened it
        got += s.receive()
        out, err = s.finish()
    assert [tid(t) for t in got] == TIDS[:8]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("Skipped 4 trains (truncated file: 4); left out "), summary
    for part in (f"{SRC2} data.adc from 8 trains (compound dtype)",
                 f"{SRC1} data.frameNumber from 4 trains (variable-length strings)",
                 f"index problems: {SRC1} data: overlapping index rows in 2 trains"):
        assert part in summary, summary


def test_module_that_does_not_stack_is_filled_and_said(rundir, pristine, tmp_path):
    """With --append-detector-modules, module 2 has other frames than module 1 in the first
    file (extra_data's server ends with a ValueError there).  Its slot of the stacked
    array is filled like a missing module's, that is said once, counted; the trains where
    the modules agree are stacked as usual."""
    replace_dataset(seqfile(rundir, 2, 0), f"INSTRUMENT/{SRC2}/data/adc",
                    lambda f, name, n: f.create_dataset(
                        name, data=np.ones((n, 4) + FRAME[1:], np.uint16)))
    want1, want2 = expected_adc(pristine, 1), expected_adc(pristine, 2)
    with Server(tmp_path, [str(rundir), "--include", "*JNGFR0[12]*[data.adc]",
                           "--append-detector-modules"]) as s:
        got = s.receive()
        out, err = s.finish()
    assert [tid(t) for t in got] == TIDS
    for data, meta in got:
        assert list(data) == ["SPB_IRDA_JF4M/DET/APPEND"]
        adc = data["SPB_IRDA_JF4M/DET/APPEND"]["data.adc"]
        t = tid((data, meta))
        assert adc.shape == (FRAME[0], 2) + FRAME[1:]
        np.testing.assert_array_equal(adc[:, 0], want1[t])
        if t < 10004:
            assert not adc[:, 1].any()
        else:
            np.testing.assert_array_equal(adc[:, 1], want2[t])
    assert err.count(f"{SRC2} data.adc: uint16(4, 64, 128) where the other modules have") == 1, err
    assert f"Left out {SRC2} data.adc from 4 trains (does not stack)" in out
