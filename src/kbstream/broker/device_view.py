"""The read-only Karabo device view of an instance: its configuration and its schema.

One job: describe the instance the way a Karabo GUI or ``DeviceClient`` asks a device to
(``slotGetConfiguration``, ``slotGetSchema``; docs/wire/karabo-broker-amqp.md, section 10.3), from one list of
elements, so that the configuration and the schema always agree.

The view is built from *sections*: callables that yield :class:`Leaf`, :class:`Node` and
:class:`Tree` elements. The built-in sections are the identity (ids, host, process, version,
heartbeat, state, status) and the pipeline channels in Karabo's layout (outputs with their
data schema, inputs with their options; :mod:`.karabo_channels`); :meth:`DeviceView.add_section` adds more
(e.g. the pipeline channels as Karabo describes them, or what a server instance shows),
each leaf with its own schema attributes. Every enclosing node a path implies is described
in the schema even when no section names it.

Every value of the configuration carries ``sec``/``frac``/``tid`` timestamp attributes (the
time the value was last set; the instance's creation time for values never changed), as
Karabo's do. ``slotReconfigure`` changes an input's ``connectedOutputChannels`` and refuses
everything else with an error reply (:class:`~kbstream.broker.errors.ReconfigureError`).

Threads: the slots run in the instance's worker thread; :meth:`DeviceView.configuration`
and :meth:`DeviceView.schema` may be called from any thread (they read the instance's
current values).
"""

from __future__ import annotations

from typing import NamedTuple

import logging
import threading

from kbhash import Hash, HashType, Schema, Timestamp

from . import karabo_channels as kc
from .errors import ReconfigureError
from .protocol import KARABO_VERSION

__all__ = ["DeviceView", "Leaf", "Node", "Tree", "READ_ONLY"]

log = logging.getLogger("kbstream.broker")

#: Karabo's ``accessMode`` of a read-only property.
READ_ONLY = 2

#: Most outputs one ``slotReconfigure`` may connect an input to: every output is a
#: connection with its own thread, and any peer on the broker may send the request.
MAX_CONNECTED_OUTPUTS = 256


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


class Tree(NamedTuple):
    """A described subtree: the node at ``path`` with its ``attrs``, its ``params`` (the
    schema of its children, attributes included) and its ``config`` (their values)."""

    path: str
    attrs: tuple
    params: Hash
    config: Hash


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
        self._sections = [self._identity, self._channel_trees]
        self._born = Timestamp.now()
        self._stamps = {}  # path -> Timestamp of the last change
        self._stamp_lock = threading.Lock()

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
            elif isinstance(e, Tree):
                h.set(e.path, e.config)
        with self._stamp_lock:
            stamps = dict(self._stamps)
        _stamp(h, "", stamps, self._born)
        return h

    def changed(self, paths):
        """Record that the values at ``paths`` changed now (their timestamps)."""
        now = Timestamp.now()
        with self._stamp_lock:
            for p in paths:
                self._stamps[p] = now

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
            if isinstance(e, Tree):
                params.set(e.path, e.params)
                for k, v, t in e.attrs:
                    params.set_attribute(e.path, k, v, type=t)
                described.add(e.path)
                continue
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
                "slotGetSchema": self._slot_get_schema,
                "slotReconfigure": self._slot_reconfigure}

    def _slot_get_configuration(self, *_):
        return self.configuration(), self._owner.instance_id

    def _slot_get_schema(self, *_):
        return self.schema(), self._owner.instance_id

    def _slot_reconfigure(self, changes=None, *_):
        """Apply ``changes`` (a Hash of paths): only inputs' ``connectedOutputChannels``
        may change; anything else refuses the whole request (nothing is applied)."""
        if not isinstance(changes, Hash):
            raise ReconfigureError("slotReconfigure needs a Hash of the new values")
        inputs = self._channels.input_names()
        plan = []
        for path in changes.paths():
            head, _, key = path.rpartition(".")
            if head in inputs and key == "connectedOutputChannels":
                value = changes[path]
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ReconfigureError(f'"{path}" must be a list of strings '
                                           f'"<instanceId>:<channel>"')
                if len(value) > MAX_CONNECTED_OUTPUTS:
                    raise ReconfigureError(f'"{path}" lists {len(value)} outputs; at most '
                                           f"{MAX_CONNECTED_OUTPUTS} (each is a connection "
                                           f"and a thread)")
                plan.append((head, path, [str(v) for v in value]))
                continue
            if path in self.configuration():
                raise ReconfigureError(f'Parameter "{path}" is not reconfigurable '
                                       f"(kbstream allows only an input's "
                                       f"connectedOutputChannels)")
            raise ReconfigureError(f'Encountered unexpected configuration parameter: "{path}"')
        for name, path, outputs in plan:
            self._channels.set_input_outputs(name, outputs)
        self.changed([p for _, p, _ in plan])
        if plan:
            conf = self.configuration()
            update = Hash()
            for _, path, _ in plan:
                update.set(path, conf[path], type=HashType.VECTOR_STRING)
                for k in ("sec", "frac", "tid"):
                    update.set_attribute(path, k, conf.get_attribute(path, k),
                                         type=HashType.UINT64)
            try:
                self._owner.emit("signalChanged", update, self._owner.instance_id)
            except Exception:  # not up (any more): nobody to tell
                log.debug("signalChanged not sent", exc_info=True)
        return None

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

    def _channel_trees(self, taken):
        """Outputs and inputs as Karabo devices publish them (:mod:`.karabo_channels`).

        A channel is shown under its own name (like a device's channel property), or under
        ``outputChannels.<name>`` / ``inputChannels.<name>`` if that would collide with a
        name taken before."""
        out = []
        host = self._owner.hostname
        for name in self._channels.output_names():
            node = name if name.split(".")[0] not in taken else f"outputChannels.{name}"
            try:
                source, schema = self._channels.output_entry(name)
            except KeyError:  # removed meanwhile
                continue
            attrs, params = kc.output_parameters(schema)
            out.append(Tree(node, attrs, params, kc.output_configuration(source, host)))
        used = {e.path.split(".")[0] for e in out} | set(taken)
        for name, channel, outputs in self._channels.inputs():
            node = name if name.split(".")[0] not in used else f"inputChannels.{name}"
            attrs, params = kc.input_parameters()
            out.append(Tree(node, attrs, params, kc.input_configuration(channel, outputs)))
        return out


def _stamp(h, prefix, stamps, default):
    """Put sec/frac/tid on every value of ``h`` (not on the nodes holding values)."""
    for key in h.keys():
        path = prefix + key
        value = h[key]
        if isinstance(value, Hash) and h.get_type(key) == HashType.HASH:
            _stamp(value, path + ".", stamps, default)
            continue
        h.set_timestamp(key, stamps.get(path, default))
