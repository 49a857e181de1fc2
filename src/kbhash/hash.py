"""The Karabo Hash container (:class:`Hash`, :class:`Attributes`).

A :class:`Hash` is an ordered tree: each node has a key, a value, an optional
explicit Karabo type and an ordered set of attributes (each with a value and
an optional explicit type).  Nested nodes are reached with dotted paths
(``h["a.b.c"]``); the separator is :attr:`Hash.sep` (``"."``), and the
path-taking methods accept ``sep=`` to use another one for one call.

Types: a node whose type was not given explicitly gets the type Karabo's own
Python binding (karabind) would give its value (see :func:`kbhash.infer_type`);
:meth:`Hash.set` with ``type=`` or decoding an archive records the type
explicitly, so that re-encoding reproduces the same bytes.  Assigning with
``h[key] = value`` replaces the node's value and forgets an explicit type, as
karabind's ``__setitem__`` does.

Typed building: :meth:`Hash.set_typed` and :meth:`Hash.from_typed` set
top-level nodes with their types and attributes in one call, and a
:class:`kbhash.HashTemplate` (``template.py``) fixes keys and types once for a Hash that is built for
every message (protocol headers); neither parses paths nor infers types.

Special values (``special.py``, ``timestamp.py``)
------------------------------------------------
- numpy arrays are NDArray nodes (any rank); decoded NDArrays are numpy views
  on the decoded buffer (no copy),
- :class:`ImageData` is an image (an NDArray plus encoding, dims, ...),
- :class:`Schema` carries a schema opaquely (root name + parameter Hash),
- :class:`Timestamp` is read from / written to the ``sec``, ``frac`` and
  ``tid`` attributes of a node (:meth:`Hash.get_timestamp`,
  :meth:`Hash.set_timestamp`).
"""

import math

from collections.abc import Mapping

import numpy as np

from ._infer import KaraboValue, infer_type
from ._types import IMAGEDATA, NDARRAY, WIRE_TYPES, HashType
from .errors import EncodeError

from .timestamp import Timestamp

__all__ = ["Hash", "Attributes"]

_MISSING = object()


def _to_node_value(value):
    """Normalise a value on assignment: dicts become Hashes (recursively)."""
    if isinstance(value, Hash):
        return value
    if isinstance(value, Mapping):
        return Hash(value)
    if type(value) is list and value and isinstance(value[0], Mapping):
        return [v if isinstance(v, Hash) else Hash(v) if isinstance(v, Mapping) else v for v in value]
    return value


def _values_equal(a, b):
    """Equality used by Hash comparison: arrays by dtype/shape/content, NaN == NaN."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            # a vector given as a list vs the same vector decoded as an array
            arr, seq = (a, b) if isinstance(a, np.ndarray) else (b, a)
            if not isinstance(seq, (list, tuple)) or arr.ndim != 1 or len(seq) != len(arr):
                return False
            try:
                b = np.asarray(seq, dtype=arr.dtype)
            except (TypeError, ValueError, OverflowError):
                return False
            a = arr
        if a.shape != b.shape or a.dtype.newbyteorder("=") != b.dtype.newbyteorder("="):
            return False
        if a.dtype.kind in "fc":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool(np.array_equal(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, complex) and isinstance(b, complex):
        return _values_equal(a.real, b.real) and _values_equal(a.imag, b.imag)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (memoryview, bytes, bytearray)) and isinstance(b, (memoryview, bytes, bytearray)):
        return bytes(a) == bytes(b)
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        return False
    return a == b


def _type_id(t, what):
    """The wire id of an explicit type given as a HashType or an int (EncodeError otherwise)."""
    if type(t) is int and t in WIRE_TYPES:
        return t
    try:
        return int(HashType(t))
    except (ValueError, TypeError):
        raise EncodeError(f"{what}: {t!r} is not a Karabo type id") from None


def _fill_typed(vals, types, attrs, attr_types, entries):
    """The work of Hash.set_typed on the four dicts of a Hash (see there)."""
    wire = WIRE_TYPES
    for entry in entries:
        n = len(entry)
        if n == 3:
            key, value, t = entry
        elif n == 5:
            key, value, t, avals, atypes = entry
        elif n == 4:
            key, value, t, avals = entry
            atypes = None
        else:
            raise TypeError(f"set_typed entries are (key, value, type[, attributes[, attribute_types]]), "
                            f"not {n} items")
        if type(key) is not str or len(key) > 63:  # up to 63 characters fit 255 bytes of UTF-8
            if not isinstance(key, str):
                raise TypeError(f"Hash keys are str, not {type(key).__name__}")
            Hash._check_key(key)
        vals[key] = value
        if t is None:
            if types:
                types.pop(key, None)
        elif type(t) is int and t in wire:
            types[key] = t
        else:
            types[key] = _type_id(t, repr(key))
        if n > 3 and (avals or atypes):
            if avals is None:
                avals = {}
            if atypes:
                try:
                    valid = wire.issuperset(atypes.values()) and avals.keys() >= atypes.keys()
                except TypeError:  # an unhashable type
                    valid = False
                if not valid:
                    _check_attribute_types(key, avals, atypes)  # raises
            a = attrs.get(key)
            if a is None:  # the common case: a node without attributes so far
                attrs[key] = dict(avals)
                attr_types[key] = dict(atypes) if atypes else {}
            else:
                a.update(avals)
                at = attr_types.get(key)
                if at is None:
                    at = attr_types[key] = {}
                else:
                    for name in avals:  # a value set anew forgets its old explicit type
                        at.pop(name, None)
                if atypes:
                    at.update(atypes)


def _check_attribute_types(key, avals, atypes):
    """Raise EncodeError for the first bad entry of ``atypes`` (a name not in ``avals``, or not a type id)."""
    for name, t in atypes.items():
        if name not in avals:
            raise EncodeError(f"{key!r}: a type for attribute {name!r}, which is not set")
        _type_id(t, f"{key!r}, attribute {name!r}")
    raise EncodeError(f"{key!r}: attribute types must map attribute names to Karabo type ids")


_new_hash = object.__new__


def _effective_type(value, explicit):
    if explicit is not None:
        return explicit
    try:
        return infer_type(value)
    except Exception:  # an unencodable value: compare by value only
        return None


class Attributes:
    """Ordered attributes of one node: name -> value, each with an optional explicit type.

    Behaves like a mutable mapping.  Attribute names are not paths: a name may
    contain dots.  ``Hash.attrs(path)`` returns a live view: changes apply to
    the node.
    """

    __slots__ = ("_v", "_t")

    def __init__(self, items=None, *, _dicts=None):
        if _dicts is not None:
            self._v, self._t = _dicts
            return
        self._v = {}
        self._t = {}
        if items:
            for k, v in (items.items() if isinstance(items, Mapping) else items):
                self[k] = v

    def __getitem__(self, name):
        return self._v[name]

    def __setitem__(self, name, value):
        if not isinstance(name, str):
            raise TypeError(f"attribute names are str, not {type(name).__name__}")
        self._v[name] = value
        self._t.pop(name, None)

    def set(self, name, value, type=None):
        """Set an attribute, optionally with an explicit Karabo type."""
        self[name] = value
        if type is not None:
            self._t[name] = int(HashType(type))

    def get_type(self, name):
        """The attribute's Karabo type (explicit, or inferred from its value)."""
        t = self._t.get(name)
        if t is not None:
            return HashType(t)
        return HashType(infer_type(self._v[name]))

    def __delitem__(self, name):
        del self._v[name]
        self._t.pop(name, None)

    def __contains__(self, name):
        return name in self._v

    def __iter__(self):
        return iter(self._v)

    def __len__(self):
        return len(self._v)

    def keys(self):
        return self._v.keys()

    def values(self):
        return self._v.values()

    def items(self):
        return self._v.items()

    def get(self, name, default=None):
        return self._v.get(name, default)

    def to_dict(self):
        return dict(self._v)

    def __eq__(self, other):
        if isinstance(other, Attributes):
            if list(self._v) != list(other._v):
                return False
            for k, v in self._v.items():
                w = other._v[k]
                if _effective_type(v, self._t.get(k)) != _effective_type(w, other._t.get(k)):
                    return False
                if not _values_equal(v, w):
                    return False
            return True
        if isinstance(other, Mapping):  # a plain mapping: values only, no types
            return list(self._v) == list(other) and all(_values_equal(v, other[k]) for k, v in self._v.items())
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return f"Attributes({self._v!r})"


class Hash(KaraboValue):
    """Ordered, nested mapping with typed nodes and per-node attributes.

    Parameters
    ----------
    *args
        Nothing, one mapping (a dict, possibly nested, or another Hash, which
        is copied shallowly with types and attributes), or alternating keys
        and values as in Karabo: ``Hash("a", 1, "b.c", 2.5)``.

    Examples
    --------
    >>> h = Hash("det.image", np.zeros((2, 3), np.uint16))
    >>> h.set("det.count", 7, type=HashType.UINT32)
    >>> h.set_attribute("det.count", "unit", "counts")
    >>> list(h.paths())
    ['det.image', 'det.count']
    """

    # _v: key -> value; _t: key -> explicit type id; _a: key -> dict of
    # attribute values; _at: key -> dict of explicit attribute type ids.  Plain
    # dicts, so that the decoder creates no per-node objects.
    __slots__ = ("_v", "_t", "_a", "_at")
    _karabo_type = int(HashType.HASH)

    #: Path separator used by ``h[path]`` and by default in the path methods.
    sep = "."

    def __init__(self, *args):
        self._v = {}
        self._t = {}
        self._a = {}
        self._at = {}
        if len(args) == 1:
            src = args[0]
            if isinstance(src, Hash):
                self._v.update(src._v)
                self._t.update(src._t)
                for k, a in src._a.items():
                    self._a[k] = dict(a)
                    self._at[k] = dict(src._at.get(k, ()))
            elif isinstance(src, Mapping):
                for k, v in src.items():
                    self[k] = v
            else:
                raise TypeError(f"Hash() takes a mapping or key/value pairs, not {type(src).__name__}")
        elif args:
            if len(args) % 2:
                raise TypeError("Hash() needs an even number of key/value arguments")
            for i in range(0, len(args), 2):
                self[args[i]] = args[i + 1]

    # -- navigation -------------------------------------------------------

    def _parent(self, path, sep, create):
        """Return (parent Hash, leaf key) for a path, or (None, None) if absent."""
        if not isinstance(path, str):
            raise TypeError(f"Hash keys are str, not {type(path).__name__}")
        if sep not in path or path in self._v:
            return self, path
        parts = path.split(sep)
        node = self
        for i, part in enumerate(parts[:-1]):
            child = node._v.get(part, _MISSING)
            if child is _MISSING:
                if not create:
                    return None, None
                child = Hash()
                node._v[part] = child
            elif not isinstance(child, Hash):
                if create:
                    raise TypeError(f"cannot set {path!r}: {sep.join(parts[: i + 1])!r} is not a Hash")
                return None, None
            node = child
        return node, parts[-1]

    def _node(self, path, sep):
        parent, key = self._parent(path, sep, False)
        if parent is None or key not in parent._v:
            raise KeyError(path)
        return parent, key

    def __getitem__(self, path):
        if type(path) is tuple:
            path, name = path
            return self.get_attribute(path, name)
        try:
            return self._v[path]
        except KeyError:
            pass
        parent, key = self._node(path, self.sep)
        return parent._v[key]

    def __setitem__(self, path, value):
        if type(path) is tuple:
            path, name = path
            self.set_attribute(path, name, value)
            return
        parent, key = self._parent(path, self.sep, True)
        self._check_key(key)
        parent._v[key] = _to_node_value(value)
        parent._t.pop(key, None)

    @staticmethod
    def _check_key(key):
        if len(key.encode("utf-8", "surrogatepass")) > 255:
            raise KeyError(f"Hash keys are at most 255 bytes of UTF-8: {key[:40]!r}...")

    def __delitem__(self, path):
        parent, key = self._node(path, self.sep)
        del parent._v[key]
        parent._t.pop(key, None)
        parent._a.pop(key, None)
        parent._at.pop(key, None)

    def __contains__(self, path):
        if not isinstance(path, str):
            return False
        if path in self._v:
            return True
        parent, key = self._parent(path, self.sep, False)
        return parent is not None and key in parent._v

    def __iter__(self):
        return iter(self._v)

    def __len__(self):
        return len(self._v)

    def __bool__(self):
        return bool(self._v)

    def keys(self):
        """Keys of the top level, in insertion order."""
        return self._v.keys()

    def values(self):
        return self._v.values()

    def items(self):
        """(key, value) pairs of the top level, in insertion order."""
        return self._v.items()

    def get(self, path, default=None, *, sep=None):
        """Value at ``path``, or ``default`` if there is none."""
        parent, key = self._parent(path, sep or self.sep, False)
        if parent is None:
            return default
        return parent._v.get(key, default)

    def set(self, path, value, type=None, *, sep=None, attrs=None):
        """Set ``path`` to ``value``, optionally as an explicit Karabo type.

        Parameters
        ----------
        type : HashType or int, optional
            Karabo type to write the value as (``HashType.UINT32``,
            ``HashType.VECTOR_INT64``, ``HashType.BYTE_ARRAY``, ...).  The value
            is checked against the type when the Hash is encoded.
        attrs : mapping, optional
            Attributes to set on the node (added to the existing ones).
        """
        parent, key = self._parent(path, sep or self.sep, True)
        self._check_key(key)
        parent._v[key] = _to_node_value(value)
        if type is None:
            parent._t.pop(key, None)
        else:
            parent._t[key] = int(HashType(type))
        if attrs:
            a = parent._attrs(key)
            for n, v in attrs.items():
                a[n] = v

    def set_typed(self, entries):
        """Set several top-level nodes at once, each with its value, type and attributes.

        For nodes whose types are known: no path is parsed, no value is
        converted and no type is inferred.  An existing node keeps its place
        and its other attributes, as with :meth:`set`.

        Parameters
        ----------
        entries : iterable of tuple
            ``(key, value, type)``, ``(key, value, type, attributes)`` or
            ``(key, value, type, attributes, attribute_types)``:

            key : str
                A top-level key, taken literally (a separator in it is part
                of the key, as in :meth:`from_dict`).
            value
                Stored as given, not converted: a HASH node's value should be
                a Hash and a VECTOR_HASH node's a list of Hashes.
            type : HashType, int or None
                The node's Karabo type; None writes the value as the type it
                would be inferred as (see :func:`kbhash.infer_type`).  The
                value is checked against the type when the Hash is encoded.
            attributes : mapping of str to object, optional
                Attributes to set on the node (copied; added to existing ones).
            attribute_types : mapping of str to HashType or int, optional
                Explicit types of some or all of these attributes; the others
                are written as their inferred types.

        Raises
        ------
        kbhash.EncodeError
            An unknown type id, or a type for an attribute that is not set.
        TypeError
            A key that is not a str, or an entry of another length.
        KeyError
            A key longer than 255 bytes of UTF-8.

        See Also
        --------
        from_typed : a new Hash from such entries.

        Examples
        --------
        >>> h = Hash()
        >>> h.set_typed([("nData", 2, HashType.UINT32),
        ...              ("source", "SA1/DET/CAM:output", None, {"tid": 1000}, {"tid": HashType.UINT64})])
        >>> h.get_type("nData"), h.get_attribute_type("source", "tid")
        (<HashType.UINT32: 14>, <HashType.UINT64: 18>)
        """
        _fill_typed(self._v, self._t, self._a, self._at, entries)

    def setdefault(self, path, default=None):
        if path not in self:
            self[path] = default
        return self[path]

    def pop(self, path, default=_MISSING):
        try:
            value = self[path]
        except KeyError:
            if default is _MISSING:
                raise
            return default
        del self[path]
        return value

    def get_type(self, path, *, sep=None):
        """Karabo type of the node (explicit, or what its value is written as).

        NDArray and ImageData nodes are ``HashType.HASH`` on the wire.
        """
        parent, key = self._node(path, sep or self.sep)
        t = parent._t.get(key)
        if t is not None:
            return HashType(t)
        t = infer_type(parent._v[key])
        return HashType.HASH if t in (NDARRAY, IMAGEDATA) else HashType(t)

    def has_explicit_type(self, path, *, sep=None):
        parent, key = self._node(path, sep or self.sep)
        return key in parent._t

    # -- attributes -------------------------------------------------------

    def _attrs(self, key):
        a = self._a.get(key)
        if a is None:
            a = self._a[key] = {}
        t = self._at.get(key)
        if t is None:
            t = self._at[key] = {}
        return Attributes(_dicts=(a, t))

    def attrs(self, path, *, sep=None):
        """The node's :class:`Attributes` (live: changes apply to the node)."""
        parent, key = self._node(path, sep or self.sep)
        return parent._attrs(key)

    def get_attribute(self, path, name, default=_MISSING, *, sep=None):
        parent, key = self._node(path, sep or self.sep)
        a = parent._a.get(key)
        if a is None or name not in a:
            if default is _MISSING:
                raise KeyError(f"{path!r} has no attribute {name!r}")
            return default
        return a[name]

    def set_attribute(self, path, name, value, type=None, *, sep=None):
        """Set attribute ``name`` of the node at ``path`` (optionally typed)."""
        self.attrs(path, sep=sep).set(name, value, type)

    def get_attribute_type(self, path, name, *, sep=None):
        return self.attrs(path, sep=sep).get_type(name)

    def has_attribute(self, path, name, *, sep=None):
        parent, key = self._node(path, sep or self.sep)
        a = parent._a.get(key)
        return a is not None and name in a

    # -- timestamps -------------------------------------------------------

    def get_timestamp(self, path, *, sep=None):
        """The :class:`Timestamp` stored in the node's sec/frac/tid attributes.

        Raises KeyError if the node has no ``sec`` attribute.
        """
        a = self.attrs(path, sep=sep)
        if "sec" not in a._v:
            raise KeyError(f"{path!r} has no timestamp attributes")
        return Timestamp(int(a._v["sec"]), int(a._v.get("frac", 0)), int(a._v.get("tid", 0)))

    def set_timestamp(self, path, ts, *, sep=None):
        """Write ``ts`` as UINT64 attributes ``sec``, ``frac``, ``tid`` (C++ order)."""
        a = self.attrs(path, sep=sep)
        a.set("sec", ts.sec, HashType.UINT64)
        a.set("frac", ts.frac, HashType.UINT64)
        a.set("tid", ts.tid, HashType.UINT64)

    # -- flattened views and dict conversion --------------------------------

    def paths(self, *, sep=None, intermediate=False):
        """Iterate over the paths of all leaves (depth first, in order).

        A leaf is any node whose value is not a Hash (NDArray, ImageData and
        empty Hashes count as leaves).  With ``intermediate=True`` the paths of
        the Hash nodes themselves are produced too, before their children.
        """
        sep = sep or self.sep
        for key, value in self._v.items():
            if isinstance(value, Hash) and value._v:
                if intermediate:
                    yield key
                for sub in value.paths(sep=sep, intermediate=intermediate):
                    yield key + sep + sub
            else:
                yield key

    def flat_items(self, *, sep=None):
        """Iterate over (path, value) of all leaves, like :meth:`paths`."""
        sep = sep or self.sep
        for key, value in self._v.items():
            if isinstance(value, Hash) and value._v:
                for sub, v in value.flat_items(sep=sep):
                    yield key + sep + sub, v
            else:
                yield key, value

    def to_dict(self, *, flat=False, sep=None):
        """Convert to plain dicts: nested (default) or flat with dotted keys.

        Types and attributes are dropped; lists of Hashes become lists of dicts.
        """
        if flat:
            return {k: _plain(v) for k, v in self.flat_items(sep=sep)}
        return {k: _plain(v) for k, v in self._v.items()}

    @classmethod
    def from_dict(cls, mapping, *, flat=False, sep=None):
        """Build a Hash from a nested dict, or from a flat one with separator paths."""
        h = cls()
        if flat:
            for k, v in mapping.items():
                h.set(k, v, sep=sep)
        else:
            for k, v in mapping.items():
                h._check_key(k)
                h._v[k] = _to_node_value(v)
        return h

    @classmethod
    def from_typed(cls, entries):
        """A new Hash of already-typed top-level entries (no path parsing, no inference).

        ``Hash.from_typed(entries)`` is ``h = Hash(); h.set_typed(entries)``:
        see :meth:`set_typed` for the entries.  A Hash built again and again
        with the same keys and types is built faster by a :class:`HashTemplate`.

        Parameters
        ----------
        entries : iterable of tuple
            ``(key, value, type[, attributes[, attribute_types]])`` per node, in
            the order the nodes are to have.

        Returns
        -------
        Hash

        Examples
        --------
        >>> lay = Hash.from_typed([("sizes", [120, 4096, 8], HashType.VECTOR_UINT32),
        ...                        ("types", [0, 1, 0], HashType.VECTOR_INT32)])
        >>> lay.get_type("sizes")
        <HashType.VECTOR_UINT32: 15>
        """
        if cls is not Hash:  # a subclass may have its own constructor
            h = cls()
            h.set_typed(entries)
            return h
        vals, types, attrs, attr_types = {}, {}, {}, {}
        _fill_typed(vals, types, attrs, attr_types, entries)
        h = _new_hash(Hash)
        h._v = vals
        h._t = types
        h._a = attrs
        h._at = attr_types
        return h

    def copy(self):
        """Shallow copy (values shared, node types and attributes copied)."""
        return Hash(self)

    def fully_equal(self, other):
        """Same keys in the same order, same types, same attributes, equal values."""
        return self == other

    def __eq__(self, other):
        if not isinstance(other, Hash):
            return NotImplemented
        if list(self._v) != list(other._v):
            return False
        for k, v in self._v.items():
            w = other._v[k]
            if _effective_type(v, self._t.get(k)) != _effective_type(w, other._t.get(k)):
                return False
            if isinstance(v, Hash):
                if v != w:
                    return False
            elif not _values_equal(v, w):
                return False
            a, b = self._a.get(k), other._a.get(k)
            if a or b:
                if Attributes(_dicts=(a or {}, self._at.get(k) or {})) != Attributes(
                    _dicts=(b or {}, other._at.get(k) or {})
                ):
                    return False
        return True

    __hash__ = None

    def __repr__(self):
        return f"Hash({self.to_dict()!r})"

    def pretty(self, indent=0):
        """Multi-line text with types and attributes, for humans."""
        lines = []
        pad = "  " * indent
        for k, v in self._v.items():
            t = self.get_type(k).name
            a = self._a.get(k)
            attrs = f" {a}" if a else ""
            if isinstance(v, Hash):
                lines.append(f"{pad}{k}{attrs} => HASH")
                lines.append(v.pretty(indent + 1))
            elif isinstance(v, np.ndarray) and k not in self._t:
                lines.append(f"{pad}{k}{attrs} => NDArray {v.dtype} {v.shape}")
            else:
                r = repr(v)
                lines.append(f"{pad}{k}{attrs} => {r if len(r) < 60 else r[:57] + '...'} {t}")
        return "\n".join(x for x in lines if x)


def _plain(v):
    if isinstance(v, Hash):
        return v.to_dict()
    if type(v) is list and v and isinstance(v[0], Hash):
        return [x.to_dict() if isinstance(x, Hash) else x for x in v]
    return v
