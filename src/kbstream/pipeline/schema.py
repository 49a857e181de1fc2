"""Declared content of pipeline items: keys, Karabo types or numpy dtypes, shapes."""

import numpy as np

from kbhash import Hash, HashType, ImageData

__all__ = ["DataSchema"]


class DataSchema:
    """What the items of a channel contain.

    Parameters
    ----------
    spec : mapping
        ``path -> expectation``; an expectation is a Karabo type
        (``HashType.INT32``), a numpy dtype (``"uint16"``: an NDArray of that
        dtype), a ``(dtype, shape)`` pair (``None`` in the shape matches any
        length), or ``ImageData``.
    strict : bool
        Also report keys that are not in the schema.

    Examples
    --------
    >>> DataSchema({"data.adc": ("uint16", (16, 512, 1024)), "data.trainId": HashType.UINT64})
    """

    def __init__(self, spec, strict=False):
        self.spec = dict(spec)
        self.strict = strict

    def validate(self, data):
        """List of problems (empty when the Hash matches)."""
        problems = []
        for path, want in self.spec.items():
            if path not in data:
                problems.append(f"{path!r} is missing")
                continue
            value = data[path]
            if want is ImageData:
                if not isinstance(value, ImageData):
                    problems.append(f"{path!r} is not an ImageData")
                continue
            if isinstance(want, (HashType, int)) and not isinstance(want, bool):
                got = data.get_type(path)
                if isinstance(value, np.ndarray) and not data.has_explicit_type(path):
                    problems.append(f"{path!r} is an NDArray, expected {HashType(want).name}")
                elif got != want:
                    problems.append(f"{path!r} is {got.name}, expected {HashType(want).name}")
                continue
            dtype, shape = (want if isinstance(want, tuple) else (want, None))
            if not isinstance(value, np.ndarray):
                problems.append(f"{path!r} is not an array")
                continue
            if value.dtype != np.dtype(dtype):
                problems.append(f"{path!r} has dtype {value.dtype}, expected {np.dtype(dtype)}")
            if shape is not None and (len(shape) != value.ndim or any(
                    s is not None and s != v for s, v in zip(shape, value.shape))):
                problems.append(f"{path!r} has shape {value.shape}, expected {tuple(shape)}")
        if self.strict:
            extra = [p for p in data.paths() if p not in self.spec]
            if extra:
                problems.append(f"unexpected keys {extra}")
        return problems

    def __repr__(self):
        return f"DataSchema({self.spec!r})"
