"""What kbstream's serve commands send equals what extra_data's send, field by field.

Both servers run on the same files at once; a real ``karabo_bridge.Client`` takes one train
from each in turn and the two are compared: sources (and their order under 2.2), every
key, every value with its Python type, numpy dtype and shape, the header metadata, and
the ``'metadata'`` entry extra_data leaves in every source's data.

extra_data's side is its own code, in a process of its own: ``extra_data.cli.serve_files``
and ``extra_data.cli.serve_run`` (``main(argv)``), which read with ``DataCollection.trains()``,
merge detector modules, drop object arrays and send with ``karabo_bridge``'s ``Sender``.
Two things are set around it: the protocol version given to that ``Sender`` (extra_data's
commands always send 2.2; ``ZMQStreamer`` / ``ServerInThread`` take ``protocol_version``,
and this is the same serializer), and the number of trains it sends, so that a job ends
after the trains compared instead of waiting for a client forever.

The runs are the ones extra_data's own test helpers write (``extra_data.tests.make_examples``,
shipped with extra-data 1.25.0), each file maker in a run directory of its own, plus two of
kbstream's demo runs, all under ``<tmp>/SPB/202501/p700000/{raw,proc}/r<run>``, with
``EXTRA_DATA_DATA_ROOT`` pointing both commands at ``<tmp>``.

kbstream runs with ``--no-file-timestamps`` (extra_data sends no timestamps), which is one
of the deliberate differences (docs/replay-differences.md); the tests at the end check
each deliberate difference and the option that restores extra_data's behaviour.
"""

import fnmatch
import json
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

karabo_bridge = pytest.importorskip("karabo_bridge")
extra_data = pytest.importorskip("extra_data")
make_examples = pytest.importorskip("extra_data.tests.make_examples")

from kbstream.replay.demo import make_demo_run  # noqa: E402

PROPOSAL = 700000
CYCLE_DIR = ("SPB", "202501", f"p{PROPOSAL:06d}")


def _file(maker, **kw):
    return lambda d, run: maker(os.path.join(d, f"RAW-R{run:04d}-DA01-S00000.h5"), **kw)


def _run(maker, **kw):
    return lambda d, run: maker(d, **kw)


#: run number -> (name, writer of the raw run directory, writer of the proc one or None).
#: Single-file makers get a run directory each; file names follow the DAQ's pattern,
#: which extra_data's writer needs for the run number.
EXAMPLES = {
    101: ("agipd_example_file", _file(make_examples.make_agipd_example_file), None),
    102: ("fxe_da_file", _file(make_examples.make_fxe_da_file), None),
    103: ("fxe_da_file_1.0", _file(make_examples.make_fxe_da_file, format_version="1.0"), None),
    104: ("sa3_da_file", _file(make_examples.make_sa3_da_file), None),
    105: ("da_file_with_empty_source", _file(make_examples.make_da_file_with_empty_source), None),
    106: ("data_file_bad_device_name", _file(make_examples.make_data_file_bad_device_name), None),
    107: ("agipd_file", _file(make_examples.make_agipd_file), None),
    108: ("lpd_file", _file(make_examples.make_lpd_file), None),
    450: ("fxe_run", _run(make_examples.make_fxe_run),
          _run(make_examples.make_fxe_run, raw=False)),
    451: ("lpd_parallelgain_run", _run(make_examples.make_lpd_parallelgain_run), None),
    452: ("lpd_run_mini_missed_train", _run(make_examples.make_lpd_run_mini_missed_train), None),
    238: ("spb_run", _run(make_examples.make_spb_run), _run(make_examples.make_spb_run, raw=False)),
    239: ("reduced_spb_run", _run(make_examples.make_reduced_spb_run,
                                  rng=np.random.RandomState(7)), None),
    142: ("modern_spb_proc_run", None, _run(make_examples.make_modern_spb_proc_run)),
    9015: ("agipd1m_run", _run(make_examples.make_agipd1m_run), None),
    9023: ("agipd500k_run", _run(make_examples.make_agipd500k_run), None),
    20: ("jungfrau_run", _run(make_examples.make_jungfrau_run), None),
    52: ("fxe_jungfrau_run", _run(make_examples.make_fxe_jungfrau_run), None),
    210: ("remi_run", _run(make_examples.make_remi_run), None),
    163: ("scs_run", _run(make_examples.make_scs_run), None),
}
#: kbstream's demo runs: run number -> (format, chunking)
DEMOS = {12: ("1.0", "train"), 13: ("0.5", "small")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The data root with every example run; returns it."""
    import warnings

    root = tmp_path_factory.mktemp("parity")
    prop = root.joinpath(*CYCLE_DIR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run, (_, raw, proc) in EXAMPLES.items():
            for origin, writer in (("raw", raw), ("proc", proc)):
                if writer is not None:
                    d = prop / origin / f"r{run:04d}"
                    d.mkdir(parents=True)
                    writer(str(d), run)
    for run, (fmt, chunking) in DEMOS.items():
        make_demo_run(root, 5, frame_shape=(2, 16, 32), layout="facility", run=run,
                      missing=True, trains_per_file=2, format_version=fmt, chunking=chunking)
    return root


def run_dir(root, run, origin="raw"):
    return str(root.joinpath(*CYCLE_DIR, origin, f"r{run:04d}"))


# -- extra_data's server, in a process of its own ----------------------------------------

_DRIVER = r"""
import functools, itertools, json, os, sys, traceback, warnings
warnings.simplefilter("ignore")
from extra_data import export
from extra_data.cli import serve_files, serve_run
import karabo_bridge.server as kbs

marks = os.fdopen(int(sys.argv[1]), "w", buffering=1)
real_iter = export._iter_trains
for line in sys.stdin:
    job = json.loads(line)
    senders = []

    def sender(*a, **kw):
        s = kbs.Sender(*a, protocol_version=job["protocol"], **kw)
        senders.append(s)
        return s

    export.Sender = sender
    export._iter_trains = lambda *a, **kw: itertools.islice(real_iter(*a, **kw), job["ntrains"])
    main = serve_files.main if job["command"] == "files" else serve_run.main
    try:
        main(job["argv"])
        result = "ok"
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result = "failed " + json.dumps("".join(traceback.format_exception(e))[-3000:])
    for s in senders:
        s.zmq_context.destroy(linger=0)
    marks.write(result + "\n")
"""


class ExtraDataServer:
    """extra_data's serve commands in one long-lived process; one job at a time."""

    def __init__(self, root, logdir):
        r, w = os.pipe()
        self.log = open(logdir / "extra_data_server.log", "w")
        env = dict(os.environ, EXTRA_DATA_DATA_ROOT=str(root))
        env.pop("PYTHONDEVMODE", None)  # extra_data's own warnings are not under test
        self.proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(w)], pass_fds=(w,),
                                     stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        os.close(w)
        self.marks = os.fdopen(r)

    def start(self, command, argv, protocol, ntrains):
        job = dict(command=command, argv=argv, protocol=protocol, ntrains=ntrains)
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()

    def result(self):
        """'ok' or the traceback of a job that failed (waits for the job to end)."""
        line = self.marks.readline()
        assert line, f"extra_data's server process ended (rc {self.proc.poll()})"
        return "ok" if line.strip() == "ok" else json.loads(line.split(" ", 1)[1])

    def receive(self, endpoint, ntrains):
        """Yield the job's trains as karabo_bridge.Client receives them, until the job
        fails (a client in a thread of its own, so that a failed job is seen at once)."""
        import queue
        import select

        q = queue.Queue()

        def client():
            try:
                with karabo_bridge.Client(endpoint, timeout=60) as c:
                    for _ in range(ntrains):
                        q.put(c.next())
            except Exception as e:  # noqa: BLE001 - handed over below
                q.put(e)

        threading.Thread(target=client, daemon=True).start()
        for _ in range(ntrains):
            while True:
                try:
                    item = q.get(timeout=0.2)
                    break
                except queue.Empty:
                    if select.select([self.marks], [], [], 0)[0]:  # the job ended
                        try:
                            item = q.get(timeout=1)
                            break
                        except queue.Empty:
                            return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)
        self.marks.close()
        self.log.close()


@pytest.fixture(scope="module")
def ed_server(tree, tmp_path_factory):
    s = ExtraDataServer(tree, tmp_path_factory.mktemp("logs"))
    yield s
    s.close()


@pytest.fixture
def root(tree, monkeypatch):
    monkeypatch.setenv("EXTRA_DATA_DATA_ROOT", str(tree))
    return tree


# -- kbstream's server, a process per job (its memory goes with it) ---------------------

_KB_SERVER = """
import sys
from kbstream.replay.cli import serve_files_main, serve_run_main
main = serve_files_main if sys.argv[1] == "files" else serve_run_main
sys.exit(main(sys.argv[2:]))
"""


class KbServer:
    """kbstream's serve command in a process of its own, its trains taken with a
    karabo_bridge.Client; ``finish()`` gives its exit status, stdout and stderr."""

    def __init__(self, tmp_path, command, argv, endpoint, name="kb"):
        self.files = [open(tmp_path / f"{name}.{x}", "w+") for x in ("out", "err")]
        self.proc = subprocess.Popen([sys.executable, "-c", _KB_SERVER, command, *argv],
                                     stdout=self.files[0], stderr=self.files[1])
        self.client = karabo_bridge.Client(endpoint, timeout=0.2)

    def next(self):
        """The next train, or None once the server has ended without it."""
        while True:
            try:
                return self.client.next()
            except TimeoutError:
                if self.proc.poll() is not None:
                    return None

    def finish(self, timeout=60, kill=False):
        """(exit status, stdout, stderr); a server still running after ``timeout`` (or at
        once with ``kill``) is killed (status -9)."""
        self.client.__exit__(None, None, None)  # karabo_bridge.Client has no close()
        try:
            self.proc.wait(0 if kill else timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        texts = []
        for f in self.files:
            f.seek(0)
            texts.append(f.read())
            f.close()
        return (self.proc.returncode, *texts)


def run_kb(tmp_path, command, argv, ntrains, name="kb"):
    """kbstream's command with ``argv`` (``@EP``: its endpoint): (trains, rc, out, err)."""
    ep = f"ipc://{tmp_path}/{name}"
    server = KbServer(tmp_path, command, [a.replace("@EP", ep) for a in argv], ep, name)
    got = []
    try:
        for _ in range(ntrains):
            t = server.next()
            if t is None:
                break
            got.append(t)
    except BaseException:
        server.finish(kill=True)
        raise
    rc, out, err = server.finish()
    return got, rc, out, err


# -- comparing -------------------------------------------------------------------------

def value_diff(a, b):
    """None when ``a`` (extra_data's) and ``b`` (kbstream's) are the same field, else why not."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return f"{type(a).__name__} != {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{a.shape} != {b.dtype}{b.shape}"
        nan = a.dtype.kind in "fc"
        return None if np.array_equal(a, b, equal_nan=nan) else "values differ"
    if type(a) is not type(b):
        return f"{type(a).__name__} {a!r:.60} != {type(b).__name__} {b!r:.60}"
    if isinstance(a, dict):
        if list(a) != list(b) and set(a) != set(b):
            return f"keys {sorted(a)} != {sorted(b)}"
        for k in a:
            d = value_diff(a[k], b[k])
            if d:
                return f"[{k!r}]: {d}"
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"length {len(a)} != {len(b)}"
        for x, y in zip(a, b):
            d = value_diff(x, y)
            if d:
                return d
        return None
    if isinstance(a, np.generic) and a.dtype != b.dtype:
        return f"{a.dtype} != {b.dtype}"
    same = a == b or (a != a and b != b)  # NaN is NaN here
    return None if same else f"{a!r:.60} != {b!r:.60}"


def train_diffs(ed, kb, protocol, ignore_keys=()):
    """Every difference between extra_data's train and kbstream's, as text."""
    (d1, m1), (d2, m2) = ed, kb
    out = []
    # 2.2 sends sources in sorted order (both); 1.0 is one map in extra_data's set order
    if (list(d1) != list(d2)) if protocol == "2.2" else (set(d1) != set(d2)):
        out.append(f"sources {list(d1)} != {list(d2)}")
    if set(m1) != set(m2):
        out.append(f"metadata sources {sorted(m1)} != {sorted(m2)}")
    for src in sorted(set(d1) & set(d2)):
        if m1.get(src) != m2.get(src):
            out.append(f"{src}: header metadata {m1.get(src)} != {m2.get(src)}")
        k1 = set(d1[src]) - {k for s, k in ignore_keys if s == src}
        k2 = set(d2[src]) - {k for s, k in ignore_keys if s == src}
        if k1 != k2:
            out.append(f"{src}: keys only extra_data {sorted(k1 - k2)}, "
                       f"only kbstream {sorted(k2 - k1)}")
        for k in sorted(k1 & k2):
            d = value_diff(d1[src][k], d2[src][k])
            if d:
                out.append(f"{src} {k}: {d}")
    return out


def tid_of(train):
    return {m["timestamp.tid"] for m in train[1].values()}


def serve_both(ed_server, tmp_path, command, argv, protocol="2.2", ntrains=2, kb_extra=(),
               compare=None, file_timestamps=False):
    """Run both commands with ``argv`` (``@EP`` = the endpoint), take ``ntrains`` from each
    in turn with karabo_bridge.Client, call ``compare(ed_train, kb_train)`` on each pair
    (it records differences; it must not raise, so that no train outlives the call).
    Returns (kbstream's stdout, its stderr)."""
    eps = {"ed": f"ipc://{tmp_path}/ed", "kb": f"ipc://{tmp_path}/kb"}
    ed_argv = [a.replace("@EP", eps["ed"]) for a in argv]
    kb_argv = [a.replace("@EP", eps["kb"]) for a in argv] + [
        "--trains", f":{ntrains}", "--prefetch", "1", "--no-progress",
        "--protocol-version", protocol, *kb_extra]
    if not file_timestamps:
        kb_argv.append("--no-file-timestamps")
    ed_server.start(command, ed_argv, protocol, ntrains)
    kb_server = KbServer(tmp_path, command, kb_argv, eps["kb"])
    ed_trains = ed_server.receive(eps["ed"], ntrains)
    ids = []
    try:
        # kbstream's trains are all taken, whatever extra_data does, so that its server ends
        for _ in range(ntrains):
            kb = kb_server.next()
            if kb is None:  # kbstream's command ended without this train
                break
            ed = next(ed_trains, None)
            if ed is not None:
                ids.append((tid_of(ed), tid_of(kb)))
                if compare is not None:
                    compare(ed, kb)
            del ed, kb
    except BaseException:
        kb_server.finish(kill=True)
        ed_server.result()  # its client thread takes the job's trains: it ends
        raise
    rc, out, err = kb_server.finish()
    result = ed_server.result()
    assert result == "ok", result
    assert rc == 0, (rc, out, err)
    assert all(a == b for a, b in ids), ids
    assert len(ids) == ntrains, (ids, out, err)
    return out, err


def assert_same(ed_server, tmp_path, command, argv, protocol="2.2", ntrains=2, kb_extra=(),
                ignore_keys=()):
    problems = []

    def compare(ed, kb):
        problems.extend(f"train {sorted(tid_of(ed))}: {d}"
                        for d in train_diffs(ed, kb, protocol, ignore_keys))

    res = serve_both(ed_server, tmp_path, command, argv, protocol, ntrains, kb_extra, compare)
    assert not problems, "\n".join(problems[:30])
    return res


# -- the matrix --------------------------------------------------------------------------

#: serve-files over every run, every source and key.  Where extra_data's own server fails
#: on the whole run (tests further down), the sources it can serve: some control sources
#: of the JUNGFRAU runs have HDF5 names with dots in them, which extra_data cannot find
#: again, and the REMI sources hold compound arrays that karabo_bridge's 2.2 client cannot
#: decode.  Two JUNGFRAU modules of the mock runs are 0.14 GB a train already.
FILES_SOURCES = {20: "*/DET/JNGFR0[12]:*", 52: "*/DET/JNGFR0[13]:*", 104: "SA3_XTD10*"}
FILES_RUNS = [r for r in EXAMPLES if r not in (210,)] + list(DEMOS)
#: runs of 8-16 detector modules, 0.13-0.6 GB a train: one train (each train is read the
#: same way; the runs with missing trains and varying frame counts get more), and under
#: 1.0 (where both sides copy every array into one frame, and both clients copy again)
#: without the keys ending in 'a' (``image.data``), so that memory stays within ~2 GB;
#: ``image.data`` is compared under 2.2.
BIG = {450, 451, 238, 142, 9015, 9023, 163, 20, 52}


def _name(run):
    return EXAMPLES[run][0] if run in EXAMPLES else f"demo_r{run}"


@pytest.mark.parametrize("protocol", ["2.2", "1.0"])
@pytest.mark.parametrize("run", FILES_RUNS, ids=[_name(r) for r in FILES_RUNS])
def test_serve_files_every_source(ed_server, root, tmp_path, run, protocol):
    origin = "proc" if EXAMPLES.get(run, (0, 1))[1] is None else "raw"
    argv = [run_dir(root, run, origin), "@EP"]
    if run in FILES_SOURCES:
        argv += ["--source", FILES_SOURCES[run]]
    if run in BIG and (protocol == "1.0" or run == 451):  # 451: 0.6 GB of image.data
        argv += ["--key", "*[!a]"]
    assert_same(ed_server, tmp_path, "files", argv, protocol, ntrains=1 if run in BIG else 3)


@pytest.mark.parametrize("protocol", ["2.2", "1.0"])
@pytest.mark.parametrize("run, source, key", [
    (102, "*XGM*", "*.value"),
    (102, "SA1_XTD2_XGM/DOOCS/MAIN*", "data.*"),
    (238, "*/DET/1*", "image.data"),
    (163, "*DSSC*/DET/[0-3]CH0:xtdf", "image.*"),
    (12, "SPB_IRDA_JF4M/DET/JNGFR0[12]:daqOutput", "data.adc"),
    (12, "SPB_IRDA_JF4M/MOTOR/*", "*Position"),
])
def test_serve_files_source_and_key(ed_server, root, tmp_path, run, source, key, protocol):
    assert_same(ed_server, tmp_path, "files",
                [run_dir(root, run), "@EP", "--source", source, "--key", key], protocol, 3)


#: serve-run: patterns with and without key parts; raw + proc runs (proc overriding raw)
SERVE_RUN = [
    (450, ["*/DET/11CH0:xtdf", "*/DET/12CH0:xtdf", "*XGM*"]),
    (450, ["FXE_DET_LPD1M-1/DET/2CH0:xtdf[image.*]", "SA1_XTD2_XGM/DOOCS/MAIN[beamPosition.i?Pos]",
           "*XGM*:output[data.intensityTD]"]),
    (238, ["*/DET/1*CH0:xtdf[image.data]", "SPB_IRU_CAM/CAM/SIDEMIC*"]),
    (452, ["*/DET/*"]),
    (239, ["*/DET/1*CH0:xtdf[image.*]"]),
    (9015, ["*/MDL/*", "*/PSC/*[*.value]"]),
    (20, ["*/DET/JNGFR01*", "*/DET/JNGFR02*[data.adc]", "*/MDL/POWER"]),
    (12, ["SPB_IRDA_JF4M/DET/JNGFR*:daqOutput", "*/MOTOR/*[*Position]", "SPB_XTD9_XGM/DOOCS/MAIN*"]),
    (13, ["*JNGFR07*[data.adc]", "*JNGFR08*[data.adc]", "*XGM*:output"]),
]


@pytest.mark.parametrize("partial, protocol", [(False, "2.2"), (False, "1.0"), (True, "2.2")],
                         ids=["require-all-2.2", "require-all-1.0", "allow-partial-2.2"])
@pytest.mark.parametrize("run, includes", SERVE_RUN, ids=[_name(r) for r, _ in SERVE_RUN])
def test_serve_run(ed_server, root, tmp_path, run, includes, partial, protocol):
    """(--allow-partial selects the same trains under either protocol: 2.2 only.)"""
    argv = [str(PROPOSAL), str(run), "--port", "@EP"]
    for p in includes:
        argv += ["--include", p]
    if partial:
        argv.append("--allow-partial")
    assert_same(ed_server, tmp_path, "run", argv, protocol, ntrains=3)


#: --append-detector-modules on the multi-module runs extra_data merges (XTDF detectors).
#: The stacked arrays always have 16 module slots, so the runs with many frames a train
#: (0.25-1.3 GB stacked) are compared under 2.2 only.
APPEND = [
    ("files", 452, [], ("2.2", "1.0")),
    ("run", 452, ["--include", "*/DET/*", "--allow-partial"], ("2.2", "1.0")),
    ("run", 239, ["--include", "*/DET/*CH0:xtdf[image.data]"], ("2.2", "1.0")),
    ("files", 163, ["--source", "*/DET/1*"], ("2.2", "1.0")),
    ("files", 9023, ["--key", "image.*"], ("2.2",)),
    ("files", 238, ["--source", "*/DET/*"], ("2.2",)),
    ("files", 9015, [], ("2.2",)),
    ("run", 450, ["--include", "*/DET/1*[image.data]", "--include", "*XGM*"], ("2.2",)),
]
APPEND_CASES = [pytest.param(c, r, e, p, id=f"{c}-{_name(r)}-{p}")
                for c, r, e, protocols in APPEND for p in protocols]


def _argv(command, run, root, extra):
    if command == "files":
        return [run_dir(root, run), "@EP", *extra]
    return [str(PROPOSAL), str(run), "--port", "@EP", *extra]


@pytest.mark.parametrize("command, run, extra, protocol", APPEND_CASES)
def test_append_detector_modules(ed_server, root, tmp_path, command, run, extra, protocol):
    """Stacked arrays, metadata and every other source are equal.  The keys of the APPEND
    source that are not stacked come, in extra_data, from whichever module its set of
    sources yields first (an order that changes from process to process); kbstream takes
    them from the lowest-numbered module with data (docs/replay-differences.md).  So
    those are compared with that module's, read by extra_data."""
    argv = _argv(command, run, root, extra) + ["--append-detector-modules"]
    problems = []
    stacked_keys = {"image.data", "image.gain", "image.mask"}
    origins = ["raw", "proc"] if command == "run" else ["raw"]
    dirs = [run_dir(root, run, o) for o in origins if os.path.isdir(run_dir(root, run, o))]
    if len(dirs) == 2:
        dc = extra_data.open_run(PROPOSAL, run, data="all")
    else:
        dc = extra_data.RunDirectory(dirs[0])
    # the selected sources' globs (no brackets in these, so both splits agree)
    globs = [extra[i + 1].split("[")[0] for i, a in enumerate(extra)
             if a in ("--include", "--source")] or ["*"]

    def modno(source):
        return int(source.rsplit("/", 1)[1].split("CH")[0])

    def compare(ed, kb):
        app = [s for s in kb[0] if s.endswith("/DET/APPEND")]
        if len(app) != 1:
            problems.append(f"APPEND sources: {list(kb[0])}")
            return
        app = app[0]
        others = {(app, k) for k in set(ed[0][app]) | set(kb[0][app])} - {
            (app, k) for k in stacked_keys | {"metadata"}}
        problems.extend(train_diffs(ed, kb, protocol, ignore_keys=others))
        # the other keys: kbstream's are the lowest-numbered selected module's with data
        (tid,) = tid_of(kb)
        det = app.rsplit("/", 2)[0]
        mods = sorted((m for m in dc.instrument_sources
                       if re.fullmatch(re.escape(det) + r"/DET/\d+CH0:xtdf", m)
                       and any(fnmatch.fnmatchcase(m, g) for g in globs)), key=modno)
        with_data = [m for m in mods if dc[m, "image.data"].data_counts().get(tid, 0)]
        if not with_data:
            problems.append(f"train {tid}: no module with data, yet an APPEND source")
            return
        first = with_data[0]
        if not others:
            return
        ref = dc.select([(first, k) for _, k in others]).train_from_id(tid)[1][first]
        mods = [first]
        for _, k in sorted(others):
            if k not in ref or k not in kb[0][app]:
                problems.append(f"APPEND {k}: not in module {mods[0]} or not sent")
                continue
            want = ref[k].item() if isinstance(ref[k], np.generic) and protocol == "2.2" else ref[k]
            d = value_diff(want, kb[0][app][k])
            if d:
                problems.append(f"APPEND {k} (module {mods[0]}): {d}")

    serve_both(ed_server, tmp_path, command, argv, protocol, 1 if run in BIG else 2,
               compare=compare)
    assert not problems, "\n".join(problems[:30])


# -- deliberate differences and the options restoring extra_data's behaviour -------------

def test_file_timestamps_are_the_only_difference_by_default(ed_server, root, tmp_path):
    """Without --no-file-timestamps kbstream sends INDEX/timestamp as the train's time:
    in the header metadata and in each source's 'metadata' entry; nothing else differs."""
    rundir = run_dir(root, 103)
    with __import__("h5py").File(os.path.join(rundir, "RAW-R0103-DA01-S00000.h5")) as f:
        ns = dict(zip(f["INDEX/trainId"][:].tolist(), f["INDEX/timestamp"][:].tolist()))
    problems = []

    def compare(ed, kb):
        (tid,) = tid_of(kb)
        sec, rest = divmod(ns[tid], 10**9)
        times = {"timestamp.sec": str(sec), "timestamp.frac": f"{rest * 10**9:018d}"}
        for src, meta in kb[1].items():
            if {k: meta.get(k) for k in times} != times or kb[0][src]["metadata"] != meta:
                problems.append(f"{src}: {meta} {kb[0][src]['metadata']}, want {times}")
                continue
            for d in (meta, kb[0][src]["metadata"]):
                for k in ("timestamp", "timestamp.sec", "timestamp.frac"):
                    del d[k]
        problems.extend(train_diffs(ed, kb, "2.2"))

    serve_both(ed_server, tmp_path, "files", [rundir, "@EP"], ntrains=3, compare=compare,
               file_timestamps=True)
    assert not problems, "\n".join(problems)


def test_bracket_in_source_glob(ed_server, root, tmp_path):
    """kbstream splits an --include pattern at its trailing [...] group, so character
    classes work in the source glob; extra_data splits at the first '[' and finds no
    match.  --split-at-first-bracket parses as extra_data does (the same error)."""
    pattern = "SA1_XTD2_XGM/DOOCS/MAIN[:]output[data.*]"
    argv = [str(PROPOSAL), "450", "--port", f"ipc://{tmp_path}/ed", "--include", pattern]
    ed_server.start("run", argv, "2.2", 1)
    result = ed_server.result()
    assert "No matches for pattern ('SA1_XTD2_XGM/DOOCS/MAIN', ':]output[data.*')" in result
    # kbstream: the pattern selects the XGM output's data
    kb_argv = [str(PROPOSAL), "450", "--port", "@EP", "--include", pattern, "--trains", ":1",
               "--no-progress"]
    got, rc, _, _ = run_kb(tmp_path, "run", kb_argv, 1)
    assert rc == 0 and list(got[0][0]) == ["SA1_XTD2_XGM/DOOCS/MAIN:output"]
    # with the option: extra_data's split, extra_data's outcome (no such source)
    _, rc, _, err = run_kb(tmp_path, "run", kb_argv + ["--split-at-first-bracket"], 0, "kb2")
    assert rc == 2
    assert "source glob 'SA1_XTD2_XGM/DOOCS/MAIN', key glob ':]output[data.*'" in err


@pytest.mark.parametrize("protocol", ["2.2", "1.0"])
def test_jungfrau_modules_stay_apart_with_xtdf_only(ed_server, root, tmp_path, protocol):
    """extra_data's --append-detector-modules merges AGIPD, LPD and DSSC only; kbstream
    also stacks JUNGFRAU modules unless --append-xtdf-only is given."""
    argv = [str(PROPOSAL), "20", "--port", "@EP", "--include", "*/DET/JNGFR01*[data.adc]",
            "--include", "*/DET/JNGFR02*[data.adc]", "--include", "*/DET/JNGFR03*[data.adc]",
            "--append-detector-modules"]
    assert_same(ed_server, tmp_path, "run", argv, protocol, 2, kb_extra=["--append-xtdf-only"])

    def stacked(ed, kb):
        assert sorted(ed[0]) == [f"SPB_IRDA_JF4M/DET/JNGFR0{m}:daqOutput" for m in (1, 2, 3)]
        assert list(kb[0]) == ["SPB_IRDA_JF4M/DET/APPEND"]
        adc = kb[0]["SPB_IRDA_JF4M/DET/APPEND"]["data.adc"]
        for m in range(3):
            np.testing.assert_array_equal(
                adc[..., m, :, :], ed[0][f"SPB_IRDA_JF4M/DET/JNGFR0{m + 1}:daqOutput"]["data.adc"])

    serve_both(ed_server, tmp_path, "run", argv, protocol, 2, compare=stacked)


def test_like_extra_data_sets_all_three(ed_server, root, tmp_path):
    """--like-extra-data: file timestamps off, extra_data's pattern split, XTDF-only
    appending; on a run with INDEX/timestamp and JUNGFRAU modules, everything is equal."""
    argv = [str(PROPOSAL), "20", "--port", "@EP", "--include", "*/DET/JNGFR01*",
            "--include", "*/DET/JNGFR02*[data.*]", "--include", "*/MDL/POWER",
            "--append-detector-modules"]
    for protocol in ("2.2", "1.0"):
        (tmp_path / protocol).mkdir()
        assert_same(ed_server, tmp_path / protocol, "run", argv, protocol, 2,
                    kb_extra=["--like-extra-data"])


# -- where extra_data's server fails and kbstream's does not ----------------------------

def _with_bool_key(rundir):
    """Add a boolean control key (HDF5's bool enum) to every DA01 file of a demo run."""
    import h5py

    for path in sorted(os.listdir(rundir)):
        if "-DA01-" not in path:
            continue
        with h5py.File(os.path.join(rundir, path), "r+") as f:
            tids = f["INDEX/trainId"][:]
            g = f.create_group("CONTROL/SPB_IRDA_JF4M/MOTOR/X/isMoving")
            g["value"] = tids % 2 == 0
            g["timestamp"] = tids


@pytest.mark.parametrize("protocol", ["2.2", "1.0"])
def test_bool_values(ed_server, tmp_path, monkeypatch, protocol):
    """A numpy bool scalar (an HDF5 boolean control value): under 1.0 both send it as
    msgpack_numpy's numpy bool; under 2.2 karabo_bridge's serializer cannot pack it and
    extra_data's server ends, kbstream sends a msgpack bool."""
    rundir = make_demo_run(tmp_path / "run", 3, frame_shape=(2, 8, 8), modules=1)
    _with_bool_key(rundir)
    argv = [str(rundir), "@EP", "--source", "SPB_IRDA_JF4M/MOTOR/X"]
    if protocol == "1.0":
        def compare(ed, kb):
            v = kb[0]["SPB_IRDA_JF4M/MOTOR/X"]["isMoving.value"]
            problems.append(None if type(v) is np.bool_ else f"{type(v)}")
            problems.extend(train_diffs(ed, kb, protocol))

        problems = []
        serve_both(ed_server, tmp_path, "files", argv, protocol, 3, compare=compare)
        assert [p for p in problems if p] == []
        return
    ep = f"ipc://{tmp_path}/ed"
    ed_server.start("files", [str(rundir), ep, "--source", "SPB_IRDA_JF4M/MOTOR/X"], "2.2", 3)
    assert "can not serialize 'numpy.bool' object" in ed_server.result()
    got, rc, _, _ = run_kb(tmp_path, "files", [str(rundir), "@EP", "--source",
                                               "SPB_IRDA_JF4M/MOTOR/X", "--no-progress"], 3)
    assert rc == 0
    assert [d["SPB_IRDA_JF4M/MOTOR/X"]["isMoving.value"] for d, _ in got] == [True, False, True]


def test_dotted_hdf5_names_stop_extra_data_not_kbstream(ed_server, root, tmp_path):
    """Some control sources of extra_data's JUNGFRAU example have HDF5 groups whose names
    hold dots (``dataStorage.enable/value``).  extra_data turns every dot of a key into
    a ``/`` to find its dataset again, does not find it, and its server ends with a
    KeyError at the first train.  kbstream keeps each key's HDF5 path and sends them."""
    import h5py

    rundir = run_dir(root, 20)
    ed_server.start("files", [rundir, f"ipc://{tmp_path}/ed"], "2.2", 2)
    assert "KeyError" in ed_server.result()
    got, rc, _, _ = run_kb(tmp_path, "files", [rundir, "@EP", "--trains", ":1", "--no-progress"],
                           1)
    assert rc == 0
    src = "SPB_IRDA_JF4M/DET/CONTROL"
    data = got[0][0][src]
    with h5py.File(os.path.join(rundir, "RAW-R0012-JNGFRCTRL00-S00000.h5")) as f:
        in_control = {}
        f[f"CONTROL/{src}"].visititems(
            lambda n, o: in_control.update({n.replace("/", "."): o[0]})
            if isinstance(o, h5py.Dataset) else None)
    assert "dataStorage.enable.value" in in_control
    assert set(data) == set(in_control) | {"metadata"}
    for key, value in in_control.items():
        np.testing.assert_array_equal(data[key], value)


@pytest.mark.parametrize("protocol", ["2.2", "1.0"])
def test_compound_arrays(ed_server, root, tmp_path, protocol):
    """The REMI source's ``rec.hits`` / ``rec.signals`` are compound (structured) arrays.
    extra_data puts them on the wire as they are: under 2.2 karabo_bridge's client cannot
    decode that train (TypeError); under 1.0 it gets them.  kbstream cannot send a
    compound dtype under either protocol: it leaves out those two keys, says so once per
    key, and sends everything else of every train (docs/replay-differences.md)."""
    src = "SQS_REMI_DLD6/DET/TOP:output"
    compound = {(src, "rec.hits"), (src, "rec.signals")}
    problems = []
    if protocol == "2.2":
        ep = f"ipc://{tmp_path}/ed"
        ed_server.start("files", [run_dir(root, 210), ep], "2.2", 1)
        with karabo_bridge.Client(ep, timeout=60) as c:
            with pytest.raises(TypeError, match="not understood"):
                c.next()
        assert ed_server.result() == "ok"
        got, rc, out, err = run_kb(tmp_path, "files", [run_dir(root, 210), "@EP", "--trains",
                                                       ":3", "--no-progress"], 3)
        assert rc == 0 and len(got) == 3
        for data, _ in got:
            assert sorted(data[src]) == ["metadata", "rec.trainId"], sorted(data[src])
        del got
    else:
        def compare(ed, kb):
            for s, k in compound:
                if not (ed[0][s][k].dtype.kind == "V" and k not in kb[0][s]):
                    problems.append(f"{k}: {ed[0][s][k].dtype}, {k in kb[0][s]}")
            problems.extend(train_diffs(ed, kb, protocol, ignore_keys=compound))

        out, err = serve_both(ed_server, tmp_path, "files", [run_dir(root, 210), "@EP"],
                              protocol, 3, compare=compare)
    assert not problems, problems
    assert len(re.findall(r" rec\.\w+: compound dtype", err)) == 2, err
    for s, k in compound:
        assert err.count(f"{s} {k}: compound dtype") == 1, err
    assert f"{src} rec.hits from 3 trains (compound dtype)" in out, out
