"""Finding runs the extra_data way."""

import pytest

from kbstream.replay import (RunNotFoundError, files_for_run, find_proposal, find_run,
                             open_run, run_files)
from kbstream.replay.demo import make_demo_run


@pytest.fixture
def root(tmp_path, monkeypatch):
    make_demo_run(tmp_path, 2, frame_shape=(2, 4, 8), modules=1, layout="facility")
    monkeypatch.setenv("EXTRA_DATA_DATA_ROOT", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("proposal", [700000, "700000", "p700000"])
@pytest.mark.parametrize("run", [12, "12", "r0012"])
def test_find_run_spellings(root, proposal, run):
    assert find_run(proposal, run) == [root / "SPB" / "202501" / "p700000" / "raw" / "r0012"]


def test_unknown_proposal_says_where_it_looked(root):
    with pytest.raises(RunNotFoundError, match=r"^Proposal p001234 not found: nothing matches "
                       + str(root) + r"/\*/\*/p001234 ") as info:
        find_proposal(1234)
    assert info.value.searched == [f"{root}/*/*/p001234"]
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_run_says_where_it_looked(root):
    with pytest.raises(RunNotFoundError, match=r"^Run r0099 of proposal p700000 not found") as info:
        find_run(700000, 99)
    assert info.value.searched[0].endswith("p700000/raw/r0099")
    with pytest.raises(RunNotFoundError, match=r"proc/r0012 does not exist"):
        find_run(700000, 12, data="proc")


def test_proc_overrides_raw(root):
    make_demo_run(root / "SPB" / "202501" / "p700000" / "proc" / "r0012", 2,
                  frame_shape=(2, 4, 8), modules=1)
    files, override = files_for_run(700000, 12)
    assert files and override and all("/proc/" in str(p) for p in override)
    with open_run(700000, 12) as reader:
        src = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
        assert all("/proc/" in rf.path for rf in reader._source_files[src])
    assert files_for_run(700000, 12, data="raw")[1] == []


def test_run_files(root, tmp_path):
    d = root / "SPB" / "202501" / "p700000" / "raw" / "r0012"
    files = run_files(d)
    assert [p.name for p in files][:2] == ["RAW-R0012-DA01-S00000.h5", "RAW-R0012-DA01-S00001.h5"]
    assert run_files(files[0]) == [files[0]]
    with pytest.raises(RunNotFoundError, match=r"does not exist$"):
        run_files(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match=r"^No \.h5 files in run directory "):
        run_files(tmp_path / "empty")


def test_replay_errors_are_kbstream_errors():
    """One tree: every replay error is a KbStreamError and keeps its builtin."""
    from kbstream.errors import KbStreamError
    from kbstream.replay import errors
    assert issubclass(errors.ReplayError, KbStreamError)
    for name, builtin in [("RunNotFoundError", FileNotFoundError), ("RunFileError", OSError),
                          ("TruncatedFileError", OSError), ("PatternError", ValueError),
                          ("NoMatchError", ValueError)]:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ReplayError) and issubclass(cls, builtin), name
