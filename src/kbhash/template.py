"""HashTemplate: keys, types and attribute types fixed once, values filled per message.

For wire layers that build a Hash of the same layout for every message (kbstream's
pipeline headers): no path parsing, no type inference, one check of the keys.
"""

from .hash import Hash, _new_hash, _type_id

__all__ = ["HashTemplate"]


class HashTemplate:
    """The keys, Karabo types and attribute types of a Hash that is built again and again.

    Like :class:`struct.Struct` for structs: the template checks the layout
    once, and :meth:`build` then only puts the values in, with no path parsing,
    no conversion and no type inference.  Meant for protocol headers made for
    every message; for a one-off Hash of typed nodes see :meth:`Hash.from_typed`.

    Parameters
    ----------
    nodes : iterable of tuple
        The top-level nodes in order, each ``(key, type)`` or
        ``(key, type, attributes)``:

        key : str
            A top-level key, taken literally.
        type : HashType, int or None
            The node's Karabo type; None writes each value as the type it is
            inferred as (see :func:`kbhash.infer_type`).
        attributes : sequence of (str, HashType or int or None)
            The node's attribute names, in order, with their types (None:
            inferred).

    Raises
    ------
    kbhash.EncodeError
        An unknown type id.
    TypeError
        A key or attribute name that is not a str, or a malformed node.
    KeyError
        A key longer than 255 bytes of UTF-8, or a key or attribute name given twice.

    Examples
    --------
    >>> META = HashTemplate([("source", None),
    ...                      ("timestamp", None, [("sec", HashType.UINT64), ("frac", HashType.UINT64),
    ...                                           ("tid", HashType.UINT64)])])
    >>> h = META.build({"source": "SA1/DET/CAM:output", "timestamp": True},
    ...                {"timestamp": {"sec": 1700000000, "frac": 0, "tid": 1000}})
    >>> h.get_timestamp("timestamp").tid, h.get_attribute_type("timestamp", "sec")
    (1000, <HashType.UINT64: 18>)
    """

    __slots__ = ("_keys", "_types", "_attributes")

    def __init__(self, nodes):
        keys = []
        types = {}
        attributes = {}
        for node in nodes:
            if not isinstance(node, (tuple, list)) or len(node) not in (2, 3):
                raise TypeError(f"template nodes are (key, type[, attributes]), not {node!r}")
            key, t = node[0], node[1]
            if not isinstance(key, str):
                raise TypeError(f"Hash keys are str, not {type(key).__name__}")
            Hash._check_key(key)
            if key in keys:
                raise KeyError(f"template key {key!r} given twice")
            keys.append(key)
            if t is not None:
                types[key] = _type_id(t, repr(key))
            if len(node) == 3:
                names, atypes = [], {}
                for name, at in node[2]:
                    if not isinstance(name, str):
                        raise TypeError(f"attribute names are str, not {type(name).__name__}")
                    if name in names:
                        raise KeyError(f"{key!r}: attribute {name!r} given twice")
                    names.append(name)
                    if at is not None:
                        atypes[name] = _type_id(at, f"{key!r}, attribute {name!r}")
                attributes[key] = (tuple(names), atypes)
        self._keys = tuple(keys)
        self._types = types
        self._attributes = attributes

    @property
    def keys(self):
        """The template's keys, in order (a tuple)."""
        return self._keys

    def build(self, values, attributes=None):
        """A new Hash with the template's nodes set to ``values``.

        Parameters
        ----------
        values : mapping of str to object
            Exactly the template's keys, in its order, with their values; the
            values are stored as given (a HASH node's value should be a Hash, a
            VECTOR_HASH node's a list of Hashes) and checked against their types
            when the Hash is encoded.
        attributes : mapping of str to mapping, optional
            For nodes whose template names attributes: key -> exactly those
            attribute names, in the template's order, with their values.  Other
            nodes get no attributes.

        Returns
        -------
        Hash

        Raises
        ------
        KeyError
            Keys or attribute names that are not the template's, or not in its order.
        """
        if tuple(values) != self._keys:
            raise KeyError(f"the template's keys are {list(self._keys)}, not {list(values)}")
        h = _new_hash(Hash)
        h._v = {**values}
        h._t = self._types.copy()
        if attributes:
            h._a, h._at = self._attribute_dicts(attributes)
        else:
            h._a = {}
            h._at = {}
        return h

    def _attribute_dicts(self, attributes):
        avals, atypes = {}, {}
        specs = self._attributes
        for key, given in attributes.items():
            spec = specs.get(key)
            if spec is None or tuple(given) != spec[0]:
                raise KeyError(f"{key!r}: the template's attributes are "
                               f"{list(spec[0]) if spec else []}, not {list(given)}")
            avals[key] = {**given}
            atypes[key] = spec[1].copy()
        return avals, atypes

    def __repr__(self):
        return f"HashTemplate({list(self._keys)!r})"
