"""Stacking the module sources of one multi-module detector into one source.

The one implementation behind ``--append-detector-modules`` of both the replay
(``karabo-bridge-serve-run``, :class:`kbstream.replay.detectors.DetectorAppender`) and
the train matcher (``kbstream-bridge``): it works on one train as a bridge client gets
it, ``data`` ``{source: {key: value}}`` and ``metadata`` ``{source: {...}}``, and knows
nothing of files or sockets.

- AGIPD, LPD and DSSC (``<det>/DET/<n>CH0:xtdf``): ``image.data``, ``image.gain`` and
  ``image.mask`` of all modules stacked with the module axis at -3 into
  :data:`XTDF_MODULES` module slots, NaN (floats) or 0 filling modules without data; the
  new source ``<det>/DET/APPEND`` has every other key of the lowest-numbered module with
  data and that module's metadata with ``source`` changed; the module sources are
  removed.
- JUNGFRAU (``<det>/DET/JNGFR<n>:daqOutput``, modules 1..N, keys ``data.adc/gain/mask``)
  likewise, unless ``jungfrau=False``; N is the highest module number among
  ``all_sources``.
- A module whose array has another shape or dtype than most others is filled like a
  missing one and reported through ``left_out``; a train where no module has data loses
  the module sources and gets no APPEND source.
"""

import collections
import logging
import re

import numpy as np

__all__ = ["ModuleStacker", "XTDF_MODULES"]

_XTDF_RE = re.compile(r"^(?P<det>.+)/DET/(?P<mod>\d+)CH0:xtdf$")
_JF_RE = re.compile(r"^(?P<det>.+)/DET/JNGFR(?P<mod>\d+):daqOutput$")

#: module slots of a stacked AGIPD, LPD or DSSC array (extra_data's default)
XTDF_MODULES = 16

log = logging.getLogger("kbstream.bridge")


class ModuleStacker:
    """Stack the module sources of one detector (module docstring).

    Parameters
    ----------
    sources : iterable of str
        The source names a train may have.
    all_sources : iterable of str, optional
        Every source name of the installation (the JUNGFRAU module count); default
        ``sources``.
    jungfrau : bool
        Also stack JUNGFRAU modules.
    left_out : callable, optional
        ``left_out(subject, cause, message)`` for a module that does not stack; default:
        a warning in the log.
    logger : logging.Logger, optional
        Where a selection without module sources is said (once).

    :attr:`modules` (``{source: module index}``) is empty when no module source is among
    ``sources``: :meth:`stack` then leaves trains as they are.
    """

    def __init__(self, sources, all_sources=None, jungfrau=True, left_out=None, logger=None):
        self.left_out = left_out or (lambda subject, cause, message: log.warning("%s", message))
        self.modules = {}
        self.keys = ()
        self.name = None
        self.nmodules = 0
        sources = list(sources)
        all_sources = sources if all_sources is None else list(all_sources)
        kinds = [(_XTDF_RE, ("image.data", "image.gain", "image.mask"), 0)]
        if jungfrau:
            kinds.append((_JF_RE, ("data.adc", "data.gain", "data.mask"), 1))
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
                    self.nmodules = max(everything, default=0) + 1
                self.nmodules = max(self.nmodules, max(self.modules.values()) + 1)
                break
        if not self.modules:
            what = "AGIPD, LPD, DSSC or JUNGFRAU" if jungfrau else "AGIPD, LPD or DSSC"
            (logger or log).warning(
                "--append-detector-modules: no %s module sources are selected; the sources "
                "are sent as they are", what)

    def stack(self, data, metadata, buffer=None, train_id=None):
        """Stack the modules of one train in place; returns the change of the train's
        array bytes (stacked arrays added, module arrays removed).

        ``buffer(key, shape, dtype)``, if given, returns the array to stack into (e.g. a
        reused one); default a new array.  ``train_id`` only goes into messages.
        """
        if not self.modules:
            return 0
        nbytes = 0
        mods = sorted(self.modules, key=self.modules.get)
        present = [s for s in mods if s in data and any(k in data[s] for k in self.keys)]
        if not present:
            for s in mods:
                data.pop(s, None)
                metadata.pop(s, None)
            return 0
        out = dict(data[present[0]])
        for key in self.keys:
            arrays = {s: data[s][key] for s in present
                      if isinstance(data[s].get(key), np.ndarray) and data[s][key].ndim >= 2}
            if not arrays:
                continue
            # the shape and dtype most modules have (ties: the lowest module's)
            common = collections.Counter((a.shape, a.dtype.str) for a in arrays.values())
            order = list(common)
            shape, dtype = max(common, key=lambda sd: (common[sd], -order.index(sd)))
            stacked_shape = shape[:-2] + (self.nmodules,) + shape[-2:]
            if buffer is not None:
                stacked = buffer((self.name, key), stacked_shape, np.dtype(dtype))
            else:
                stacked = np.empty(stacked_shape, dtype)
            filled = set()
            for s, a in arrays.items():
                if (a.shape, a.dtype.str) == (shape, dtype):
                    stacked[..., self.modules[s], :, :] = a
                    filled.add(self.modules[s])
                else:
                    self.left_out(
                        f"{s} {key}", "does not stack",
                        f"{s} {key}: {a.dtype}{a.shape} where the other modules have "
                        f"{np.dtype(dtype)}{shape}; in {self.name} this module is filled like "
                        f"a missing one (first in train {train_id})")
            fill = np.nan if stacked.dtype.kind == "f" else 0
            for m in range(self.nmodules):
                if m not in filled:
                    stacked[..., m, :, :] = fill
            out[key] = stacked
            nbytes += stacked.nbytes
        meta = dict(metadata[present[0]])
        meta["source"] = self.name
        out["metadata"] = meta
        for s in mods:
            src = data.pop(s, None)
            metadata.pop(s, None)
            for k in self.keys:
                v = (src or {}).get(k)
                if isinstance(v, np.ndarray):
                    nbytes -= v.nbytes
        data[self.name] = out
        metadata[self.name] = meta
        return nbytes
