"""Convert between kbhash.Hash and the typed "content" form of the test vectors.

The content form (``tests/data/karabo_hash_vectors.json``, field
``content``) is an ordered list of nodes ``{key, type, attrs, value}``; it is
also what the Karabo peer driver (tests/peers) reads and writes, so archives
can be compared with Karabo's own implementations value by value, with types.

NDArray and ImageData nodes appear in it as the HASH nodes they are on the
wire (``__classId`` attribute first, then the children in C++ order).
"""

import math

import numpy as np

from kbhash import Hash, HashType, ImageData, Schema, infer_type
from kbhash._nodes import imagedata_children
from kbhash._types import IMAGEDATA, NDARRAY
from kbhash._values import ndarray_parts

T = HashType


def _float(x):
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _unfloat(x):
    return float(x) if isinstance(x, str) else x


def _elements(value):
    """Python elements of a vector value (a list as is: no detour through float64)."""
    return list(value) if isinstance(value, (list, tuple)) else np.asarray(value).tolist()


def value_to_content(value, t):
    """The content form of a value written as type id ``t``."""
    if t == T.BOOL:
        return bool(value)
    if t == T.CHAR:
        return value if isinstance(value, str) else chr(value[0] if isinstance(value, bytes) else value)
    if t in (T.FLOAT, T.DOUBLE):
        return _float(value)
    if t in (T.COMPLEX_FLOAT, T.COMPLEX_DOUBLE):
        c = complex(value)
        return {"re": _float(c.real), "im": _float(c.imag)}
    if t in (T.VECTOR_CHAR, T.BYTE_ARRAY):
        return {"hex": bytes(memoryview(value).cast("B")).hex()}
    if t in (T.VECTOR_FLOAT, T.VECTOR_DOUBLE):
        return [_float(x) for x in _elements(value)]
    if t in (T.VECTOR_COMPLEX_FLOAT, T.VECTOR_COMPLEX_DOUBLE):
        return [{"re": _float(c.real), "im": _float(c.imag)} for c in _elements(value)]
    if t in (T.VECTOR_BOOL,):
        return [bool(x) for x in _elements(value)]
    if T.VECTOR_INT8 <= t <= T.VECTOR_UINT64 and t % 2 == 1:
        return [int(x) for x in _elements(value)]
    if t in (T.HASH, T.HASH_POINTER):
        return hash_to_content(value if isinstance(value, Hash) else Hash(value))
    if t in (T.VECTOR_HASH, T.VECTOR_HASH_POINTER):
        return [hash_to_content(v if isinstance(v, Hash) else Hash(v)) for v in value]
    if t == T.SCHEMA:
        return {"rootName": value.root_name, "parameters": hash_to_content(value.parameters)}
    if t == T.NONE:
        return None
    if t == T.VECTOR_NONE:
        return [None] * len(value)
    if t == T.VECTOR_STRING:
        return list(value)
    if t in (T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64):
        return int(value)
    if t == T.STRING:
        return value
    raise AssertionError(f"no content form for type {t}")


def _attrs_content(attrs, prefix=()):
    """``attrs``: None or (values dict, explicit types dict) as a Hash stores them."""
    out = list(prefix)
    if attrs:
        avals, atypes = attrs
        for name, v in avals.items():
            if prefix and name == "__classId":
                continue
            t = (atypes or {}).get(name)
            t = infer_type(v) if t is None else t
            out.append({"key": name, "type": T(t).name, "value": value_to_content(v, t)})
    return out


def _ndarray_content(arr):
    arr, et, shape, big = ndarray_parts(arr)
    return [
        {"key": "data", "type": "BYTE_ARRAY", "attrs": [], "value": {"hex": arr.tobytes().hex()}},
        {"key": "type", "type": "INT32", "attrs": [], "value": int(et)},
        {"key": "shape", "type": "VECTOR_UINT64", "attrs": [], "value": shape},
        {"key": "isBigEndian", "type": "BOOL", "attrs": [], "value": bool(big)},
    ]


def _class_attr(name):
    return {"key": "__classId", "type": "STRING", "value": name}


def node_to_content(key, value, t, attrs):
    if t == NDARRAY:
        return {
            "key": key,
            "type": "HASH",
            "attrs": _attrs_content(attrs, [_class_attr("NDArray")]),
            "value": _ndarray_content(value),
        }
    if t == IMAGEDATA:
        children = []
        for k, v, ct in imagedata_children(value):
            children.append(node_to_content(k, v, NDARRAY if ct is None else ct, None))
        return {"key": key, "type": "HASH", "attrs": _attrs_content(attrs, [_class_attr("ImageData")]), "value": children}
    return {"key": key, "type": T(t).name, "attrs": _attrs_content(attrs), "value": value_to_content(value, t)}


def hash_to_content(h):
    """Content form of a Hash, with the types it is (or would be) written with."""
    out = []
    for key, value in h.items():
        t = h._t.get(key)
        t = infer_type(value) if t is None else t
        a = h._a.get(key)
        out.append(node_to_content(key, value, t, (a, h._at.get(key)) if a else None))
    return out


def content_value(v, t):
    """Python value for a content value of type name ``t`` (for Hash.set with that type)."""
    t = T[t]
    if t in (T.FLOAT, T.DOUBLE):
        return _unfloat(v)
    if t in (T.COMPLEX_FLOAT, T.COMPLEX_DOUBLE):
        return complex(_unfloat(v["re"]), _unfloat(v["im"]))
    if t in (T.VECTOR_CHAR,):
        return bytes.fromhex(v["hex"])
    if t == T.BYTE_ARRAY:
        return memoryview(bytes.fromhex(v["hex"]))
    if t in (T.VECTOR_FLOAT, T.VECTOR_DOUBLE):
        return [_unfloat(x) for x in v]
    if t in (T.VECTOR_COMPLEX_FLOAT, T.VECTOR_COMPLEX_DOUBLE):
        return [complex(_unfloat(c["re"]), _unfloat(c["im"])) for c in v]
    if t in (T.HASH, T.HASH_POINTER):
        return content_to_hash(v)
    if t in (T.VECTOR_HASH, T.VECTOR_HASH_POINTER):
        return [content_to_hash(x) for x in v]
    if t == T.SCHEMA:
        return Schema(v["rootName"], content_to_hash(v["parameters"]))
    return v


def content_to_hash(nodes):
    """A Hash whose every node and attribute carries the content's explicit type.

    NDArray/ImageData nodes stay plain HASH nodes with a ``__classId``
    attribute: they encode to the same bytes as the real thing.
    """
    h = Hash()
    for n in nodes:
        h.set(n["key"], content_value(n["value"], n["type"]), type=T[n["type"]], sep="\0")
        for a in n["attrs"]:
            h.set_attribute(n["key"], a["key"], content_value(a["value"], a["type"]), type=T[a["type"]], sep="\0")
    return h


__all__ = ["hash_to_content", "content_to_hash", "value_to_content", "ImageData"]
