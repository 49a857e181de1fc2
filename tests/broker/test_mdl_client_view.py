"""What Karabo's middle-layer clients make of a kbstream output (issue 13).

A ``KbMdlInspector`` device (tests/peers/mdl) in a real ``karabo-middlelayerserver`` runs
``getDevice`` / ``getSchema`` / ``connectDevice`` on three devices with an output channel
``output``: the kbstream instance, a middle-layer ``KbMdlSource`` declaring the same data,
and a C++ ``PropertyTest`` in ``karabo-cppserver``. The kbstream output must look like the
other two: an ``OutputProxy`` on the proxy, a ``classId`` / ``displayType``
``OutputChannel`` node with an ``OutputSchema`` node ``output.schema`` -- the same data
description as the middle-layer device's -- and a ``connectDevice`` proxy connected to it
receives its items.
"""

import json

import numpy as np
import pytest

from kbhash import Hash, HashType

from broker_stack import wait_until
from mdl_stack import mdl_server, probe, wait_online  # noqa: F401  (fixtures)

pytestmark = pytest.mark.karabo


def same_data_as_mdl_source():
    """The data KbMdlSource declares, as a kbstream DataSchema."""
    from kbstream.pipeline import DataSchema
    return DataSchema({"node.int32": HashType.INT32, "node.string": HashType.STRING,
                       "node.vecInt64": HashType.VECTOR_INT64,
                       "node.ndarray": ("float32", (4, 5))})


def item(i):
    h = Hash()
    h.set("node.int32", i, type=HashType.INT32)
    h.set("node.string", f"kb {i}")
    h.set("node.vecInt64", [i, 2 * i], type=HashType.VECTOR_INT64)
    h.set("node.ndarray", np.full((4, 5), i, np.float32))
    return h


def ask(probe, slot, *args, timeout=60):
    (reply,) = probe.request("mdlInspect", slot, *args, timeout=timeout)
    return json.loads(reply)


def test_mdl_get_device_sees_kbstream_output_as_an_output_channel(broker_env, mdl_server,
                                                                   cpp_server, probe):
    from kbstream.broker import BrokerInstance
    from kbstream.pipeline import OutputChannel

    cpp_server({"kbDev": {"classId": "PropertyTest", "heartbeatInterval": 10,
                          "output": {"hostname": "127.0.0.1"}}})
    out = OutputChannel("kbPeer:output", hostname="127.0.0.1",
                        schema=same_data_as_mdl_source()).start()
    peer = BrokerInstance("kbPeer", heartbeat_interval=10)
    try:
        peer.add_output_channel("output", out)
        peer.start()
        mdl_server({"mdlSrc": {"classId": "KbMdlSource", "output": {"hostname": "127.0.0.1"}},
                    "mdlInspect": {"classId": "KbMdlInspector"}},
                   ["KbMdlSource", "KbMdlInspector"])
        wait_online(probe, "kbDev", 60)

        views = {dev: ask(probe, "inspect", dev, "output") for dev in ("kbPeer", "mdlSrc",
                                                                         "kbDev")}
        for dev, v in views.items():
            assert v["isOutputProxy"], (dev, v)
            assert (v["classId"], v["displayType"], v["schemaDisplayType"]) == (
                "OutputChannel", "OutputChannel", "OutputSchema"), (dev, v)
            assert {"hostname", "port", "schema"} <= set(v["channelKeys"]), (dev, v)
        # the same declared data gives the same description as the middle layer's own
        assert views["kbPeer"]["dataPaths"] == views["mdlSrc"]["dataPaths"] == {
            "node.int32": "INT32", "node.string": "STRING", "node.vecInt64": "VECTOR_INT64",
            "node.ndarray": "NDArray"}
        # the output's options are those of the C++ output channel, key for key
        assert views["kbPeer"]["channelKeys"] == views["kbDev"]["channelKeys"]
        # and the C++ device's output is described the same way (its own data)
        assert views["kbDev"]["dataPaths"]["node.ndarray"] == "NDArray"
        assert views["kbDev"]["dataPaths"]["node.int32"] == "INT32"

        # a connectDevice proxy connects to the kbstream output by name and gets items
        assert probe.request("mdlInspect", "follow", "kbPeer", "output", timeout=60) == (True,)
        i = 0

        def one_more():
            nonlocal i
            i += 1
            out.write(item(i), {"tid": 9000 + i})
            out.update(timeout=10)
            return ask(probe, "followed")

        got = wait_until(one_more, 60, interval=0.2, what="an item at the connectDevice proxy")
    finally:
        out.close()
        peer.stop()
    first = got[0]
    k = first["data"]["node.int32"]
    assert 1 <= k <= i and first["trainId"] == 9000 + k
    assert first["data"]["node.string"] == f"kb {k}"
    assert first["data"]["node.ndarray"] == {"dtype": "float32", "shape": [4, 5],
                                             "values": [float(k)] * 20}
