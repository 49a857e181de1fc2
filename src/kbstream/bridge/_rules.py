"""Rules of the Karabo Bridge wire format shared by both codecs (neutral: no zmq, no codec).

``_codec.pyx`` (compiled) and ``_pure.py`` (its pure-Python twin and test oracle) each
import only this module and :mod:`kbstream.errors`.  Here live the limits, the checks whose
error messages both codecs must give word for word (dtype, shape, frame size, header
fields), the protocol 2.0 / 2.1 metadata recovery, the timestamp metadata builder used by
every sender of kbstream (servers, replay, the kbhash flattening), and :data:`PUBLIC_API`,
the names both codecs provide (a test checks both against it).

Wire format: ``docs/wire/karabo-bridge-protocol.md``.
"""

import operator
import re
import time

import numpy as np

from ..errors import (
    AmplificationError,
    ProtocolError,
    ShapeMismatchError,
    UnsupportedDtypeError,
)

#: The names both codec modules provide, with the same signatures and behaviour.
PUBLIC_API = (
    "serialize",
    "deserialize",
    "packb",
    "unpackb",
    "make_dummy_timestamps",
    "release_pool",
    "ENCODE_VERSIONS",
    "MAX_DEPTH",
    "MAX_NDIM",
    "MAX_CONTAINERS",
)

#: protocol versions ``serialize`` produces
ENCODE_VERSIONS = ("1.0", "2.2")
#: deepest nesting of msgpack containers accepted by the packer and the unpacker
MAX_DEPTH = 256
#: most msgpack containers (maps and arrays, at any depth, in all frames together) that
#: one message may decode into, unless the caller gives another ``max_containers``.
#: A container takes one byte on the wire and 60 to 200 bytes as a dict or list, so
#: without a bound a 16 MiB frame of empty maps became 16.7 M dicts (1.2 GiB); with it
#: the containers of one message take at most some 200 MiB.  A train of a detector uses
#: a few per source (header, metadata, payload, shape).
MAX_CONTAINERS = 1 << 20
#: most dimensions accepted for a decoded array (numpy's limit)
MAX_NDIM = 64
#: longest dtype string accepted on the wire
MAX_DTYPE_LEN = 64
#: dtype kinds that can travel as raw bytes
ARRAY_KINDS = "biufcSUmM"

#: What a wire dtype may look like before numpy parses it (numpy names and array-protocol
#: type strings such as "uint16", "<u2", "|S3", "datetime64[ns]").  Checking the syntax
#: first keeps numpy's deprecation warnings out of the way without touching the
#: process-wide warning filters (which are not thread-safe).
DTYPE_RE = re.compile(
    r"^(?:[<>|=]?[?bBhHiIlLqQpPefdgFDGSUVmMuicO][0-9]{0,10}(?:\[[a-zA-Z0-9]{1,6}\])?"
    r"(?:,[<>|=]?[?bBhHiIlLqQpPefdgFDGSUVmMuicO][0-9]{0,10}){0,16}"
    r"|object_?|bool_?|u?int(?:8|16|32|64)?|float(?:16|32|64|96|128)?|complex(?:64|128|192|256)?"
    r"|half|single|double|longdouble|str_?[0-9]*|bytes_?[0-9]*"
    r"|(?:datetime|timedelta)64(?:\[[a-zA-Z0-9]{1,6}\])?)$")

#: first bytes of a REP server's error reply ("Error: bad request ...")
ERROR_PREFIX = b"Error: "

_dtype_cache = {}


def type_name(obj):
    t = type(obj)
    if t.__module__ == "builtins":
        return t.__qualname__
    return f"{t.__module__}.{t.__qualname__}"


def make_dummy_timestamps():
    """Timestamp fields from the current time, as ``karabo_bridge`` makes them.

    ``timestamp.sec`` and ``timestamp.frac`` split ``str(time.time())`` at the dot, the
    fraction right-padded with zeros to 18 digits (attoseconds; about 0.1 us of real
    resolution).
    """
    epoch = time.time()
    sec, _, frac = repr(epoch).partition(".")
    return {"timestamp": epoch, "timestamp.sec": sec, "timestamp.frac": frac.ljust(18, "0")}


def timestamp_fields(sec, frac):
    """The bridge metadata's timestamp fields for ``sec`` seconds + ``frac`` attoseconds.

    ``timestamp`` (float seconds), ``timestamp.sec`` (decimal str), ``timestamp.frac``
    (18-digit str of attoseconds), in that order; integer arithmetic, no float rounding
    in the strings.
    """
    sec = int(sec)
    frac = int(frac)
    return {"timestamp": sec + frac / 1e18, "timestamp.sec": str(sec),
            "timestamp.frac": f"{frac:018d}"}


def source_metadata(source, tid, sec=None, frac=0):
    """One source's bridge metadata, the one builder every kbstream sender uses.

    ``{"source", "timestamp", "timestamp.sec", "timestamp.frac", "timestamp.tid"}`` in
    that order (the order extra_data's replay sends); the three timestamp fields only
    when ``sec`` is given (see :func:`timestamp_fields`).
    """
    meta = {"source": source}
    if sec is not None:
        meta.update(timestamp_fields(sec, frac))
    meta["timestamp.tid"] = int(tid)
    return meta


def container_limit(max_containers):
    """The container budget of one decode: :data:`MAX_CONTAINERS` for None, else the
    given non-negative int."""
    if max_containers is None:
        return MAX_CONTAINERS
    if type(max_containers) is not int:
        try:
            if isinstance(max_containers, bool):
                raise TypeError
            max_containers = operator.index(max_containers)
        except TypeError:
            raise TypeError(
                f"max_containers must be an int or None, got {type_name(max_containers)}"
            ) from None
    if max_containers < 0:
        raise ValueError(f"max_containers must be >= 0, got {max_containers}")
    return max_containers


def amplification_error(index, at, limit):
    """The error for the container at ``at`` in frame ``index`` that is one too many."""
    return AmplificationError(
        f"frame {index}: msgpack map or array at offset {at} is one more than the "
        f"{limit} containers one message may hold",
        index,
        at,
        limit=limit,
    )


def wire_dtype(name, index):
    """np.dtype for a wire dtype string; refuses object, structured and empty dtypes."""
    if not isinstance(name, (str, bytes)):
        raise UnsupportedDtypeError(
            f"frame {index}: dtype must be a short string, got {type(name).__name__}", index,
            dtype=None
        )
    dt = _dtype_cache.get(name)
    if dt is not None:
        return dt
    if isinstance(name, bytes):
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            text = None
    else:
        text = name
    if not isinstance(text, str) or len(text) > MAX_DTYPE_LEN:
        raise UnsupportedDtypeError(
            f"frame {index}: dtype must be a short string, got {name!r}", index, dtype=name
        )
    if not DTYPE_RE.match(text):
        raise UnsupportedDtypeError(
            f"frame {index}: unknown dtype {name!r}", index, dtype=name
        )
    try:
        dt = np.dtype(text)
    except Exception:
        raise UnsupportedDtypeError(
            f"frame {index}: unknown dtype {name!r}", index, dtype=name
        ) from None
    if dt.kind not in ARRAY_KINDS or dt.hasobject or dt.itemsize == 0 or dt.shape:
        raise UnsupportedDtypeError(
            f"frame {index}: dtype {name!r} cannot be built from raw bytes", index, dtype=name
        )
    if len(_dtype_cache) < 256:
        _dtype_cache[name] = dt
    return dt


def shape_count(shape, index):
    """Validate a wire shape; return (tuple shape, number of items)."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise ShapeMismatchError(
            f"frame {index}: shape must be a list of at most {MAX_NDIM} ints, got {shape!r}",
            index,
        )
    count = 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise ShapeMismatchError(
                f"frame {index}: shape must be a list of at most {MAX_NDIM} ints, "
                f"got {shape!r}",
                index,
            )
        count *= d
    return tuple(shape), count


def check_nbytes(shape, count, dt, nbytes, index, what):
    if count * dt.itemsize != nbytes:
        raise ShapeMismatchError(
            f"frame {index}: {what} declares shape {list(shape)} of {dt.str} "
            f"({count * dt.itemsize} bytes) but carries {nbytes} bytes",
            index,
        )
    if count == 0:
        # numpy refuses shapes whose non-zero dimensions overflow, even for empty arrays
        nonzero = 1
        for d in shape:
            if d:
                nonzero *= d
        if nonzero * dt.itemsize >= 2**63:
            raise ShapeMismatchError(
                f"frame {index}: {what} declares shape {list(shape)} of {dt.str}, "
                f"too large for numpy",
                index,
            )


def meta_from_payload(payload):
    """Metadata of a 2.0 (nested) or 2.1 (``metadata.`` prefixed) payload."""
    m = payload.get("metadata")
    if isinstance(m, dict):
        return dict(m)
    return {
        k[9:]: v for k, v in payload.items() if isinstance(k, str) and k.startswith("metadata.")
    }


def header_field(hdr, name, index, types):
    try:
        v = hdr[name]
    except KeyError:
        raise ProtocolError(f"frame {index}: header has no {name!r}", index) from None
    if not isinstance(v, types):
        raise ProtocolError(f"frame {index}: header {name!r} is {type_name(v)}", index)
    return v
