"""Composite node rules shared by both codecs: HASH and VECTOR_HASH values, ImageData.

Everything here builds or takes apart kbhash's container classes, so this
module depends on ``hash``; the plain value rules (``_values``) and the type
inference (``_infer``) do not, which keeps the import graph of kbhash free of
cycles: ``_types``/``errors`` <- ``_infer`` <- ``hash`` <- ``_nodes`` <- codecs.
"""

from collections.abc import Mapping

import numpy as np

from ._types import HashType, type_name
from .errors import EncodeError
from .hash import Hash
from .special import ImageData

T = HashType


def hash_list(value, key, t):
    """A VECTOR_HASH value as a list of Hashes (mappings are converted)."""
    if not isinstance(value, (list, tuple)):
        raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as {type_name(t)}")
    out = []
    for v in value:
        if isinstance(v, Hash):
            out.append(v)
        elif isinstance(v, Mapping):
            out.append(Hash(v))
        else:
            raise EncodeError(f"{key!r}: {type_name(t)} elements must be Hashes, not {type(v).__name__}")
    return out


def as_hash(value, key, t):
    """A HASH value as a Hash (a mapping is converted)."""
    if isinstance(value, Hash):
        return value
    if isinstance(value, Mapping):
        return Hash(value)
    raise EncodeError(f"{key!r}: cannot write {type(value).__name__} as {type_name(t)}")


def imagedata_children(img):
    """The ImageData children in C++ order, as (key, value, type) triples."""
    f = img.fields()
    return [
        ("pixels", img.pixels, None),
        ("encoding", f["encoding"], int(T.INT32)),
        ("dims", f["dims"], int(T.VECTOR_UINT64)),
        ("bitsPerPixel", f["bitsPerPixel"], int(T.INT32)),
        ("roiOffsets", f["roiOffsets"], int(T.VECTOR_UINT64)),
        ("binning", f["binning"], int(T.VECTOR_UINT64)),
        ("rotation", f["rotation"], int(T.INT32)),
        ("flipX", f["flipX"], int(T.BOOL)),
        ("flipY", f["flipY"], int(T.BOOL)),
    ]


#: ImageData children and the type each must have on the wire.
IMAGEDATA_FIELDS = {
    "encoding": int(T.INT32),
    "dims": int(T.VECTOR_UINT64),
    "bitsPerPixel": int(T.INT32),
    "roiOffsets": int(T.VECTOR_UINT64),
    "binning": int(T.VECTOR_UINT64),
    "rotation": int(T.INT32),
    "flipX": int(T.BOOL),
    "flipY": int(T.BOOL),
}


def make_imagedata(h):
    """An ImageData from a decoded ``__classId="ImageData"`` Hash, or None.

    None means the Hash does not have exactly ImageData's shape (unknown or
    mistyped children, pixels not an NDArray); the caller then keeps the plain
    Hash, so nothing is lost.
    """
    pixels = h._v.get("pixels")
    if not isinstance(pixels, np.ndarray) or "pixels" in h._t or h._a.get("pixels"):
        return None
    kw = {}
    for k, v in h._v.items():
        if k == "pixels":
            continue
        if IMAGEDATA_FIELDS.get(k) != h._t.get(k) or h._a.get(k):
            return None
        kw[k] = v
    try:
        return ImageData(pixels, **kw)
    except (ValueError, TypeError):
        return None
