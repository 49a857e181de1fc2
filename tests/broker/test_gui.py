"""The real Karabo GUI shows a kbstream device and an image from its output (issue 13).

karabo-gui 3.1.2 (its own environment, ``KBSTREAM_GUI_PYTHON``) runs under Xvfb and
connects to a C++ ``GuiServerDevice`` in ``karabo-cppserver`` on the suite's private
RabbitMQ. A kbstream device ``kbCam`` (class ``KbCamera``) of the kbstream server instance
``kbCamServer`` publishes an output ``output`` declaring an ImageData ``data.image`` and
streams frames. tests/broker/gui_view.py drives the GUI and reports what it holds; the test
asserts that the System Topology has the device under its server (with the class), that the
GUI built a pipeline-output binding with its schema and an image binding, and that the
pixels it decoded are one of the frames sent. The screenshot is kept in the test's temp dir
(and copied to ``$KBSTREAM_GUI_SCREENSHOT`` when set; docs/images/gui-kbstream-device.png
was made so).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kbhash import ImageData, Timestamp

from broker_stack import free_port, stop_process, wait_port
from broker_stack import require
from mdl_stack import REPO

pytestmark = pytest.mark.karabo

HERE = Path(__file__).resolve().parent
H, W = 120, 160


def frame(k):
    """Frame ``k``: a diagonal ramp plus 16 k (uint16), recognisable from any pixel."""
    y, x = np.mgrid[0:H, 0:W]
    return ((x + y) * 8 + 16 * k).astype(np.uint16)


def _gui_python():
    explicit = os.environ.get("KBSTREAM_GUI_PYTHON")
    if explicit:
        return explicit
    default = REPO / ".venv-gui" / "bin" / "python"
    return str(default) if default.exists() else None


@pytest.fixture(scope="session")
def gui_python():
    py = _gui_python()
    require(bool(py) and Path(py).exists(),
            "no Karabo GUI interpreter (.venv-gui): run `bash scripts/gui-env.sh .venv-gui` "
            "or set KBSTREAM_GUI_PYTHON")
    return py


@pytest.fixture
def xvfb(tmp_path):
    """A private X display (Xvfb picks a free display number itself)."""
    require(shutil.which("Xvfb") is not None, "Xvfb is not installed: run "
            "`bash scripts/gui-env.sh .venv-gui` as root")
    rfd, wfd = os.pipe()
    log = open(tmp_path / "xvfb.out", "wb")
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(wfd), "-screen", "0", "1600x900x24",
                             "-nolisten", "tcp"], pass_fds=(wfd,), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            process_group=0)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as r:
            number = r.readline().strip()  # written once the server accepts clients
        if not number:
            raise RuntimeError("Xvfb did not start: "
                               + (tmp_path / "xvfb.out").read_text(errors="replace"))
        yield f":{int(number)}"
    finally:
        stop_process(proc, grace=5)
        log.close()


class Frames:
    """Writes frame 1, 2, ... to ``out`` every 0.2 s until stopped."""

    def __init__(self, out):
        self.out = out
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        k = 0
        while not self._stop.wait(0.2):
            k += 1
            try:
                self.out.write({"data.image": ImageData(frame(k))}, Timestamp.now(k))
                self.out.update(timeout=5)
                self.sent = k
            except Exception:  # a slow reader: the next frame goes anyway
                pass

    def stop(self):
        self._stop.set()
        self._thread.join(10)


def test_karabo_gui_lists_kbstream_device_under_its_server_and_shows_its_image(
        broker_env, cpp_server, gui_python, xvfb, tmp_path):
    from kbstream.broker import BrokerInstance
    from kbstream.pipeline import DataSchema, OutputChannel
    from kbstream.pipeline.schema import Image

    gui_port = free_port()
    server = cpp_server({"guiSrv": {"classId": "GuiServerDevice", "port": gui_port}},
                        server_id="cppGuiServer")
    wait_port(gui_port, 120, server.proc, "GuiServerDevice")

    out = OutputChannel("kbCam:output", hostname="127.0.0.1",
                        schema=DataSchema({"data.image": Image("uint16", (H, W))})).start()
    cam = BrokerInstance("kbCam", heartbeat_interval=10, server="kbCamServer",
                         info_extra={"classId": "KbCamera"})
    frames = None
    shot = tmp_path / "gui.png"
    try:
        cam.add_output_channel("output", out)
        cam.start()
        frames = Frames(out)
        env = dict(os.environ, DISPLAY=xvfb, QT_QPA_PLATFORM="xcb",
                   HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(tmp_path / "xdg"),
                   KARABO_TEST_GUI="1")
        for d in ("home", "xdg"):
            (tmp_path / d).mkdir(mode=0o700, exist_ok=True)
        with open(tmp_path / "gui.err", "wb") as err:
            cp = subprocess.run(
                [gui_python, str(HERE / "gui_view.py"), "127.0.0.1", str(gui_port), "kbCam",
                 "output", "output.schema.data.image", str(shot), "240"],
                env=env, stdout=subprocess.PIPE, stderr=err, timeout=400, text=True)
    finally:
        if frames is not None:
            frames.stop()
        out.close()
        cam.stop()

    lines = [ln for ln in cp.stdout.splitlines() if ln.startswith("{")]
    assert lines, (f"gui_view.py printed nothing (rc={cp.returncode}):\n"
                   + (tmp_path / "gui.err").read_text(errors="replace")[-4000:])
    seen = json.loads(lines[-1])
    assert "error" not in seen and cp.returncode == 0, (seen.get("error"),
        seen, (tmp_path / "gui.err").read_text(errors="replace")[-4000:])

    # System Topology: host -> kbCamServer -> KbCamera -> kbCam
    assert seen["topology"]["server"] == "kbCamServer"
    assert seen["topology"]["class"] == "KbCamera"
    assert seen["topology"]["device"] == "kbCam"
    assert "KbCamera" in seen["serverClasses"]
    # the output is recognised as a pipeline output with its data schema
    assert seen["outputBinding"] == "PipelineOutputBinding"
    assert seen["outputSchemaNode"] is True
    assert seen["imageBinding"] == "ImageBinding"
    # the pixels the GUI decoded are one of the frames sent
    img = seen["image"]
    assert img["shape"] == [H, W] and img["dtype"] == "uint16"
    pixels = np.array(img["values"], np.uint16).reshape(H, W)
    k = int(pixels[0, 0]) // 16
    assert k >= 1 and (pixels == frame(k)).all()

    assert shot.stat().st_size > 10_000  # a real screen, not an empty picture
    target = os.environ.get("KBSTREAM_GUI_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
