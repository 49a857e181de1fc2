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
"""

import json

import numpy as np

from karabo.middlelayer import (
    AccessMode, Configurable, Device, Float, Hash, InputChannel, Int32, NDArray, Node,
    OutputChannel, Overwrite, Slot, State, String, Timestamp, UInt32, VectorInt64,
    get_array_data)


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
