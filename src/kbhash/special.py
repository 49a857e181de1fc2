"""Karabo's special values carried in a Hash: :class:`ImageData` and :class:`Schema`."""

import numpy as np

from ._infer import KaraboValue
from ._types import IMAGEDATA, Encoding, HashType
from .hash import Hash, _values_equal

__all__ = ["ImageData", "Schema"]


class Schema(KaraboValue):
    """A Karabo Schema, carried opaquely: its root name and parameter Hash."""

    __slots__ = ("root_name", "parameters")
    _karabo_type = int(HashType.SCHEMA)

    def __init__(self, root_name="", parameters=None):
        self.root_name = root_name
        self.parameters = Hash() if parameters is None else parameters

    def __eq__(self, other):
        if not isinstance(other, Schema):
            return NotImplemented
        return self.root_name == other.root_name and self.parameters == other.parameters

    __hash__ = None

    def __repr__(self):
        return f"Schema({self.root_name!r}, {list(self.parameters.paths())!r})"


_CHANNELS = {
    Encoding.GRAY: 1,
    Encoding.RGB: 3,
    Encoding.BGR: 3,
    Encoding.RGBA: 4,
    Encoding.BGRA: 4,
    Encoding.BAYER_RG: 1,
    Encoding.BAYER_BG: 1,
    Encoding.BAYER_GR: 1,
    Encoding.BAYER_GB: 1,
}


def _guess_encoding(shape):
    if len(shape) == 2:
        return Encoding.GRAY
    if len(shape) == 3:
        return {1: Encoding.GRAY, 3: Encoding.RGB, 4: Encoding.RGBA}.get(shape[2], Encoding.GRAY)
    return Encoding.UNDEFINED


class ImageData(KaraboValue):
    """A Karabo ImageData: pixels plus their description.

    Field names are Karabo's (they are also the keys on the wire).  Defaults
    follow Karabo's C++ ImageData: the encoding is guessed from the shape
    (2-D GRAY; 3-D with last dimension 1/3/4 GRAY/RGB/RGBA; other 3-D GRAY;
    otherwise UNDEFINED), ``dims`` is the shape, ``bitsPerPixel`` is
    8 x itemsize x channels (0 when unknown), ``roiOffsets`` zeros,
    ``binning`` ones, ``rotation`` 0, no flips.
    """

    __slots__ = ("pixels", "encoding", "dims", "bitsPerPixel", "roiOffsets", "binning", "rotation", "flipX", "flipY")
    _karabo_type = IMAGEDATA

    def __init__(
        self,
        pixels,
        encoding=None,
        dims=None,
        bitsPerPixel=None,
        roiOffsets=None,
        binning=None,
        rotation=0,
        flipX=False,
        flipY=False,
    ):
        if not isinstance(pixels, np.ndarray):
            pixels = np.asarray(pixels)
        self.pixels = pixels
        shape = pixels.shape
        self.encoding = _guess_encoding(shape) if encoding is None else Encoding(encoding)
        self.dims = [int(x) for x in (shape if dims is None else dims)]
        if bitsPerPixel is None:
            ch = _CHANNELS.get(self.encoding)
            bitsPerPixel = 8 * pixels.dtype.itemsize * ch if ch else 0
        self.bitsPerPixel = int(bitsPerPixel)
        n = len(self.dims)
        self.roiOffsets = [0] * n if roiOffsets is None else [int(x) for x in roiOffsets]
        self.binning = [1] * n if binning is None else [int(x) for x in binning]
        self.rotation = int(rotation)
        self.flipX = bool(flipX)
        self.flipY = bool(flipY)

    def fields(self):
        """The non-pixel fields as an ordered dict (wire order)."""
        return {
            "encoding": int(self.encoding),
            "dims": list(self.dims),
            "bitsPerPixel": self.bitsPerPixel,
            "roiOffsets": list(self.roiOffsets),
            "binning": list(self.binning),
            "rotation": self.rotation,
            "flipX": self.flipX,
            "flipY": self.flipY,
        }

    def __eq__(self, other):
        if not isinstance(other, ImageData):
            return NotImplemented
        return _values_equal(self.pixels, other.pixels) and self.fields() == other.fields()

    __hash__ = None

    def __repr__(self):
        return f"ImageData({self.pixels.dtype} {self.pixels.shape}, encoding={self.encoding.name})"
