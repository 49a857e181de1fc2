"""The user guide builds with Sphinx, warnings as errors, and has its pages and the API
reference from the docstrings (``sphinx-build -W -b html docs OUT``, as CI builds it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GUIDE = ["install", "tour", "replay", "bridge", "pipelines", "broker", "live-bridge",
         "tools", "performance", "differences"]
# the existing Markdown pages, built through MyST where they are
PAGES = ["conventions", "run-files", "matcher", "replay-differences", "peers",
         "safety-kbhash", "safety-bridge", "safety-pipeline", "safety-shm",
         "wire/karabo-hash-binary", "wire/karabo-bridge-protocol",
         "wire/karabo-pipeline-protocol", "wire/karabo-broker-amqp"]
# API entries autodoc must find, per page
API = {
    "kbhash": ["kbhash.Hash", "kbhash.encode", "kbhash.decode", "kbhash.errors.DecodeError"],
    "bridge": ["kbstream.bridge.Client", "kbstream.bridge.ServerInThread",
               "kbstream.bridge.serialize"],
    "pipeline": ["kbstream.pipeline.OutputChannel", "kbstream.pipeline.InputChannel"],
    "broker": ["kbstream.broker.BrokerInstance"],
    "matcher": ["kbstream.matcher.TrainMatcher"],
    "replay": ["kbstream.replay.RunReader", "kbstream.replay.serve.serve_data",
               "kbstream.replay.progress.ReplayStats"],
    "tools": ["kbstream.tools.monitor.StreamStats", "kbstream._display.ProgressLine"],
    "errors": ["kbstream.errors.KbStreamError", "kbstream.errors.ChannelTimeout"],
}


# Sphinx 9 (the pinned docs toolchain) needs Python 3.11; CI builds the guide on 3.11+.
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="Sphinx 9 needs Python >= 3.11")


def test_sphinx_builds_the_guide_with_warnings_as_errors(tmp_path):
    out = tmp_path / "html"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(out), "-d", str(tmp_path / "doctrees")],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    index = (out / "index.html").read_text(encoding="utf-8")
    for page in GUIDE:
        assert (out / "guide" / f"{page}.html").is_file(), page
        assert f'href="guide/{page}.html"' in index, page
    for page in PAGES:
        assert (out / f"{page}.html").is_file(), page
    for page, names in API.items():
        html = (out / "api" / f"{page}.html").read_text(encoding="utf-8")
        for name in names:
            assert f'id="{name}"' in html, (page, name)
    # the performance page carries benchmarks/RESULTS.md
    perf = (out / "guide" / "performance.html").read_text(encoding="utf-8")
    assert "Measured speed" in perf and "karabind" in perf
