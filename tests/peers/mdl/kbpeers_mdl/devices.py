"""Two middle-layer devices, written as a facility's Python device would be.

``KbMdlSource``
    An ``OutputChannel`` named ``output`` with a declared data schema (``node.int32``,
    ``node.string``, ``node.vecInt64``, ``node.ndarray`` 4 x 5 float32). The slot
    ``writeOutput`` writes one item: counter ``n`` = 1, 2, ... in ``node.int32``, the
    ndarray filled with ``n``, train id ``1000 + n``; ``eosOutput`` sends end of stream.
``KbMdlSink``
    The default ``InputChannel`` (``raw=False``: the middle layer fetches the sender's
    ``<channel>.schema`` and delivers the declared keys) named ``input``, connected by
    name through ``input.connectedOutputChannels`` in ``init``. Every item and every end
    of stream is appended as one JSON line to the file ``recordPath``; ``received`` and
    ``endOfStreams`` count them.
``KbMdlInspector``
    A middle-layer client inside a device: what ``getDevice`` / ``getSchema`` /
    ``connectDevice`` make of another device's output channel.
"""

import json
from asyncio import wait_for

import numpy as np

from karabo.middlelayer import (
    AccessMode, Configurable, Device, Float, Hash, InputChannel, Int32, NDArray, Node,
    OutputChannel, Overwrite, Slot, State, String, Timestamp, UInt32, VectorInt64,
    get_array_data, slot)


class ItemNode(Configurable):
    int32 = Int32(defaultValue=0, accessMode=AccessMode.READONLY)
    string = String(defaultValue="", accessMode=AccessMode.READONLY)
    vecInt64 = VectorInt64(defaultValue=[], maxSize=8, accessMode=AccessMode.READONLY)
    ndarray = NDArray(dtype=Float, shape=(4, 5), accessMode=AccessMode.READONLY)


class ItemSchema(Configurable):
    node = Node(ItemNode)


class KbMdlSource(Device):
    state = Overwrite(defaultValue=State.ON, options=[State.ON])

    output = OutputChannel(ItemSchema, displayedName="Output")

    outputCounter = UInt32(defaultValue=0, accessMode=AccessMode.READONLY)

    @Slot()
    async def writeOutput(self):
        n = int(self.outputCounter.value) + 1
        self.outputCounter = n
        node = self.output.schema.node
        node.int32 = n
        node.string = f"item {n}"
        node.vecInt64 = [n, 2 * n, 3 * n]
        node.ndarray = np.full((4, 5), n, dtype=np.float32)
        stamp = Timestamp()
        stamp.tid = 1000 + n
        await self.output.writeData(timestamp=stamp)

    @Slot()
    async def eosOutput(self):
        await self.output.writeEndOfStream()


def _plain(value):
    """A JSON-friendly description of one delivered value."""
    value = getattr(value, "value", value)
    if isinstance(value, np.ndarray):
        return {"dtype": str(value.dtype), "shape": list(value.shape),
                "values": value.ravel().tolist()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def describe(hsh):
    out = {}

    def walk(h, prefix):
        for key in h.keys():
            value = h[key]
            path = f"{prefix}{key}"
            if isinstance(value, Hash):
                try:
                    out[path] = _plain(get_array_data(value))
                    continue
                except (KeyError, TypeError, ValueError):
                    walk(value, path + ".")
                    continue
            out[path] = _plain(value)

    walk(hsh, "")
    return out


class KbMdlSink(Device):
    state = Overwrite(defaultValue=State.ON, options=[State.ON])

    recordPath = String(defaultValue="", accessMode=AccessMode.INITONLY)
    received = UInt32(defaultValue=0, accessMode=AccessMode.READONLY)
    endOfStreams = UInt32(defaultValue=0, accessMode=AccessMode.READONLY)

    def _record(self, entry):
        if self.recordPath.value:
            with open(self.recordPath.value, "a") as f:
                f.write(json.dumps(entry) + "\n")

    @InputChannel(displayedName="Input")
    async def input(self, data, meta):
        hsh = data.configurationAsHash()
        self._record({"source": meta.source, "trainId": int(meta.timestamp.tid),
                      "data": describe(hsh)})
        self.received = int(self.received.value) + 1

    @input.endOfStream
    async def input(self, name):
        self._record({"endOfStream": name})
        self.endOfStreams = int(self.endOfStreams.value) + 1


def _schema_paths(hsh, prefix=""):
    """``{path: valueType}`` of the leaves and ``{path: classId}`` of the special nodes
    (NDArray, ImageData) of a schema subtree; nodes below special nodes are left out."""
    out = {}
    for key in hsh.keys():
        attrs = hsh[key, ...]
        path = f"{prefix}{key}"
        if attrs.get("nodeType") == 1 or isinstance(hsh[key], Hash) and len(hsh[key]):
            class_id = attrs.get("classId")
            if class_id in ("NDArray", "ImageData"):
                out[path] = str(class_id)
            else:
                out.update(_schema_paths(hsh[key], path + "."))
        else:
            out[path] = str(attrs.get("valueType"))
    return out


class KbMdlInspector(Device):
    """What a middle-layer client sees of another device: ``inspect(deviceId, channel)``
    answers (JSON) with ``getDevice``'s view of ``channel`` and ``getSchema``'s
    ``<channel>`` / ``<channel>.schema`` nodes; ``follow(deviceId, channel)`` connects a
    ``connectDevice`` proxy's output channel, ``followed()`` lists what arrived there."""

    state = Overwrite(defaultValue=State.ON, options=[State.ON])

    def __init__(self, configuration):
        super().__init__(configuration)
        self._follow_log = []
        self._followers = []

    @slot
    async def inspect(self, deviceId, channel):
        from karabo.middlelayer import OutputProxy, get_property, getDevice, getSchema
        proxy = await wait_for(getDevice(deviceId), timeout=30)
        try:
            ch = get_property(proxy, channel)
        except AttributeError:
            ch = None
        schema = await wait_for(getSchema(deviceId), timeout=30)
        sh = schema.hash
        node = sh[channel, ...] if channel in sh else {}
        data = f"{channel}.schema"
        data_attrs = sh[data, ...] if data in sh else {}
        return json.dumps({
            "proxyType": type(ch).__name__,
            "isOutputProxy": isinstance(ch, OutputProxy),
            "classId": str(node.get("classId")),
            "displayType": str(node.get("displayType")),
            "schemaDisplayType": str(data_attrs.get("displayType")),
            "dataPaths": _schema_paths(sh[data]) if data in sh else None,
            "channelKeys": sorted(sh[channel].keys()) if channel in sh else None,
        })

    @slot
    async def follow(self, deviceId, channel):
        from karabo.middlelayer import connectDevice, get_property
        proxy = await wait_for(connectDevice(deviceId), timeout=30)
        self._followers.append(proxy)
        ch = get_property(proxy, channel)

        async def on_data(data, meta):
            self._follow_log.append({"trainId": int(meta.timestamp.tid),
                                   "data": describe(data)})

        ch.setDataHandler(on_data)
        ch.connect()
        return True

    @slot
    def followed(self):
        return json.dumps(self._follow_log)
