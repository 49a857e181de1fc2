"""The serve commands, in process through main(argv) and once as a subprocess.

Fidelity: every train a real ``karabo_bridge.Client`` receives equals what
the real ``extra_data`` reads for the same selection.
"""

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

karabo_bridge = pytest.importorskip("karabo_bridge")
extra_data = pytest.importorskip("extra_data")

from kbstream.replay import serve
from kbstream.replay.cli import parse_train_slice, serve_files_main, serve_run_main
from kbstream.replay.demo import make_demo_run
from kbstream.replay.progress import ReplayStats

SHAPE = (4, 16, 32)
SRC = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"


@pytest.fixture
def serializer():
    """The serializer serve_data uses by default."""
    import kbstream
    return kbstream.serialize


@pytest.fixture
def root(tmp_path, monkeypatch):
    make_demo_run(tmp_path, 5, frame_shape=SHAPE, layout="facility", missing=True,
                  trains_per_file=2)
    monkeypatch.setenv("EXTRA_DATA_DATA_ROOT", str(tmp_path))
    return tmp_path


def run_with_client(main, argv, ntrains, sock="REQ", endpoint=None, timeout=30):
    """Run ``main(argv)`` with a client receiving ``ntrains`` in a thread."""
    got, errors = [], []

    def client():
        try:
            with karabo_bridge.Client(endpoint, sock=sock, timeout=timeout) as c:
                for _ in range(ntrains):
                    got.append(c.next())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=client)
    t.start()
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, out=out, err=err)
    t.join(timeout + 5)
    assert not errors, (errors, len(got), rc, out.getvalue())
    return rc, got, out.getvalue(), err.getvalue()


def assert_matches_extra_data(got, sel):
    """Each received (data, metadata) equals extra_data's train with the same id."""
    ref = dict(sel.trains())
    assert len(got) == len(ref)
    for data, meta in got:
        tids = {m["timestamp.tid"] for m in meta.values()}
        assert len(tids) == 1
        tid = tids.pop()
        expected = ref[tid]
        assert sorted(data) == sorted(expected)
        for src, values in expected.items():
            assert set(data[src]) == set(values), src
            keys = set(values) - {"metadata"}
            assert meta[src]["source"] == src
            # extra_data's 'metadata' entry, with the train's time from INDEX/timestamp
            assert data[src]["metadata"] == meta[src]
            assert {k: meta[src][k] for k in values["metadata"]} == values["metadata"]
            for k in keys:
                a, b = data[src][k], values[k]
                if isinstance(b, np.ndarray):
                    assert (a.dtype, a.shape) == (b.dtype, b.shape), (src, k)
                    np.testing.assert_array_equal(a, b)
                elif isinstance(b, np.number):
                    assert a == b.item() and type(a) is type(b.item()), (src, k)
                else:
                    assert a == b, (src, k)
    return sorted(ref)


def test_serve_run_equals_extra_data(root, tmp_path):
    ep = f"ipc://{tmp_path}/bridge"
    includes = ["SPB_IRDA_JF4M/DET/JNGFR*:daqOutput", "*/MOTOR/*[*Position]",
                "SPB_XTD9_XGM/DOOCS/MAIN*"]
    run = extra_data.open_run(700000, 12, data="raw")
    sel = run.select([("SPB_IRDA_JF4M/DET/JNGFR*:daqOutput", "*"), ("*/MOTOR/*", "*Position"),
                      ("SPB_XTD9_XGM/DOOCS/MAIN*", "*")], require_all=True)
    argv = ["700000", "12", "--port", ep, "--no-progress"]
    for p in includes:
        argv += ["--include", p]
    rc, got, out, _ = run_with_client(serve_run_main, argv, len(sel.train_ids), endpoint=ep)
    assert rc == 0
    # Module 8 misses train 10001 and the XGM output train 10002: require-all drops them.
    assert assert_matches_extra_data(got, sel) == [10000, 10003, 10004]
    assert out.startswith(f"Streamer started on: {ep}\n")
    assert "Sent 3 trains" in out
    # Real timestamps from INDEX/timestamp by default.
    assert got[0][1][SRC]["timestamp.frac"] == "000000000000000000"
    assert got[0][1][SRC]["timestamp.sec"] == "1700000000"


def test_serve_run_allow_partial_equals_extra_data(root, tmp_path):
    ep = f"ipc://{tmp_path}/bridge"
    run = extra_data.open_run(700000, 12, data="raw")
    sel = run.select([("*JNGFR0[78]*", "data.adc"), ("*XGM*:output", "*")], require_any=True)
    rc, got, *_ = run_with_client(serve_run_main, [
        "700000", "12", "--port", ep, "--include", "*JNGFR0[78]*[data.adc]",
        "--include", "*XGM*:output", "--allow-partial"], 5, endpoint=ep)
    assert rc == 0
    assert assert_matches_extra_data(got, sel) == list(range(10000, 10005))


def test_serve_files_equals_extra_data(root, tmp_path):
    rundir = root / "SPB" / "202501" / "p700000" / "raw" / "r0012"
    ep = f"ipc://{tmp_path}/bridge"
    sel = extra_data.RunDirectory(str(rundir)).select("*JNGFR*", "data.*")
    rc, got, *_ = run_with_client(serve_files_main, [
        str(rundir), ep, "--source", "*JNGFR*", "--key", "data.*", "-z", "PUSH"], 5,
        sock="PULL", endpoint=ep)
    assert rc == 0
    assert assert_matches_extra_data(got, sel) == list(range(10000, 10005))


def test_serve_single_file(root, tmp_path):
    path = root / "SPB" / "202501" / "p700000" / "raw" / "r0012" / "RAW-R0012-DA01-S00000.h5"
    ep = f"ipc://{tmp_path}/bridge"
    sel = extra_data.H5File(str(path))
    rc, got, *_ = run_with_client(serve_files_main, [str(path), ep], 3, endpoint=ep)
    assert rc == 0
    assert assert_matches_extra_data(got, sel) == [10000, 10001, 10002]


def test_repeat_keeps_train_ids_increasing(root, tmp_path):
    ep = f"ipc://{tmp_path}/bridge"
    rc, got, out, err = run_with_client(serve_run_main, [
        "700000", "12", "--port", ep, "--include", "*JNGFR01*[data.adc]", "--repeat", "2",
        "--trains", "1:5:2"], 4, endpoint=ep)
    assert rc == 0
    assert [m[SRC]["timestamp.tid"] for _, m in got] == [10001, 10003, 10004, 10006]
    first, again = got[0][0][SRC]["data.adc"], got[2][0][SRC]["data.adc"]
    np.testing.assert_array_equal(first, again)
    assert "4/4 trains" in err and "trains/s" in err and "GB/s" in err


def test_append_detector_modules_jungfrau(root, tmp_path):
    ep = f"ipc://{tmp_path}/bridge"
    rc, got, *_ = run_with_client(serve_run_main, [
        "700000", "12", "--port", ep, "--include", "*JNGFR*[data.adc]",
        "--append-detector-modules", "--trains", "0:1"], 1, endpoint=ep)
    assert rc == 0
    data, meta = got[0]
    assert list(data) == ["SPB_IRDA_JF4M/DET/APPEND"]
    stacked = data["SPB_IRDA_JF4M/DET/APPEND"]["data.adc"]
    assert stacked.shape == (4, 8, 16, 32)
    run = extra_data.open_run(700000, 12, data="raw")
    for m in range(8):
        ref = run[f"SPB_IRDA_JF4M/DET/JNGFR{m + 1:02d}:daqOutput", "data.adc"].ndarray()[0]
        np.testing.assert_array_equal(stacked[:, m], ref)
    assert meta["SPB_IRDA_JF4M/DET/APPEND"]["source"] == "SPB_IRDA_JF4M/DET/APPEND"


def test_truncated_file_skips_train_and_goes_on(tmp_path, monkeypatch):
    from kbstream.replay import dataset as dataset_mod
    from kbstream.replay.reader import RunReader
    monkeypatch.setattr(dataset_mod, "SMALL_DATASET_BYTES", 0)
    rundir = make_demo_run(tmp_path / "run", 4, frame_shape=SHAPE, modules=1, trains_per_file=2)
    real_init = RunReader.__init__
    victim = rundir / "RAW-R0012-JNGFR01-S00001.h5"

    def init_then_truncate(self, *a, **kw):
        # Truncate after opening: HDF5 refuses to open a file with a short superblock eof.
        real_init(self, *a, **kw)
        import h5py
        with h5py.File(victim, "r") as f:
            ds = f[f"INSTRUMENT/{SRC}/data/adc"]
            offset = ds.id.get_chunk_info_by_coord((0, 0, 0, 0)).byte_offset
        os.truncate(victim, offset + 100)

    monkeypatch.setattr(RunReader, "__init__", init_then_truncate)
    ep = f"ipc://{tmp_path}/bridge"
    rc, got, out, err = run_with_client(serve_files_main, [
        str(rundir), ep, "--include", "*JNGFR01*[data.adc]"], 2, endpoint=ep, timeout=10)
    assert rc == 0
    assert [m[SRC]["timestamp.tid"] for _, m in got] == [10000, 10001]
    assert "Skipped 2 trains (truncated file: 2)" in out


def test_list_sources_without_include(root):
    out, err = io.StringIO(), io.StringIO()
    assert serve_run_main(["700000", "12"], out=out, err=err) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "Available sources:"
    assert len(lines) == 13 and "  SPB_XTD9_XGM/DOOCS/MAIN:output" in lines
    assert err.getvalue() == "Please select at least one source with --include\n"


@pytest.mark.parametrize("argv, code, message", [
    (["700000", "99", "--include", "*"], 2,
     r"^karabo-bridge-serve-run: error: Run r0099 of proposal p700000 not found: .*raw/r0099"),
    (["123", "12", "--include", "*"], 2,
     r"^karabo-bridge-serve-run: error: Proposal p000123 not found: nothing matches .*/\*/\*/p000123"),
    (["700000", "12", "--include", "NOPE*"], 2,
     r"^karabo-bridge-serve-run: error: No source or key matches 'NOPE\*'"),
    (["700000", "12", "--include", "SRC[data"], 2,
     r"^karabo-bridge-serve-run: error: Missing final \] in 'SRC\[data'"),
])
def test_clear_errors(root, argv, code, message):
    out, err = io.StringIO(), io.StringIO()
    assert serve_run_main(argv, out=out, err=err) == code
    assert __import__("re").match(message, err.getvalue()), err.getvalue()


def test_bind_error(root, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    rc = serve_run_main(["700000", "12", "--include", "*JNGFR01*", "--port",
                         "tcp://256.1.1.1:5"], out=out, err=err)
    assert rc == 1
    assert err.getvalue().startswith("karabo-bridge-serve-run: error: cannot bind tcp://256.1.1.1:5")


def test_bind_error_is_kbstreams_one_class(root):
    """serve_data raises kbstream.errors.BindError (an OSError), with the endpoint."""
    import kbstream.errors
    from kbstream.replay import BindError, open_run, select_sources
    assert BindError is kbstream.errors.BindError
    with open_run(700000, 12, data="raw") as reader:
        sel = select_sources(reader, ["*JNGFR01*[data.adc]"])
        with pytest.raises(kbstream.errors.BindError) as info:
            serve.serve_data(reader, sel, "tcp://256.1.1.1:5", progress=False,
                             out=io.StringIO(), err=io.StringIO())
    assert isinstance(info.value, OSError)
    assert info.value.endpoint == "tcp://256.1.1.1:5"


def test_endpoint_rules():
    """--port goes through the bridge sender's endpoint rules (as extra_data's)."""
    from kbstream.bridge.sender import parse_endpoint
    assert parse_endpoint(4545) == "tcp://*:4545"
    assert parse_endpoint("4545") == "tcp://*:4545"
    assert parse_endpoint("tcp://127.0.0.1:4545") == "tcp://127.0.0.1:4545"
    assert parse_endpoint("ipc:///tmp/x") == "ipc:///tmp/x"
    assert parse_endpoint("0", use_infiniband=True).endswith(":0")


def test_port_number_binds_every_interface(root):
    """A bare port number binds tcp://*:PORT (0: a random port)."""
    from kbstream.replay import open_run, select_sources
    bound = []
    with open_run(700000, 12) as reader:
        sel = select_sources(reader, ["*JNGFR01*[data.adc]"])
        stop = threading.Event()
        stats = serve.serve_data(reader, sel, "0", sock="PUB", progress=False,
                                 out=io.StringIO(), stop_event=stop,
                                 ready=lambda ep: (bound.append(ep), stop.set()))
    assert bound[0].startswith("tcp://0.0.0.0:") and int(bound[0].rsplit(":", 1)[1]) > 0
    assert stats.sent == 0


@pytest.mark.parametrize("text, expected", [
    ("1:5:2", slice(1, 5, 2)), (":3", slice(None, 3)), ("2", slice(2, 3)), ("-1", slice(-1, None)),
])
def test_parse_train_slice(text, expected):
    assert parse_train_slice(text) == expected


def test_rate_and_stop_event(root, tmp_path, serializer):
    # PUB without subscribers: trains are dropped (and counted so), the sender never blocks.
    from kbstream.replay import open_run, select_sources
    with open_run(700000, 12) as reader:
        sel = select_sources(reader, ["*JNGFR01*[data.adc]"])
        stats = serve.serve_data(reader, sel, f"ipc://{tmp_path}/pub", sock="PUB", loop=True,
                                 rate=1000.0, max_trains=12, serialize=serializer,
                                 progress=False, out=io.StringIO())
    assert stats.sent == 0 and stats.dropped == 12 and stats.skipped == 0
    assert stats.last_tid == 10000 + 12 - 1 + 0  # loop: ids keep increasing past 10004
    assert stats.summary().startswith("Sent 0 trains (")
    assert "dropped 12 trains nobody subscribed to" in stats.summary()


def test_subprocess_smoke(root, tmp_path):
    ep = f"ipc://{tmp_path}/bridge"
    script = ("import sys\n"
              "from kbstream.replay import cli\n"
              "sys.exit(cli.serve_run_main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(__import__("pathlib").Path(serve.__file__).parents[2])] + sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "700000", "12", "--port", ep, "--include",
        "*JNGFR01*[data.adc]", "--trains", ":2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with karabo_bridge.Client(ep, timeout=30) as c:
            got = [c.next() for _ in range(2)]
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert [m[SRC]["timestamp.tid"] for _, m in got] == [10000, 10001]
    assert got[0][0][SRC]["data.adc"].shape == SHAPE
    assert "Sent 2 trains" in out


@pytest.mark.parametrize("interval, states", [
    (0.0, ["1/3", "2/3", "3/3"]),   # every train drawn; finish() adds nothing
    (3600.0, ["1/3", "3/3"]),       # the first train drawn, the next two inside the
])                                  # interval; finish() draws the final state
def test_progress_in_a_log_has_each_state_once(interval, states):
    """Not a terminal: one line per drawn state, and finish() adds the final state only
    when the last line drawn is not already it."""
    out = io.StringIO()
    stats = ReplayStats(3, stream=out, interval=interval)
    for tid in (10, 11, 12):
        stats.sent_train(tid, 100)
    stats.finish()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == states   # "replay: 1/3 trains ..."
    assert lines[-1].endswith("train 12")


def test_console_scripts_point_at_the_cli():
    """pyproject's karabo-bridge-serve-* scripts name callables of kbstream.replay.cli."""
    import importlib
    import pathlib
    import tomllib
    pyproject = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    for name, func in [("karabo-bridge-serve-run", serve_run_main),
                       ("karabo-bridge-serve-files", serve_files_main)]:
        module, _, attr = scripts[name].partition(":")
        assert module == "kbstream.replay.cli"
        assert getattr(importlib.import_module(module), attr) is func


def test_replay_modules_import_one_way():
    """Reading never loads sending (nor zmq); sending never loads the command line."""
    code = ("import sys\n"
            "import kbstream.replay.reader, kbstream.replay.prefetch\n"
            "assert not {'kbstream.replay.serve', 'kbstream.replay.cli', 'zmq'} & set(sys.modules), "
            "sorted(m for m in sys.modules if 'replay' in m)\n"
            "import kbstream.replay.serve\n"
            "assert 'kbstream.replay.cli' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(__import__("pathlib").Path(serve.__file__).parents[2])] + sys.path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _serve_in_thread(reader, sel, endpoint, **kw):
    """serve_data in a thread; returns (thread, result dict, bound event)."""
    result, bound = {}, threading.Event()

    def target():
        try:
            result["stats"] = serve.serve_data(reader, sel, endpoint, progress=False,
                                               out=io.StringIO(), ready=lambda ep: bound.set(),
                                               **kw)
        except Exception as e:  # noqa: BLE001 - checked by the test
            result["error"] = e
            bound.set()

    t = threading.Thread(target=target)
    t.start()
    assert bound.wait(30)
    return t, result


def test_rep_bad_request_gets_an_error_and_the_train_waits(root, tmp_path):
    """The bridge sender's REP rule: a request other than 'next' is answered with
    'Error: bad request ...' and the train goes to the next good request."""
    import zmq
    from kbstream import deserialize
    from kbstream.replay import open_run, select_sources
    ep = f"ipc://{tmp_path}/rep"
    with open_run(700000, 12) as reader:
        sel = select_sources(reader, ["*JNGFR01*[data.adc]"])
        t, result = _serve_in_thread(reader, sel, ep, trains=slice(0, 1))
        ctx = zmq.Context()
        req = ctx.socket(zmq.REQ)
        req.linger = 0
        req.rcvtimeo = 30000
        try:
            req.connect(ep)
            req.send(b"what")
            assert req.recv_multipart() == [b"Error: bad request what"]
            req.send(b"next")
            data, meta = deserialize(req.recv_multipart())
        finally:
            req.close()
            ctx.term()
        t.join(30)
    assert "error" not in result, result
    assert meta[SRC]["timestamp.tid"] == 10000 and data[SRC]["data.adc"].shape == SHAPE
    assert result["stats"].sent == 1


def test_unserializable_train_is_skipped_and_counted(root, tmp_path, serializer):
    """A train the serializer refuses is skipped and counted; the stream goes on.  With
    one slot (prefetch=0) the stream would stall if that train's slot were not given
    back, or if a sent train's slot were not given back once libzmq released it."""
    from kbstream.replay import open_run, select_sources
    calls = []

    def flaky(data, metadata, protocol_version, dummy_timestamps):
        calls.append(1)
        if len(calls) == 2:
            raise TypeError("cannot encode this one")
        return serializer(data, metadata, protocol_version, dummy_timestamps)

    ep = f"ipc://{tmp_path}/bridge"
    with open_run(700000, 12) as reader:
        sel = select_sources(reader, ["*JNGFR01*[data.adc]"])
        t, result = _serve_in_thread(reader, sel, ep, serialize=flaky, trains=slice(0, 4),
                                     prefetch=0)
        with karabo_bridge.Client(ep, timeout=30) as c:
            got = [c.next() for _ in range(3)]
        t.join(30)
    assert "error" not in result, result
    stats = result["stats"]
    assert (stats.sent, stats.skipped) == (3, 1)
    assert [m[SRC]["timestamp.tid"] for _, m in got] == [10000, 10002, 10003]
