"""The lazy import of h5py: replay needs it only once a file is opened."""

__all__ = ["h5py"]


def h5py():
    """The ``h5py`` module; ImportError naming the extra to install when it is missing."""
    try:
        import h5py as module
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("kbstream.replay needs h5py: pip install 'kbstream[replay]'") from e
    return module
