"""Rooms with one job: no product module grows past the size one job needs."""

from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 900


def test_no_product_python_file_over_900_lines():
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in SRC.rglob("*.py")}
    assert sizes, "no sources found"
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
