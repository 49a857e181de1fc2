"""kbstream's channels and server as Karabo's clients see them, on a real RabbitMQ with
real Karabo 3.1.2 (karabind DeviceClient, karabo-cppserver with PropertyTest).

* A karabind ``DeviceClient`` gets the data schema of a kbstream output with
  ``getOutputChannelSchema`` (before: "Key 'schema' does not exist"), the same as the one of
  the C++ PropertyTest output declaring the same data, attribute by attribute (descriptions
  and displayed names aside: PropertyTest has its own);
* the kbstream process appears as a server: ``getServers()`` lists it, ``getDevices(server)``
  lists its device, whose ``serverId`` names it;
* a C++ input connects to a kbstream output whose information reply carries the schema;
* ``DeviceClient.set`` of an input's ``connectedOutputChannels`` rewires it without touching
  the connections kept; a refused change comes back as Karabo's error reply.
"""

from __future__ import annotations

import pytest

from kbhash import Hash, HashType
from kbstream.broker import RemoteError
from kbstream.pipeline import DataSchema, InputChannel, OutputChannel
from kbstream.pipeline.schema import Image, Vector

from broker_stack import wait_until, wait_ready

pytestmark = pytest.mark.karabo

#: What PropertyTest's outputs declare (their data schema, as karabind dumps it).
PT_DATA = DataSchema({
    "node.int32": HashType.INT32,
    "node.string": HashType.STRING,
    "node.vecInt64": Vector(HashType.VECTOR_INT64, 100),
    "node.ndarray": ("float32", (100, 200)),
    "node.image": Image("uint16", (400, 500)),
}, daq="train")

KB_DEV = {"classId": "PropertyTest", "heartbeatInterval": 10, "output": {"hostname": "127.0.0.1"}}

#: Attributes that carry the structure (what clients, the middle layer and the DAQ use).
STRUCTURE = ("nodeType", "valueType", "accessMode", "classId", "displayType", "maxSize",
             "daqDataType", "defaultValue", "unitSymbol", "metricPrefixSymbol", "assignment")


def test_device_client_sees_kbstream_output_and_server_like_cpp(instances, cpp_server,
                                                               karabind_client):
    cpp_server({"kbDev": KB_DEV,
                "kbIn": {"classId": "PropertyTest", "heartbeatInterval": 10,
                         "input": {"connectedOutputChannels": ["kbView:output"]}}})
    out = OutputChannel("kbView:output", hostname="127.0.0.1", schema=PT_DATA).start()
    try:
        obs = instances("kbObs")
        obs.start()
        wait_ready(obs, "kbDev", 60)
        wait_ready(obs, "kbIn", 60)
        peer = instances("kbView", heartbeat_interval=10, server="kbViewServer",
                         info_extra={"classId": "KbStreamProbe"})
        peer.add_output_channel("output", out)
        peer.start()
        # the C++ input takes the information reply with the schema in it and connects
        out.wait_for_inputs(copy=["kbIn:input"], timeout=60)

        client = karabind_client()
        client.wait_for(lambda m: m.get("event") == "new" and m.get("id") == "kbView", 60)
        ours = client.command({"cmd": "outschema", "id": "kbView", "channel": "output"})
        cpp = client.command({"cmd": "outschema", "id": "kbDev", "channel": "output"})
        assert "error" not in ours, ours
        assert "error" not in cpp, cpp
        assert ours["paths"] == cpp["paths"]
        for path in cpp["paths"]:
            for name in STRUCTURE:
                assert ours["attrs"][path].get(name) == cpp["attrs"][path].get(name), \
                    (path, name)
        assert ours["attrs"]["node.ndarray.data"]["unitSymbol"] == "N_A"

        sch = client.command({"cmd": "schema", "id": "kbView"})
        assert "error" not in sch, sch
        assert "output" in sch["nodes"]
        assert sch["leaves"]["output.schema.node.int32"]["type"].endswith("INT32")
        assert sch["leaves"]["output.port"]["type"].endswith("UINT32")

        def listed():
            topo = client.command({"cmd": "topology"})
            return topo if "kbViewServer" in topo.get("servers", []) else None

        topo = wait_until(listed, 60, interval=0.5, what="kbViewServer listed")
        assert topo["devices_by_server"]["kbViewServer"] == ["kbView"]
        assert topo["devices_by_server"]["kbServer"] == ["kbDev", "kbIn"]
        server = topo["instances"]["kbViewServer"]
        assert server["kind"] == "server"
        assert server["attrs"]["serverId"] == "kbViewServer"
        assert server["attrs"]["lang"] == "python"
        assert "KbStreamProbe" in server["attrs"]["deviceClasses"]
        assert topo["instances"]["kbView"]["attrs"]["serverId"] == "kbViewServer"
        assert client.command({"cmd": "get", "id": "kbView", "key": "serverId"})["value"] \
            == "kbViewServer"
    finally:
        out.close()


def test_device_client_set_rewires_an_input_and_gets_the_error_reply(instances, cpp_server,
                                                                    karabind_client):
    cpp_server({"kbDev": KB_DEV})
    obs = instances("kbObs2")
    obs.start()
    wait_ready(obs, "kbDev", 60)
    peer = instances("kbRewire", heartbeat_interval=10)
    inp = InputChannel("kbRewire:input", connectedOutputChannels=["kbDev:output"],
                       resolver=peer.resolver, reconnect_interval=2.0)
    peer.add_input_channel(inp)
    peer.start()
    inp.start()
    try:
        inp.wait_connected(["kbDev:output"], timeout=60)
        first = inp._conns["kbDev:output"]
        client = karabind_client()
        client.wait_for(lambda m: m.get("event") == "new" and m.get("id") == "kbRewire", 60)
        r = client.command({"cmd": "set", "id": "kbRewire",
                            "key": "input.connectedOutputChannels",
                            "value": ["kbDev:output", "kbDev:node.output"]})
        assert r.get("ok") is True, r
        inp.wait_connected(["kbDev:output", "kbDev:node.output"], timeout=60)
        assert inp._conns["kbDev:output"] is first   # the kept connection was not touched
        got = client.command({"cmd": "get", "id": "kbRewire",
                              "key": "input.connectedOutputChannels"})
        assert got["value"] == ["kbDev:output", "kbDev:node.output"]
        r = client.command({"cmd": "set", "id": "kbRewire",
                            "key": "input.connectedOutputChannels",
                            "value": ["kbDev:node.output"]})
        assert r.get("ok") is True, r
        wait_until(lambda: "kbDev:output" not in inp.connection_status(), 30,
                   what="kbDev:output disconnected")
        # refused: a malformed output id (karabind sees the error reply), and a property
        # that is not reconfigurable (an error reply to any caller)
        bad = client.command({"cmd": "set", "id": "kbRewire",
                              "key": "input.connectedOutputChannels", "value": ["nocolon"]})
        assert "ReconfigureError" in bad.get("error", ""), bad
        with pytest.raises(RemoteError, match="not reconfigurable"):
            obs.request("kbRewire", "slotReconfigure", Hash("input.minData", 3), timeout=10)
        assert list(peer.configuration()["input.connectedOutputChannels"]) == \
            ["kbDev:node.output"]
    finally:
        inp.close()


def test_devices_name_the_process_default_server_shared_and_gone_with_the_last(
        instances, karabind_client):
    """Without ``server=`` a device names the process's server (``<host>_kbstream_<pid>``):
    a DeviceClient lists it with both devices of the process under it; it says goodbye
    after the last of them; ``server=False`` names none."""
    from kbstream.broker.server import default_server_id

    sid = default_server_id()
    client = karabind_client()
    a = instances("kbDefA", heartbeat_interval=10, info_extra={"classId": "KbProbeA"})
    b = instances("kbDefB", heartbeat_interval=10, info_extra={"classId": "KbProbeB"})
    lone = instances("kbNoServer", heartbeat_interval=10, server=False)
    a.start()
    b.start()
    lone.start()
    assert a.server is b.server and a.server.instance_id == sid
    assert a.server.state == "up"
    assert lone.server is None and lone.instance_info["serverId"] == "__none__"
    assert a.instance_info["serverId"] == b.instance_info["serverId"] == sid

    def listed():
        topo = client.command({"cmd": "topology"})
        full = all("serverId" in topo.get("instances", {}).get(iid, {}).get("attrs", {})
                   for iid in ("kbDefA", "kbDefB", "kbNoServer"))
        return topo if (sid in topo.get("servers", [])
                        and topo["devices_by_server"].get(sid) == ["kbDefA", "kbDefB"]
                        and "kbNoServer" in topo["devices"] and full) else None

    topo = wait_until(listed, 60, interval=0.5, what=f"{sid} listed with its devices")
    assert topo["instances"][sid]["kind"] == "server"
    assert topo["instances"][sid]["attrs"]["host"] == a.hostname
    classes = topo["instances"][sid]["attrs"]["deviceClasses"]   # str() of the vector
    assert "KbProbeA" in classes and "KbProbeB" in classes, classes
    assert topo["instances"]["kbNoServer"]["attrs"]["serverId"] == "__none__"
    assert client.command({"cmd": "get", "id": "kbDefA", "key": "serverId"})["value"] == sid

    server = a.server
    since = len(client.events)
    a.close()
    client.wait_for(lambda m: m.get("event") == "gone" and m.get("id") == "kbDefA", 30, since)
    assert server.state == "up"        # kbDefB still names it
    b.close()
    client.wait_for(lambda m: m.get("event") == "gone" and m.get("id") == sid, 30, since)
    assert server.state == "stopped"
    gone_ids = [m["id"] for m in client.events[since:] if m.get("event") == "gone"]
    assert gone_ids.index("kbDefB") < gone_ids.index(sid)   # the devices first
    assert "kbNoServer" not in gone_ids and lone.state == "up"
