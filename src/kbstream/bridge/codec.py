"""The Karabo Bridge codec front: implementation selection and the peers' entry points.

``serialize`` / ``deserialize`` have ``karabo_bridge``'s signatures.  They run the compiled
codec (``kbstream.bridge._codec``) by default, or its pure-Python twin
(``kbstream.bridge._pure``) when ``KB_IMPL=pure`` is set; there is no silent fallback (see
:func:`kbhash.select_backend`).  :func:`flatten_hash` turns a ``kbhash.Hash`` source into
the flat dict the bridge carries.  No sockets here.
"""

import kbhash

from ._rules import MAX_CONTAINERS, timestamp_fields

__all__ = ["serialize", "deserialize", "flatten_hash", "backend", "ENCODE_VERSIONS",
           "MAX_CONTAINERS"]

_codec, backend = kbhash.select_backend("kbstream.bridge")
#: protocol versions :func:`serialize` produces
ENCODE_VERSIONS = _codec.ENCODE_VERSIONS


def serialize(data, metadata=None, protocol_version="2.2", dummy_timestamps=False):
    """Serialize one train for the Karabo Bridge (``karabo_bridge.serialize`` signature).

    Parameters
    ----------
    data : dict
        ``{source: {flat key: value}}``; a source may also be a ``kbhash.Hash`` (flattened
        with :func:`flatten_hash`).
    metadata : dict, optional
        ``{source: {source, timestamp, timestamp.sec, timestamp.frac, timestamp.tid}}``.
        Default: each source's ``'metadata'`` entry (or the timestamp of a Hash source).
    protocol_version : {'2.2', '1.0'}
    dummy_timestamps : bool
        Fill missing ``timestamp*`` fields from the current time (for OnDA).

    Returns
    -------
    list
        2.2: header ``bytes`` and zero-copy array ``memoryview`` s, ready for
        ``sock.send_multipart(frames, copy=False)``; 1.0: one ``bytes`` frame.
        A JUNGFRAU module train (16 MiB) serializes in a few microseconds in 2.2.
    """
    for props in data.values():
        if type(props) is not dict:
            data, metadata = _flatten_train(data, metadata)
            break
    return _codec.serialize(data, metadata, protocol_version, dummy_timestamps)


#: ``deserialize(frames, *, max_containers=None)`` (``karabo_bridge.deserialize``
#: signature, plus the keyword): the selected codec's own function, with no wrapper
#: around it (a Python-level wrapper with a keyword-only argument cost ~40 ns per call).
#: Its docstring tells the rest: protocols, views on the frames, the container budget
#: (``MAX_CONTAINERS``, ``docs/safety-bridge.md``) and the errors.
deserialize = _codec.deserialize


def _flatten_train(data, metadata):
    """Flatten kbhash.Hash sources; return (flat data, explicit metadata for every source)."""
    flat = {}
    meta = {}
    for src, props in data.items():
        given = None if metadata is None else metadata.get(src)
        if isinstance(props, dict):
            flat[src] = props
            meta[src] = given if given is not None else props.get("metadata", {})
            continue
        values, src_meta = flatten_hash(props)
        flat[src] = values
        meta[src] = given if given is not None else {"source": src, **src_meta}
    return flat, meta


_IMAGE_FIELDS = (
    ("encoding", "encoding"),
    ("dims", "dimensions"),
    ("bitsPerPixel", "bitsPerPixel"),
    ("roiOffsets", "ROIOffsets"),
    ("binning", "binning"),
    ("rotation", "rotation"),
    ("flipX", "flipX"),
    ("flipY", "flipY"),
)


def flatten_hash(h):
    """Flatten a ``kbhash.Hash`` source the way the live bridge presents it.

    Returns ``(values, metadata)``:

    * ``values``: flat dict with dotted keys (``data.adc``, ``header.pulseCount``);
      NDArray nodes are numpy arrays (sent as array frames); nested empty Hashes are left
      out; lists of Hashes are sent as lists of flat dicts.
    * an ImageData at ``<prefix>`` gives ``<prefix>.data`` (the pixels array) and, in the
      msgpack part, ``<prefix>.encoding``, ``.dimensions`` (``dims``), ``.bitsPerPixel``,
      ``.ROIOffsets`` (``roiOffsets``), ``.binning``, ``.rotation``, ``.flipX``, ``.flipY``
      (names as the live bridge sends them, ``docs/wire/karabo-bridge-protocol.md``;
      lists of ints).
    * ``metadata``: from the newest ``sec`` / ``frac`` / ``tid`` timestamp attributes of
      any node: ``timestamp`` (float seconds), ``timestamp.sec`` (str), ``timestamp.frac``
      (18-digit str, attoseconds), ``timestamp.tid`` (int); empty if no node has one.

    Raises
    ------
    TypeError
        if *h* is not a ``kbhash.Hash``.
    """
    if not isinstance(h, kbhash.Hash):
        raise TypeError(f"expected a dict or kbhash.Hash source, got {type(h).__name__}")
    values = {}
    newest = []

    def visit(node, prefix):
        for key, value in node.items():
            path = prefix + key
            try:
                ts = node.get_timestamp(key)
            except KeyError:
                ts = None
            if ts is not None:
                stamp = (ts.tid, ts.sec, ts.frac)
                if not newest or stamp > newest[0]:
                    newest[:] = [stamp]
            if isinstance(value, kbhash.Hash):
                visit(value, path + ".")
            elif isinstance(value, kbhash.ImageData):
                values[path + ".data"] = value.pixels
                for field, name in _IMAGE_FIELDS:
                    v = getattr(value, field)
                    if hasattr(v, "tolist"):
                        v = v.tolist()
                    elif isinstance(v, tuple):
                        v = list(v)
                    values[f"{path}.{name}"] = v
            elif isinstance(value, list) and value and isinstance(value[0], kbhash.Hash):
                values[path] = [flatten_hash(item)[0] for item in value]
            else:
                values[path] = value

    visit(h, "")
    meta = {}
    if newest:
        tid, sec, frac = newest[0]
        meta = timestamp_fields(sec, frac)
        meta["timestamp.tid"] = tid
    return values, meta
