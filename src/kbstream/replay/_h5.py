"""The lazy import of h5py: replay needs it only once a file is opened.

hdf5plugin, where installed, is imported with it: it registers the HDF5 filters it
ships (bitshuffle/LZ4, LZ4, Blosc, Zstd, ...) so that datasets compressed with them can
be read (by HDF5, see :mod:`kbstream.replay.dataset`).
"""

__all__ = ["h5py"]


def h5py():
    """The ``h5py`` module; ImportError naming the extra to install when it is missing."""
    try:
        import h5py as module
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("kbstream.replay needs h5py: pip install 'kbstream[replay]'") from e
    try:
        import hdf5plugin  # noqa: F401  (registers its filters with HDF5)
    except ImportError:
        pass
    return module
