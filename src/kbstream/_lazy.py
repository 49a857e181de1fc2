"""Attributes of a package loaded on first use (PEP 562), one helper for every package.

``__getattr__, __dir__ = lazy(__name__, {"Client": "client", ...}, __all__)`` in a
package's ``__init__``: ``package.Client`` imports ``package.client`` the first time it
is asked for and keeps the value, so importing the package loads nothing it does not
need (kbstream, kbstream.bridge and kbstream.matcher use it to keep zmq and the
pipeline out of imports that do not use them).
"""

import importlib
import sys

__all__ = ["lazy"]


def lazy(package, names, public):
    """``(__getattr__, __dir__)`` serving ``names[attr]`` (a submodule) of ``package``."""

    def __getattr__(attr):
        module = names.get(attr)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), attr)
        setattr(sys.modules[package], attr, value)
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
