"""The stream tools end to end: ``kbstream simulate`` served to the real
``karabo_bridge.Client`` and to karabo-bridge's own glimpse; ``kbstream monitor`` and
``kbstream glimpse`` reading a kbstream server and the real ``karabo-bridge-server-sim``."""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kbstream.tools import glimpse, monitor
from kbstream.tools.detectors import make_detector

karabo_bridge = pytest.importorskip("karabo_bridge")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _simulate(*args):
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "kbstream", "simulate", f"tcp://127.0.0.1:{port}",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("Simulated"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, f"tcp://127.0.0.1:{port}"


def _stop(proc):
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    return out


@pytest.mark.parametrize("name, raw, key, shape, dtype", [
    ("JUNGFRAU", True, "data.adc", (16, 512, 1024), "uint16"),
    ("JUNGFRAU", False, "data.adc", (16, 512, 1024), "float32"),
    ("AGIPD", True, "image.data", (64, 2, 512, 128), "uint16"),
    ("AGIPD", False, "image.data", (64, 512, 128), "float32"),
    ("LPD", True, "image.data", (100, 1, 256, 256), "uint16"),
    ("ePix100", True, "data.image.pixels", (704, 768), "int16"),
])
def test_detectors_send_the_keys_and_shapes_of_the_real_ones(name, raw, key, shape, dtype):
    det = make_detector(name, raw=raw)
    data, meta = det.train(1234)
    assert len(data) == det.modules
    for src, values in data.items():
        arr = values[key]
        assert arr.shape == shape and arr.dtype == dtype
        assert np.count_nonzero(arr) > arr.size // 2   # a picture, not zeros
        assert meta[src]["source"] == src and meta[src]["timestamp.tid"] == 1234
    if name == "JUNGFRAU" and raw:
        gain = data[next(iter(data))][key] >> 14
        assert set(np.unique(gain)) > {0}          # several gain stages


def test_simulate_serves_the_real_karabo_bridge_client_with_increasing_trains():
    proc, ep = _simulate("-d", "JUNGFRAU", "-r", "-n", "2", "--rate", "0")
    try:
        client = karabo_bridge.Client(ep, timeout=20)
        tids = []
        for _ in range(3):
            data, meta = client.next()
            assert sorted(data) == ["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput",
                                    "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"]
            adc = data["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"]["data.adc"]
            assert adc.shape == (16, 512, 1024) and adc.dtype == np.uint16
            tids.append(meta["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"]["timestamp.tid"])
        client._context.destroy(linger=0)
    finally:
        out = _stop(proc)
    assert tids == sorted(tids) and len(set(tids)) == 3
    assert "Sent" in out


def test_karabo_bridge_glimpse_reads_the_simulator():
    exe = shutil.which("karabo-bridge-glimpse") or os.path.join(os.path.dirname(sys.executable),
                                                                "karabo-bridge-glimpse")
    proc, ep = _simulate("-d", "AGIPDModule", "--rate", "0")
    try:
        out = subprocess.run([exe, ep], capture_output=True, text=True, timeout=60)
    finally:
        _stop(proc)
    assert out.returncode == 0, out.stderr
    assert "SPB_DET_AGIPD1M-1/CORR/0CH0:output" in out.stdout
    assert "image.data" in out.stdout and "(64, 512, 128)" in out.stdout


def test_kbstream_glimpse_prints_one_train():
    proc, ep = _simulate("-d", "ePix100", "-r", "--rate", "0")
    try:
        buf = io.StringIO()
        assert glimpse.main([ep], out=buf) == 0
    finally:
        _stop(proc)
    text = buf.getvalue()
    assert "Data from 1 sources, REQ-REP took" in text
    assert "Source 1: 'MID_EXP_EPIX-1/DET/RECEIVER:daqOutput' @ " in text
    assert " - [ndarray] data.image.pixels, int16, (704, 768)" in text
    assert " - [int] timestamp.tid, " in text


def _shape_of_text(text):
    """glimpse output with every number replaced by N (train ids, times, values differ)."""
    lines = [re.sub(r"\d+", "N", line) for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@pytest.mark.parametrize("detector", ["ePix100", "JUNGFRAU"])
def test_kbstream_glimpse_prints_what_karabo_bridge_glimpse_prints(detector):
    """Both glimpses read the same kbstream simulator: line for line the same text, up to
    the numbers (each gets its own train; the peer prints seconds labelled ms)."""
    exe = os.path.join(os.path.dirname(sys.executable), "karabo-bridge-glimpse")
    proc, ep = _simulate("-d", detector, "-r", "-n", "2", "--rate", "0")
    try:
        peer = subprocess.run([exe, ep], capture_output=True, text=True, timeout=120)
        ours = subprocess.run([sys.executable, "-m", "kbstream", "glimpse", ep],
                              capture_output=True, text=True, timeout=120)
    finally:
        _stop(proc)
    assert peer.returncode == 0, peer.stderr
    assert ours.returncode == 0, ours.stderr
    assert _shape_of_text(ours.stdout) == _shape_of_text(peer.stdout)
    assert len(ours.stdout.splitlines()) > 10


def test_kbstream_monitor_reads_the_kbstream_simulator():
    proc, ep = _simulate("-d", "AGIPD", "-r", "-n", "3", "-z", "PUB", "--rate", "20")
    try:
        out = subprocess.run([sys.executable, "-m", "kbstream", "monitor", ep, "-z", "PUB",
                              "--ntrains", "6", "--interval", "0.2"],
                             capture_output=True, text=True, timeout=120)
    finally:
        _stop(proc)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Received 6 trains" in text, text
    assert "0 backwards, 0 malformed messages" in text
    for m in range(3):
        assert f"SPB_DET_AGIPD1M-1/DET/{m}CH0:xtdf: 6 trains, missing from 0" in text


def test_karabo_bridge_monitor_reads_the_kbstream_simulator():
    exe = os.path.join(os.path.dirname(sys.executable), "karabo-bridge-monitor")
    proc, ep = _simulate("-d", "JUNGFRAU", "-n", "2", "--rate", "0")
    try:
        out = subprocess.run([exe, ep, "--ntrains", "3"], capture_output=True, text=True,
                             timeout=120)
    finally:
        _stop(proc)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Train ID:") == 3
    assert "'SPB_IRDA_JF4M/CORR/JNGFR02:output'" in out.stdout


def test_kbstream_monitor_counts_trains_and_sources_of_the_peer_simulator():
    port = _port()
    exe = os.path.join(os.path.dirname(sys.executable), "karabo-bridge-server-sim")
    peer = subprocess.Popen([exe, str(port), "-d", "AGIPDModule", "-r", "-z", "PUSH"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        out = subprocess.run([sys.executable, "-m", "kbstream", "monitor",
                              f"tcp://127.0.0.1:{port}", "-z", "PUSH", "--ntrains", "5",
                              "--interval", "0.2"], capture_output=True, text=True, timeout=120)
    finally:
        peer.kill()
        _, peer_err = peer.communicate()
    assert out.returncode == 0, (out.stderr, peer_err)
    text = out.stdout
    assert "Received 5 trains" in text, (text, peer_err)
    assert "0 backwards, 0 malformed messages" in text
    assert "SPB_DET_AGIPD1M-1/DET/0CH0:xtdf: 5 trains, missing from 0" in text


def test_monitor_counts_gaps_missing_sources_and_backwards_trains():
    s = monitor.StreamStats()
    a = np.zeros(10, np.uint16)
    s.add({"A": {"x": a}, "B": {"x": a}}, {"A": {"timestamp.tid": 10}}, now=0.0)
    s.add({"A": {"x": a}}, {"A": {"timestamp.tid": 13}}, now=0.1)     # B missing, 2 ids missed
    s.add({"A": {"x": a}, "B": {"x": a}}, {"A": {"timestamp.tid": 12}}, now=0.2)  # backwards
    assert (s.trains, s.gaps, s.backwards) == (3, 2, 1)
    assert s.sources == {"A": 3, "B": 2} and s.missing == {"B": 1}
    assert s.bytes == 5 * a.nbytes
    assert "3 trains" in s.line()


def test_simulate_refuses_pickle_and_protocol_2_1(capsys):
    from kbstream.tools import simulate

    for extra in (["-s", "pickle"], ["-p", "2.1"]):
        with pytest.raises(SystemExit) as info:
            simulate.main(["0", *extra])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "pickle is refused" in err and "2.1 is not produced" in err
