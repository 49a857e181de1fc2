"""The ``kbstream`` command: in process through main(argv), and once as a subprocess."""

import re
import subprocess
import sys

from kbstream.cli import main


def test_usage(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
    assert "usage: kbstream COMMAND" in capsys.readouterr().err


def test_bridge_subcommand(capsys):
    assert "bridge" in (main([]), capsys.readouterr().out)[1]
    try:
        main(["bridge", "--help"])
    except SystemExit as e:
        assert e.code == 0
    else:
        raise AssertionError("--help did not exit")
    out = capsys.readouterr().out
    assert "kbstream-bridge" in out and "--max-wait" in out and "--protocol-version" in out
    # a bad option value is a message and status 2, not a traceback
    assert main(["bridge", "D:o=127.0.0.1:1", "--mode", "buffer", "--buffer", "0",
                 "--port", "tcp://127.0.0.1:0"]) == 2
    assert "buffer must be an integer >= 1" in capsys.readouterr().err


def test_hash_demo(capsys):
    assert main(["hash-demo"]) == 0
    out = capsys.readouterr().out
    assert "JUNGFRAU module Hash, 16777847 bytes, buffers [128, 16777216, 503]" in out
    assert "round trip OK" in out


def test_demo_replays_a_small_generated_run(capfd):
    rc = main(["demo", "--trains", "3", "--frame-shape", "2,64,128", "--modules", "2"])
    out = capfd.readouterr().out
    assert rc == 0
    assert "client: received 3 trains" in out and "train ids 10000..10002" in out
    # the server's summary and the client's report are lines of their own, in that order
    lines = out.splitlines()
    sent = [i for i, line in enumerate(lines) if line.startswith("Sent 3 trains")]
    got = [i for i, line in enumerate(lines) if line.startswith("client: received 3 trains")]
    assert len(sent) == 1 and len(got) == 1 and sent[0] < got[0]
    # one truth: both sides measure the same, labelled interval
    assert "; from the first train sent to the last: " in lines[sent[0]]
    assert "; from the first train received to the last: " in lines[got[0]]
    for i in sent + got:
        assert re.search(r"to the last: \d+\.\d\d s, \d+\.\d trains/s, \d+\.\d\d GB/s", lines[i])
    # the demo writes only what it replays (data.adc)
    assert "demo run: 3 trains x 2 JUNGFRAU modules (2, 64, 128) uint16" in out


def test_make_demo_run(tmp_path, capsys):
    assert main(["make-demo-run", str(tmp_path / "r1"), "--trains", "2", "--frame-shape", "2,8,16",
                 "--modules", "1"]) == 0
    assert "Demo run written to" in capsys.readouterr().out
    assert list((tmp_path / "r1").glob("*.h5"))


def test_subprocess_smoke():
    p = subprocess.run([sys.executable, "-m", "kbstream", "hash-demo"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "round trip OK" in p.stdout
