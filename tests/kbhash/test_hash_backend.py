"""kbhash.select_backend: compiled by default, the twin only on request, no silent fallback."""

import sys

import pytest

import kbhash
from kbhash import _pure, select_backend


def test_pure_on_request(monkeypatch):
    for value in ("pure", "PURE"):
        monkeypatch.setenv("KB_IMPL", value)
        assert select_backend("kbhash") == (_pure, "pure")


def test_compiled_by_default(monkeypatch):
    from kbhash import _codec

    for value in (None, "", "cython", "Compiled"):
        if value is None:
            monkeypatch.delenv("KB_IMPL", raising=False)
        else:
            monkeypatch.setenv("KB_IMPL", value)
        assert select_backend("kbhash") == (_codec, "cython")


def test_unknown_choice_is_an_import_error(monkeypatch):
    monkeypatch.setenv("KB_IMPL", "fast")
    with pytest.raises(ImportError, match="KB_IMPL='fast'"):
        select_backend("kbhash")


def test_missing_compiled_codec_does_not_fall_back(monkeypatch, tmp_path):
    pkg = tmp_path / "codecless"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_pure.py").write_text("NAME = 'twin'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("KB_IMPL", raising=False)
    try:
        with pytest.raises(ImportError, match=r"codecless\._codec\) is not built.*KB_IMPL=pure"):
            select_backend("codecless")
        monkeypatch.setenv("KB_IMPL", "pure")
        module, name = select_backend("codecless")
        assert (module.NAME, name) == ("twin", "pure")
    finally:
        for mod in ("codecless", "codecless._pure"):
            sys.modules.pop(mod, None)


def test_the_package_uses_it():
    assert "select_backend" in kbhash.__all__
    assert kbhash.backend in ("cython", "pure")
    assert kbhash.decode is select_backend("kbhash")[0].decode
