"""Stacking the module sources of one multi-module detector into one source."""

import re

import numpy as np

from .errors import NoMatchError

__all__ = ["DetectorAppender"]

_XTDF_RE = re.compile(r"^(?P<det>.+)/DET/(?P<mod>\d+)CH0:xtdf$")
_JF_RE = re.compile(r"^(?P<det>.+)/DET/JNGFR(?P<mod>\d+):daqOutput$")


class DetectorAppender:
    """Stack the module sources of one multi-module detector into one source.

    AGIPD, LPD, DSSC (``<det>/DET/<n>CH0:xtdf``, modules 0..15, keys
    ``image.data/gain/mask``) and JUNGFRAU (``<det>/DET/JNGFR<n>:daqOutput``,
    modules 1..N, keys ``data.adc/gain/mask``).  The new source
    ``<det>/DET/APPEND`` starts from the first module's dict; stacked arrays
    have the module axis at -3 (as ``extra_data.stack_detector_data``), with
    NaN (floats) or 0 filling missing modules.  The module sources are removed.
    """

    def __init__(self, sources, all_sources):
        self.modules = {}
        self.keys = ()
        for regex, keys, base in ((_XTDF_RE, ("image.data", "image.gain", "image.mask"), 0),
                                  (_JF_RE, ("data.adc", "data.gain", "data.mask"), 1)):
            found = {}
            for s in sources:
                m = regex.match(s)
                if m:
                    found.setdefault(m.group("det"), {})[s] = int(m.group("mod")) - base
            if found:
                det = sorted(found)[0]
                self.modules = found[det]
                self.keys = keys
                self.name = f"{det}/DET/APPEND"
                everything = [int(m.group("mod")) - base for m in map(regex.match, all_sources)
                              if m and m.group("det") == det]
                if base == 0:
                    self.nmodules = 8 if "500K" in det else 16
                else:
                    self.nmodules = max(everything) + 1
                self.nmodules = max(self.nmodules, max(self.modules.values()) + 1)
                break
        if not self.modules:
            raise NoMatchError("--append-detector-modules: no AGIPD, LPD, DSSC or JUNGFRAU "
                               "module sources selected")

    def __call__(self, item):
        if item.error is not None:
            return item
        present = [s for s in sorted(self.modules) if s in item.data and
                   any(k in item.data[s] for k in self.keys)]
        mods = sorted(self.modules)
        if not present:
            for s in mods:
                item.data.pop(s, None)
                item.metadata.pop(s, None)
            return item
        first = item.data[present[0]]
        out = dict(first)
        for key in self.keys:
            arrays = {s: item.data[s][key] for s in present if key in item.data[s]}
            if not arrays:
                continue
            ref = next(iter(arrays.values()))
            shape = ref.shape[:-2] + (self.nmodules,) + ref.shape[-2:] if ref.ndim >= 2 else None
            if shape is None:
                continue
            buf_name = (self.name, key)
            if item.slot is not None:
                stacked = item.slot.buffer(buf_name, shape, ref.dtype)
            else:
                stacked = np.empty(shape, ref.dtype)
            filled = set()
            for s, a in arrays.items():
                if a.shape == ref.shape:
                    stacked[..., self.modules[s], :, :] = a
                    filled.add(self.modules[s])
            for m in range(self.nmodules):
                if m not in filled:
                    stacked[..., m, :, :] = np.nan if stacked.dtype.kind == "f" else 0
            out[key] = stacked
            item.nbytes += stacked.nbytes
        meta = dict(item.metadata[present[0]])
        meta["source"] = self.name
        for s in mods:
            src = item.data.pop(s, None)
            item.metadata.pop(s, None)
            for k in self.keys:
                v = (src or {}).get(k)
                if isinstance(v, np.ndarray):
                    item.nbytes -= v.nbytes
        item.data[self.name] = out
        item.metadata[self.name] = meta
        return item
