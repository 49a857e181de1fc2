"""Simulated detector trains with the sources, keys, shapes and dtypes real detectors send.

Raw data (``raw=True``) is what the DAQ receives from each module: ADC counts with the
gain stage in the top bits (JUNGFRAU) or in a second analog/digital image (AGIPD), cell
and pulse ids, train ids.  Corrected data is what the online calibration pipelines send:
float32 photon energies with a gain and a mask array.  Every module's image carries a
pattern a picture shows at once (rings around the beam centre, a module number in its
offset, a weak gradient), on top of Poisson-like noise, so an assembled image is easy to
check by eye.  Train ids increase by one per train; the arrays are made once per detector
and only their train-dependent rows change, so the generator costs little per train.
"""

import time

import numpy as np

from ..bridge import source_metadata

__all__ = ["DETECTORS", "Detector", "make_detector"]


class Detector:
    """One simulated detector: ``train(tid)`` -> ``(data, metadata)`` for the bridge."""

    #: (name, modules, frames per train, module (ss, fs))
    name = "generic"
    modules = 1
    frames = 1
    module_shape = (512, 1024)

    def __init__(self, raw=False, frames=None, modules=None, gen="pattern", seed=0):
        self.raw = raw
        self.frames = frames or self.frames
        self.modules = modules or self.modules
        self.gen = gen
        rng = np.random.default_rng(seed)
        # one block of noise, shifted for every module and frame: cheap to make
        self._noise = rng.poisson(3.0, self.module_shape).astype(np.float32)
        self._base = [self._image(m) for m in range(self.modules)]

    # -- pixel pattern ----------------------------------------------------------------

    def _image(self, module):
        """One module's photon-energy image (float32, keV-like units), frames first."""
        ss, fs = self.module_shape
        shape = (self.frames, ss, fs)
        if self.gen == "zeros":
            return np.zeros(shape, np.float32)
        # place modules around a beam centre (a 2 x N/2 grid), rings in the global frame:
        # the grid of extra-geom's example JUNGFRAU geometry (module 2k + 1 left of module
        # 2k, first pixels on the inner edge), so an assembled image shows whole rings
        col, row = module % 2, module // 2
        y = np.arange(ss, dtype=np.float32)[:, None] + row * ss
        x = np.arange(fs, dtype=np.float32)[None, :] - col * fs
        cy, cx = (self.modules // 2) * ss / 2, 0.0
        r = np.hypot(y - cy, x - cx)
        rings = 40 * (1 + np.cos(r / 18.0)) * np.exp(-r / (3 * max(ss, fs)))
        img = (rings + 2.0 * (module + 1) + x * 0.002).astype(np.float32)
        out = np.empty(shape, np.float32)
        for f in range(self.frames):
            np.add(img, np.roll(self._noise, 7 * module + 13 * f, axis=1), out=out[f])
        return out

    # -- to override ----------------------------------------------------------------------

    def sources(self):
        raise NotImplementedError

    def module_data(self, module, tid):
        raise NotImplementedError

    # -- trains --------------------------------------------------------------------------

    def train(self, tid, timestamp=None):
        """The data and metadata of train ``tid`` (timestamp: now by default)."""
        now = time.time() if timestamp is None else timestamp
        sec = int(now)
        frac = int(round((now - sec) * 1e18))
        data, meta = {}, {}
        for module, src in enumerate(self.sources()):
            data[src] = self.module_data(module, tid)
            meta[src] = source_metadata(src, tid, sec, frac)
        return data, meta


def _gain_stage(energy):
    """JUNGFRAU-like gain stage per pixel: 0 (high gain) up to 2 (low gain)."""
    return np.digitize(energy, (60.0, 75.0)).astype(np.uint8)


class Jungfrau(Detector):
    """JUNGFRAU 4M: 8 modules of 512 x 1024 pixels (``SPB_IRDA_JF4M``)."""

    name = "JUNGFRAU"
    modules = 8
    frames = 16
    module_shape = (512, 1024)
    prefix = "SPB_IRDA_JF4M"

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.raw:
            self._adc, self._gain = [], []
            for e in self._base:
                g = _gain_stage(e)
                adc = np.clip(e * 40 / (1 + 15 * g), 0, 0x3FFF).astype(np.uint16)
                self._adc.append(adc | (g.astype(np.uint16) << 14))
                self._gain.append(g)
        else:
            self._mask = [np.zeros(e.shape, np.uint32) for e in self._base]
            self._gain = [_gain_stage(e) for e in self._base]

    def sources(self):
        kind = "DET" if self.raw else "CORR"
        port = "daqOutput" if self.raw else "output"
        return [f"{self.prefix}/{kind}/JNGFR{m + 1:02d}:{port}" for m in range(self.modules)]

    def module_data(self, module, tid):
        n = self.frames
        d = {
            "data.trainId": np.full(n, tid, np.uint64),
            "data.memoryCell": np.arange(n, dtype=np.uint8),
            "data.frameNumber": np.arange(n, dtype=np.uint64) + tid * n,
            "data.timestamp": np.full(n, tid / 10.0),
        }
        if self.raw:
            d["data.adc"] = self._adc[module]
        else:
            d["data.adc"] = self._base[module]
            d["data.gain"] = self._gain[module]
            d["data.mask"] = self._mask[module]
        return d


class _XTDF(Detector):
    """AGIPD, LPD, DSSC-style modules: ``<det>/DET/<m>CH0:xtdf`` with image.* keys."""

    prefix = ""

    def sources(self):
        if self.raw:
            return [f"{self.prefix}/DET/{m}CH0:xtdf" for m in range(self.modules)]
        return [f"{self.prefix}/CORR/{m}CH0:output" for m in range(self.modules)]

    def module_data(self, module, tid):
        n = self.frames
        d = {
            "header.pulseCount": n,
            "image.trainId": np.full((n, 1), tid, np.uint64),
            "image.pulseId": np.arange(n, dtype=np.uint64).reshape(n, 1),
            "image.cellId": np.arange(n, dtype=np.uint16).reshape(n, 1),
            "image.length": np.full((n, 1), int(np.prod(self.module_shape)) * 2, np.uint32),
            "image.status": np.zeros((n, 1), np.uint16),
        }
        d.update(self.images(module))
        return d


class Agipd(_XTDF):
    """AGIPD 1M: 16 modules of 512 x 128 pixels (``SPB_DET_AGIPD1M-1``)."""

    name = "AGIPD"
    modules = 16
    frames = 64
    module_shape = (512, 128)
    prefix = "SPB_DET_AGIPD1M-1"

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.raw:
            self._raw = []
            for e in self._base:
                g = _gain_stage(e)
                analog = np.clip(e * 40 / (1 + 15 * g), 0, 0x3FFF).astype(np.uint16)
                digital = (4000 + 2000 * g.astype(np.uint16)).astype(np.uint16)
                self._raw.append(np.stack([analog, digital], axis=1))  # (frames, 2, ss, fs)
        else:
            self._gain = [_gain_stage(e) for e in self._base]
            self._mask = [np.zeros(e.shape, np.uint32) for e in self._base]

    def images(self, module):
        if self.raw:
            return {"image.data": self._raw[module]}
        return {"image.data": self._base[module], "image.gain": self._gain[module],
                "image.mask": self._mask[module]}


class Lpd(_XTDF):
    """LPD 1M: 16 modules of 256 x 256 pixels (``FXE_DET_LPD1M-1``)."""

    name = "LPD"
    modules = 16
    frames = 100
    module_shape = (256, 256)
    prefix = "FXE_DET_LPD1M-1"

    def __init__(self, **kw):
        super().__init__(**kw)
        if self.raw:
            self._raw = [np.clip(e * 40, 0, 0x0FFF).astype(np.uint16)[:, None]
                         for e in self._base]  # (frames, 1, ss, fs)
        else:
            self._mask = [np.zeros(e.shape, np.uint32) for e in self._base]

    def images(self, module):
        if self.raw:
            return {"image.data": self._raw[module]}
        return {"image.data": self._base[module], "image.mask": self._mask[module]}


class Epix100(Detector):
    """ePix100: one module of 704 x 768 pixels (``MID_EXP_EPIX-1``)."""

    name = "ePix100"
    modules = 1
    frames = 1
    module_shape = (704, 768)

    def sources(self):
        if self.raw:
            return ["MID_EXP_EPIX-1/DET/RECEIVER:daqOutput"]
        return ["MID_EXP_EPIX-1/CORR/RECEIVER:output"]

    def __init__(self, **kw):
        super().__init__(**kw)
        e = self._base[0][0]
        self._pixels = (np.clip(e * 20, 0, 0x3FFF).astype(np.int16) if self.raw else e)

    def module_data(self, module, tid):
        return {"data.image.pixels": self._pixels, "data.trainId": tid,
                "data.frameNumber": tid, "data.calibrated": not self.raw}


#: detector name (as given on the command line, case-insensitive) -> class
DETECTORS = {"JUNGFRAU": Jungfrau, "AGIPD": Agipd, "LPD": Lpd, "EPIX100": Epix100}


def make_detector(name, **kw):
    """A detector by name (``JUNGFRAU``, ``AGIPD``, ``AGIPDModule`` = one AGIPD module,
    ``LPD``, ``ePix100``)."""
    key = name.upper()
    if key == "AGIPDMODULE":
        kw.setdefault("modules", 1)
        key = "AGIPD"
    try:
        cls = DETECTORS[key]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}: choose from JUNGFRAU, AGIPD, "
                         "AGIPDModule, LPD, ePix100") from None
    return cls(**kw)
