"""Sphinx configuration of the kbstream user guide (``sphinx-build -W -b html docs OUT``).

The guide's pages are Markdown (MyST); the API reference comes from the docstrings of
the built package (the compiled codecs import from the source tree once built in place).
"""

import glob
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SRC = os.path.join(ROOT, "src")
# The source tree when its codecs are built in place (setup.py build_ext --inplace), else
# the installed package (pip install ".[docs]" builds them there).
if glob.glob(os.path.join(SRC, "kbhash", "_codec.*.so")) or glob.glob(
        os.path.join(SRC, "kbhash", "_codec.*.pyd")):
    sys.path.insert(0, SRC)

project = "kbstream"
author = "kbstream developers"
copyright = "kbstream developers"

try:
    from importlib.metadata import version as _version

    release = _version("kbstream")
except Exception:  # noqa: BLE001 - a source tree without an installed package
    release = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "none"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "furo"
html_title = "kbstream"
