"""kbhash's own modules import each other without cycles (read from the sources with ast).

Every import counts, also one inside a function: a deferred import hides a
cycle, it does not remove it.
"""

import ast
from pathlib import Path

import kbhash

PACKAGE = Path(kbhash.__file__).parent
MODULES = {p.stem for p in PACKAGE.glob("*.py")}


def _imports(module, root=PACKAGE):
    """The kbhash modules ``module`` (a name from MODULES) imports anywhere in its source."""
    tree = ast.parse((root / f"{module}.py").read_text(), filename=f"{module}.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kbhash":
                    out.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != "kbhash":
                continue
            if node.level > 1:
                raise AssertionError(f"{module}.py imports from outside kbhash: level {node.level}")
            parts = (node.module or "").split(".")
            sub = parts[0] if node.level == 1 else (parts[1] if len(parts) > 1 else "")
            if sub:
                out.add(sub)
            else:  # "from . import x" / "from kbhash import x": a module or the package itself
                for alias in node.names:
                    out.add(alias.name if alias.name in MODULES else "__init__")
    out.discard(module)
    return out


def test_the_sources_are_there():
    assert {"hash", "_values", "_infer", "_nodes", "_types", "errors", "_pure"} <= MODULES


def test_hash_does_not_import_values():
    assert "_values" not in _imports("hash")


def test_values_does_not_import_hash():
    assert "hash" not in _imports("_values")


def test_no_module_imports_the_package():
    importers = sorted(m for m in MODULES - {"__init__"} if "__init__" in _imports(m))
    assert importers == []


def test_no_import_cycles():
    graph = {m: _imports(m) & MODULES for m in MODULES}
    state = {}  # module -> "open" while on the path, "done" after

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_every_form_of_import(tmp_path):
    (tmp_path / "probe.py").write_text(
        "import kbhash.errors\n"
        "from kbhash import _types, Hash\n"
        "from . import _nodes as N\n"
        "from kbhash._infer import infer_type\n"
        "import numpy\n"
        "def f():\n"
        "    from ._values import check_int  # deferred: still an import\n"
        "    return check_int\n"
    )
    assert _imports("probe", tmp_path) == {"errors", "_types", "__init__", "_nodes", "_infer", "_values"}
