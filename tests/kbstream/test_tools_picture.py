"""``kbstream glimpse --png``: the picture of a train, checked by reading the PNG back.

End to end against ``kbstream simulate``, a replayed demo run (module sources and
``--append-detector-modules``), a run on disk (``glimpse RUN_DIR --train N``) and
karabo-bridge's ``karabo-bridge-server-sim``; the expected image sizes and module places
come from extra-geom's example geometries, never from fixed numbers.
"""

import json
import os
import socket
import subprocess
import sys

# extra-geom and matplotlib (with its PIL) are in the test extra: no skip when missing
import extra_geom
import numpy as np
import pytest
from PIL import Image

from kbstream.errors import KbStreamError
from kbstream.tools import glimpse, picture
from kbstream.tools.detectors import make_detector
from kbstream.tools.errors import PictureError, PlotDependencyError, TrainNotFoundError


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kbstream(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "kbstream", *args], capture_output=True,
                          text=True, timeout=timeout)


def _simulate(*args):
    ep = f"tcp://127.0.0.1:{_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "kbstream", "simulate", ep, "--rate", "0",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("Simulated"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, ep


def _stop(proc):
    proc.terminate()
    try:
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _read_png(path):
    with Image.open(path) as im:
        panels = json.loads(im.text[picture.PANELS_KEY])
        pixels = np.asarray(im.convert("RGB"))
    return pixels, panels


def _expected(geom, nmodules):
    """(module index per assembled pixel, -1 in gaps) in the picture's orientation."""
    shape = geom.expected_data_shape[1:]
    stack = np.empty((nmodules,) + tuple(shape), np.float32)
    stack[:] = np.arange(nmodules, dtype=np.float32)[:, None, None]
    img, _ = geom.position_modules(stack)
    img = img[::-1, ::-1]   # front view: as extra-geom's plot_data shows it
    return np.where(np.isfinite(img), img, -1).astype(int)


def _check_assembled(pixels, panel, geom, nmodules, with_data=None):
    """The panel has the geometry's assembled size; pixels inside modules are drawn and
    vary, pixels in the gaps are empty."""
    where = _expected(geom, nmodules)
    assert (panel["height"], panel["width"]) == where.shape
    x, y, w, h = panel["x"], panel["y"], panel["width"], panel["height"]
    # the drawn area below the panel's title is exactly that size (read from the pixels)
    below = pixels[y:, x:x + w + 1]
    drawn = np.any(below != picture.BACKGROUND_RGB, axis=-1)
    rows, cols = np.nonzero(drawn)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (h, w)
    box = pixels[y:y + h, x:x + w].astype(int)
    empty = np.all(box == picture.EMPTY_RGB, axis=-1)
    gaps = where < 0
    assert gaps.any() and empty[gaps].all()          # every gap pixel is empty
    for m in range(nmodules):
        region = where == m
        if with_data is not None and m not in with_data:
            assert empty[region].all(), m
            continue
        assert not empty[region].any(), m          # a module has no empty pixel
        colours = box[region]
        assert colours.std(axis=0).max() > 10, m    # ... and is a picture, not one colour
        assert len(np.unique(colours[::97], axis=0)) > 20, m


def _jf4m():
    return extra_geom.JUNGFRAUGeometry.example(8)


# -- kbstream glimpse --png against kbstream simulate ---------------------------------------

@pytest.mark.parametrize("raw", [False, True], ids=["corrected", "raw"])
def test_glimpse_png_of_simulated_jungfrau_4m(tmp_path, raw):
    proc, ep = _simulate("-d", "JUNGFRAU", *(["-r"] if raw else []))
    png = tmp_path / "jf4m.png"
    try:
        out = _kbstream("glimpse", ep, "--png", str(png))
    finally:
        _stop(proc)
    assert out.returncode == 0, out.stderr
    form = "DET/JNGFR*:daqOutput" if raw else "CORR/JNGFR*:output"
    assert f"Picture: {png}" in out.stdout and f"SPB_IRDA_JF4M/{form}" in out.stdout
    pixels, panels = _read_png(png)
    assert len(panels) == 1
    p = panels[0]
    assert p["kind"] == "JUNGFRAU" and p["key"] == "data.adc" and len(p["sources"]) == 8
    assert p["modules"] == list(range(8))
    _check_assembled(pixels, p, _jf4m(), 8)


def test_glimpse_png_of_simulated_agipd_and_a_partial_detector(tmp_path):
    proc, ep = _simulate("-d", "AGIPD", "-r", "-n", "3")
    png = tmp_path / "agipd.png"
    try:
        out = _kbstream("glimpse", ep, "--png", str(png), "--frame", "5")
    finally:
        _stop(proc)
    assert out.returncode == 0, out.stderr
    pixels, panels = _read_png(png)
    (p,) = panels
    assert p["kind"] == "AGIPD" and p["frame"] == 5 and p["modules"] == [0, 1, 2]
    _check_assembled(pixels, p, extra_geom.AGIPD_1MGeometry.example(), 16, with_data={0, 1, 2})


# -- against a replayed demo run and a run on disk ------------------------------------------

@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from kbstream.replay.demo import make_demo_run

    return make_demo_run(tmp_path_factory.mktemp("demo") / "r0012", 3,
                         frame_shape=(2, 512, 1024), gain_mask=False, trains_per_file=2)


@pytest.mark.parametrize("append", [False, True], ids=["modules", "append-detector-modules"])
def test_glimpse_png_of_a_replayed_demo_run(tmp_path, demo_run, append):
    ep = f"tcp://127.0.0.1:{_port()}"
    server = subprocess.Popen([sys.executable, "-m", "kbstream", "serve-files", str(demo_run), ep,
                               "--no-progress", *(["--append-detector-modules"] if append else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    png = tmp_path / "demo.png"
    try:
        out = _kbstream("glimpse", ep, "--png", str(png))
    finally:
        server.kill()
        server.communicate()
    assert out.returncode == 0, out.stderr
    pixels, panels = _read_png(png)
    jf = [p for p in panels if p["kind"] == "JUNGFRAU"]
    assert len(jf) == 1
    assert jf[0]["sources"] == (["SPB_IRDA_JF4M/DET/APPEND"] if append else
                                [f"SPB_IRDA_JF4M/DET/JNGFR{n:02d}:daqOutput" for n in range(1, 9)])
    _check_assembled(pixels, jf[0], _jf4m(), 8)


def test_glimpse_of_a_run_on_disk(tmp_path, demo_run):
    png = tmp_path / "run.png"
    out = _kbstream("glimpse", str(demo_run), "--train", "10001", "--png", str(png))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("Train ID: 10001 ")
    assert "Source 1: 'SPB_IRDA_JF4M/DET/JNGFR01:daqOutput' @ 10001" in text
    assert " - [ndarray] data.adc, uint16, (2, 512, 1024)" in text
    assert "SPB_IRDA_JF4M/MOTOR/X" in text          # control sources too
    pixels, panels = _read_png(png)
    (jf,) = [p for p in panels if p["kind"] == "JUNGFRAU"]
    _check_assembled(pixels, jf, _jf4m(), 8)

    data, meta, tid = glimpse.read_run_train(demo_run)
    assert tid == 10000 and meta["SPB_IRDA_JF4M/DET/JNGFR08:daqOutput"]["timestamp.tid"] == 10000
    with pytest.raises(TrainNotFoundError) as info:
        glimpse.read_run_train(demo_run, 5)
    assert info.value.train_ids == (10000, 10002)
    out = _kbstream("glimpse", str(demo_run), "--train", "5")
    assert out.returncode == 1 and "TrainNotFoundError" in out.stderr and "10000 .. 10002" in out.stderr


# -- against karabo-bridge's server-sim -----------------------------------------------------

def test_kbstream_glimpse_reads_and_draws_the_peer_simulator(tmp_path):
    port = _port()
    exe = os.path.join(os.path.dirname(sys.executable), "karabo-bridge-server-sim")
    peer = subprocess.Popen([exe, str(port), "-d", "AGIPDModule", "-r"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    png = tmp_path / "peer.png"
    try:
        out = _kbstream("glimpse", f"tcp://127.0.0.1:{port}", "--png", str(png))
    finally:
        peer.kill()
        _, peer_err = peer.communicate()
    assert out.returncode == 0, (out.stderr, peer_err)
    text = out.stdout
    assert "Source 1: 'SPB_DET_AGIPD1M-1/DET/0CH0:xtdf'" in text
    # the peer's online layout: (y, x, pulses) of one module
    assert " - [ndarray] image.data, uint16, (128, 512, 64)" in text
    pixels, panels = _read_png(png)
    (p,) = panels
    assert p["kind"] == "AGIPD" and p["modules"] == [0]
    _check_assembled(pixels, p, extra_geom.AGIPD_1MGeometry.example(), 16, with_data={0})


# -- the picture's pieces -------------------------------------------------------------------

def test_stacked_online_and_plain_arrays_are_recognised():
    jf = make_detector("JUNGFRAU", raw=True, modules=2)
    data, _ = jf.train(7)
    adc = np.stack([d["data.adc"] for d in data.values()], axis=-3)   # (frames, 2, ss, fs)
    train = {
        "SPB_IRDA_JF4M/DET/APPEND": {"data.adc": adc},
        # the online layout of karabo-bridge's simulator: (modules, fs, ss, frames)
        "SPB_DET_AGIPD1M-1/CAL/APPEND_CORRECTED": {
            "image.data": np.random.default_rng(0).random((16, 128, 512, 4), np.float32)},
        "CAM/IMAGE:output": {"data.image.pixels": np.arange(60 * 80, dtype=np.uint16).reshape(60, 80),
                             "data.small": np.zeros((3, 1))},
        "STACK/IMAGE:output": {"data.frames": np.ones((5, 30, 40), np.float32)},
        "XGM/DOOCS/MAIN:output": {"data.intensityTD": np.ones(1000, np.float32)},
    }
    panels = {p.title: p for p in picture.train_panels(train, frame=1)}
    assert sorted(panels) == ["CAM/IMAGE:output", "SPB_DET_AGIPD1M-1/CAL/APPEND_CORRECTED",
                              "SPB_IRDA_JF4M/DET/APPEND", "STACK/IMAGE:output"]
    jfp = panels["SPB_IRDA_JF4M/DET/APPEND"]
    assert jfp.kind == "JUNGFRAU" and jfp.modules == [0, 1]
    assert jfp.image.shape == _expected(_jf4m(), 8).shape     # JF4M by name: 8 modules
    # raw counts without the gain bits
    assert np.nanmax(jfp.image) <= 0x3FFF and np.nanmax(jfp.image) > 0
    ag = panels["SPB_DET_AGIPD1M-1/CAL/APPEND_CORRECTED"]
    assert ag.kind == "AGIPD" and ag.modules == list(range(16))
    assert ag.image.shape == _expected(extra_geom.AGIPD_1MGeometry.example(), 16).shape
    cam = panels["CAM/IMAGE:output"]
    assert cam.kind == "image" and cam.key == "data.image.pixels" and cam.image.shape == (60, 80)
    assert cam.image[0, 1] == 1 and cam.image[1, 0] == 80           # rows top down, as stored
    assert panels["STACK/IMAGE:output"].frame == 1


def test_a_geometry_file_replaces_the_example(tmp_path):
    # a JF4M in one column of 8 modules, written as a CrystFEL file by extra-geom
    h = 514 + 30
    geom = extra_geom.JUNGFRAUGeometry.from_module_positions([(-1030, i * h) for i in range(8)])
    path = tmp_path / "jf4m.geom"
    geom.write_crystfel_geom(str(path))
    data, _ = make_detector("JUNGFRAU").train(1)
    png = tmp_path / "column.png"
    info = picture.write_picture(data, png, geometries={"JUNGFRAU": path})
    (p,) = info["panels"]
    assert p["geometry"] == "jf4m.geom"
    pixels, (stored,) = _read_png(png)
    assert stored == p
    _check_assembled(pixels, p, extra_geom.JUNGFRAUGeometry.from_crystfel_geom(str(path)), 8)
    assert p["height"] > p["width"] * 3        # one column, not the example's two

    bad = tmp_path / "bad.geom"
    bad.write_text("this is no geometry\n")
    with pytest.raises(PictureError, match="bad.geom"):
        picture.write_picture(data, tmp_path / "x.png", geometries={None: bad})
    with pytest.raises(PictureError, match="CrystFEL"):
        picture.write_picture(data, tmp_path / "x.png", geometries={None: tmp_path / "g.json"})
    # a geometry of fewer modules than the data has
    two = tmp_path / "two.geom"
    extra_geom.JUNGFRAUGeometry.example(2).write_crystfel_geom(str(two))
    with pytest.raises(PictureError, match="outside the 2 modules"):
        picture.write_picture(data, tmp_path / "x.png", geometries={None: two})


def test_bad_requests_are_typed_errors(tmp_path):
    data, _ = make_detector("ePix100").train(1)
    with pytest.raises(PictureError, match="frame 3"):
        picture.train_panels({"A": {"data.x": np.ones((2, 8, 8))}}, frame=3)
    with pytest.raises(PictureError, match="no source"):
        picture.train_panels({"A": {"data.x": np.ones(8), "data.y": 3}})
    assert issubclass(PictureError, (KbStreamError, ValueError))
    info = picture.write_picture(data, tmp_path / "epix.png")
    assert info["panels"][0]["kind"] == "image" and (info["panels"][0]["height"],
                                                     info["panels"][0]["width"]) == (704, 768)


def test_missing_plot_packages_give_a_clear_typed_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "extra_geom", None)     # import extra_geom fails
    with pytest.raises(PlotDependencyError) as info:
        picture.require_plotting()
    assert isinstance(info.value, (ImportError, KbStreamError))
    assert info.value.missing == "extra-geom" and "kbstream[plot]" in str(info.value)
    # glimpse says so before it waits for a train (nothing listens on this endpoint)
    rc = glimpse.main([f"tcp://127.0.0.1:{_port()}", "--png", str(tmp_path / "x.png"),
                       "--timeout", "60"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "PlotDependencyError" in err and "pip install 'kbstream[plot]'" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotDependencyError, match="matplotlib"):
        picture.require_plotting(geometry=False)


def test_binned_pictures_are_smaller_and_keep_gaps_empty(tmp_path):
    img = np.array([[1, 2, np.nan, np.nan, 5],
                    [3, 4, np.nan, np.nan, 7],
                    [np.nan, 6, np.nan, np.nan, np.nan]], np.float32)
    out = picture.binned(img, 2)
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out[0], [2.5, np.nan, 6.0])
    np.testing.assert_array_equal(out[1], [6.0, np.nan, np.nan])
    assert picture.binned(img, 1) is img

    data, _ = make_detector("JUNGFRAU").train(1)
    info = picture.write_picture(data, tmp_path / "small.png", bin=4)
    (p,) = info["panels"]
    where = _expected(_jf4m(), 8)
    assert (p["height"], p["width"]) == tuple(-(-n // 4) for n in where.shape)
    assert p["bin"] == 4
    pixels, _ = _read_png(tmp_path / "small.png")
    box = pixels[p["y"]:p["y"] + p["height"], p["x"]:p["x"] + p["width"]]
    empty = np.all(box == picture.EMPTY_RGB, axis=-1)
    covered = picture.binned(np.where(where >= 0, 1.0, np.nan).astype(np.float32), 4)
    np.testing.assert_array_equal(empty, np.isnan(covered))
    with pytest.raises(PictureError):
        picture.write_picture(data, tmp_path / "x.png", bin=0)


def test_dssc_modules_and_an_lpd_geometry_file(tmp_path):
    rng = np.random.default_rng(1)
    dssc = {f"SCS_DET_DSSC1M-1/DET/{m}CH0:xtdf":
            {"image.data": rng.integers(1, 500, (4, 1, 128, 512), dtype=np.uint16)}
            for m in range(16)}
    info = picture.write_picture(dssc, tmp_path / "dssc.png", frame=3)
    pixels, (p,) = _read_png(tmp_path / "dssc.png")
    assert p["kind"] == "DSSC" and p["title"] == "SCS_DET_DSSC1M-1/DET/*CH0:xtdf"
    _check_assembled(pixels, p, extra_geom.DSSC_1MGeometry.example(), 16)

    # an XFEL HDF5 geometry file (quadrant positions in it) written by extra-geom
    geom_file = tmp_path / "lpd.h5"
    extra_geom.LPD_1MGeometry.from_quad_positions(
        [(15, 300), (-15, 0), (260, -20), (290, 280)]).to_h5_file_and_quad_positions(str(geom_file))
    lpd = {f"FXE_DET_LPD1M-1/CORR/{m}CH0:output":
           {"image.data": rng.random((3, 256, 256), dtype=np.float32) + 1}
           for m in range(0, 16, 2)}
    info = picture.write_picture(lpd, tmp_path / "lpd.png", geometries={"LPD": geom_file})
    pixels, (p,) = _read_png(tmp_path / "lpd.png")
    assert p == info["panels"][0] and p["geometry"] == "lpd.h5"
    _check_assembled(pixels, p, extra_geom.LPD_1MGeometry.from_h5_file(str(geom_file)), 16,
                     with_data=set(range(0, 16, 2)))


def test_geometry_options_name_a_detector_or_all():
    assert glimpse._geometries(None) == {}
    assert glimpse._geometries(["jungfrau=a.geom", "b.h5"]) == {"JUNGFRAU": "a.geom", None: "b.h5"}
    # a path with '=' in it that names no detector is a path
    assert glimpse._geometries(["dir=x/c.geom"]) == {None: "dir=x/c.geom"}
