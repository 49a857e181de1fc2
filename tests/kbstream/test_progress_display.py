"""Progress through rich on a terminal, plain lines in a log: the replay, the demo run
writer and ``kbstream monitor``, with their output read through a pipe as a CI log
reads it."""

import io
import re
import subprocess
import sys
import threading

import pytest

from kbstream._display import ProgressLine, is_terminal
from kbstream.replay.progress import ReplayStats

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but newline and tab
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def last_state(text):
    """The last state a terminal shows: the text after the last carriage return, without
    escape sequences."""
    return ESCAPES.sub("", text.rsplit("\r", 1)[-1])


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_and_a_terminal_gets_rich():
    log, tty = io.StringIO(), Terminal()
    assert not is_terminal(log) and is_terminal(tty)
    for stream in (log, tty):
        line = ProgressLine("work", 3, stream, interval=0.0)
        for i in (1, 2):
            assert line.due()
            line.draw(i, f"{i}/3 steps")
        line.close(3, "3/3 steps")
    assert log.getvalue() == "work: 1/3 steps\nwork: 2/3 steps\nwork: 3/3 steps\n"
    text = tty.getvalue()
    assert "\x1b[" in text and "\r" in text   # redrawn in place by rich
    assert last_state(text).startswith("work ") and last_state(text).endswith("3/3 steps\n")


def test_due_once_per_interval():
    line = ProgressLine("work", None, io.StringIO(), interval=10.0)
    assert line.due(now=100.0)
    assert not line.due(now=105.0)
    assert line.due(now=110.0)


def test_replay_progress_on_a_terminal_is_rich_and_ends_with_the_final_state():
    tty = Terminal()
    stats = ReplayStats(3, stream=tty, interval=0.0)
    for tid in (10, 11, 12):
        stats.sent_train(tid, 100)
    stats.finish()
    text = tty.getvalue()
    assert "\x1b[" in text
    final = last_state(text)
    assert final.startswith("replay ") and "3/3 trains" in final and final.endswith("train 12\n")


def test_summary_rates_are_those_from_the_first_train_to_the_last():
    stats = ReplayStats(None, progress=False)
    stats.start = 0.0
    for now, tid in ((5.0, 1), (6.0, 2), (7.0, 3)):   # 3 trains, 2 intervals, 2 s
        stats.sent_train(tid, 1000)
        stats.first_sent = 5.0 if tid == 1 else stats.first_sent
        stats.last_sent = now
    assert stats.rates() == (2.0, 1.0, 1000.0)
    text = stats.summary()
    assert text.startswith("Sent 3 trains (0.000 GB), train ids 1..3; from the first "
                           "train sent to the last: 2.00 s, 1.0 trains/s")
    assert "(5.00 s before the first train)" in text
    one = ReplayStats(None, progress=False)
    one.sent_train(1, 10)
    assert one.rates() == (0.0, None, None) and "trains/s" not in one.summary()


def _log_lines(err, label):
    return [line for line in err.splitlines() if line.startswith(label + ": ")]


def test_serve_files_through_a_pipe_writes_plain_lines(tmp_path):
    """The replay's stderr read through a pipe: no escape or carriage return, and at
    most one line per train (each drawn state once)."""
    karabo_bridge = pytest.importorskip("karabo_bridge")
    pytest.importorskip("h5py")
    from kbstream.replay.demo import make_demo_run

    run = make_demo_run(tmp_path / "r", 6, frame_shape=(2, 16, 32), modules=2)
    ep = f"ipc://{tmp_path}/bridge"
    proc = subprocess.Popen([sys.executable, "-m", "kbstream", "serve-files", str(run), ep,
                             "--include", "*JNGFR*[data.adc]"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with karabo_bridge.Client(ep, timeout=60) as c:
            got = [c.next() for _ in range(6)]
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert len(got) == 6
    assert not CONTROL.search(err) and not CONTROL.search(out), repr(err)
    lines = _log_lines(err, "replay")
    assert 1 <= len(lines) <= 6, err
    assert lines[-1].startswith("replay: 6/6 trains")
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert counts == sorted(set(counts))          # each state once, in order
    assert "Sent 6 trains" in out and "from the first train sent to the last" in out


def test_make_demo_run_through_a_pipe_writes_plain_lines(tmp_path):
    pytest.importorskip("h5py")
    p = subprocess.run([sys.executable, "-m", "kbstream", "make-demo-run", str(tmp_path / "r"),
                        "--trains", "3", "--frame-shape", "2,8,16", "--modules", "2",
                        "--trains-per-file", "3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert not CONTROL.search(p.stderr + p.stdout), repr(p.stderr)
    lines = _log_lines(p.stderr, "writing demo run")
    # 2 modules x 1 file + 1 DA01 file: at most one line per file, the last is the total
    assert 1 <= len(lines) <= 3 and lines[-1] == "writing demo run: 3/3 files", p.stderr
    quiet = subprocess.run([sys.executable, "-m", "kbstream", "make-demo-run",
                            str(tmp_path / "q"), "--trains", "1", "--frame-shape", "1,2,2",
                            "--modules", "1", "--no-progress"],
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_monitor_through_a_pipe_writes_one_plain_line_per_interval():
    """``kbstream monitor`` against ``kbstream simulate``, stdout a pipe: plain lines of
    counts, not a table redrawn in place."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sim = subprocess.Popen([sys.executable, "-m", "kbstream", "simulate",
                            f"tcp://127.0.0.1:{port}", "-d", "JUNGFRAU", "-z", "PUSH"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stdout.readline().startswith("Simulated")
        mon = subprocess.run([sys.executable, "-m", "kbstream", "monitor",
                              f"tcp://127.0.0.1:{port}", "-z", "PUSH", "--ntrains", "6",
                              "--interval", "0.1"], capture_output=True, text=True, timeout=120)
    finally:
        sim.terminate()
        try:
            sim.communicate(timeout=20)
        finally:
            if sim.poll() is None:
                sim.kill()
    assert mon.returncode == 0, mon.stderr
    assert not CONTROL.search(mon.stdout), repr(mon.stdout)
    text = mon.stdout
    assert "Received 6 trains" in text
    live = [line for line in text.splitlines() if re.match(r"\d+ trains ", line)]
    assert live and all("trains/s" in line and "GB/s" in line for line in live), text
    counts = [int(line.split()[0]) for line in live]
    assert counts == sorted(counts) and counts[-1] <= 6, text
