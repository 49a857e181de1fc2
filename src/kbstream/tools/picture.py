"""A picture of one train's detector data: ``kbstream glimpse --png FILE``.

One panel per detector (its module sources assembled into one image with the facility's
geometry package, extra-geom) and one per other source with a 2-D or 3-D array (a plain
image of that array), laid out in a grid in one PNG.  Every image is drawn at one PNG pixel
per image pixel (no resampling), so the picture's panels have the size of the assembled
images; a panel's place in the PNG is written in the PNG's text chunk
:data:`PANELS_KEY` (JSON).  Values are coloured between their 2nd and 98th percentile
(viridis); pixels no module covers are :data:`EMPTY_RGB`.

Detectors recognised (by name, key and the module's pixel shape):

========  ===============  ==============================================  =============
detector  module (ss, fs)   default geometry (extra-geom)                   geometry file
========  ===============  ==============================================  =============
JUNGFRAU  512 x 1024       ``JUNGFRAUGeometry.example(n)`` (JF4M: n = 8)   CrystFEL .geom
AGIPD     512 x 128        ``AGIPD_1MGeometry.example()`` (500K: 500K2G)   CrystFEL .geom
LPD       256 x 256        ``LPD_1MGeometry.example()``                    XFEL .h5, .geom
DSSC      128 x 512        ``DSSC_1MGeometry.example()``                   XFEL .h5, .geom
========  ===============  ==============================================  =============

in the forms they reach a bridge client: one source per module (``.../JNGFR01:daqOutput``,
``.../CORR/JNGFR01:output``, ``.../DET/0CH0:xtdf``, ``.../CORR/0CH0:output``; module
numbers from the name) with frames first (``(frames, ss, fs)``, raw AGIPD/LPD
``(frames, 1|2, ss, fs)``: the first of the middle axis, AGIPD's analog image), or one
stacked source (``--append-detector-modules``: the module axis at -3, missing modules
NaN or 0; the online ``(modules, fs, ss, frames)`` layout of karabo-bridge's simulator
too).  Raw JUNGFRAU ``uint16`` counts are drawn without the gain bits (the top two).
The image is shown as extra-geom's ``plot_data`` shows it: looking along the beam
(x increases to the left, y upwards).

matplotlib (Agg, no display) and extra-geom are imported when a picture is made:
``pip install 'kbstream[plot]'``; without them :class:`PlotDependencyError`.
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import PictureError, PlotDependencyError

__all__ = ["write_picture", "train_panels", "render", "binned", "require_plotting", "load_geometry",
           "default_geometry", "DETECTORS", "EMPTY_RGB", "PANELS_KEY"]

#: colour of pixels no module covers (the grey of extra-geom's own plots)
EMPTY_RGB = (64, 64, 64)
#: colour around the panels
BACKGROUND_RGB = (255, 255, 255)
#: PNG text chunk with the panels' places, sizes, sources (JSON list)
PANELS_KEY = "kbstream.panels"
#: a plain image larger than this on a side is drawn with every k-th pixel
MAX_SIDE = 4096

_HEADER = 60   # pixels above each panel for its three title lines
_MARGIN = 12
_DPI = 100


@dataclass(frozen=True)
class _Kind:
    name: str
    module_shape: tuple
    hints: tuple          # upper-case parts of a source name that say which detector
    keys: tuple           # the image keys, preferred in this order
    module_re: str        # a module number in a source name
    first_module: int     # the number of the first module in names (JNGFR01 is module 0)


DETECTORS = {
    "JUNGFRAU": _Kind("JUNGFRAU", (512, 1024), ("JNGFR", "JF"), ("data.adc",),
                      r"JNGFR(\d+)", 1),
    "AGIPD": _Kind("AGIPD", (512, 128), ("AGIPD",), ("image.data",), r"(\d+)CH0", 0),
    "LPD": _Kind("LPD", (256, 256), ("LPD",), ("image.data",), r"(\d+)CH0", 0),
    "DSSC": _Kind("DSSC", (128, 512), ("DSSC",), ("image.data",), r"(\d+)CH0", 0),
}

#: keys drawn in preference to others of a source without a detector
_IMAGE_KEYS = ("image.data", "data.adc", "data.image.pixels", "data.image.data", "data.image",
               "image.pixels")
#: the last part of keys that are not the picture (bookkeeping or companions of an image)
_NOT_IMAGES = {"gain", "mask", "cellId", "pulseId", "trainId", "length", "status",
               "memoryCell", "frameNumber", "timestamp"}


@dataclass
class Panel:
    """One panel of the picture: a 2-D image (float, NaN where nothing is)."""

    title: str
    image: np.ndarray
    sources: list
    key: str
    kind: str = "image"
    frame: int = None
    geometry: str = None
    modules: list = field(default_factory=list)
    note: str = ""
    bin: int = 1


# -- optional dependencies ------------------------------------------------------------------

def require_plotting(geometry=True):
    """Import matplotlib (and extra-geom when ``geometry``); :class:`PlotDependencyError`
    naming the missing package and the extra to install."""
    names = ["matplotlib"] + (["extra_geom"] if geometry else [])
    for name in names:
        try:
            __import__(name)
        except ImportError as e:
            pip = "extra-geom" if name == "extra_geom" else name
            raise PlotDependencyError(
                f"a picture needs {pip}, which is not installed: "
                f"pip install 'kbstream[plot]' (extra-geom and matplotlib)", missing=pip) from e


def _extra_geom():
    require_plotting(geometry=True)
    import extra_geom

    return extra_geom


# -- geometries -----------------------------------------------------------------------------

def _geometry_class(kind, nmodules):
    eg = _extra_geom()
    if kind == "JUNGFRAU":
        return eg.JUNGFRAUGeometry
    if kind == "AGIPD":
        return eg.AGIPD_500K2GGeometry if nmodules == 8 else eg.AGIPD_1MGeometry
    if kind == "LPD":
        return eg.LPD_1MGeometry
    return eg.DSSC_1MGeometry


def default_geometry(kind, nmodules):
    """extra-geom's example geometry of ``kind`` with ``nmodules`` modules (JUNGFRAU: any
    number; AGIPD: 16, or 8 for the 500K; LPD, DSSC: 16)."""
    cls = _geometry_class(kind, nmodules)
    if kind == "JUNGFRAU":
        return cls.example(nmodules)
    return cls.example()


def load_geometry(kind, path, nmodules=16):
    """The geometry of ``kind`` read by extra-geom from ``path``: a CrystFEL ``.geom`` file
    (every detector) or an XFEL HDF5 geometry file (``.h5``: LPD, DSSC, with the quadrant
    positions in the file)."""
    cls = _geometry_class(kind, nmodules)
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".geom":
        load = cls.from_crystfel_geom
    elif ext in (".h5", ".hdf5") and kind in ("LPD", "DSSC"):
        load = cls.from_h5_file
    else:
        what = "a CrystFEL .geom file" + (" or an XFEL .h5 geometry file"
                                          if kind in ("LPD", "DSSC") else "")
        raise PictureError(f"{path}: the {kind} geometry is read from {what}")
    try:
        return load(os.fspath(path))
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            RuntimeError) as e:
        raise PictureError(f"{path}: extra-geom cannot read it as a {kind} geometry: "
                           f"{type(e).__name__}: {e}") from e


# -- recognising detectors ------------------------------------------------------------------

def _standard(arr, module_shape):
    """``arr`` with the module's pixels as the last two axes (ss, fs), or None."""
    ss, fs = module_shape
    if arr.shape[-2:] == (ss, fs):
        return arr
    if arr.ndim >= 3 and arr.shape[-3:-1] == (fs, ss):
        # the old online layout: (..., fs, ss, frames)
        return np.moveaxis(arr, -1, 0).swapaxes(-1, -2)
    return None


def _recognise(source, key, arr):
    """``(kind, array with the module axes last, module or None)`` or None."""
    name = source.upper()
    hinted = [k for k in DETECTORS.values() if any(h in name for h in k.hints)]
    kinds = hinted or [k for k in DETECTORS.values() if key in k.keys]
    for kind in kinds:
        std = _standard(arr, kind.module_shape)
        if std is None:
            continue
        m = re.search(kind.module_re, source)
        module = int(m.group(1)) - kind.first_module if m else None
        return kind, std, module
    return None


def _image_key(values):
    """The key of a source's array to draw, or None."""
    arrays = {k: v for k, v in values.items()
              if isinstance(v, np.ndarray) and v.ndim >= 2 and v.dtype.kind in "biuf"
              and min(v.shape[-2:]) >= 2}
    for k in _IMAGE_KEYS:
        if k in arrays:
            return k
    rest = [k for k in arrays if k.rpartition(".")[2] not in _NOT_IMAGES]
    return max(rest, key=lambda k: (arrays[k].size, k)) if rest else None


def _pick_frame(arr, frame, what):
    n = arr.shape[0]
    if not -n <= frame < n:
        raise PictureError(f"{what}: frame {frame} is outside its {n} frames")
    return arr[frame]


def _module_image(kind, std, frame, what):
    """One module's 2-D image of ``std`` (frames first, then e.g. AGIPD's analog/digital)."""
    a = std
    if a.ndim >= 3:
        a = _pick_frame(a, frame, what)
    while a.ndim > 2:
        a = a[0]
    return _pixels(kind, a)


def _stacked_modules(kind, std, frame, what):
    """``(modules, ss, fs)`` of a stacked array (module axis -3, frames first)."""
    a = std
    if a.ndim == 2:
        a = a[None]
    if a.ndim >= 4:
        a = _pick_frame(a, frame, what)
    while a.ndim > 3:
        a = a[0]
    return _pixels(kind, a)


def _pixels(kind, a):
    if kind.name == "JUNGFRAU" and a.dtype == np.uint16:
        a = a & 0x3FFF       # raw counts: the top two bits are the gain stage
    return a.astype(np.float32, copy=False)


def _module_count(kind, sources, seen):
    """Modules of the default geometry: from the name (JF4M: 8, JF1M: 2, JF500K: 1;
    AGIPD500K: 8) or 16 for AGIPD, LPD and DSSC; never fewer than the data has."""
    names = " ".join(sources).upper()
    if kind.name == "JUNGFRAU":
        m = re.search(r"JF(\d+)M", names)
        n = int(m.group(1)) * 2 if m else 1    # JF500K: one module
    elif kind.name == "AGIPD" and "AGIPD500K" in names:
        n = 8
    else:
        n = 16
    return max(n, seen)


def _assemble(kind, modules, sources, geometries):
    """The assembled image (front view) and a description of the geometry."""
    nseen = max(modules) + 1
    path = None
    if geometries:
        path = geometries.get(kind.name, geometries.get(None))
    if path is not None:
        geom = load_geometry(kind.name, path, _module_count(kind, sources, nseen))
        described = os.path.basename(os.fspath(path))
    else:
        geom = default_geometry(kind.name, _module_count(kind, sources, nseen))
        described = f"extra-geom {type(geom).__name__}.example"
    n = len(geom.modules)
    if nseen > n:
        raise PictureError(f"{sources[0]}: module {nseen - 1} is outside the {n} modules of "
                           f"the geometry ({described})")
    stack = np.full((n,) + kind.module_shape, np.nan, np.float32)
    for m, img in modules.items():
        if m >= 0:
            stack[m] = img
    image, _centre = geom.position_modules(stack)
    # as extra-geom's plot_data shows it: y upwards, x to the left (looking along the beam)
    return image[::-1, ::-1], described


def train_panels(data, frame=0, geometries=None):
    """The panels of one train's ``data`` ({source: {key: value}}).

    ``frame``: the frame (memory cell / pulse) drawn of arrays with several; ``geometries``:
    ``{detector name or None (any): geometry file}``.  Raises :class:`PictureError` when no
    source has an array to draw.
    """
    groups = {}     # (kind, pattern) -> {"modules": {m: image}, "sources": [...], "key"}
    plain = []
    for source in sorted(data):
        values = data[source]
        if not isinstance(values, dict):
            continue
        key = _image_key(values)
        if key is None:
            continue
        arr = values[key]
        found = _recognise(source, key, arr)
        what = f"{source} {key}"
        if found is None:
            plain.append((source, key, arr))
            continue
        kind, std, module = found
        if module is None:
            stacked = _stacked_modules(kind, std, frame, what)
            g = groups.setdefault((kind.name, source), {"kind": kind, "sources": [], "key": key,
                                                        "modules": {}})
            g["sources"].append(source)
            for m in range(stacked.shape[0]):
                # modules without data: NaN (floats) or 0 (integers) in a stacked array
                filler = np.isnan(stacked[m]) if arr.dtype.kind == "f" else stacked[m] == 0
                if not filler.all():
                    g["modules"][m] = stacked[m]
            g["stacked"] = stacked.shape[0]
        else:
            m = re.search(kind.module_re, source)
            pattern = source[:m.start(1)] + "*" + source[m.end(1):]
            g = groups.setdefault((kind.name, pattern), {"kind": kind, "sources": [], "key": key,
                                                         "modules": {}})
            g["sources"].append(source)
            g["modules"][module] = _module_image(kind, std, frame, what)
    panels = []
    for (kname, pattern), g in groups.items():
        kind = g["kind"]
        if not g["modules"]:
            g["modules"][0] = np.full(kind.module_shape, np.nan, np.float32)
        image, described = _assemble(kind, g["modules"], g["sources"], geometries)
        n = len(g["modules"])
        panels.append(Panel(
            title=pattern, image=image, sources=g["sources"], key=g["key"], kind=kname,
            frame=frame, geometry=described, modules=sorted(g["modules"]),
            note=f"{kname}, {n} module{'s' if n != 1 else ''} with data, frame {frame}"))
    for source, key, arr in plain:
        a = arr
        f = None
        if a.ndim == 3:
            a, f = _pick_frame(a, frame, f"{source} {key}"), frame
        if a.ndim != 2:
            continue     # only 2-D images and stacks of them are drawn
        step = max(1, math.ceil(max(a.shape) / MAX_SIDE))
        a = a[::step, ::step].astype(np.float32, copy=False)
        note = f"{arr.dtype} {tuple(arr.shape)}" + (f", frame {f}" if f is not None else "")
        if step > 1:
            note += f", every {step}th pixel"
        panels.append(Panel(title=source, image=a, sources=[source], key=key, frame=f,
                            note=note))
    if not panels:
        raise PictureError("no source of this train has a 2-D or 3-D array to draw")
    return panels


def binned(image, n):
    """``image`` with each ``n`` x ``n`` block of pixels drawn as one: the mean of the block's
    finite pixels, NaN (empty) where it has none; the last row and column of blocks may be
    partial."""
    if n <= 1:
        return image
    h, w = image.shape
    H, W = -(-h // n), -(-w // n)
    padded = np.full((H * n, W * n), np.nan, np.float32)
    padded[:h, :w] = image
    blocks = padded.reshape(H, n, W, n)
    finite = np.isfinite(blocks)
    counts = finite.sum(axis=(1, 3))
    sums = np.where(finite, blocks, 0.0).sum(axis=(1, 3), dtype=np.float64)
    out = np.full((H, W), np.nan, np.float32)
    np.divide(sums, counts, out=out, where=counts > 0, casting="unsafe")
    return out


# -- drawing --------------------------------------------------------------------------------

def _colours(image, cmap):
    """RGBA bytes of ``image``: viridis between its 2nd and 98th percentile, NaN empty."""
    finite = np.isfinite(image)
    rgba = np.empty(image.shape + (4,), np.uint8)
    rgba[...] = EMPTY_RGB + (255,)
    if finite.any():
        vals = image[finite]
        lo, hi = np.percentile(vals, [2.0, 98.0])
        if not hi > lo:
            hi = lo + 1.0
        scaled = np.clip((vals - lo) / (hi - lo), 0.0, 1.0)
        rgba[finite] = cmap(scaled, bytes=True)
        return rgba, (float(lo), float(hi))
    return rgba, (None, None)


def _layout(panels):
    """``(width, height, [(x, y)])``: a grid of about sqrt(n) columns, each cell as wide as
    its column's widest panel and as high as its row's highest."""
    n = len(panels)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    widths = [max(p.image.shape[1] for p in panels[c::cols]) for c in range(cols)]
    heights = [max(p.image.shape[0] for p in panels[r * cols:(r + 1) * cols]) + _HEADER
               for r in range(rows)]
    # a title needs some width too
    widths = [max(w, 320) for w in widths]
    xs = [_MARGIN + sum(widths[:c]) + c * _MARGIN for c in range(cols)]
    ys = [_MARGIN + sum(heights[:r]) + r * _MARGIN for r in range(rows)]
    width = xs[-1] + widths[-1] + _MARGIN
    height = ys[-1] + heights[-1] + _MARGIN
    return width, height, [(xs[i % cols], ys[i // cols]) for i in range(n)]


def render(panels, path, title=None):
    """Write ``panels`` to the PNG ``path``; returns the picture's description
    (``width``, ``height``, ``panels``: each with its image's ``x``, ``y``, ``width``,
    ``height`` in PNG pixels, ``sources``, ``key``, ``kind``, ``frame``, ``geometry``,
    ``range``), also stored in the PNG's :data:`PANELS_KEY` text chunk."""
    require_plotting(geometry=False)
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cmap = colormaps["viridis"]
    width, height, places = _layout(panels)
    canvas = np.empty((height, width, 4), np.uint8)
    canvas[...] = BACKGROUND_RGB + (255,)
    described = []
    texts = []
    for p, (x, y) in zip(panels, places):
        rgba, rng = _colours(p.image, cmap)
        h, w = p.image.shape
        top = y + _HEADER
        canvas[top:top + h, x:x + w] = rgba
        lo, hi = rng
        span = "no finite values" if lo is None else f"colours {lo:.4g} .. {hi:.4g}"
        chars = max(20, w // 7)
        line1 = f"{p.title} [{p.key}]"
        line3 = (f"geometry: {p.geometry}; " if p.geometry else "") + span
        texts.append((x, y, line1[:chars], p.note[:chars], line3[:chars]))
        described.append({"x": x, "y": top, "width": w, "height": h, "title": p.title,
                          "sources": list(p.sources), "key": p.key, "kind": p.kind,
                          "frame": p.frame, "geometry": p.geometry, "modules": p.modules,
                          "bin": p.bin, "range": [lo, hi]})
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    fig.figimage(canvas, 0, 0, origin="upper", resize=False)
    for x, y, line1, line2, line3 in texts:
        fig.text(x / width, 1 - (y + 4) / height, line1, va="top", ha="left", fontsize=9,
                 fontweight="bold", family="monospace")
        for i, line in enumerate((line2, line3)):
            fig.text(x / width, 1 - (y + 22 + 16 * i) / height, line, va="top", ha="left",
                     fontsize=8, family="monospace")
    info = {"width": width, "height": height, "panels": described}
    meta = {PANELS_KEY: json.dumps(described), "Software": "kbstream glimpse"}
    if title:
        meta["Title"] = title
    fig.savefig(os.fspath(path), dpi=_DPI, format="png", metadata=meta)
    return info


def write_picture(data, path, frame=0, geometries=None, title=None, bin=1):
    """Draw one train's ``data`` into the PNG ``path`` (:func:`train_panels`,
    :func:`render`); returns the picture's description.  ``bin``: draw each ``bin`` x
    ``bin`` block of pixels as one (:func:`binned`; a smaller file)."""
    require_plotting(geometry=False)
    if int(bin) < 1:
        raise PictureError(f"bin must be 1 or more, not {bin}")
    panels = train_panels(data, frame=frame, geometries=geometries)
    for p in panels:
        p.image = binned(p.image, int(bin))
        p.bin = int(bin)
        if bin > 1:
            p.note += f", {bin}x{bin} binned"
    return render(panels, path, title=title)
