"""kbstream's pipeline channels in the device schema, compared with karabind's.

karabind (the side interpreter) builds a C++-style device schema with ``OUTPUT_CHANNEL``
(data schema: NODE with daqDataType, INT32, STRING, UINT64, VECTOR_INT64 with maxSize,
NDARRAY, IMAGEDATA) and ``INPUT_CHANNEL`` and serializes it (tests/broker/karabo_schema_dump.py);
kbstream publishes the same declaration; the two are compared node by node, attribute by
attribute, key order included. Deliberate differences are asserted one by one (and listed in
docs/wire/karabo-broker-amqp.md, "What kbstream publishes"):

* ``description`` texts are kbstream's own words (both sides have one where Karabo has one);
* an input's ``connectedOutputChannels`` is reconfigurable (``accessMode`` 4, Karabo: 1 INIT),
  so that ``slotReconfigure`` can rewire it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import kbhash
from kbhash import Hash, HashType, ImageData, Schema
from kbstream.broker import BrokerInstance
from kbstream.broker.errors import ReconfigureError
from kbstream.pipeline import DataSchema
from kbstream.pipeline.schema import Image, Vector

from memory_broker import MemoryBroker, MemoryTransport

HERE = Path(__file__).resolve().parent

#: The data schema karabo_schema_dump.py declares with karabind's elements.
DATA = DataSchema({
    "node.int32": HashType.INT32,
    "node.string": HashType.STRING,
    "node.trainId": HashType.UINT64,
    "node.vecInt64": Vector(HashType.VECTOR_INT64, 100),
    "node.ndarray": ("float32", (100, 200)),
    "node.image": Image("uint16", (400, 500)),
}, daq="train")

#: Attributes whose values differ on purpose: (path suffix, attribute) -> (kbstream, Karabo)
DELIBERATE = {("input.connectedOutputChannels", "accessMode"): (4, 1)}


@pytest.fixture(scope="module")
def karabind_dump(karabo_python):
    out = subprocess.run([karabo_python, str(HERE / "karabo_schema_dump.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    device_hex, data_hex = out.stdout.split()
    device = kbhash.decode(bytes.fromhex(device_hex))["schema"]
    data = kbhash.decode(bytes.fromhex(data_hex))["schema"]
    assert isinstance(device, Schema) and isinstance(data, Schema)
    return device, data


class _Output:
    """An output as the broker layer sees a kbstream OutputChannel."""

    info = Hash("connectionType", "tcp", "hostname", "127.0.0.1", "port", 4321)
    no_input_shared = "drop"
    validate_schema = "always"

    def input_ids(self, shared=None):
        return []


class _Input:
    channel_id = "kbSchema:input"
    connected_output_channels = []
    data_distribution = "copy"
    on_slowness = "drop"
    max_queue_length = 2
    min_data = 1
    respond_to_eos = True
    delay_on_input = 0.0

    def __init__(self):
        self.calls = []

    def connection_status(self):
        return {}

    def remove_output(self, oid):
        self.calls.append(("remove", oid))

    def add_output(self, oid):
        self.calls.append(("add", oid))


@pytest.fixture
def published():
    transport = MemoryTransport(MemoryBroker())
    inst = BrokerInstance("kbSchema", transport=transport, topic="t",
                          info_extra={"classId": "KbStreamProbe"})
    inst.add_output_channel("output", _Output(), schema=DATA)
    inp = _Input()
    inst.add_input_channel(inp, outputs=[])
    yield inst, inp
    inst.close()
    transport.close()


def _same_value(a, b):
    if isinstance(a, Schema) or isinstance(b, Schema):
        return None  # compared as a subtree by the caller
    if isinstance(a, memoryview) or isinstance(b, memoryview):
        return bytes(a) == bytes(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (np.asarray(a).dtype == np.asarray(b).dtype
                and np.array_equal(np.asarray(a), np.asarray(b)))
    return a == b and type(a) is type(b)


def compare(ours: Hash, theirs: Hash, prefix="", seen=None):
    """Differences between two schema parameter Hashes, as readable lines; every
    deliberate difference found is recorded in ``seen``."""
    seen = set() if seen is None else seen
    diffs = []
    if list(ours.keys()) != list(theirs.keys()):
        diffs.append(f"{prefix or '<root>'}: keys {list(ours.keys())} != {list(theirs.keys())}")
    for key in theirs.keys():
        if key not in ours:
            continue
        path = prefix + key
        a, b = ours.attrs(key), theirs.attrs(key)
        if set(a) != set(b):
            diffs.append(f"{path}: attributes {sorted(set(a) - set(b))} only in kbstream, "
                         f"{sorted(set(b) - set(a))} only in karabind")
        for name in b:
            if name not in a:
                continue
            if a.get_type(name) != b.get_type(name):
                diffs.append(f"{path}@{name}: type {a.get_type(name).name} != "
                             f"{b.get_type(name).name}")
                continue
            va, vb = a[name], b[name]
            if name == "description":
                if not (isinstance(va, str) and va and isinstance(vb, str) and vb):
                    diffs.append(f"{path}@description missing")
                continue
            if isinstance(vb, Schema):
                diffs += compare(va.parameters, vb.parameters, f"{path}@{name}:", seen)
                continue
            if (path, name) in DELIBERATE and (va, vb) == DELIBERATE[(path, name)]:
                seen.add((path, name))
                continue
            if not _same_value(va, vb):
                diffs.append(f"{path}@{name}: {va!r} != {vb!r}")
        va, vb = ours[key], theirs[key]
        if isinstance(vb, Hash) and isinstance(va, Hash):
            diffs += compare(va, vb, path + ".", seen)
    return diffs


def test_channels_match_karabind_node_by_node_attribute_by_attribute(published,
                                                                     karabind_dump):
    inst, _ = published
    device, _ = karabind_dump
    ours = inst.schema().parameters
    theirs = device.parameters
    seen = set()
    for channel in ("output", "input"):
        sub_ours, sub_theirs = Hash(), Hash()
        sub_ours.set(channel, ours[channel])
        sub_theirs.set(channel, theirs[channel])
        for name in ours.attrs(channel):
            sub_ours.set_attribute(channel, name, ours.get_attribute(channel, name),
                                   type=ours.get_attribute_type(channel, name))
        for name in theirs.attrs(channel):
            sub_theirs.set_attribute(channel, name, theirs.get_attribute(channel, name),
                                     type=theirs.get_attribute_type(channel, name))
        assert compare(sub_ours, sub_theirs, seen=seen) == []
    # the deliberate differences really are there, and are the only ones
    assert seen == set(DELIBERATE)
    # the data description in detail (what the middle layer and the DAQ read)
    assert ours.get_attribute("output.schema", "displayType") == "OutputSchema"
    assert ours.get_attribute("output.schema.node", "daqDataType") == 1
    assert ours.get_attribute("output.schema.node.ndarray.data", "unitSymbol") == "N_A"
    assert ours.get_attribute("output.schema.node.ndarray.data", "metricPrefixSymbol") == ""
    assert list(ours.get_attribute("output.schema.node.image.dims", "defaultValue")) == [400, 500]


def test_published_schema_encodes_and_karabind_reads_it_back(published, karabind_dump,
                                                             karabo_python):
    """kbstream's encoded schema loads in karabind (what DeviceClient does with the reply)
    and gives the same paths, leaf types and node classes as karabind's own."""
    inst, _ = published
    blob = kbhash.encode_bytes(Hash("schema", inst.schema())).hex()
    script = (
        "import sys, karabind as kb\n"
        "h = kb.BinarySerializerHash.create('Bin').load(bytes.fromhex(sys.stdin.read()))\n"
        "s = h['schema']\n"
        "for p in s.getPaths():\n"
        "    if p.startswith(('output', 'input')):\n"
        "        kind = str(s.getValueType(p)) if s.isLeaf(p) else 'node:' + "
        "str(s.getParameterHash().getAttributes(p).get('displayType') "
        "if s.getParameterHash().hasAttribute(p, 'displayType') else '')\n"
        "        print(p, kind)\n")
    got = subprocess.run([karabo_python, "-c", script], input=blob, capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    lines = got.stdout.splitlines()
    assert "output.port Types.UINT32" in lines
    assert "output.schema.node.int32 Types.INT32" in lines
    assert "output.schema.node.vecInt64 Types.VECTOR_INT64" in lines
    assert "output.schema.node.ndarray.shape Types.VECTOR_UINT64" in lines
    assert "input.connectedOutputChannels Types.VECTOR_STRING" in lines


def test_data_schema_round_trips_through_karabos_layout(karabind_dump):
    """DataSchema.from_parameters reads karabind's data schema as the declaration it came
    from, and to_parameters writes it back identically."""
    _, data = karabind_dump
    back = DataSchema.from_parameters(data.parameters)
    assert back.spec == DATA.spec
    assert back.daq == {"node": 1}
    assert compare(DATA.to_parameters(), data.parameters) == []


def _good():
    h = Hash()
    h.set("node.int32", 1, type=HashType.INT32)
    h.set("node.string", "s", type=HashType.STRING)
    h.set("node.trainId", 5, type=HashType.UINT64)
    h.set("node.vecInt64", [1, 2], type=HashType.VECTOR_INT64)
    h["node.ndarray"] = np.zeros((100, 200), np.float32)
    h["node.image"] = ImageData(np.zeros((400, 500), np.uint16))
    return h


@pytest.mark.parametrize("change, problem", [
    (lambda h: h.pop("node.int32"), "'node.int32' is missing"),
    (lambda h: h.set("node.extra", 5), "unexpected keys ['node.extra']"),
    (lambda h: h.set("node.int32", 1, type=HashType.INT64), "is INT64, expected INT32"),
    (lambda h: h.set("node.int32", "5"), "is STRING, expected INT32"),
    (lambda h: h.set("node.vecInt64", list(range(101)), type=HashType.VECTOR_INT64),
     "101 elements, at most 100"),
    (lambda h: h.set("node.vecInt64", [1], type=HashType.VECTOR_INT32),
     "is VECTOR_INT32, expected VECTOR_INT64"),
    (lambda h: h.set("node.ndarray", np.zeros((3, 200), np.float32)), "has shape (3, 200)"),
    (lambda h: h.set("node.ndarray", np.zeros((100, 200))), "has dtype float64"),
    (lambda h: h.set("node.image", ImageData(np.zeros((6, 500), np.uint16))), "has dims"),
    (lambda h: h.set("node.image", ImageData(np.zeros((400, 500), np.uint8))),
     "pixels of dtype uint8"),
], ids=["missing", "extra", "int64", "string", "maxSize", "vector type", "shape", "dtype",
        "image dims", "image dtype"])
def test_strict_validation_refuses_what_karabos_output_refuses(change, problem):
    """The cases karabind's OutputChannel.write refuses with validateSchema (checked
    against karabind 3.1.2: each one raised a 'data/schema mismatch')."""
    assert DATA.validate(_good(), strict=True) == []
    h = _good()
    change(h)
    problems = DATA.validate(h, strict=True)
    assert any(problem in p for p in problems), problems


def test_every_configuration_value_has_a_timestamp(published):
    inst, _ = published
    conf = inst.configuration()
    values = [p for p in conf.paths() if not isinstance(conf[p], Hash)]
    assert "output.port" in values and "input.minData" in values and "deviceId" in values
    for p in values:
        ts = conf.get_timestamp(p)
        assert ts.sec > 0 and conf.get_attribute_type(p, "tid") == HashType.UINT64, p
    # nodes (and the empty <ch>.schema node) carry none, as in Karabo
    assert not conf.has_attribute("output", "sec")
    assert not conf.has_attribute("output.schema", "sec")
    assert conf.get_type("output.port") == HashType.UINT32
    assert conf["output.validateSchema"] == "always"


def test_output_information_carries_the_data_schema(published):
    inst, _ = published
    reply = inst._channels.slot_output_information(Hash("channelId", "output"))
    assert reply["success"] is True
    info = reply["info"]
    assert info.get_type("schema") == HashType.SCHEMA
    # laid out as the slotGetSchema reply: the middle layer reads
    # info["schema"].hash[<channel name>]["schema"]
    sent = info["schema"].parameters
    assert sent.get_attribute("output", "classId") == "OutputChannel"
    assert compare(sent["output"]["schema"], DATA.to_parameters()) == []
    full = inst.schema().parameters
    assert compare(sent["output"], full["output"]) == []
    # an output without a data schema answers as Karabo 3.1.2 does: no schema key
    inst.add_output_channel("raw", Hash("connectionType", "tcp", "hostname", "h", "port", 1))
    raw = inst._channels.slot_output_information(Hash("channelId", "raw"))["info"]
    assert "schema" not in raw


def test_reconfigure_rewires_an_input_and_refuses_the_rest(published):
    from kbstream.broker.device_view import MAX_CONNECTED_OUTPUTS

    inst, inp = published
    view = inst.device_view
    view._slot_reconfigure(Hash("input.connectedOutputChannels", ["a:out", "b:out"]))
    assert inp.calls == [("add", "a:out"), ("add", "b:out")]
    before = inst.configuration().get_timestamp("input.connectedOutputChannels")
    inp.calls.clear()
    view._slot_reconfigure(Hash("input.connectedOutputChannels", ["b:out", "c:out"]))
    assert inp.calls == [("remove", "a:out"), ("add", "c:out")]  # b:out untouched
    conf = inst.configuration()
    assert list(conf["input.connectedOutputChannels"]) == ["b:out", "c:out"]
    assert conf.get_timestamp("input.connectedOutputChannels").time >= before.time
    inp.calls.clear()
    for bad, match in ((Hash("input.minData", 5), "not reconfigurable"),
                       (Hash("output.port", 7), "not reconfigurable"),
                       (Hash("nope", 1), "unexpected configuration parameter"),
                       (Hash("input.connectedOutputChannels", ["no-colon"]),
                        "not '<instanceId>:<channel>'"),
                       (Hash("input.connectedOutputChannels", ["x:y"], "deviceId", "z"),
                        "not reconfigurable"),
                       # a scalar instead of a list, and a list that would open a
                       # connection (and a thread) per entry without a bound
                       (Hash("input.connectedOutputChannels", 7), "must be a list of strings"),
                       (Hash("input.connectedOutputChannels",
                             [f"d{i}:out" for i in range(MAX_CONNECTED_OUTPUTS + 1)]),
                        f"at most {MAX_CONNECTED_OUTPUTS}")):
        with pytest.raises(ReconfigureError, match=match):
            view._slot_reconfigure(bad)
    assert inp.calls == []  # a refused request changes nothing
    assert list(inst.configuration()["input.connectedOutputChannels"]) == ["b:out", "c:out"]


def test_output_validates_writes_strictly_always_or_once():
    """kbstream's OutputChannel with the declared data schema: Karabo's validateSchema
    (always: every write; once: the first write of each stream) with a typed error."""
    from kbstream.pipeline import OutputChannel, SchemaError

    bad = _good()
    bad.set("node.extra", 1)
    with OutputChannel("kbSchema:output", hostname="127.0.0.1", schema=DATA) as out:
        out.write(_good())
        with pytest.raises(SchemaError, match="unexpected keys"):
            out.write(bad)
    # the schema may also be given in Karabo's layout (a Hash)
    with OutputChannel("kbSchema:output", hostname="127.0.0.1", validateSchema="once",
                       schema=DATA.to_parameters()) as out:
        with pytest.raises(SchemaError, match="is missing"):
            out.write(Hash("node.int32", 1))
        out.write(_good())      # the first valid write of the stream
        out.write(bad)          # not checked again ...
        out.signal_end_of_stream()
        with pytest.raises(SchemaError):
            out.write(bad)      # ... until the next stream


def test_server_instance_announces_like_a_karabo_server_and_lists_its_devices():
    from kbstream.broker.errors import BrokerConfigError
    from kbstream.broker.server import ServerInstance

    broker = MemoryBroker()
    transports = [MemoryTransport(broker) for _ in range(3)]
    srv = ServerInstance("kbSrv", transport=transports[0], topic="t", self_check=False)
    watcher = BrokerInstance("kbWatch", transport=transports[1], topic="t", self_check=False,
                             instance_type="client")
    updated = []
    watcher.register_slot("slotInstanceUpdated", lambda iid, info: updated.append(
        (iid, list(info["deviceClasses"]))))
    dev = BrokerInstance("kbDevOfSrv", transport=transports[2], topic="t", self_check=False,
                         server=srv, info_extra={"classId": "KbStreamProbe"})
    try:
        srv.start()
        watcher.start()
        info = srv.instance_info
        assert info["type"] == "server" and info["serverId"] == "kbSrv"
        assert info["lang"] == "python" and info["deviceClasses"] == ["KbStreamProbe"]
        for key, t in (("serverFlags", HashType.INT32), ("heartbeatInterval", HashType.INT32),
                       ("deviceClasses", HashType.VECTOR_STRING), ("user", HashType.STRING),
                       ("version", HashType.STRING), ("log", HashType.STRING)):
            assert info.get_type(key) == t, key
        assert srv.heartbeat_args()[1]["type"] == "server"
        assert dev.instance_info["serverId"] == "kbSrv"
        assert dev.configuration()["serverId"] == "kbSrv"
        srv.add_device_class("Other")
        srv.add_device_class("Other")  # once only
        from broker_stack import wait_until

        wait_until(lambda: updated, 10, what="slotInstanceUpdated of the server")
        assert updated == [("kbSrv", ["KbStreamProbe", "Other"])]
        # a server id (not an instance) needs a real broker
        with pytest.raises(BrokerConfigError, match="ServerInstance"):
            BrokerInstance("kbNoSrv", transport=transports[2], topic="t", server="kbSrv2")
    finally:
        for inst in (dev, watcher, srv):
            inst.close()
        for t in transports:
            t.close()


def test_devices_naming_one_server_id_share_one_server_instance():
    from kbstream.broker import server as srvmod
    from kbstream.broker.config import BrokerConfig

    config = BrokerConfig.resolve("amqp://guest:guest@127.0.0.1:1", "kbShare")
    a = srvmod.use("kbShared", config)
    b = srvmod.use("kbShared", config)
    other_topic = srvmod.use("kbShared", BrokerConfig.resolve(config, "kbShare2"))
    assert a is b and other_topic is not a
    assert sorted(a.device_classes) == []
    srvmod.release(a, 1)
    assert a.state == "new"           # still used by the second device
    srvmod.release(b, 1)
    assert a.state == "stopped"       # the last user closed it
    srvmod.release(other_topic, 1)
    again = srvmod.use("kbShared", config)
    assert again is not a   # a fresh one after the last release
    srvmod.release(again, 1)
    assert again.state == "stopped" and not srvmod._shared


def test_middle_layer_builds_its_proxy_from_the_information_reply(published, karabo_python):
    """What a middle-layer InputChannel(raw=False) does with the reply: build a proxy
    class from info["schema"].hash[<channel>]["schema"] (karabo.middlelayer 3.1.2)."""
    from broker_stack import require

    probe = subprocess.run([karabo_python, "-c", "import karabo.middlelayer"],
                           capture_output=True, text=True, timeout=120)
    require(probe.returncode == 0, "karabo.middlelayer (karabo-karathon) is not installed "
            "in the Karabo side interpreter: run scripts/karabo-env.sh")
    inst, _ = published
    reply = inst._channels.slot_output_information(Hash("channelId", "output"))
    script = (
        "import sys\n"
        "from karabo.native import decodeBinary, Schema\n"
        "from karabo.middlelayer.proxy import ProxyFactory\n"
        "info = decodeBinary(bytes.fromhex(sys.stdin.read()))['info']\n"
        "s = info['schema']\n"
        "cls = ProxyFactory.createProxy(Schema(name='output', hash=s.hash['output']['schema']))\n"
        "p = cls()\n"
        "print(' '.join(sorted(k for k in dir(p.node) if not k.startswith('_'))))\n")
    got = subprocess.run([karabo_python, "-c", script],
                         input=kbhash.encode_bytes(reply).hex(), capture_output=True,
                         text=True, timeout=120)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.split() == sorted(k.split(".")[1] for k in DATA.spec)


def test_default_server_id_and_who_gets_a_server():
    import os

    from kbstream.broker import validate_instance_id
    from kbstream.broker.config import BrokerConfig
    from kbstream.broker.errors import BrokerConfigError, InvalidInstanceId
    from kbstream.broker.server import default_server_id

    sid = default_server_id()
    assert validate_instance_id(sid) == sid
    assert sid.endswith(f"_kbstream_{os.getpid()}") and "." not in sid
    config = BrokerConfig.resolve("amqp://guest:guest@127.0.0.1:1", "kbWho")
    dev = BrokerInstance("kbWhoDev", broker=config)
    twin = BrokerInstance("kbWhoTwin", broker=config)
    other = BrokerInstance("kbWhoOther", broker=config, server="kbWhoSrv")
    client = BrokerInstance("kbWhoClient", broker=config, instance_type="client")
    none = BrokerInstance("kbWhoNone", broker=config, server=False)
    try:
        assert dev.server is twin.server and dev.server.instance_id == sid
        assert dev.instance_info["serverId"] == sid and dev.configuration()["serverId"] == sid
        assert other.server is not dev.server and other.instance_info["serverId"] == "kbWhoSrv"
        assert client.server is None and "serverId" not in client.instance_info  # as DeviceClient
        assert none.server is None and none.instance_info["serverId"] == "__none__"
        with pytest.raises(BrokerConfigError, match="server must be"):
            BrokerInstance("kbWhoBad", broker=config, server=3)
        with pytest.raises(InvalidInstanceId):
            BrokerInstance("kbWhoBad", broker=config, server="bad id")
        server = dev.server
        dev.close()
        assert server.state == "new"         # the twin still names it
        twin.close()
        assert server.state == "stopped"     # closed with its last device
    finally:
        for inst in (dev, twin, other, client, none):
            inst.close()
    # with a transport of the caller's there is no default server (no second connection)
    t = MemoryTransport(MemoryBroker())
    mem = BrokerInstance("kbWhoMem", transport=t, topic="t")
    assert mem.server is None and mem.instance_info["serverId"] == "__none__"
    mem.close()
    t.close()


def test_a_shared_server_whose_start_failed_is_renewed_for_its_users():
    from kbstream.broker import server as srvmod
    from kbstream.broker.config import BrokerConfig

    config = BrokerConfig.resolve("amqp://guest:guest@127.0.0.1:1", "kbRenew")
    a = srvmod.use("kbRenewSrv", config)
    a.add_device_class("KbA")
    a.close()                         # what a failed start leaves
    b = srvmod.use("kbRenewSrv", config)
    assert b is not a and b.state == "new" and b.device_classes == ["KbA"]
    srvmod.release(a, 1)              # the first user leaves: the second still uses it
    assert b.state == "new"
    srvmod.release(b, 1)
    assert b.state == "stopped" and not srvmod._shared


def test_output_connections_table_and_byte_counters_come_from_the_output():
    from broker_stack import wait_until
    from kbstream.pipeline import InputChannel, OutputChannel

    transport = MemoryTransport(MemoryBroker())
    inst = BrokerInstance("kbTable", transport=transport, topic="t")
    out = OutputChannel("kbTable:output", hostname="127.0.0.1").start()
    inp = InputChannel("kbReader:input", onSlowness="wait", use_shm=False)
    got = []
    inp.register_data_handler(lambda data, meta: got.append(int(data["i"])))
    try:
        inst.add_output_channel("output", out)
        empty = inst.configuration()
        assert list(empty["output.connections"]) == []
        assert len(empty["output.bytesWritten"]) == 0
        inp.connect(out.info, "kbTable:output")
        inp.start()
        out.wait_for_inputs(copy=["kbReader:input"])
        for i in range(3):
            out.write({"i": i, "a": np.zeros(1000, np.uint8)})
            out.update()
        wait_until(lambda: len(got) == 3, 20, what="3 items")
        conf = inst.configuration()
        (row,) = conf["output.connections"]
        assert row["remoteId"] == "kbReader:input" and row["dataDistribution"] == "copy"
        assert row["onSlowness"] == "wait" and row["memoryLocation"] == "remote"
        assert row["remoteAddress"] == "127.0.0.1" and row["localPort"] == out.port
        assert row.get_type("remotePort") == HashType.UINT16 and row["remotePort"] > 0
        assert conf.get_type("output.bytesWritten") == HashType.VECTOR_UINT64
        assert list(conf["output.bytesWritten"]) == [out.stats()["kbReader:input"]["bytes_written"]]
        assert conf["output.bytesWritten"][0] > 3000 and conf["output.bytesRead"][0] > 0
    finally:
        inp.close()
        out.close()
        inst.close()
        transport.close()


def test_at_exit_devices_say_goodbye_before_their_servers(monkeypatch):
    import weakref

    from kbstream.broker import shutdown

    closed = []

    class Live:
        def __init__(self, iid, kind):
            self.iid, self.instance_info = iid, Hash("type", kind)

        def close(self, timeout=None):
            closed.append(self.iid)

    live = [Live("srv", "server"), Live("dev1", "device"), Live("dev2", "device")]
    monkeypatch.setattr(shutdown, "_live_instances", weakref.WeakSet(live))
    shutdown._close_all_at_exit()
    assert sorted(closed[:2]) == ["dev1", "dev2"] and closed[2] == "srv"
