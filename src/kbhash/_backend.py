"""Selection of a package's codec: compiled by default, pure-Python on request.

``KB_IMPL=pure`` selects the pure-Python twin; anything else but ``cython``
(or empty) is an error.  There is no silent fallback: a missing extension
makes the import fail and says how to build it.  Used by kbhash and kbstream.
"""

import importlib
import os


def select(package):
    """``(codec module, "cython" | "pure")`` for ``package`` (``"kbhash"``, ``"kbstream"``)."""
    impl = os.environ.get("KB_IMPL", "cython").lower()
    if impl == "pure":
        return importlib.import_module(f"{package}._pure"), "pure"
    if impl not in ("cython", "compiled", ""):
        raise ImportError(f"KB_IMPL={impl!r}: use 'cython' (default) or 'pure'")
    try:
        return importlib.import_module(f"{package}._codec"), "cython"
    except ImportError as e:  # depends on the build
        raise ImportError(
            f"{package}'s compiled codec ({package}._codec) is not built: install the package "
            "with 'pip install .' (or 'python setup.py build_ext --inplace' in a source tree), "
            "or set KB_IMPL=pure to use the pure-Python implementation explicitly"
        ) from e
