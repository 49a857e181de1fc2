"""The read-only Karabo device view of an instance: its configuration and its schema.

One job: describe the instance the way a Karabo GUI or ``DeviceClient`` asks a device to
(``slotGetConfiguration``, ``slotGetSchema``; docs/wire/karabo-broker-amqp.md, section 10.3), from one list of
elements, so that the configuration and the schema always agree.

The view is built from *sections*: callables that yield :class:`Leaf` and :class:`Node`
elements. The built-in sections are the identity (ids, host, process, version, heartbeat,
state, status) and the output channels' addresses; :meth:`DeviceView.add_section` adds more
(e.g. the pipeline channels as Karabo describes them, or what a server instance shows),
each leaf with its own schema attributes. Every enclosing node a path implies is described
in the schema even when no section names it.

Threads: the slots run in the instance's worker thread; :meth:`DeviceView.configuration`
and :meth:`DeviceView.schema` may be called from any thread (they read the instance's
current values).
"""

from __future__ import annotations

from typing import NamedTuple

from kbhash import Hash, HashType, Schema

from .protocol import KARABO_VERSION

__all__ = ["DeviceView", "Leaf", "Node", "READ_ONLY"]

#: Karabo's ``accessMode`` of a read-only property.
READ_ONLY = 2


class Leaf(NamedTuple):
    """A property: its ``path`` in the configuration, ``value`` and Karabo ``type``, the
    ``shown`` (displayed) name, and more schema attributes as ``(name, value, HashType)``."""

    path: str
    value: object
    type: HashType
    shown: str
    attrs: tuple = ()


class Node(NamedTuple):
    """A node of the schema (``nodeType`` 1) with its displayed name and more attributes."""

    path: str
    shown: str
    attrs: tuple = ()


_STATE_ATTRS = (("leafType", 2, HashType.INT32), ("displayType", "State", HashType.STRING),
                ("classId", "State", HashType.STRING))


class DeviceView:
    """Configuration and schema of one instance, from its sections.

    Parameters
    ----------
    owner : BrokerInstance
        Gives ``instance_id``, ``instance_info``, ``hostname``, ``pid``,
        ``heartbeat_interval`` and ``state``.
    channels : Channels
        Gives ``output_names()`` and ``output_details(name)``.
    """

    def __init__(self, owner, channels):
        self._owner = owner
        self._channels = channels
        self._sections = [self._identity, self._output_addresses]

    def add_section(self, section):
        """Append ``section(taken) -> iterable of Leaf / Node`` to the view.

        ``taken`` is the set of top-level names the sections before it used; a section
        puts an element that would collide under a node of its own. Returns ``section``.
        """
        self._sections.append(section)
        return section

    def elements(self) -> list:
        """Every element of the view, section by section."""
        out = []
        taken = set()
        for section in self._sections:
            mine = list(section(frozenset(taken)))
            out += mine
            taken.update(e.path.split(".", 1)[0] for e in mine)
        return out

    def configuration(self) -> Hash:
        """The device configuration ``slotGetConfiguration`` answers (every leaf's value)."""
        h = Hash()
        for e in self.elements():
            if isinstance(e, Leaf):
                h.set(e.path, e.value, type=e.type)
        return h

    def schema(self) -> Schema:
        """The Schema ``slotGetSchema`` answers, describing :meth:`configuration`: one
        read-only leaf per property and one node per enclosing path (Karabo's attribute
        names and codes: ``nodeType`` 0 leaf / 1 node, ``accessMode`` 2 read,
        ``assignment`` 0 optional)."""
        params = Hash()
        described = set()

        def element(path, node_type, shown, attrs=()):
            params.set(path, Hash())
            for k, v in (("nodeType", node_type), ("accessMode", READ_ONLY), ("assignment", 0),
                         ("requiredAccessLevel", 0)):
                params.set_attribute(path, k, v, type=HashType.INT32)
            params.set_attribute(path, "displayedName", shown, type=HashType.STRING)
            for k, v, t in attrs:
                params.set_attribute(path, k, v, type=t)
            described.add(path)

        for e in self.elements():
            parts = e.path.split(".")
            for depth in range(1, len(parts)):  # every enclosing node, outermost first
                head = ".".join(parts[:depth])
                if head not in described:
                    element(head, 1, parts[depth - 1])
            if isinstance(e, Node):
                if e.path not in described:
                    element(e.path, 1, e.shown, e.attrs)
                else:
                    for k, v, t in e.attrs:
                        params.set_attribute(e.path, k, v, type=t)
                continue
            element(e.path, 0, e.shown)
            params.set_attribute(e.path, "valueType", e.type.name, type=HashType.STRING)
            params.set_attribute(e.path, "defaultValue", e.value, type=e.type)
            for k, v, t in e.attrs:
                params.set_attribute(e.path, k, v, type=t)
        return Schema(self._class_id(), params)

    def slots(self) -> dict:
        """What a GUI or DeviceClient asks a device for when it opens it."""
        return {"slotGetConfiguration": self._slot_get_configuration,
                "slotGetSchema": self._slot_get_schema}

    def _slot_get_configuration(self, *_):
        return self.configuration(), self._owner.instance_id

    def _slot_get_schema(self, *_):
        return self.schema(), self._owner.instance_id

    # ---- built-in sections ----------------------------------------------------------

    def _class_id(self):
        return self._owner.instance_info.get("classId") or "KbStreamInstance"

    def _identity(self, taken):
        o = self._owner
        info = o.instance_info
        return [
            Leaf("deviceId", o.instance_id, HashType.STRING, "DeviceID"),
            Leaf("classId", info.get("classId") or "KbStreamInstance", HashType.STRING,
                 "ClassID"),
            Leaf("serverId", info.get("serverId") or "__none__", HashType.STRING, "ServerID"),
            Leaf("hostName", o.hostname, HashType.STRING, "Host"),
            Leaf("pid", o.pid, HashType.INT32, "Process ID"),
            Leaf("karaboVersion", KARABO_VERSION, HashType.STRING, "Karabo version"),
            Leaf("heartbeatInterval", o.heartbeat_interval, HashType.INT32,
                 "Heartbeat interval"),
            Leaf("state", "ON" if o.state == "up" else "UNKNOWN", HashType.STRING, "State",
                 _STATE_ATTRS),
            Leaf("status", str(info.get("status") or ""), HashType.STRING, "Status"),
        ]

    def _output_addresses(self, taken):
        out = []
        for name in self._channels.output_names():
            try:
                details = self._channels.output_details(name)
            except Exception:  # an output without connection details yet
                details = None
            host = details.get("hostname") if details is not None else ""
            port = details.get("port") if details is not None else 0
            # an output is shown under its own name (like a device's output channel
            # property), or under outputChannels.<name> if that would collide with a
            # name taken before
            node = name if name.split(".")[0] not in taken else f"outputChannels.{name}"
            out.append(Leaf(f"{node}.hostname", str(host or ""), HashType.STRING, "Hostname"))
            out.append(Leaf(f"{node}.port", int(port or 0), HashType.UINT32, "Port"))
        return out
