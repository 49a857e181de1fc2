"""Declared content of pipeline items: keys, Karabo types or numpy dtypes, shapes.

A :class:`DataSchema` is what a Karabo user declares as an output channel's data schema
(``OUTPUT_CHANNEL(...).dataSchema(...)``): it validates items (:meth:`DataSchema.validate`,
Karabo's strict rules when asked) and describes them in Karabo's schema layout
(:meth:`DataSchema.to_parameters`, the ``<channel>.schema`` node of a device schema;
docs/wire/karabo-broker-amqp.md, "What kbstream publishes"). :meth:`DataSchema.from_parameters`
reads that layout back (a schema written as a Hash, or another device's).
"""

from typing import NamedTuple

import numpy as np

from kbhash import NDARRAY_DTYPE, Hash, HashType, ImageData, dtype_type

from .errors import SchemaError

__all__ = ["DataSchema", "Vector", "Image", "DAQ_TRAIN", "DAQ_PULSE"]

#: Karabo's ``daqDataType`` codes of a top node of a data schema.
DAQ_PULSE = 0
DAQ_TRAIN = 1
_DAQ = {"pulse": DAQ_PULSE, "train": DAQ_TRAIN, DAQ_PULSE: DAQ_PULSE, DAQ_TRAIN: DAQ_TRAIN}

# Karabo's numeric attribute values: nodeType, accessMode, assignment, unit codes
_LEAF, _NODE = 0, 1
_READ, _RECONFIGURE = 2, 4


class Vector(NamedTuple):
    """A vector property: its Karabo ``type`` (``HashType.VECTOR_INT64``, ...) and at most
    ``max_size`` elements (Karabo's ``maxSize``; None: any length)."""

    type: HashType
    max_size: int = None


class Image(NamedTuple):
    """An ImageData: pixel ``dtype`` and ``dims`` (Karabo's ``setDimensions``; None and 0
    match any extension); both None: any image."""

    dtype: object = None
    dims: tuple = None


def _int32(h, path, name, value):
    h.set_attribute(path, name, int(value), type=HashType.INT32)


def _string(h, path, name, value):
    h.set_attribute(path, name, value, type=HashType.STRING)


def _node(h, path, access=_READ, *attrs):
    h.set(path, Hash())
    for name, value in attrs:
        _string(h, path, name, value)
    _int32(h, path, "accessMode", access)
    _int32(h, path, "nodeType", _NODE)


def _leaf(h, path, vtype, default, *, shown=None, desc=None, display=None, max_size=None,
          extra=()):
    """A read-only leaf with Karabo's attributes (order as karabind writes them)."""
    h.set(path, Hash())
    if shown is not None:
        _string(h, path, "displayedName", shown)
    if desc is not None:
        _string(h, path, "description", desc)
    if max_size is not None:
        h.set_attribute(path, "maxSize", int(max_size), type=HashType.UINT32)
    _int32(h, path, "accessMode", _READ)
    _int32(h, path, "assignment", 0)
    h.set_attribute(path, "defaultValue", default, type=vtype)
    _int32(h, path, "nodeType", _LEAF)
    if display is not None:
        _string(h, path, "displayType", display)
    _string(h, path, "valueType", vtype.name)
    for name, value, t in extra:
        h.set_attribute(path, name, value, type=t)
    if vtype != HashType.BYTE_ARRAY:
        _int32(h, path, "requiredAccessLevel", 0)


def _uint64s(values):
    return np.asarray([int(v or 0) for v in (values or ())], dtype=np.uint64)


def _ndarray_node(h, path, dtype, shape, max_dims=None, shown=None, desc=None):
    node_attrs = [("classId", "NDArray"), ("displayType", "NDArray")]
    _node(h, path, _READ, *node_attrs)
    if shown is not None:
        _string(h, path, "displayedName", shown)
    if desc is not None:
        _string(h, path, "description", desc)
    _leaf(h, f"{path}.data", HashType.BYTE_ARRAY, b"", shown="Data",
          desc="the array's elements as raw bytes", display="ByteArray",
          extra=(("unitEnum", 45, HashType.INT32), ("unitName", "not_assigned", HashType.STRING),
                 ("unitSymbol", "N_A", HashType.STRING), ("metricPrefixEnum", 10, HashType.INT32),
                 ("metricPrefixName", "", HashType.STRING),
                 ("metricPrefixSymbol", "", HashType.STRING)))
    _leaf(h, f"{path}.shape", HashType.VECTOR_UINT64, _uint64s(shape), shown="Shape",
          desc="extension of each dimension (0: any)", display="Curve",
          extra=(() if max_dims is None else
                 (("maxSize", int(max_dims), HashType.UINT32),)))
    t = -1 if dtype is None else dtype_type(np.dtype(dtype))
    _leaf(h, f"{path}.type", HashType.INT32, int(t if t is not None else -1),
          shown="Data Type", desc="Karabo type code of the elements")
    _leaf(h, f"{path}.isBigEndian", HashType.BOOL, False, shown="Is big-endian",
          desc="true when the elements are stored big-endian")


def _image_node(h, path, dtype, dims):
    _node(h, path, _READ, ("classId", "ImageData"), ("displayType", "ImageData"))
    _ndarray_node(h, f"{path}.pixels", dtype, dims, max_dims=2, shown="Pixel Data",
                  desc="the pixels as an NDArray")
    v2 = (("maxSize", 2, HashType.UINT32),)
    _leaf(h, f"{path}.dims", HashType.VECTOR_UINT64, _uint64s(dims), shown="Dimensions",
          desc="extension of each image dimension", display="Curve", extra=v2)
    _leaf(h, f"{path}.encoding", HashType.INT32, 0, shown="Encoding",
          desc="pixel encoding (GRAY, RGB, ...)")
    _leaf(h, f"{path}.bitsPerPixel", HashType.INT32, 0, shown="Bits per pixel",
          desc="bits of one pixel")
    _leaf(h, f"{path}.roiOffsets", HashType.VECTOR_UINT64, _uint64s(()), shown="ROI Offsets",
          desc="offset of the region of interest (zeros: none)", display="Curve", extra=v2)
    _leaf(h, f"{path}.binning", HashType.VECTOR_UINT64, _uint64s(()), shown="Binning",
          desc="pixels combined into one in each dimension", display="Curve", extra=v2)
    _leaf(h, f"{path}.rotation", HashType.INT32, 0, shown="Rotation",
          desc="counterclockwise rotation in degrees",
          extra=(("options", np.array([0, 90, 180, 270], np.int32), HashType.VECTOR_INT32),
                 ("unitEnum", 11, HashType.INT32), ("unitName", "degree", HashType.STRING),
                 ("unitSymbol", "deg", HashType.STRING)))
    _leaf(h, f"{path}.flipX", HashType.BOOL, False, shown="Flip X", desc="mirrored horizontally")
    _leaf(h, f"{path}.flipY", HashType.BOOL, False, shown="Flip Y", desc="mirrored vertically")


def _scalar_default(t):
    t = HashType(t)
    if t == HashType.STRING:
        return ""
    if t == HashType.BOOL:
        return False
    if t == HashType.VECTOR_STRING:
        return []
    if t == HashType.VECTOR_BOOL:
        return np.zeros(0, bool)
    if t.name.startswith("VECTOR_"):
        dt = NDARRAY_DTYPE.get(int(t) - 1)
        return np.zeros(0, dt if dt is not None else np.int32)
    if t in (HashType.FLOAT, HashType.DOUBLE):
        return 0.0
    if t == HashType.CHAR:
        return b"\0"
    return 0


def _shape_matches(want, got):
    return len(want) == len(got) and all(not w or w == g for w, g in zip(want, got))


class DataSchema:
    """What the items of a channel contain.

    Parameters
    ----------
    spec : mapping
        ``path -> expectation``; an expectation is a Karabo type
        (``HashType.INT32``, ``HashType.VECTOR_INT64``), a :class:`Vector` (type and
        ``maxSize``), a numpy dtype (``"uint16"``: an NDArray of that dtype), a
        ``(dtype, shape)`` pair (``None`` or 0 in the shape matches any length), an
        :class:`Image` (pixel dtype and dims), or ``ImageData`` (any image).
    strict : bool
        Also report keys that are not in the schema (Karabo's output channel always
        does; :class:`~kbstream.pipeline.OutputChannel` validates strictly).
    daq : str, int, mapping or None
        Karabo's ``daqDataType`` of the top nodes: ``"train"`` (1, the default),
        ``"pulse"`` (0), a mapping ``{top node: kind}``, or None (no attribute).

    Examples
    --------
    >>> DataSchema({"data.adc": ("uint16", (16, 512, 1024)), "data.trainId": HashType.UINT64})
    """

    def __init__(self, spec, strict=False, daq="train"):
        self.spec = dict(spec)
        self.strict = strict
        if daq is not None and not isinstance(daq, dict) and daq not in _DAQ:
            raise SchemaError(f"daq must be 'train', 'pulse', a mapping or None, not {daq!r}")
        self.daq = daq
        self._leaves = None

    # ---- validation -----------------------------------------------------------------

    def _covered(self):
        """Paths the schema declares, with every key an NDArray / ImageData node holds."""
        if self._leaves is None:
            self._leaves = frozenset(self.spec)
        return self._leaves

    def validate(self, data, strict=None):
        """List of problems (empty when the Hash matches); ``strict`` overrides
        :attr:`strict` (keys not in the schema are problems)."""
        problems = []
        for path, want in self.spec.items():
            if path not in data:
                problems.append(f"{path!r} is missing")
                continue
            value = data[path]
            if want is ImageData or isinstance(want, Image):
                if not isinstance(value, ImageData):
                    problems.append(f"{path!r} is not an ImageData")
                elif isinstance(want, Image):
                    px = value.pixels
                    if want.dtype is not None and px.dtype != np.dtype(want.dtype):
                        problems.append(f"{path!r} has pixels of dtype {px.dtype}, "
                                        f"expected {np.dtype(want.dtype)}")
                    if want.dims is not None and not _shape_matches(want.dims, px.shape):
                        problems.append(f"{path!r} has dims {px.shape}, expected "
                                        f"{tuple(want.dims)}")
                continue
            if isinstance(want, Vector):
                got = data.get_type(path)
                if got != want.type:
                    problems.append(f"{path!r} is {got.name}, expected {HashType(want.type).name}")
                elif want.max_size is not None and len(value) > want.max_size:
                    problems.append(f"{path!r} has {len(value)} elements, at most "
                                    f"{want.max_size} allowed")
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
            if dtype is not None and value.dtype != np.dtype(dtype):
                problems.append(f"{path!r} has dtype {value.dtype}, expected {np.dtype(dtype)}")
            if shape is not None and not _shape_matches(
                    [s or 0 for s in shape], value.shape):
                problems.append(f"{path!r} has shape {value.shape}, expected {tuple(shape)}")
        if self.strict if strict is None else strict:
            covered = self._covered()
            extra = [p for p in data.paths() if p not in covered]
            if extra:
                problems.append(f"unexpected keys {extra}")
        return problems

    # ---- Karabo's layout ------------------------------------------------------------

    def _daq_of(self, top):
        d = self.daq
        if isinstance(d, dict):
            d = d.get(top)
        return None if d is None else _DAQ.get(d)

    def to_parameters(self) -> Hash:
        """The data description in Karabo's schema layout: the content of an output
        channel's ``<channel>.schema`` node, as karabind's ``OUTPUT_CHANNEL(...).dataSchema``
        publishes it (read-only leaves with ``valueType``/``defaultValue``, vectors with
        ``maxSize``, NDArray and ImageData nodes, ``daqDataType`` on the top nodes)."""
        h = Hash()
        for path, want in self.spec.items():
            parts = path.split(".")
            for depth in range(1, len(parts)):
                head = ".".join(parts[:depth])
                if head not in h:
                    h.set(head, Hash())
                    if depth == 1:
                        daq = self._daq_of(head)
                        if daq is not None:
                            _int32(h, head, "daqDataType", daq)
                    _int32(h, head, "accessMode", _RECONFIGURE)
                    _int32(h, head, "nodeType", _NODE)
            if want is ImageData or isinstance(want, Image):
                w = want if isinstance(want, Image) else Image()
                _image_node(h, path, w.dtype, w.dims)
            elif isinstance(want, Vector):
                t = HashType(want.type)
                _leaf(h, path, t, _scalar_default(t), max_size=want.max_size,
                      display=None if t == HashType.VECTOR_STRING else "Curve")
            elif isinstance(want, (HashType, int)) and not isinstance(want, bool):
                t = HashType(want)
                vector = t.name.startswith("VECTOR_") and t != HashType.VECTOR_HASH
                _leaf(h, path, t, _scalar_default(t),
                      display="Curve" if vector and t != HashType.VECTOR_STRING else None)
            else:
                dtype, shape = (want if isinstance(want, tuple) else (want, None))
                _ndarray_node(h, path, dtype, shape)
        return h

    @classmethod
    def from_parameters(cls, params, strict=True):
        """The DataSchema a Karabo data description declares (the content of a
        ``<channel>.schema`` node; see :meth:`to_parameters`).

        Raises
        ------
        SchemaError
            ``params`` is not a Hash, or a leaf has no usable ``valueType``.
        """
        if not isinstance(params, Hash):
            raise SchemaError(f"a data schema must be a Hash, not {type(params).__name__}")
        spec = {}
        daq = {}

        def attr(h, k, name, default=None):
            return h.get_attribute(k, name, default)

        def walk(h, prefix):
            for k in h.keys():
                path = prefix + k
                node = h[k]
                cls_id = attr(h, k, "classId")
                if attr(h, k, "nodeType") == _NODE or (isinstance(node, Hash) and len(node)):
                    if not prefix and attr(h, k, "daqDataType") is not None:
                        daq[k] = int(attr(h, k, "daqDataType"))
                    if cls_id == "NDArray":
                        spec[path] = _array_spec(node)
                    elif cls_id == "ImageData":
                        px = node.get("pixels") if isinstance(node, Hash) else None
                        dtype, shape = _array_spec(px) if isinstance(px, Hash) else (None, None)
                        dims = shape
                        if isinstance(node, Hash) and "dims" in node:
                            d = node.get_attribute("dims", "defaultValue", None)
                            if d is not None and len(d):
                                dims = tuple(int(x) for x in d)
                        spec[path] = Image(dtype, dims)
                    else:
                        walk(node, path + ".")
                    continue
                vt = attr(h, k, "valueType")
                try:
                    t = HashType[vt]
                except (KeyError, TypeError):
                    raise SchemaError(f"{path!r} has no usable valueType ({vt!r})") from None
                ms = attr(h, k, "maxSize")
                spec[path] = Vector(t, int(ms)) if ms is not None else t

        def _array_spec(node):
            if not isinstance(node, Hash):
                return (None, None)
            t = node.get_attribute("type", "defaultValue", None) if "type" in node else None
            dt = NDARRAY_DTYPE.get(int(t)) if t is not None else None
            shape = node.get_attribute("shape", "defaultValue", None) if "shape" in node else None
            shape = tuple(int(x) for x in shape) if shape is not None and len(shape) else None
            return (dt, shape)

        walk(params, "")
        out = cls(spec, strict=strict, daq=daq or None)
        return out

    def __repr__(self):
        return f"DataSchema({self.spec!r})"
