"""The repository is self-contained: nothing points outside it, and every cited doc exists.

A fresh clone must build and test on its own, so no tracked source, test, benchmark, script
or build file may mention the reference folder that sat beside the project while it was
written (its vectors now live in ``tests/data``, its facts in ``docs/``). And every
Markdown document under ``docs/`` that code or tests cite must be a file of this repository.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so that this file does not contain what it looks for.
_OUTSIDE = "shared"
NEEDLES = (
    "../" + _OUTSIDE,
    "/work/" + _OUTSIDE,
    _OUTSIDE + "/vectors",
    _OUTSIDE + "/specs",
)
CHECKED_DIRS = ("src", "tests", "benchmarks", "scripts", ".ci")
CHECKED_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
DOC_DIRS = ("src", "tests")
DOC_RE = re.compile(r"(?<![\w-])docs/[\w/.-]+\.md")


def _tracked(*pathspecs):
    """Tracked files under ``pathspecs`` (relative to the repository root), as Paths."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"git is not usable here ({e}): cannot list the tracked files")
    if top.returncode or Path(top.stdout.strip()).resolve() != ROOT:
        pytest.skip(f"{ROOT} is not the top of a git checkout: cannot list the tracked files")
    out = subprocess.run(["git", "ls-files", "-z", "--", *pathspecs], cwd=ROOT,
                         capture_output=True, check=True, timeout=60).stdout
    return [ROOT / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]


def _text(path):
    """The file's text, or None for a binary file (or one that vanished from the work tree)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", "replace")


def _offences(path, text):
    """``path:line: text`` for every line of ``text`` that mentions a needle."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if any(needle in line for needle in NEEDLES):
            found.append(f"{path}:{number}: {line.strip()[:120]}")
    return found


def test_the_scan_finds_each_needle():
    # planted mentions are found, repository-internal paths are not (guards the scan and
    # the piecewise needles above against a typo that would make the next test vacuous)
    for needle in NEEDLES:
        assert _offences("x", "ok\n    path = ROOT / '" + needle + "/file.json'\n") == [
            f"x:2: path = ROOT / '{needle}/file.json'"]
    assert _offences("x", "tests/data/bridge_frames.json docs/wire/karabo-hash-binary.md") == []


def test_nothing_points_at_the_outside_reference_folder():
    files = _tracked(*CHECKED_DIRS, *CHECKED_FILES)
    assert files, "git ls-files listed nothing"
    offences = []
    for path in files:
        text = _text(path)
        if text is not None:
            offences += _offences(path.relative_to(ROOT), text)
    assert not offences, ("files point outside the repository (copy the data into tests/data, "
                          "cite docs/ instead):\n" + "\n".join(offences))


def test_every_cited_doc_exists():
    cited = {}
    for path in _tracked(*DOC_DIRS):
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for doc in DOC_RE.findall(line):
                cited.setdefault(doc, []).append(f"{path.relative_to(ROOT)}:{number}")
    assert cited, "no docs/ citations found at all: the scan is broken"
    missing = {doc: where for doc, where in cited.items() if not (ROOT / doc).is_file()}
    assert not missing, "cited documents that do not exist:\n" + "\n".join(
        f"{doc} (cited at {', '.join(where)})" for doc, where in sorted(missing.items()))
