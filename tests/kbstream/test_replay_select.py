"""--include / --exclude pattern parsing and selection semantics."""

import pytest

from kbstream.replay import NoMatchError, PatternError, RunReader, parse_pattern, run_files
from kbstream.replay.demo import make_demo_run
from kbstream.replay.select import select_sources


@pytest.mark.parametrize("pattern, expected", [
    ("SPB_IRDA_JF4M/DET/JNGFR*:daqOutput", ("SPB_IRDA_JF4M/DET/JNGFR*:daqOutput", "*")),
    ("*/MOTOR/*[*Position]", ("*/MOTOR/*", "*Position")),
    ("*[data.adc]", ("*", "data.adc")),
    # The peer splits at the first "[": character classes in the source part fail there.
    ("*JNGFR0[1-2]:daqOutput[data.adc]", ("*JNGFR0[1-2]:daqOutput", "data.adc")),
    ("*JNGFR0[1-2]:daqOutput", ("*JNGFR0[1-2]:daqOutput", "*")),
    ("*JNGFR0[!3-8]*[data.[ag][da][cin]*]", ("*JNGFR0[!3-8]*", "data.[ag][da][cin]*")),
    ("*JNGFR0[12][*]", ("*JNGFR0[12]", "*")),
])
def test_parse_pattern(pattern, expected):
    assert parse_pattern(pattern) == expected


@pytest.mark.parametrize("pattern, message", [
    ("SRC[data.adc", r"^Missing final \] in 'SRC\[data.adc'$"),
    ("[data.adc]", r"^No source glob before \[data.adc\] in '\[data.adc\]'$"),
    ("SRC[]", r"^Empty key glob in 'SRC\[\]'$"),
    ("SRCdata]]", r"^Unbalanced \[ \] in 'SRCdata\]\]'$"),
    ("", r"^empty selection pattern ''$"),
])
def test_parse_pattern_errors(pattern, message):
    with pytest.raises(PatternError, match=message) as info:
        parse_pattern(pattern)
    assert isinstance(info.value, ValueError)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    d = make_demo_run(tmp_path_factory.mktemp("run"), 3, frame_shape=(2, 8, 16))
    with RunReader(run_files(d)) as r:
        yield r


def test_character_class_in_source_part(reader):
    sel = select_sources(reader, ["*JNGFR0[1-2]:daqOutput[data.adc]"])
    assert dict(sel) == {
        "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput": ["data.adc"],
        "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput": ["data.adc"],
    }


def test_control_keys_get_value_suffix(reader):
    sel = select_sources(reader, ["*/MOTOR/X[*Position]"])
    assert sel["SPB_IRDA_JF4M/MOTOR/X"] == [
        "actualPosition.value", "encoderPosition.value", "targetPosition.value"]
    sel = select_sources(reader, ["*/MOTOR/X[actualPosition]"])
    assert sel["SPB_IRDA_JF4M/MOTOR/X"] == ["actualPosition.value"]
    sel = select_sources(reader, ["*/MOTOR/X[actualPosition.*]"])
    assert sel["SPB_IRDA_JF4M/MOTOR/X"] == ["actualPosition.timestamp", "actualPosition.value"]


def test_source_only_pattern_selects_all_keys(reader):
    sel = select_sources(reader, ["SPB_XTD9_XGM/DOOCS/MAIN:output"])
    assert sel["SPB_XTD9_XGM/DOOCS/MAIN:output"] == ["data.intensityTD", "data.trainId", "data.xTD"]
    assert len(select_sources(reader)) == 12


def test_no_match_is_an_error(reader):
    with pytest.raises(NoMatchError, match=r"^No source or key matches 'NOPE\*' ") as info:
        select_sources(reader, ["*JNGFR*[data.adc]", "NOPE*"])
    assert info.value.pattern == "NOPE*"
    with pytest.raises(NoMatchError):
        select_sources(reader, ["*JNGFR*[nokey]"])


def test_exclude(reader):
    sel = select_sources(reader, ["*JNGFR*"], exclude=["*JNGFR0[3-8]*", "*[data.gain]"])
    assert list(sel) == ["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput",
                         "SPB_IRDA_JF4M/DET/JNGFR02:daqOutput"]
    assert "data.gain" not in sel["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"]
    assert "data.adc" in sel["SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"]


def test_serve_files_source_and_key(reader):
    sel = select_sources(reader, source_glob="*JNGFR01*", key_glob="data.mask")
    assert dict(sel) == {"SPB_IRDA_JF4M/DET/JNGFR01:daqOutput": ["data.mask"]}


@pytest.mark.parametrize("pattern, expected", [
    # --split-at-first-bracket: extra_data's rule (docs/replay-differences.md, 1.2)
    ("SPB_IRDA_JF4M/DET/JNGFR*:daqOutput", ("SPB_IRDA_JF4M/DET/JNGFR*:daqOutput", "*")),
    ("*/MOTOR/*[*Position]", ("*/MOTOR/*", "*Position")),
    ("*JNGFR0[1-2]:daqOutput[data.adc]", ("*JNGFR0", "1-2]:daqOutput[data.adc")),
    ("*XGM*[data.intensity[TS]D]", ("*XGM*", "data.intensity[TS]D")),
])
def test_parse_pattern_first_bracket(pattern, expected):
    assert parse_pattern(pattern, first_bracket=True) == expected


def test_first_bracket_errors_as_extra_data():
    with pytest.raises(PatternError, match=r"^Missing final \] in '\*JNGFR0\[1-2\]:daqOutput'$"):
        parse_pattern("*JNGFR0[1-2]:daqOutput", first_bracket=True)


def test_first_bracket_selection(reader):
    with pytest.raises(NoMatchError, match="source glob '\\*JNGFR0', key glob '1-2]:daqOutput"):
        select_sources(reader, ["*JNGFR0[1-2]:daqOutput[data.adc]"], first_bracket=True)
    sel = select_sources(reader, ["*/MOTOR/X[*Position]"], first_bracket=True)
    assert dict(sel) == {"SPB_IRDA_JF4M/MOTOR/X": ["actualPosition.value", "encoderPosition.value",
                                                  "targetPosition.value"]}


def test_source_without_keys_is_selected(tmp_path):
    """A source listed in METADATA with no dataset of its own (e.g. a control source with
    only RUN values) is selected by a pattern without key part, and sent with its
    metadata alone, as extra_data does."""
    import h5py
    d = make_demo_run(tmp_path / "run", 2, frame_shape=(2, 8, 16), modules=1)
    src = "SPB_IRDA_JF4M/MOTOR/Y"
    for path in d.glob("RAW-R0012-DA01-*.h5"):
        with h5py.File(path, "r+") as f:
            del f[f"CONTROL/{src}"]
    with RunReader(run_files(d)) as r:
        assert r.keys(src) == []
        sel = select_sources(r, ["*/MOTOR/*"])
        assert sel[src] == []
        train = r.read_train(10000, sel)
        assert set(train.data[src]) == {"metadata"}
        with pytest.raises(NoMatchError):
            select_sources(r, ["*/MOTOR/Y[*Position]"])
