"""Selection of a package's codec: compiled by default, pure-Python on request.

Implements :func:`kbhash.select_backend`, used by kbhash itself and by
packages that ship the same pair of codecs (kbstream).
"""

import importlib
import os

__all__ = ["select_backend"]


def select_backend(package):
    """Import the codec of ``package`` that the environment asks for.

    A package that uses this ships two codecs with the same public names: a
    compiled one, ``<package>._codec``, and its pure-Python twin,
    ``<package>._pure``.  The compiled codec is the default.  The environment
    variable ``KB_IMPL`` chooses: ``cython`` (or ``compiled``, or unset/empty)
    for the compiled codec, ``pure`` for the twin; the value is not case
    sensitive.  There is no silent fallback: when the compiled codec cannot be
    imported, the call fails instead of using the twin.

    Parameters
    ----------
    package : str
        Name of the importable package, e.g. ``"kbhash"`` or ``"kbstream"``.

    Returns
    -------
    module : module
        ``<package>._codec`` or ``<package>._pure``.
    name : {"cython", "pure"}
        Which of the two it is.

    Raises
    ------
    ImportError
        When ``KB_IMPL`` has another value, or when the compiled codec is not
        built (the message says how to build it or how to ask for the twin).

    Examples
    --------
    >>> codec, impl = kbhash.select_backend("kbhash")
    >>> impl in ("cython", "pure")
    True
    """
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
