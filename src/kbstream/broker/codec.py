"""Broker message payloads: header Hash archive immediately followed by body Hash archive.

Karabo 3 writes ``Bin(header) ++ Bin(body)`` as the AMQP message body, with no separator,
no length prefix and no AMQP properties (docs/wire/karabo-broker-amqp.md, sections 6 to 8). The body holds the
positional arguments as ``a1 ... aN``.
"""

from __future__ import annotations

import time

import kbhash
from kbhash import Hash, HashType

from .errors import MessageError

__all__ = ["Typed", "split_archives", "decode_message", "encode_message", "make_header",
           "body_from_args", "args_from_body", "now_ms"]


class Typed:
    """A slot argument with an explicit Karabo type: ``Typed(5, HashType.UINT32)``.

    Python ``int`` values become INT32 when they fit (karabind's rule); C++ slots read
    their arguments with exact types, so use this for the others.
    """

    __slots__ = ("value", "type")

    def __init__(self, value, type):
        self.value = value
        self.type = HashType(type)

    def __repr__(self):
        return f"Typed({self.value!r}, {self.type.name})"


def split_archives(data):
    """Decode ``header ++ body``; return ``(header, body)``.

    Raises
    ------
    MessageError
        When either archive is malformed or the body is missing or followed by bytes.
    """
    mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    try:
        header, n = kbhash.decode_prefix(mv)
    except (kbhash.KbHashError, ValueError, TypeError) as e:
        raise MessageError(f"bad header archive: {e}") from e
    if n >= len(mv):
        raise MessageError(f"message of {len(mv)} bytes has a header but no body")
    try:
        body = kbhash.decode(memoryview(mv)[n:])
    except (kbhash.KbHashError, ValueError, TypeError) as e:
        raise MessageError(f"bad body archive at offset {n}: {e}") from e
    return header, body


def decode_message(data):
    """:func:`split_archives` plus header checks: ``signalInstanceId`` must be a string.

    Returns ``(header, body)``.
    """
    header, body = split_archives(data)
    sender = header.get("signalInstanceId")
    if not isinstance(sender, str):
        raise MessageError("message header without a string 'signalInstanceId'")
    for key in ("replyTo", "replyFrom", "replyFunction"):
        if key in header and not isinstance(header[key], str):
            raise MessageError(f"message header key {key!r} is not a string")
    return header, body


def now_ms() -> int:
    return int(time.time() * 1000)


def make_header(sender, *, reply_to=None, reply_from=None, error=False, reply_function=None,
                timestamp_ms=None):
    """A header in the key order of the C++ sender (docs/wire/karabo-broker-amqp.md, section 7)."""
    h = Hash()
    if error:
        h.set("error", True, type=HashType.BOOL)
    if reply_to is not None:
        h.set("replyTo", reply_to, type=HashType.STRING)
    if reply_from is not None and error:
        h.set("replyFrom", reply_from, type=HashType.STRING)
    if error:
        h.set("signalInstanceId", sender, type=HashType.STRING)
    else:
        h.set("signalInstanceId", sender, type=HashType.STRING)
        if reply_from is not None:
            h.set("replyFrom", reply_from, type=HashType.STRING)
        if reply_function is not None:
            h.set("replyFunction", reply_function, type=HashType.STRING)
    h.set("MQTimestamp", now_ms() if timestamp_ms is None else timestamp_ms,
          type=HashType.INT64)
    return h


def body_from_args(args):
    """``Hash{a1: args[0], ...}``; :class:`Typed` arguments keep their explicit type."""
    body = Hash()
    for i, arg in enumerate(args, 1):
        if isinstance(arg, Typed):
            body.set(f"a{i}", arg.value, type=arg.type)
        else:
            body.set(f"a{i}", arg)
    return body


def args_from_body(body):
    """The positional arguments ``a1, a2, ...`` of a body, in order (stops at a gap)."""
    args = []
    i = 1
    while f"a{i}" in body:
        args.append(body[f"a{i}"])
        i += 1
    return tuple(args)


def encode_message(header, body) -> bytes:
    """``Bin(header) ++ Bin(body)`` as one ``bytes`` (control messages are small)."""
    return kbhash.encode_bytes(header) + kbhash.encode_bytes(body)
