"""Package surface: the compiled backends are in use, the public names exist."""

import os
from pathlib import Path

import kbhash


def test_kbhash_backend_is_compiled_unless_pure_requested():
    if os.environ.get("KB_IMPL", "").lower() == "pure":
        assert kbhash.backend == "pure"
    else:
        assert kbhash.backend == "cython"
        assert kbhash.encode.__module__ == "kbhash._codec" or "cython" in repr(kbhash.encode)


def test_kbhash_public_names():
    for name in kbhash.__all__:
        assert hasattr(kbhash, name), name
    assert issubclass(kbhash.DecodeError, ValueError)
    assert issubclass(kbhash.TruncatedError, kbhash.DecodeError)
    assert issubclass(kbhash.EncodeError, TypeError)


def test_kbhash_ships_typing_marker_and_sources():
    root = Path(kbhash.__file__).parent
    assert (root / "py.typed").exists()
