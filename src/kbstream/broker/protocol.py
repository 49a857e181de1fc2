"""The fixed names and rules of Karabo's broker protocol that several rooms share.

One job: say what a valid instance id, slot name, reply address and output channel id is,
and hold the constants every instance announces or binds (docs/wire/karabo-broker-amqp.md, sections 4 and 10).
Pure functions and constants: no state, no threads; any thread may call them.
"""

from __future__ import annotations

import re

from .errors import InvalidInstanceId, InvalidOutputId, InvalidSlotName

__all__ = ["validate_instance_id", "validate_slot_name", "split_output_id", "instance_of_output",
           "is_valid_sender", "is_valid_reply_address", "BROADCAST_SLOTS", "KARABO_VERSION"]

#: The broadcast slots every instance binds (``*.<slot>`` on ``Global_Slots``).
BROADCAST_SLOTS = ("slotInstanceNew", "slotInstanceUpdated", "slotInstanceGone", "slotDiscover")
#: The Karabo version a kbstream instance announces (the one its messages follow).
KARABO_VERSION = "3.1.2"

_ID_RE = re.compile(r"^[A-Za-z0-9_/\-]+$")


def validate_instance_id(instance_id: str) -> str:
    """Karabo's rule: one or more of ``A-Z a-z 0-9 _ / -`` (no ``.``, ``:`` or space).

    Raises
    ------
    InvalidInstanceId
    """
    if not isinstance(instance_id, str) or not _ID_RE.match(instance_id):
        raise InvalidInstanceId(
            f"invalid instance id {instance_id!r}: use only letters, digits, '_', '/' and '-'")
    return instance_id


def validate_slot_name(name: str) -> str:
    """A slot name: a non-empty string without spaces.

    Raises
    ------
    InvalidSlotName
    """
    if not isinstance(name, str) or not name or " " in name:
        raise InvalidSlotName(f"invalid slot name {name!r}")
    return name


def split_output_id(output_id: str):
    """``"<instanceId>:<channel>"`` (or ``@``) -> ``(instanceId, channel)``.

    Raises
    ------
    InvalidOutputId
        Not a string, no separator, or an empty part.
    """
    if isinstance(output_id, str):
        for sep in (":", "@"):
            if sep in output_id:
                iid, _, channel = output_id.partition(sep)
                if iid and channel:
                    return iid, channel
    raise InvalidOutputId(f"output channel id {output_id!r} is not '<instanceId>:<channel>'")


def instance_of_output(output_id: str) -> str:
    """The instance part of an output id, leniently: the whole text without a separator."""
    for sep in (":", "@"):
        if sep in output_id:
            return output_id.partition(sep)[0]
    return output_id


def is_valid_sender(text) -> bool:
    """An instance id that can be a routing key part (Karabo: letters, digits, _ / -)."""
    return isinstance(text, str) and 0 < len(text) <= 200 and "." not in text and text.isprintable()


def is_valid_reply_address(text) -> bool:
    """A ``replyTo`` / ``replyFunction``: one routing-key word (no '.')."""
    return isinstance(text, str) and 0 < len(text) <= 50 and "." not in text and text.isprintable()
