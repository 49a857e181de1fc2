"""The demo run writer: realistic layout, accepted by extra_data's validator."""

import numpy as np
import pytest

extra_data = pytest.importorskip("extra_data")
h5py = pytest.importorskip("h5py")

from kbstream.replay.demo import JF4M_SOURCES, main, make_demo_run  # noqa: E402


@pytest.mark.parametrize("fmt", ["0.5", "1.0", "1.2"])  # extra_data warns on 1.1 by design
@pytest.mark.parametrize("chunking", ["train", "small", "contiguous"])
def test_validator_accepts_demo_run(tmp_path, fmt, chunking):
    from extra_data.validation import RunValidator
    d = make_demo_run(tmp_path, 4, frame_shape=(2, 8, 16), chunking=chunking,
                      format_version=fmt, trains_per_file=2, missing=True)
    RunValidator(str(d)).validate()  # raises ValidationError on any problem
    run = extra_data.RunDirectory(str(d))
    assert list(run.train_ids) == [10000, 10001, 10002, 10003]
    assert set(JF4M_SOURCES) <= run.all_sources


def test_layout_and_values(tmp_path):
    d = make_demo_run(tmp_path, 5, frame_shape=(16, 8, 16), trains_per_file=2)
    names = sorted(p.name for p in d.glob("*.h5"))
    assert names[:2] == ["RAW-R0012-DA01-S00000.h5", "RAW-R0012-DA01-S00001.h5"]
    assert "RAW-R0012-JNGFR08-S00002.h5" in names and len(names) == 8 * 3 + 2
    run = extra_data.RunDirectory(str(d))
    src = "SPB_IRDA_JF4M/DET/JNGFR03:daqOutput"
    assert run[src, "data.adc"].entry_shape == (16, 8, 16)
    assert run[src, "data.adc"].dtype == np.uint16
    assert run[src, "data.gain"].dtype == np.uint8 and run[src, "data.mask"].dtype == np.uint8
    cells = run[src, "data.memoryCell"].ndarray()
    np.testing.assert_array_equal(cells[0], np.arange(15, -1, -1))
    frames = run[src, "data.frameNumber"].ndarray()
    np.testing.assert_array_equal(frames.ravel(), np.arange(5 * 16))
    adc = run[src, "data.adc"].ndarray()
    assert adc.any() and not np.array_equal(adc[0], adc[1])
    assert run["SPB_IRDA_JF4M/MOTOR/X", "actualPosition"].ndarray()[1] == pytest.approx(0.01)
    assert run["SPB_XTD9_XGM/DOOCS/MAIN:output", "data.intensityTD"].entry_shape == (1000,)
    with h5py.File(d / "RAW-R0012-JNGFR01-S00000.h5") as f:
        ds = f[f"INSTRUMENT/{JF4M_SOURCES[0]}/data/adc"]
        assert ds.chunks == (1, 16, 8, 16)
        assert f["METADATA/dataFormatVersion"][0] == b"1.0"
        assert f["INDEX/timestamp"][1] - f["INDEX/timestamp"][0] == 100_000_000


def test_missing_trains(tmp_path):
    d = make_demo_run(tmp_path, 4, frame_shape=(2, 8, 16), missing=True)
    run = extra_data.RunDirectory(str(d))
    assert list(run["SPB_IRDA_JF4M/DET/JNGFR08:daqOutput", "data.adc"].drop_empty_trains().train_ids) == [
        10000, 10002, 10003]
    assert list(run["SPB_XTD9_XGM/DOOCS/MAIN:output", "data.xTD"].drop_empty_trains().train_ids) == [
        10000, 10001, 10003]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"^chunking must be one of"):
        make_demo_run(tmp_path, 1, chunking="huge")
    with pytest.raises(ValueError, match=r"^modules must be 1..8, not 9$"):
        make_demo_run(tmp_path, 1, modules=9)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "r"), "--trains", "2", "--frame-shape", "2,8,16",
                 "--modules", "2", "--chunking", "small", "--no-gain-mask"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Demo run written to {tmp_path / 'r'} (")
    run = extra_data.RunDirectory(str(tmp_path / "r"))
    assert "data.gain" not in run["SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"].keys()
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--frame-shape", "2,8"])
    assert main([str(tmp_path), "--trains", "1", "--frame-shape", "1,2,2", "--modules", "1",
                 "--facility-layout"]) == 0
    assert (tmp_path / "SPB" / "202501" / "p700000" / "raw" / "r0012").is_dir()


def test_progress_callback_counts_every_file(tmp_path):
    calls = []
    make_demo_run(tmp_path, 4, frame_shape=(2, 8, 16), modules=2, trains_per_file=2,
                  progress=lambda done, total: calls.append((done, total)))
    nfiles = len(list(tmp_path.glob("*.h5")))
    assert nfiles == 2 * 2 + 2
    assert calls == [(i, nfiles) for i in range(1, nfiles + 1)]


@pytest.mark.parametrize("chunking", ["train", "small", "contiguous"])
def test_frames_are_the_documented_pattern(tmp_path, chunking):
    """adc = base + ((k * 17 + module) & 0xFFF), gain = ((base >> 12) + k) & 3 and
    mask = (base & 0xFF) > 250, per train k and module, whatever the chunking."""
    shape = (3, 8, 16)
    d = make_demo_run(tmp_path, 3, frame_shape=shape, modules=2, chunking=chunking)
    base = np.random.default_rng(0).integers(0, 2 ** 14, shape, dtype=np.uint16)
    run = extra_data.RunDirectory(str(d))
    for m in (1, 2):
        src = f"SPB_IRDA_JF4M/DET/JNGFR{m:02d}:daqOutput"
        adc, gain, mask = (run[src, f"data.{k}"].ndarray() for k in ("adc", "gain", "mask"))
        for k in range(3):
            np.testing.assert_array_equal(adc[k], base + np.uint16((k * 17 + m) & 0xFFF))
            np.testing.assert_array_equal(gain[k], (((base >> 12) + k) & 3).astype(np.uint8))
            np.testing.assert_array_equal(mask[k], ((base & 0xFF) > 250).astype(np.uint8))
