"""Hypothesis strategies for random Karabo Hashes with explicit types.

``hashes(profile)`` draws Hashes whose every node and attribute carries an
explicit Karabo type, nested up to a few levels, with NDArray and ImageData
nodes.  ``profile`` limits the types to what a peer supports:

- ``"all"``: every type of the format,
- ``"karabind"``: what Karabo's C++ binding can build and read back
  (no HASH_POINTER types, no VECTOR_COMPLEX_FLOAT, no complex NDArrays),
- ``"native"``: what karabo.native can read (no complex types, no
  VECTOR_NONE, no HASH_POINTER types).
"""

import string

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kbhash import Hash, HashType, ImageData, Schema

T = HashType

INT_RANGES = {
    T.INT8: (-(2**7), 2**7 - 1),
    T.UINT8: (0, 2**8 - 1),
    T.INT16: (-(2**15), 2**15 - 1),
    T.UINT16: (0, 2**16 - 1),
    T.INT32: (-(2**31), 2**31 - 1),
    T.UINT32: (0, 2**32 - 1),
    T.INT64: (-(2**63), 2**63 - 1),
    T.UINT64: (0, 2**64 - 1),
}

safe_keys = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=12)
any_keys = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=".\0"), min_size=0, max_size=12)
texts = st.text(max_size=20)


def scalar(t, profile="all"):
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        return st.integers(lo, hi)
    if t == T.BOOL:
        return st.booleans()
    if t == T.CHAR:
        # the peers only build and read ASCII characters
        return st.characters(max_codepoint=255 if profile == "all" else 127)
    if t == T.FLOAT:
        return st.floats(width=32)
    if t == T.DOUBLE:
        return st.floats()
    # karabind builds complex values through a text conversion that refuses inf/nan
    finite = profile != "all"
    if t == T.COMPLEX_FLOAT:
        return st.complex_numbers(width=64, allow_infinity=not finite, allow_nan=not finite)
    if t == T.COMPLEX_DOUBLE:
        return st.complex_numbers(width=128, allow_infinity=not finite, allow_nan=not finite)
    if t == T.STRING:
        return texts
    raise AssertionError(t)


LEAF_TYPES = {
    "all": [
        T.BOOL, T.CHAR, T.INT8, T.UINT8, T.INT16, T.UINT16, T.INT32, T.UINT32, T.INT64, T.UINT64,
        T.FLOAT, T.DOUBLE, T.COMPLEX_FLOAT, T.COMPLEX_DOUBLE, T.STRING, T.NONE, T.BYTE_ARRAY,
        T.VECTOR_BOOL, T.VECTOR_CHAR, T.VECTOR_INT8, T.VECTOR_UINT8, T.VECTOR_INT16, T.VECTOR_UINT16,
        T.VECTOR_INT32, T.VECTOR_UINT32, T.VECTOR_INT64, T.VECTOR_UINT64, T.VECTOR_FLOAT, T.VECTOR_DOUBLE,
        T.VECTOR_COMPLEX_FLOAT, T.VECTOR_COMPLEX_DOUBLE, T.VECTOR_STRING, T.VECTOR_NONE,
    ],
}
LEAF_TYPES["karabind"] = [t for t in LEAF_TYPES["all"] if t not in (T.VECTOR_COMPLEX_FLOAT,)]
LEAF_TYPES["native"] = [
    t
    for t in LEAF_TYPES["all"]
    if t not in (T.COMPLEX_FLOAT, T.COMPLEX_DOUBLE, T.VECTOR_COMPLEX_FLOAT, T.VECTOR_COMPLEX_DOUBLE, T.VECTOR_NONE)
]

NDARRAY_DTYPES = ["?", "i1", "u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f4", "<f8"]


def leaf_value(t, profile="all"):
    if t in INT_RANGES or t in (T.BOOL, T.CHAR, T.FLOAT, T.DOUBLE, T.COMPLEX_FLOAT, T.COMPLEX_DOUBLE, T.STRING):
        return scalar(t, profile)
    if t == T.NONE:
        return st.none()
    if t in (T.BYTE_ARRAY,):
        return st.binary(max_size=40).map(memoryview)
    if t == T.VECTOR_CHAR:
        return st.binary(max_size=40)
    if t == T.VECTOR_STRING:
        return st.lists(texts, max_size=4)
    if t == T.VECTOR_NONE:
        return st.lists(st.none(), max_size=4)
    return st.lists(scalar(T(t - 1), profile), max_size=6)


@st.composite
def typed_leaf(draw, profile):
    t = draw(st.sampled_from(LEAF_TYPES[profile]))
    return t, draw(leaf_value(t, profile))


def ndarrays(profile):
    dtypes = NDARRAY_DTYPES + (["<c8", "<c16", ">u2", ">f8"] if profile == "all" else [])
    return st.sampled_from(dtypes).flatmap(
        lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    )


def images():
    return hnp.arrays(
        st.sampled_from([np.uint8, np.uint16, np.float32]),
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=4),
    ).map(ImageData)


@st.composite
def attributes(draw, profile, keys):
    n = draw(st.integers(0, 3))
    names = draw(st.lists(keys, min_size=n, max_size=n, unique=True))
    return [(name, *draw(typed_leaf(profile))) for name in names]


@st.composite
def hashes(draw, profile="all", depth=0, keys=None):
    """A Hash with explicit types everywhere (NDArray/ImageData by value)."""
    if keys is None:
        keys = any_keys if profile == "all" else safe_keys
    n = draw(st.integers(0, 5 if depth < 2 else 2))
    names = draw(st.lists(keys, min_size=n, max_size=n, unique=True))
    h = Hash()
    for name in names:
        kind = draw(st.integers(0, 9))
        if kind <= 5 or depth >= 3:
            t, v = draw(typed_leaf(profile))
            h.set(name, v, type=t, sep="\0")
        elif kind == 6:
            h.set(name, draw(hashes(profile, depth + 1, keys)), type=T.HASH, sep="\0")
        elif kind == 7:
            t = T.VECTOR_HASH
            if profile == "all" and draw(st.booleans()):
                t = draw(st.sampled_from([T.HASH_POINTER, T.VECTOR_HASH_POINTER]))
            if t == T.HASH_POINTER:
                h.set(name, draw(hashes(profile, depth + 1, keys)), type=t, sep="\0")
            else:
                h.set(name, draw(st.lists(hashes(profile, depth + 1, keys), max_size=3)), type=t, sep="\0")
        elif kind == 8:
            h.set(name, draw(ndarrays(profile)), sep="\0")
        else:
            if draw(st.booleans()):
                h.set(name, draw(images()), sep="\0")
            else:
                h.set(name, Schema(draw(safe_keys), draw(hashes(profile, depth + 1, keys))), type=T.SCHEMA, sep="\0")
        for aname, at, av in draw(attributes(profile, keys)):
            h.set_attribute(name, aname, av, type=at, sep="\0")
    return h


# Plain Python values whose Karabo type comes from inference (karabind's rules).
plain_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=10),
    st.none(),
    st.binary(max_size=10),
)
plain_lists = st.one_of(
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4),
    st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=4),
    st.lists(st.floats(), min_size=1, max_size=4),
    st.lists(st.text(max_size=5), max_size=4),
)
plain_dicts = st.recursive(
    st.dictionaries(safe_keys, st.one_of(plain_scalars, plain_lists), max_size=5),
    lambda children: st.dictionaries(safe_keys, st.one_of(plain_scalars, plain_lists, children), max_size=4),
    max_leaves=20,
)
