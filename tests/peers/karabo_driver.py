"""Line-oriented JSON driver for Karabo's own Hash codecs (an independent test oracle).

Run it with the Python 3.12 side environment that holds ``karabo.cpp==3.1.2`` (module
``karabind``) and ``karabo.native==3.1.2`` (see ``scripts/karabo-env.sh``)::

    .venv-karabo/bin/python tests/peers/karabo_driver.py

It deliberately imports neither ``kbhash`` nor ``kbstream``: everything it says comes from
Karabo's implementations. The client is ``tests/peers/karabo.py``.

Protocol
--------
One JSON object per line on stdin, one JSON reply per line on stdout (flushed each time):

=============================================  ===========================================
request                                        reply
=============================================  ===========================================
``{"op": "kb_save", "content": C}``            ``{"ok": true, "hex": H}``: karabind builds
                                               a Hash from C and saves it with
                                               ``BinarySerializerHash.create("Bin")``
``{"op": "kb_load", "hex": H}``                ``{"ok": true, "content": C}``
``{"op": "kb_save_array", "dtype": D, "values": [...], "shape": [...]}``  ``{"ok": true, "hex": H}``:
karabind's own NDArray from a numpy array ``Hash("x", array)``
``{"op": "nat_save", "content": C}``           same with ``karabo.native.encodeBinary``
``{"op": "nat_load", "hex": H}``               same with ``karabo.native.decodeBinary``
``{"op": "ping"}``                             ``{"ok": true, "pong": true}``
``{"op": "versions"}``                         ``{"ok": true, "python": ..., "karabind":
                                               ..., "karabo.native": ..., "numpy": ...}``
=============================================  ===========================================

Any failure gives ``{"ok": false, "error": "<ExceptionType>: <message>"}`` and the driver
keeps serving. It ends at end of input.

Typed content C
---------------
Exactly the ``content`` format of ``tests/data/karabo_hash_vectors.json``: an
ordered list of nodes ``{"key", "type", "attrs", "value"}``; ``attrs`` is an ordered list of
``{"key", "type", "value"}``. Type names are those of ``docs/wire/karabo-hash-binary.md``,
section 4 (``INT32``, ``VECTOR_UINT64``, ``HASH``, ..., plus ``HASH_POINTER`` and
``VECTOR_HASH_POINTER``).
Values: integers of any size as JSON ints; BOOL as JSON booleans; FLOAT and DOUBLE as JSON
numbers (a FLOAT is sent as the exact float64 value of the float32), with ``"nan"``,
``"inf"`` and ``"-inf"`` for the special values (the sign and payload of a NaN are not kept);
COMPLEX_* as ``{"re", "im"}`` (same float rules); CHAR as a one-character string (the
character with that byte's code point); STRING as a string; VECTOR_CHAR and BYTE_ARRAY as
``{"hex": ...}``; numeric, bool and string vectors as lists; HASH and HASH_POINTER as node
lists; VECTOR_HASH and VECTOR_HASH_POINTER as lists of node lists; SCHEMA as
``{"rootName", "parameters"}`` (parameters a node list); NONE as ``null``; VECTOR_NONE as a
list of ``null``.

NDArray and ImageData are ordinary HASH nodes with a ``__classId`` attribute and the
children of sections 5 and 6 of that document. On ``kb_load`` the driver reports the Hash
that karabind's C++ reader built (``Hash.getNode(key).getValue()``), not the numpy view that
``h[key]`` would give; if karabind ever hands back an ndarray, it is written out in the
NDArray form of section 5 there (data, type, shape, isBigEndian; ``__classId="NDArray"``). On
``kb_save`` a HASH node with ``__classId="NDArray"`` is turned into a real numpy array (dtype
from ``type``, shape, byte order) so that karabind's own NDArray code serializes it. If the
NDArray that karabind makes from that array does not reproduce the requested node exactly
(children in another order or with attributes, extra children, ``isBigEndian`` true, a
zero-size array with more than one dimension, an element type numpy cannot carry), the node
is built as a plain Hash with the same keys, types and attributes instead, which the format
encodes identically.

Every ``kb_save`` and ``nat_save`` is checked before it is answered: the archive is loaded
back with the same implementation and must give the requested content again. If it does not,
the reply is an error: that implementation cannot represent the content.

What karabind (karabo.cpp 3.1.2) cannot do
------------------------------------------
- build: HASH_POINTER (no ``Types`` member; ``setType`` refuses it), VECTOR_SCHEMA (33),
  non-empty VECTOR_COMPLEX_FLOAT (cast error from complex<double>), CHAR outside ASCII (cast
  error), HASH-typed *attributes* (saved, but its own reader then fails with
  ``bad any_cast``), NDArrays with big-endian data (a big-endian numpy array is written with
  ``isBigEndian=false``: handled by the plain-Hash fallback above), N-D zero-size arrays
  (their shape collapses to ``[0]``: fallback too), 0-d arrays (shape becomes ``[1]``).
- read: type ids 33, 34 and 38-41 and 44-58 (``Requested datatype (..) not known``);
  STRING / VECTOR_STRING that are not valid UTF-8 (``UnicodeDecodeError`` in the binding).
  It does read HASH_POINTER (42, reported by the binding as ``Types.???``) and
  VECTOR_HASH_POINTER (43).
- malformed input: the C++ reader does not check bounds. ``01000000`` (one node, no bytes
  after it) "loads" as a node with key ``""`` and BOOL ``false``. Do not use ``kb_load`` to
  decide whether truncated or corrupt input must be rejected.

What karabo.native (3.1.2) cannot do
------------------------------------
- build: COMPLEX_FLOAT, COMPLEX_DOUBLE, VECTOR_COMPLEX_FLOAT, VECTOR_COMPLEX_DOUBLE,
  VECTOR_NONE, HASH_POINTER, VECTOR_HASH_POINTER, VECTOR_SCHEMA, CHAR outside ASCII.
- read: the same ids (``KeyError: <id>``), so any archive containing one of them; CHAR
  outside ASCII; non-UTF-8 strings; keys containing ``.`` (``decodeBinary`` asserts
  "Can't set values in sub-hashes!"), although ``encodeBinary`` writes them.
- reports types as ``get_hash_type_from_data`` sees the decoded values, i.e. what
  ``encodeBinary`` would write again.
"""

import json
import math
import os
import sys
import traceback
from collections import OrderedDict

import numpy as np

# Run as a script, this file's directory comes first on sys.path, and the client module next
# to it (tests/peers/karabo.py) would then shadow the ``karabo`` package of karabo.native.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# ---------------------------------------------------------------------------------------
# Type names (Karabo's Types.hh ids, as listed in docs/wire/karabo-hash-binary.md, section 4)
# ---------------------------------------------------------------------------------------

TYPE_IDS = {
    "BOOL": 0, "VECTOR_BOOL": 1, "CHAR": 2, "VECTOR_CHAR": 3,
    "INT8": 4, "VECTOR_INT8": 5, "UINT8": 6, "VECTOR_UINT8": 7,
    "INT16": 8, "VECTOR_INT16": 9, "UINT16": 10, "VECTOR_UINT16": 11,
    "INT32": 12, "VECTOR_INT32": 13, "UINT32": 14, "VECTOR_UINT32": 15,
    "INT64": 16, "VECTOR_INT64": 17, "UINT64": 18, "VECTOR_UINT64": 19,
    "FLOAT": 20, "VECTOR_FLOAT": 21, "DOUBLE": 22, "VECTOR_DOUBLE": 23,
    "COMPLEX_FLOAT": 24, "VECTOR_COMPLEX_FLOAT": 25,
    "COMPLEX_DOUBLE": 26, "VECTOR_COMPLEX_DOUBLE": 27,
    "STRING": 28, "VECTOR_STRING": 29, "HASH": 30, "VECTOR_HASH": 31,
    "SCHEMA": 32, "VECTOR_SCHEMA": 33, "NONE": 35, "VECTOR_NONE": 36,
    "BYTE_ARRAY": 37, "HASH_POINTER": 42, "VECTOR_HASH_POINTER": 43,
}
TYPE_NAMES = {v: k for k, v in TYPE_IDS.items()}

INT_TYPES = {"INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32", "INT64", "UINT64"}
FLOAT_TYPES = {"FLOAT", "DOUBLE"}
COMPLEX_TYPES = {"COMPLEX_FLOAT", "COMPLEX_DOUBLE"}
HASH_TYPES = {"HASH", "HASH_POINTER"}
VECTOR_HASH_TYPES = {"VECTOR_HASH", "VECTOR_HASH_POINTER"}

# numpy scalar type per Karabo simple type (also the NDArray element types:
# docs/wire/karabo-hash-binary.md, section 5)
NUMPY_TYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16,
    "UINT16": np.uint16, "INT32": np.int32, "UINT32": np.uint32, "INT64": np.int64,
    "UINT64": np.uint64, "FLOAT": np.float32, "DOUBLE": np.float64,
}
NUMPY_TO_NAME = {np.dtype(v).newbyteorder("<"): k for k, v in NUMPY_TYPES.items()}
NUMPY_TO_NAME.update({np.dtype(v).newbyteorder(">"): k for k, v in NUMPY_TYPES.items()})


class UnsupportedType(Exception):
    """The implementation has no way to build or read this type."""


class Mismatch(Exception):
    """The implementation did not reproduce the requested content."""


# ---------------------------------------------------------------------------------------
# JSON value helpers shared by both implementations
# ---------------------------------------------------------------------------------------

def float_to_json(x):
    """A float as JSON: a number, or "nan" / "inf" / "-inf"."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def float_from_json(x):
    """Inverse of :func:`float_to_json` (also accepts JSON ints)."""
    if isinstance(x, str):
        if x in ("nan", "inf", "-inf"):
            return float(x)
        raise ValueError(f"bad float value {x!r}")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"bad float value {x!r}")
    return float(x)


def complex_to_json(z):
    return {"re": float_to_json(z.real), "im": float_to_json(z.imag)}


def complex_from_json(v):
    return complex(float_from_json(v["re"]), float_from_json(v["im"]))


def leaf_to_json(tname, v):
    """A leaf value as Python gives it (int, float, str, bytes, list, ...) to JSON."""
    if tname == "BOOL":
        return bool(v)
    if tname in INT_TYPES:
        return int(v)
    if tname in FLOAT_TYPES:
        return float_to_json(v)
    if tname in COMPLEX_TYPES:
        return complex_to_json(complex(v))
    if tname in ("CHAR", "STRING"):
        return str(v)
    if tname in ("VECTOR_CHAR", "BYTE_ARRAY"):
        return {"hex": bytes(v).hex()}
    if tname == "NONE":
        return None
    if tname == "VECTOR_BOOL":
        return [bool(x) for x in v]
    if tname == "VECTOR_STRING":
        return [str(x) for x in v]
    if tname == "VECTOR_NONE":
        return [None for _ in v]
    if tname in ("VECTOR_FLOAT", "VECTOR_DOUBLE"):
        return [float_to_json(x) for x in v]
    if tname in ("VECTOR_COMPLEX_FLOAT", "VECTOR_COMPLEX_DOUBLE"):
        return [complex_to_json(complex(x)) for x in v]
    if tname.startswith("VECTOR_") and tname[7:] in INT_TYPES:
        return [int(x) for x in v]
    raise UnsupportedType(f"no leaf conversion for {tname}")


def check_node_fields(node, what="node"):
    """Validate the shape of one content node or attribute."""
    if not isinstance(node, dict):
        raise ValueError(f"{what} must be an object, got {node!r}")
    keys = {"key", "type", "value"} | ({"attrs"} if what == "node" else set())
    missing = keys - node.keys()
    if missing:
        raise ValueError(f"{what} {node!r} lacks {sorted(missing)}")
    if node["type"] not in TYPE_IDS:
        raise ValueError(f"unknown type name {node['type']!r}")
    if not isinstance(node["key"], str):
        raise ValueError(f"key must be a string, got {node['key']!r}")


def normalize(content):
    """Canonical JSON form of a content list, for comparisons (floats, NaN, int/float)."""
    return json.loads(json.dumps(content, allow_nan=True), parse_constant=str)


def first_difference(want, got, path="$"):
    """Where two JSON structures differ, as a short human-readable string."""
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{path}: length {len(want)} != {len(got)}"
        for i, (a, b) in enumerate(zip(want, got)):
            d = first_difference(a, b, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(want, dict) and isinstance(got, dict):
        if want.keys() != got.keys():
            return f"{path}: keys {sorted(want)} != {sorted(got)}"
        for k in want:
            d = first_difference(want[k], got[k], f"{path}.{k}")
            if d:
                return d
        return None
    same = want == got and type(want) is type(got) or (
        isinstance(want, (int, float)) and isinstance(got, (int, float))
        and not isinstance(want, bool) and not isinstance(got, bool) and want == got)
    return None if same else f"{path}: requested {want!r}, got {got!r}"


# ---------------------------------------------------------------------------------------
# karabind (C++ serializer)
# ---------------------------------------------------------------------------------------

def check_round_trip(peer, did, undo, load, data, content):
    """``data`` (what ``peer`` made of ``content``) loads back to the same content."""
    try:
        back = load(data)
    except Exception as exc:
        raise Mismatch(f"{peer} {did} the content but cannot {undo}: "
                       f"{type(exc).__name__}: {exc}") from None
    diff = first_difference(normalize(content), normalize(back))
    if diff:
        raise Mismatch(f"{peer} does not reproduce the content: {diff}")
    return data

class KarabindCodec:
    """Content <-> karabind.Hash, and archives through BinarySerializerHash("Bin")."""

    SEPARATORS = ".|/#:;,!~^\x1f\x1e\x1d"

    def __init__(self):
        import karabind as kb

        self.kb = kb
        self.ser = kb.BinarySerializerHash.create("Bin")
        self.schema_ser = kb.BinarySerializerSchema.create("Bin")
        self._keepalive = []    # numpy buffers referenced (not copied) by NDArray nodes

    # ---- reading ----------------------------------------------------------------------

    def load(self, data):
        return self.hash_to_content(self.ser.load(data))

    def type_name(self, t):
        tid = int(t)
        try:
            return TYPE_NAMES[tid]
        except KeyError:
            raise UnsupportedType(f"karabind reported unknown type id {tid}") from None

    def hash_to_content(self, h):
        out = []
        for node in h:      # HashNode objects: no path parsing, dots in keys are safe
            tname = self.type_name(node.getType())
            attrs = [{"key": a.getKey(), "type": self.type_name(a.getType()),
                      "value": self.value_to_json(self.type_name(a.getType()), a.getValue())}
                     for a in node.getAttributes()]
            value = node.getValue()
            if isinstance(value, np.ndarray):
                # The binding's NDArray view: write it out as the HASH node of the
                # format (docs/wire/karabo-hash-binary.md, section 5).
                value = self.ndarray_to_nodes(value)
            else:
                value = self.value_to_json(tname, value)
            out.append({"key": node.getKey(), "type": tname, "attrs": attrs, "value": value})
        return out

    def value_to_json(self, tname, v):
        kb = self.kb
        if tname in HASH_TYPES:
            if isinstance(v, np.ndarray):
                return self.ndarray_to_nodes(v)
            return self.hash_to_content(v)
        if tname in VECTOR_HASH_TYPES:
            return [self.hash_to_content(x) for x in v]
        if tname == "SCHEMA":
            if not isinstance(v, kb.Schema):
                raise TypeError(f"SCHEMA value came back as {type(v).__name__}")
            return {"rootName": v.getRootName(),
                    "parameters": self.hash_to_content(v.getParameterHash())}
        return leaf_to_json(tname, v)

    @staticmethod
    def ndarray_to_nodes(arr):
        """NDArray children (docs/wire/karabo-hash-binary.md, section 5) for a numpy array."""
        name = NUMPY_TO_NAME.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == "|"
                                 else arr.dtype)
        if name is None:
            raise UnsupportedType(f"ndarray of dtype {arr.dtype} has no Karabo type")
        big = arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and
                                             sys.byteorder == "big")
        return [
            {"key": "data", "type": "BYTE_ARRAY", "attrs": [],
             "value": {"hex": np.ascontiguousarray(arr).tobytes().hex()}},
            {"key": "type", "type": "INT32", "attrs": [], "value": TYPE_IDS[name]},
            {"key": "shape", "type": "VECTOR_UINT64", "attrs": [],
             "value": [int(n) for n in arr.shape]},
            {"key": "isBigEndian", "type": "BOOL", "attrs": [], "value": bool(big)},
        ]

    # ---- building ---------------------------------------------------------------------

    def save(self, content):
        self._keepalive = []
        try:
            h = self.content_to_hash(content)
            data = self.ser.save(h)
        finally:
            self._keepalive = []
        return check_round_trip("karabind", "saved", "load it back", self.load, data, content)

    def pick_sep(self, key):
        for sep in self.SEPARATORS:
            if sep not in key:
                return sep
        raise ValueError(f"no usable path separator for key {key!r}")

    def content_to_hash(self, nodes):
        kb = self.kb
        if not isinstance(nodes, list):
            raise ValueError(f"a Hash must be a list of nodes, got {type(nodes).__name__}")
        h = kb.Hash()
        for node in nodes:
            check_node_fields(node)
            key, tname = node["key"], node["type"]
            sep = self.pick_sep(key)
            if not (tname == "HASH" and self.try_ndarray(h, key, sep, node)):
                self.set_value(h, key, sep, tname, node["value"])
                self.set_attrs(h, key, sep, node["attrs"])
        return h

    def set_value(self, h, key, sep, tname, value):
        kb = self.kb
        if tname in ("HASH_POINTER", "VECTOR_SCHEMA"):
            raise UnsupportedType(f"karabind cannot build {tname}")
        pyval = self.value_from_json(tname, value)
        if tname in ("HASH", "VECTOR_HASH", "VECTOR_HASH_POINTER", "SCHEMA"):
            h.set(key, pyval, sep)
        else:
            h.setAs(key, pyval, getattr(kb.Types, tname), sep)
        got = self.type_name(h.getType(key, sep))
        if got != tname:
            raise Mismatch(f"karabind stored {key!r} as {got}, not {tname}")

    def set_attrs(self, h, key, sep, attrs):
        kb = self.kb
        if not isinstance(attrs, list):
            raise ValueError(f"attrs of {key!r} must be a list")
        for a in attrs:
            check_node_fields(a, "attribute")
            aname, tname = a["key"], a["type"]
            if tname in ("HASH_POINTER", "VECTOR_SCHEMA", "VECTOR_HASH_POINTER"):
                raise UnsupportedType(f"karabind cannot build a {tname} attribute")
            h.setAttribute(key, aname, self.value_from_json(tname, a["value"]), sep)
            anode = h.getAttributes(key, sep).getNode(aname)
            if self.type_name(anode.getType()) != tname:
                anode.setType(getattr(kb.Types, tname))     # converts the value in place
            got = self.type_name(h.getAttributes(key, sep).getNode(aname).getType())
            if got != tname:
                raise Mismatch(f"karabind stored attribute {aname!r} as {got}, not {tname}")

    def value_from_json(self, tname, v):
        """The Python object that karabind turns into type ``tname`` (with setAs)."""
        kb = self.kb
        if tname == "BOOL":
            if not isinstance(v, bool):
                raise ValueError(f"BOOL needs true/false, got {v!r}")
            return v
        if tname in INT_TYPES:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{tname} needs an integer, got {v!r}")
            return v
        if tname in FLOAT_TYPES:
            return float_from_json(v)
        if tname in COMPLEX_TYPES:
            return complex_from_json(v)
        if tname == "CHAR":
            if not (isinstance(v, str) and len(v) == 1):
                raise ValueError(f"CHAR needs a one-character string, got {v!r}")
            return v
        if tname == "STRING":
            if not isinstance(v, str):
                raise ValueError(f"STRING needs a string, got {v!r}")
            return v
        if tname in ("VECTOR_CHAR", "BYTE_ARRAY"):
            return bytes.fromhex(v["hex"])
        if tname == "NONE":
            if v is not None:
                raise ValueError(f"NONE needs null, got {v!r}")
            return None
        if tname == "HASH":
            return self.content_to_hash(v)
        if tname == "VECTOR_HASH":
            return kb.VectorHash([self.content_to_hash(x) for x in v])
        if tname == "VECTOR_HASH_POINTER":
            return kb.VectorHashPointer([self.content_to_hash(x) for x in v])
        if tname == "SCHEMA":
            return self.schema_from_json(v)
        if not isinstance(v, list):
            raise ValueError(f"{tname} needs a list, got {v!r}")
        if tname == "VECTOR_BOOL":
            return [self.value_from_json("BOOL", x) for x in v]
        if tname == "VECTOR_STRING":
            return [self.value_from_json("STRING", x) for x in v]
        if tname == "VECTOR_NONE":
            return [self.value_from_json("NONE", x) for x in v]
        if tname in ("VECTOR_FLOAT", "VECTOR_DOUBLE"):
            return [float_from_json(x) for x in v]
        if tname in ("VECTOR_COMPLEX_FLOAT", "VECTOR_COMPLEX_DOUBLE"):
            return [complex_from_json(x) for x in v]
        if tname.startswith("VECTOR_") and tname[7:] in INT_TYPES:
            return [self.value_from_json(tname[7:], x) for x in v]
        raise UnsupportedType(f"karabind cannot build {tname}")

    def schema_from_json(self, v):
        """A karabind Schema with the given root name and parameter Hash.

        karabind has no setter for a Schema's parameter Hash; its Schema serializer takes
        the root name (u8 length + bytes) followed by a Hash archive, so the Schema is made
        by loading exactly that.
        """
        root = v["rootName"].encode()
        if len(root) > 255:
            raise ValueError("SCHEMA rootName longer than 255 bytes")
        params = self.ser.save(self.content_to_hash(v["parameters"]))
        return self.schema_ser.load(bytes([len(root)]) + root + params)

    def try_ndarray(self, h, key, sep, node):
        """Build an NDArray-classed HASH node from a numpy array; False if not possible.

        The candidate is first built in a scratch Hash and kept only if karabind's NDArray
        reproduces the requested node exactly (see the module docstring).
        """
        attrs = node["attrs"]
        if not any(a.get("key") == "__classId" and a.get("type") == "STRING"
                   and a.get("value") == "NDArray" for a in attrs if isinstance(a, dict)):
            return False
        arr = self.ndarray_from_nodes(node["value"])
        if arr is None:
            return False
        scratch = self.kb.Hash()
        try:
            scratch.set(key, arr, sep)
            self.set_attrs(scratch, key, sep, attrs)
            ok = normalize(self.hash_to_content(scratch)) == normalize([node])
        except Exception:
            ok = False
        if not ok:
            return False
        self._keepalive.append(arr)
        h.set(key, arr, sep)
        self.set_attrs(h, key, sep, attrs)
        return True

    @staticmethod
    def ndarray_from_nodes(children):
        """numpy array for NDArray children (format doc, section 5), or None if not one."""
        if not isinstance(children, list):
            return None
        by_key = {c.get("key"): c for c in children if isinstance(c, dict)}
        want = {"data": "BYTE_ARRAY", "type": "INT32", "shape": "VECTOR_UINT64",
                "isBigEndian": "BOOL"}
        if len(by_key) != len(children) or by_key.keys() != want.keys():
            return None
        if any(by_key[k].get("type") != t for k, t in want.items()):
            return None
        try:
            elem = TYPE_NAMES.get(by_key["type"]["value"])
            if elem not in NUMPY_TYPES:
                return None
            dtype = np.dtype(NUMPY_TYPES[elem]).newbyteorder(
                ">" if by_key["isBigEndian"]["value"] else "<")
            raw = bytearray.fromhex(by_key["data"]["value"]["hex"])
            shape = [int(n) for n in by_key["shape"]["value"]]
            return np.frombuffer(raw, dtype=dtype).reshape(shape)
        except Exception:
            return None


# ---------------------------------------------------------------------------------------
# karabo.native (pure Python codec)
# ---------------------------------------------------------------------------------------

class NativeCodec:
    """Content <-> karabo.native.Hash, and archives through encodeBinary/decodeBinary."""

    UNSUPPORTED = {"COMPLEX_FLOAT", "COMPLEX_DOUBLE", "VECTOR_COMPLEX_FLOAT",
                   "VECTOR_COMPLEX_DOUBLE", "VECTOR_NONE", "HASH_POINTER",
                   "VECTOR_HASH_POINTER", "VECTOR_SCHEMA"}

    def __init__(self):
        from karabo.native import (
            Hash, HashByte, HashList, Schema, decodeBinary, encodeBinary,
            get_hash_type_from_data)
        from karabo.native.data.hash import HashElement

        self.Hash, self.HashByte, self.HashList = Hash, HashByte, HashList
        self.Schema, self.HashElement = Schema, HashElement
        self.decode, self.encode = decodeBinary, encodeBinary
        self.type_of = get_hash_type_from_data

    # ---- reading ----------------------------------------------------------------------

    def load(self, data):
        return self.hash_to_content(self.decode(bytes(data)))

    def type_name(self, value):
        """karabo.native's own idea of the type of a decoded value (what it would write)."""
        tid = self.type_of(value).value
        return TYPE_NAMES[tid]

    def hash_to_content(self, h):
        out = []
        for key, value, attrs in h.iterall():
            tname = self.type_name(value)
            out.append({
                "key": key, "type": tname,
                "attrs": [{"key": k, "type": self.type_name(v),
                           "value": self.value_to_json(self.type_name(v), v)}
                          for k, v in attrs.items()],
                "value": self.value_to_json(tname, value)})
        return out

    def value_to_json(self, tname, v):
        if tname == "HASH":
            return self.hash_to_content(v)
        if tname == "VECTOR_HASH":
            return [self.hash_to_content(x) for x in v]
        if tname == "SCHEMA":
            return {"rootName": v.name, "parameters": self.hash_to_content(v.hash)}
        return leaf_to_json(tname, v)

    # ---- building ---------------------------------------------------------------------

    def save(self, content):
        data = self.encode(self.content_to_hash(content))
        return check_round_trip("karabo.native", "encoded", "decode it", self.load, data,
                                content)

    def content_to_hash(self, nodes):
        if not isinstance(nodes, list):
            raise ValueError(f"a Hash must be a list of nodes, got {type(nodes).__name__}")
        h = self.Hash()
        for node in nodes:
            check_node_fields(node)
            attrs = {}
            for a in node["attrs"]:
                check_node_fields(a, "attribute")
                attrs[a["key"]] = self.value_from_json(a["type"], a["value"])
            value = self.value_from_json(node["type"], node["value"])
            # One level only, keys used verbatim (a '.' in a key must not create nesting).
            OrderedDict.__setitem__(h, node["key"], self.HashElement(value, attrs))
        return h

    def value_from_json(self, tname, v):
        """The Python object that karabo.native encodes as type ``tname``."""
        if tname in self.UNSUPPORTED:
            raise UnsupportedType(f"karabo.native cannot encode {tname}")
        if tname == "BOOL":
            if not isinstance(v, bool):
                raise ValueError(f"BOOL needs true/false, got {v!r}")
            return v
        if tname in INT_TYPES:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{tname} needs an integer, got {v!r}")
            return NUMPY_TYPES[tname](v)    # numpy raises OverflowError when out of range
        if tname in FLOAT_TYPES:
            return NUMPY_TYPES[tname](float_from_json(v))
        if tname == "CHAR":
            if not (isinstance(v, str) and len(v) == 1):
                raise ValueError(f"CHAR needs a one-character string, got {v!r}")
            return self.HashByte(v)
        if tname == "STRING":
            if not isinstance(v, str):
                raise ValueError(f"STRING needs a string, got {v!r}")
            return v
        if tname == "VECTOR_CHAR":
            return bytes.fromhex(v["hex"])
        if tname == "BYTE_ARRAY":
            return bytearray.fromhex(v["hex"])
        if tname == "NONE":
            if v is not None:
                raise ValueError(f"NONE needs null, got {v!r}")
            return None
        if tname == "HASH":
            return self.content_to_hash(v)
        if tname == "VECTOR_HASH":
            return self.HashList(self.content_to_hash(x) for x in v)
        if tname == "SCHEMA":
            return self.Schema(v["rootName"], hash=self.content_to_hash(v["parameters"]))
        if not isinstance(v, list):
            raise ValueError(f"{tname} needs a list, got {v!r}")
        if tname == "VECTOR_STRING":
            return [self.value_from_json("STRING", x) for x in v]
        elem = tname[7:]
        if elem in NUMPY_TYPES:     # VECTOR_BOOL and the numeric vectors: 1-D ndarrays
            if elem in FLOAT_TYPES:
                items = [float_from_json(x) for x in v]
            else:
                items = [self.value_from_json(elem, x) for x in v]
            return np.array(items, dtype=NUMPY_TYPES[elem])
        raise UnsupportedType(f"karabo.native cannot encode {tname}")


# ---------------------------------------------------------------------------------------
# Request loop
# ---------------------------------------------------------------------------------------


def versions():
    from importlib import metadata

    out = {"python": sys.version.split()[0], "numpy": np.__version__}
    for dist, name in (("karabo.cpp", "karabind"), ("karabo.native", "karabo.native")):
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class Driver:
    def __init__(self):
        self._kb = None
        self._nat = None

    @property
    def kb(self):
        if self._kb is None:
            self._kb = KarabindCodec()
        return self._kb

    @property
    def nat(self):
        if self._nat is None:
            self._nat = NativeCodec()
        return self._nat

    def handle(self, req):
        if not isinstance(req, dict) or "op" not in req:
            raise ValueError("request must be an object with an 'op'")
        op = req["op"]
        if op == "ping":
            return {"pong": True}
        if op == "versions":
            return versions()
        if op in ("kb_save", "nat_save"):
            codec = self.kb if op == "kb_save" else self.nat
            return {"hex": codec.save(req["content"]).hex()}
        if op in ("kb_load", "nat_load"):
            codec = self.kb if op == "kb_load" else self.nat
            return {"content": codec.load(bytes.fromhex(req["hex"]))}
        if op == "kb_save_array":
            # karabind builds the NDArray itself from a numpy array (no content conversion):
            # shows what its binding does with dtype, byte order and shape
            kb = self.kb.kb
            arr = np.array(req["values"], dtype=np.dtype(req["dtype"])).reshape(req["shape"])
            h = kb.Hash()
            h["x"] = arr
            return {"hex": bytes(kb.BinarySerializerHash.create("Bin").save(h)).hex()}
        raise ValueError(f"unknown op {op!r}")


def reply(obj):
    sys.stdout.write(json.dumps(obj, allow_nan=False) + "\n")
    sys.stdout.flush()


def main():
    driver = Driver()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            result = driver.handle(req)
            out = {"ok": True}
            out.update(result)
            reply(out)
        except Exception as exc:     # report and keep serving
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            reply({"ok": False, "error": f"{type(exc).__name__}: {message}"})
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
