"""Stacking the module sources of one multi-module detector into one source.

What extra_data's ``--append-detector-modules`` sends, and where kbstream differs
(``docs/replay-differences.md``):

- AGIPD, LPD and DSSC (``<det>/DET/<n>CH0:xtdf``): ``image.data``, ``image.gain`` and
  ``image.mask`` of all modules stacked with the module axis at -3 into 16 module slots
  (``extra_data.stack_detector_data``'s default, also for the 8 modules of an AGIPD 500K),
  NaN (floats) or 0 filling modules without data; the new source ``<det>/DET/APPEND``
  has every other key of one module and that module's ``'metadata'`` entry with
  ``source`` changed; the module sources are removed.
- kbstream takes the other keys from the lowest-numbered module with data; extra_data
  from whichever module its set of sources yields first.
- kbstream also stacks JUNGFRAU (``<det>/DET/JNGFR<n>:daqOutput``, modules 1..N, keys
  ``data.adc/gain/mask``) unless ``jungfrau=False``; extra_data sends them as they are.
- A module whose array has another shape or dtype than the others is filled like a
  missing one and reported (extra_data's server ends with a ValueError there); a train
  where no module has data is sent without the APPEND source (extra_data's ends too).
"""

import collections
import re

import numpy as np

from .progress import Problems

__all__ = ["DetectorAppender", "XTDF_MODULES"]

_XTDF_RE = re.compile(r"^(?P<det>.+)/DET/(?P<mod>\d+)CH0:xtdf$")
_JF_RE = re.compile(r"^(?P<det>.+)/DET/JNGFR(?P<mod>\d+):daqOutput$")

#: module slots of a stacked AGIPD, LPD or DSSC array (extra_data's default)
XTDF_MODULES = 16


class DetectorAppender:
    """Stack the module sources of one multi-module detector into one source.

    Parameters
    ----------
    sources : iterable of str
        The selected sources.
    all_sources : iterable of str
        Every source of the run (the JUNGFRAU module count).
    jungfrau : bool
        Also stack JUNGFRAU modules (extra_data's commands do not).
    problems : Problems, optional
        Where modules that do not stack, and a selection without modules, are said.

    :attr:`modules` is empty when no module source is selected: the appender then leaves
    trains as they are (as extra_data does), which is said once.
    """

    def __init__(self, sources, all_sources, jungfrau=True, problems=None):
        self.problems = problems if problems is not None else Problems()
        self.modules = {}
        self.keys = ()
        self.name = None
        kinds = [(_XTDF_RE, ("image.data", "image.gain", "image.mask"), 0)]
        if jungfrau:
            kinds.append((_JF_RE, ("data.adc", "data.gain", "data.mask"), 1))
        sources = list(sources)
        for regex, keys, base in kinds:
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
                if base == 0:
                    self.nmodules = XTDF_MODULES
                else:
                    everything = [int(m.group("mod")) - base for m in map(regex.match, all_sources)
                                  if m and m.group("det") == det]
                    self.nmodules = max(everything) + 1
                self.nmodules = max(self.nmodules, max(self.modules.values()) + 1)
                break
        if not self.modules:
            what = "AGIPD, LPD, DSSC or JUNGFRAU" if jungfrau else "AGIPD, LPD or DSSC"
            self.problems.log.warning(
                "--append-detector-modules: no %s module sources are selected; the sources "
                "are sent as they are", what)

    def __call__(self, item):
        if item.error is not None or not self.modules:
            return item
        data = item.data
        mods = sorted(self.modules, key=self.modules.get)
        present = [s for s in mods if s in data and any(k in data[s] for k in self.keys)]
        if not present:
            for s in mods:
                data.pop(s, None)
                item.metadata.pop(s, None)
            return item
        out = dict(data[present[0]])
        for key in self.keys:
            arrays = {s: data[s][key] for s in present
                      if isinstance(data[s].get(key), np.ndarray) and data[s][key].ndim >= 2}
            if not arrays:
                continue
            # the shape and dtype most modules have (ties: the lowest module's)
            common = collections.Counter((a.shape, a.dtype.str) for a in arrays.values())
            shape, dtype = max(common, key=lambda sd: (common[sd], -list(common).index(sd)))
            stacked_shape = shape[:-2] + (self.nmodules,) + shape[-2:]
            if item.slot is not None:
                stacked = item.slot.buffer((self.name, key), stacked_shape, np.dtype(dtype))
            else:
                stacked = np.empty(stacked_shape, dtype)
            filled = set()
            for s, a in arrays.items():
                if (a.shape, a.dtype.str) == (shape, dtype):
                    stacked[..., self.modules[s], :, :] = a
                    filled.add(self.modules[s])
                else:
                    self.problems.left_out(
                        f"{s} {key}", "does not stack",
                        f"{s} {key}: {a.dtype}{a.shape} where the other modules have "
                        f"{np.dtype(dtype)}{shape}; in {self.name} this module is filled like "
                        f"a missing one (first in train {item.file_train_id})")
            fill = np.nan if stacked.dtype.kind == "f" else 0
            for m in range(self.nmodules):
                if m not in filled:
                    stacked[..., m, :, :] = fill
            out[key] = stacked
            item.nbytes += stacked.nbytes
        meta = dict(item.metadata[present[0]])
        meta["source"] = self.name
        out["metadata"] = meta
        for s in mods:
            src = data.pop(s, None)
            item.metadata.pop(s, None)
            for k in self.keys:
                v = (src or {}).get(k)
                if isinstance(v, np.ndarray):
                    item.nbytes -= v.nbytes
        data[self.name] = out
        item.metadata[self.name] = meta
        return item
