"""Broker layer without a broker: configuration, message bytes against the captured Karabo
messages (docs/wire/karabo-broker-amqp.md, section 13), topic matching, and whole instances
on the in-memory transport (life cycle, slots, request/reply, discovery, tracking, faults)."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import kbhash
from kbhash import Hash, HashType

from kbstream.broker import (BrokerConfig, BrokerConfigError, BrokerConnectionError,
                             BrokerInstance, InstanceIdInUse, InvalidInstanceId, NotStartedError,
                             RemoteError, RequestTimeout, Typed, parse_broker_urls, resolve_host,
                             split_output_id)
from kbstream.broker import codec, tracking
from kbstream.broker.errors import MessageError

from broker_stack import wait_until
from memory_broker import MemoryBroker, MemoryTransport, topic_matches

# ---- captured Karabo 3.1.2 messages (docs/wire/karabo-broker-amqp.md, section 13) --------

PING_13_1 = bytes.fromhex(
    "03000000077265706c79546f1c000000000000002400000033376130333666322d363364392d343831312d"
    "616435332d373831656165353336353663107369676e616c496e7374616e636549641c00000000000000"
    "0800000070726f62654465760b4d5154696d657374616d7010000000000000007427bffea10100000100"
    "00000261310c00000000000000c8237b32")
INSTANCE_NEW_13_2 = bytes.fromhex(
    "02000000107369676e616c496e7374616e636549641c000000000000000800000070726f626544657"
    "60b4d5154696d657374616d7010000000000000005d2bbffea1010000020000000261311c0000000000"
    "00000800000070726f62654465760261321e000000000000000800000004747970651c0000000000000"
    "00600000064657669636507636c61737349641c000000000000000c00000050726f706572747954657"
    "3740873657276657249641c000000000000000b00000070726f626553657276657204686f73741c0000"
    "000000000002000000766d067374617475731c00000000000000020000006f6b0c6361706162696c697"
    "46965730e000000000000000000000011686561727462656174496e74657276616c0c0000000000000"
    "00a0000000d6b617261626f56657273696f6e1c0000000000000005000000332e312e32")
HEARTBEAT_13_3 = bytes.fromhex(
    "02000000107369676e616c496e7374616e636549641c000000000000000800000070726f626544657"
    "60b4d5154696d657374616d7010000000000000006e52bffea1010000020000000261311c0000000000"
    "00000800000070726f62654465760261321e000000000000000200000004747970651c0000000000000"
    "00600000064657669636511686561727462656174496e74657276616c0c000000000000000a000000")
INFO_REQUEST_13_4 = bytes.fromhex(
    "03000000077265706c79546f1c000000000000002400000063633864303231632d383732362d343439"
    "332d396235392d626237633436633165366161107369676e616c496e7374616e636549641c00000000"
    "00000007000000707950726f62650b4d5154696d657374616d701000000000000000e0a5b7fea10100"
    "00010000000261311e0000000000000003000000096368616e6e656c49641c0000000000000006000000"
    "6f75747075740970726f6365737349640c00000000000000e60a000008686f73746e616d651c000000"
    "0000000002000000766d")
INFO_REPLY_13_4 = bytes.fromhex(
    "03000000107369676e616c496e7374616e636549641c000000000000000800000070726f62654465760"
    "97265706c7946726f6d1c000000000000002400000063633864303231632d383732362d343439332d39"
    "6235392d6262376334366331653661610b4d5154696d657374616d701000000000000000e1a5b7fea10"
    "10000010000000261311e0000000000000002000000077375636365737300000000000000000104696e"
    "666f1e00000000000000040000000e636f6e6e656374696f6e547970651c00000000000000030000007"
    "4637008686f73746e616d651c0000000000000002000000766d04706f72740e00000000000000"
    "1fd100000e6d656d6f72794c6f636174696f6e1c000000000000000600000072656d6f7465")
UUID = "cc8d021c-8726-4493-9b59-bb7c46c1e6aa"


def hexdiff(a, b):
    return f"\nours    {a.hex()}\ncaptured {b.hex()}"


def test_captured_sizes():
    assert (len(PING_13_1), len(INSTANCE_NEW_13_2), len(HEARTBEAT_13_3),
            len(INFO_REQUEST_13_4), len(INFO_REPLY_13_4)) == (144, 324, 164, 216, 283)


def test_split_archives_of_captured_heartbeat():
    header, body = codec.split_archives(HEARTBEAT_13_3)
    assert list(header) == ["signalInstanceId", "MQTimestamp"]
    assert header.get_type("MQTimestamp") == HashType.INT64
    assert header["MQTimestamp"] == 1795275313774
    assert body["a1"] == "probeDev"
    assert body["a2.type"] == "device"
    assert body["a2"].get_type("heartbeatInterval") == HashType.INT32


def test_ping_bytes_equal_captured():
    ours = codec.encode_message(
        codec.make_header("probeDev", reply_to="37a036f2-63d9-4811-ad53-781eae53656c",
                          timestamp_ms=1795275302772),
        codec.body_from_args([Typed(846930888, HashType.INT32)]))
    assert ours == PING_13_1, hexdiff(ours, PING_13_1)


def test_heartbeat_bytes_equal_captured():
    inst = BrokerInstance("probeDev", heartbeat_interval=10, transport=MemoryTransport(
        MemoryBroker()))
    ours = codec.encode_message(codec.make_header("probeDev", timestamp_ms=1795275313774),
                                codec.body_from_args(inst.heartbeat_args()))
    assert ours == HEARTBEAT_13_3, hexdiff(ours, HEARTBEAT_13_3)


def test_request_bytes_equal_captured():
    arg = Hash()
    arg.set("channelId", "output")
    arg.set("processId", 2790, type=HashType.INT32)
    arg.set("hostname", "vm")
    ours = codec.encode_message(
        codec.make_header("pyProbe", reply_to=UUID, timestamp_ms=1795274810848),
        codec.body_from_args([arg]))
    assert ours == INFO_REQUEST_13_4, hexdiff(ours, INFO_REQUEST_13_4)


def test_output_info_reply_bytes_equal_captured():
    inst = BrokerInstance("probeDev", transport=MemoryTransport(MemoryBroker()))
    info = Hash("connectionType", "tcp", "hostname", "vm")
    info.set("port", 53535, type=HashType.UINT32)
    inst.add_output_channel("output", info)
    _, request = codec.split_archives(INFO_REQUEST_13_4)
    reply = inst._channels.slot_output_information(request["a1"])
    ours = codec.encode_message(
        codec.make_header("probeDev", reply_from=UUID, timestamp_ms=1795274810849),
        codec.body_from_args([reply]))
    assert ours == INFO_REPLY_13_4, hexdiff(ours, INFO_REPLY_13_4)


def test_instance_new_of_cpp_device_decodes():
    header, body = codec.decode_message(INSTANCE_NEW_13_2)
    info = body["a2"]
    assert header["signalInstanceId"] == body["a1"] == "probeDev"
    assert info.get_type("capabilities") == HashType.UINT32
    assert info.get_type("heartbeatInterval") == HashType.INT32
    assert list(info) == ["type", "classId", "serverId", "host", "status", "capabilities",
                          "heartbeatInterval", "karaboVersion"]


def test_our_instance_info_types():
    inst = BrokerInstance("kbPeer", heartbeat_interval=10, transport=MemoryTransport(
        MemoryBroker()), info_extra={"classId": "KbStreamProbe"})
    info = inst.instance_info
    assert info["type"] == "device" and info["classId"] == "KbStreamProbe"
    assert info.get_type("heartbeatInterval") == HashType.INT32
    assert info.get_type("capabilities") == HashType.UINT32
    # must round-trip through the codec as Karabo reads it
    assert kbhash.decode(kbhash.encode_bytes(info)).get_type("heartbeatInterval") == HashType.INT32


@pytest.mark.parametrize("data, match", [
    (b"", "bad header"),
    (b"\x01\x00\x00\x00", "bad header"),
    (bytes.fromhex("00000000"), "no body"),
    (HEARTBEAT_13_3[:-1], "bad body"),
    (HEARTBEAT_13_3 + b"\x00", "bad body"),
])
def test_malformed_payloads_raise_message_error(data, match):
    with pytest.raises(MessageError, match=match):
        codec.split_archives(data)


def test_header_without_sender_is_rejected():
    data = codec.encode_message(Hash("MQTimestamp", 1), Hash())
    with pytest.raises(MessageError, match="signalInstanceId"):
        codec.decode_message(data)


# ---- configuration ------------------------------------------------------------------------

def test_parse_broker_urls():
    a, b = parse_broker_urls("amqp://u:p%40w@host1:5673/vh, amqp://h2")
    assert (a.host, a.port, a.user, a.password, a.vhost) == ("host1", 5673, "u", "p@w", "vh")
    assert (b.host, b.port, b.user, b.vhost) == ("h2", 5672, "guest", "/")
    assert "p@w" not in a.safe and "p@w" not in repr(a)


@pytest.mark.parametrize("text", ["", "tcp://h:1", "amqp://", "amqp://h:notaport"])
def test_bad_broker_urls(text):
    with pytest.raises(BrokerConfigError):
        parse_broker_urls(text)


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("KARABO_BROKER", "amqp://a:b@envhost:1234")
    monkeypatch.setenv("KARABO_BROKER_TOPIC", "SPB")
    c = BrokerConfig.resolve()
    assert c.urls[0].host == "envhost" and c.topic == "SPB"
    assert c.exchanges == {"signals": "SPB.Signals", "slots": "SPB.Slots",
                           "global_slots": "SPB.Global_Slots"}
    c = BrokerConfig.resolve("amqp://x", "T2")
    assert c.urls[0].host == "x" and c.topic == "T2"


def test_config_defaults(monkeypatch):
    for var in ("KARABO_BROKER", "KARABO_BROKER_TOPIC", "LOGNAME", "USER", "LNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("USERNAME", "someone")
    c = BrokerConfig.resolve()
    assert c.urls[0].safe == "amqp://guest@localhost:5672" and c.topic == "someone"
    # logins with dots are common topics and Karabo accepts them
    assert BrokerConfig.resolve(topic="john.doe").topic == "john.doe"
    for bad in ("", "a b", "x" * 201, "tab\there"):
        with pytest.raises(BrokerConfigError):
            BrokerConfig.resolve(topic=bad)
    monkeypatch.delenv("USERNAME")
    assert BrokerConfig.resolve().topic == "karabo"  # Karabo's default, not the login database


@pytest.mark.parametrize("pattern, key, ok", [
    ("kbPeer.#", "kbPeer.slotPing", True), ("kbPeer.#", "kbPeer.node.slot", True),
    ("kbPeer.#", "kbPeerX.slotPing", False), ("*.slotInstanceNew", "a.slotInstanceNew", True),
    ("*.slotInstanceNew", "a.b.slotInstanceNew", False), ("#", "x", True),
    (":none:", "x.y", False), ("a.*.c", "a.b.c", True), ("a.#.c", "a.c", True),
])
def test_topic_matching(pattern, key, ok):
    assert topic_matches(pattern, key) is ok


def test_instance_ids_and_output_ids():
    for bad in ("a.b", "a:b", "a b", "", "ü"):
        with pytest.raises(InvalidInstanceId):
            BrokerInstance(bad, transport=MemoryTransport(MemoryBroker()))
    assert split_output_id("SPB_IRDA_JF4M/DET/JNGFR01:daqOutput") == (
        "SPB_IRDA_JF4M/DET/JNGFR01", "daqOutput")
    assert split_output_id("dev@out") == ("dev", "out")
    with pytest.raises(ValueError):
        split_output_id("nochannel")


def test_resolve_host():
    assert resolve_host("10.1.2.3") == "10.1.2.3"
    assert resolve_host("localhost") in ("127.0.0.1", "::1")
    assert resolve_host("no-such-host.invalid") is None
    assert resolve_host("myself-unknown-name", own_hostname="myself-unknown-name") == "127.0.0.1"


def test_import_kbstream_does_not_import_pika():
    code = ("import sys, kbstream, kbstream.broker; "
            "from kbstream.broker import BrokerInstance; "
            "from memory_broker import MemoryBroker, MemoryTransport; "
            "i = BrokerInstance('x', transport=MemoryTransport(MemoryBroker())); "
            "assert 'pika' not in sys.modules, 'pika imported'")
    path = os.pathsep.join([str(Path(__file__).resolve().parent)] + sys.path)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   env=dict(os.environ, PYTHONPATH=path))


# ---- instances on the in-memory broker ----------------------------------------------------

@pytest.fixture
def mem():
    broker = MemoryBroker()
    made = []
    transports = []

    def make(iid, **kw):
        kw.setdefault("self_check", False)
        transports.append(MemoryTransport(broker))
        inst = BrokerInstance(iid, transport=transports[-1], topic="t", **kw)
        made.append(inst)
        return inst

    make.broker = broker
    yield make
    for inst in made:
        inst.stop()
    for t in transports:  # passed in: the instances leave them open
        t.close()


def routing_keys(broker):
    return [(ex, key) for ex, key, _ in broker.published]


def test_life_cycle_messages(mem):
    a = mem("kbA", self_check=True, heartbeat_interval=1)
    a.start()
    wait_until(lambda: ("t.Global_Slots", "kbA.slotHeartbeat") in routing_keys(mem.broker), 5)
    keys = routing_keys(mem.broker)
    assert keys[0] == ("t.Slots", "kbA.slotPing")
    assert keys[1] == ("t.Global_Slots", "kbA.slotInstanceNew")
    a.stop()
    assert routing_keys(mem.broker)[-1] == ("t.Global_Slots", "kbA.slotInstanceGone")
    assert a.state == "stopped"
    with pytest.raises(NotStartedError):
        a.call("kbB", "slotX")


def test_self_check_refuses_duplicate_id(mem):
    mem("kbDup").start()
    with pytest.raises(InstanceIdInUse, match="another instance with id 'kbDup'") as ei:
        mem("kbDup", self_check=True).start()
    assert ei.value.host


def test_request_reply_and_errors(mem):
    a, b = mem("kbA"), mem("kbB")
    a.register_slot("add", lambda x, y: x + y)
    a.register_slot("two", lambda: ("x", Typed(7, HashType.UINT32)))
    a.register_slot("nothing", lambda: None)
    a.register_slot("boom", lambda: 1 / 0)
    a.start()
    b.start()
    assert b.request("kbA", "add", 2, 3, timeout=2) == (5,)
    assert b.request("kbA", "two", timeout=2) == ("x", 7)
    assert b.request("kbA", "nothing", timeout=2) == ()
    with pytest.raises(RemoteError, match="'kbA' has no slot 'nope'"):
        b.request("kbA", "nope", timeout=2)
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        b.request("kbA", "boom", timeout=2)
    with pytest.raises(RequestTimeout, match="no reply from kbGhost.slotPing within 0.2 s"):
        b.request("kbGhost", "slotPing", 1, timeout=0.2)
    assert b.request("kbA", "slotHasSlot", "add", timeout=2) == (True,)
    assert "add" in b.request("kbA", "slotGetAvailableFunctions", "slots", timeout=2)[0]


def test_slot_can_make_requests_itself(mem):
    a, b, c = mem("kbA"), mem("kbB"), mem("kbC")
    c.register_slot("value", lambda: 42)
    b.register_slot("relay", lambda: b.request("kbC", "value", timeout=2)[0] + 1)
    for i in (a, b, c):
        i.start()
    assert a.request("kbB", "relay", timeout=5) == (43,)


def test_broadcasts_are_never_answered_and_call_is_fire_and_forget(mem):
    a, b = mem("kbA"), mem("kbB")
    got = []
    a.register_slot("note", lambda x: got.append((x, a.current_call.sender)) or "ignored")
    a.start()
    b.start()
    b.call("kbA", "note", "one-to-one")
    wait_until(lambda: got, 2)
    assert got == [("one-to-one", "kbB")]
    n = len(mem.broker.published)
    b.broadcast("slotInstanceUpdated", "kbB", b.instance_info)
    time.sleep(0.2)
    assert all(not key.startswith("kbB.") or "Updated" in key
               for _, key, _ in mem.broker.published[n:])


def test_discovery_and_topology(mem):
    a = mem("kbA", info_extra={"classId": "Proc"})
    a.start()
    new = []
    t = mem("kbTracker", track_heartbeats=True, instance_type="client")
    t.on_instance_new(lambda iid, info: new.append((iid, info.get("classId"))))
    t.start()  # broadcasts slotDiscover, kbA answers with slotDiscoverAnswer
    wait_until(lambda: "kbA" in t.instances(), 2)
    assert ("kbA", "Proc") in new
    assert t.instances()["kbA"].type == "device"
    b = mem("kbB")
    b.start()  # announced by slotInstanceNew
    wait_until(lambda: "kbB" in t.instances(), 2)
    gone = []
    t.on_instance_gone(lambda iid, info: gone.append(iid))
    b.stop()
    wait_until(lambda: gone == ["kbB"], 2)
    assert "kbB" not in t.instances()


def test_tracking_drops_silent_instances_and_keeps_beating_ones(mem, monkeypatch):
    monkeypatch.setattr(tracking, "TRACK_TICK", 0.1)
    beating = mem("kbBeat", heartbeat_interval=1)
    silent = mem("kbSilent", heartbeat_interval=1, send_heartbeats=False)
    t = mem("kbTracker", track_heartbeats=True, instance_type="client")
    for i in (beating, silent, t):
        i.start()
    gone = []
    t.on_instance_gone(lambda iid, info: gone.append(iid))
    wait_until(lambda: "kbSilent" in gone, 5, what="silent instance dropped")
    wait_until(lambda: t.instances().get("kbBeat") and t.instances()["kbBeat"].heartbeats >= 2,
               5, what="two heartbeats")
    assert "kbBeat" in t.instances() and "kbBeat" not in gone


def test_heartbeat_from_unknown_instance_triggers_discover(mem):
    t = mem("kbTracker", track_heartbeats=True)
    t.start()
    a = mem("kbA")
    a.start()
    t._tracker.forget()
    mem.broker.publish("t.Global_Slots", "kbA.slotHeartbeat", codec.encode_message(
        codec.make_header("kbA"), codec.body_from_args(a.heartbeat_args())))
    wait_until(lambda: t.instances().get("kbA") and "classId" in t.instances()["kbA"].info, 2)


class FakeInput:
    def __init__(self, outputs):
        self.connectedOutputChannels = outputs
        self.hints = []

    def reconnect_now(self, output_id):
        self.hints.append(output_id)


def test_resolver_and_reconnect_hint(mem):
    consumer = mem("kbIn")
    inp = FakeInput(["kbOut:output", "other:x"])
    consumer.add_input_channel(inp)
    consumer.start()
    assert consumer.resolver("kbOut:output") is None  # offline: 3 s timeout -> None
    out = mem("kbOut")
    out.add_output_channel("output", lambda: Hash("connectionType", "tcp",
                                                   "hostname", "127.0.0.1", "port", 4242))
    out.start()
    wait_until(lambda: inp.hints == ["kbOut:output"], 2, what="reconnect hint")
    info = consumer.resolver("kbOut:output")
    assert dict(info.items()) == {"connectionType": "tcp", "hostname": "127.0.0.1",
                                  "port": 4242, "memoryLocation": "remote",
                                  "outputChannelString": "kbOut:output"}
    assert info.get_type("port") == HashType.UINT32
    assert consumer.resolver("kbOut:nope") is None
    raw = consumer.resolver.request_info("kbOut:nope")
    assert raw["success"] is False and len(raw["info"]) == 0
    assert consumer.request("kbOut", "slotGetOutputChannelNames", timeout=2) == (["output"],)


def test_output_channel_object_with_info_attribute(mem):
    class Out:
        info = Hash("connectionType", "tcp", "hostname", "0.0.0.0", "port", 5000)

    out = mem("kbOut")
    out.add_output_channel("output", Out())
    out.start()
    c = mem("kbC")
    c.start()
    a1 = c.resolver.request_info("kbOut:output")
    assert a1["info.hostname"] == out.hostname  # an unspecific bind address becomes the host name
    assert a1["info"].get_type("port") == HashType.UINT32


def test_malformed_messages_are_logged_and_ignored(mem, caplog):
    a = mem("kbA")
    a.start()
    b = mem("kbB")
    b.start()
    garbage = [b"", b"\xff" * 7, bytes.fromhex("00000000"),
               codec.encode_message(Hash("MQTimestamp", 1), Hash()),
               codec.encode_message(Hash("signalInstanceId", 5), Hash()),
               codec.encode_message(codec.make_header("kbB", reply_to="r1"),
                                    Hash("a1", "not a hash"))]
    with caplog.at_level("WARNING", logger="kbstream.broker"):
        for g in garbage[:-1]:
            mem.broker.publish("t.Slots", "kbA.slotPing", g)
            mem.broker.publish("t.Global_Slots", "x.slotInstanceNew", g)
        # a well-formed request with a wrong argument type gets a reply, not a crash
        assert b.request("kbA", "slotGetOutputChannelInformation", "bad", timeout=2)[0][
            "success"] is False
        mem.broker.publish("t.Global_Slots", "x.slotInstanceNew", codec.encode_message(
            codec.make_header("x"), Hash("a1", 5, "a2", "no hash")))
        assert b.request("kbA", "slotPing", 1, timeout=2)[0]["type"] == "device"
    assert sum("malformed" in r.getMessage() for r in caplog.records) >= 10


def test_broker_restart_reannounces_and_rebinds(mem):
    a = mem("kbA")
    t = mem("kbT", track_heartbeats=True)
    a.start()
    t.start()
    news = []
    t.on_instance_new(lambda iid, info: news.append(iid))
    mem.broker.restart()
    wait_until(lambda: a.announcements == 2, 2)
    wait_until(lambda: "kbA" in news, 2)
    assert t.request("kbA", "slotPing", 1, timeout=2)


def test_unreachable_broker_gives_clear_error():
    pytest.importorskip("pika")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inst = BrokerInstance("kbA", broker=f"amqp://guest:guest@127.0.0.1:{port}", topic="t")
    with pytest.raises(BrokerConnectionError,
                       match=rf"^cannot connect to the Karabo broker \(KARABO_BROKER\): "
                             rf"amqp://guest@127.0.0.1:{port}: ConnectionRefusedError") as ei:
        inst.start()
    assert ei.value.urls == [f"amqp://guest@127.0.0.1:{port}"]
    assert inst.state == "stopped"
    # nothing of the instance is left (the process-wide callback pool may exist)
    assert not [t for t in threading.enumerate()
                if t.name.startswith("kbstream-") and not t.name.startswith("kbstream-callbacks")]


def test_pending_resolution_is_renewed_when_the_output_announces(mem):
    consumer = mem("kbIn")
    consumer.start()
    consumer.resolver.timeout = 60.0  # without renewal the first request would wait 60 s
    result = []
    t = threading.Thread(target=lambda: result.append(consumer.resolver("kbLate:output")))
    t.start()
    wait_until(lambda: consumer.resolver._inflight, 5, what="request in flight")
    out = mem("kbLate")
    out.add_output_channel("output", Hash("connectionType", "tcp", "hostname", "127.0.0.1",
                                          "port", 4000))
    out.start()
    t.join(20)
    assert not t.is_alive() and result[0]["port"] == 4000
    # the renewed request leaves nothing pending behind it
    wait_until(lambda: not consumer._requests.pending, 5, what="no pending requests")


# ---- regressions (review findings) ----------------------------------------------------------


def test_invalid_reply_addresses_are_ignored_and_the_instance_keeps_answering(mem, caplog):
    a, b = mem("kbA"), mem("kbB")
    a.start()
    b.start()
    n_before = len(mem.broker.published)
    with caplog.at_level("WARNING", logger="kbstream.broker"):
        for reply_to in ("r" * 300, "has.dot"):
            mem.broker.publish("t.Slots", "kbA.slotPing", codec.encode_message(
                codec.make_header("evil", reply_to=reply_to), Hash("a1", 1)))
        mem.broker.publish("t.Slots", "kbA.slotPing", codec.encode_message(
            codec.make_header("e" * 300, reply_to="r1"), Hash("a1", 1)))
    time.sleep(0.2)
    replies = [k for _, k, _ in mem.broker.published[n_before:] if k.startswith(("evil", "eee"))]
    assert replies == []
    assert sum("invalid sender or reply address" in r.getMessage() for r in caplog.records) == 3
    assert b.request("kbA", "slotPing", 1, timeout=2)[0]["type"] == "device"


def test_routing_keys_longer_than_amqp_allows_are_refused():
    from kbstream.broker.errors import BrokerError
    from kbstream.broker.transport import _check_key

    _check_key("k" * 255, "routing key")
    with pytest.raises(BrokerError, match="at most 255 bytes"):
        _check_key("k" * 256, "routing key")


def test_pings_are_answered_while_starting_so_duplicates_cannot_both_start(mem):
    a = mem("kbDup", self_check=True)
    b = mem("kbDup", self_check=True)
    errors = []

    def start(inst):
        try:
            inst.start()
        except InstanceIdInUse as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(errors) >= 1  # at most one of them comes up
    assert [x.state for x in (a, b)].count("up") <= 1


def test_reply_callbacks_run_off_the_broker_thread(mem):
    a, b = mem("kbA"), mem("kbB")
    a.start()
    b.start()
    seen = []
    done = threading.Event()

    def callback(fut):
        seen.append(threading.current_thread().name)
        # a blocking request from a callback works: replies are matched elsewhere
        seen.append(b.request("kbA", "slotPing", 1, timeout=2)[0]["type"])
        done.set()

    b.request_async("kbA", "slotPing", 1, timeout=2).add_done_callback(callback)
    assert done.wait(10)
    assert seen[0].startswith("kbstream-callbacks") and seen[1] == "device"


def test_device_view_with_outputs_named_like_properties_or_dotted(mem):
    """Outputs whose names collide with a built-in property, or contain dots, still give a
    configuration and a schema that agree (every enclosing node described)."""
    dev = mem("kbNames")
    dev.add_output_channel("state", Hash("connectionType", "tcp", "hostname", "h1", "port", 1))
    dev.add_output_channel("a.b", Hash("connectionType", "tcp", "hostname", "h2", "port", 2))
    dev.add_output_channel("output", Hash("connectionType", "tcp", "hostname", "h3", "port", 3))
    dev.start()
    ask = mem("kbAsker").start()
    conf, did = ask.request("kbNames", "slotGetConfiguration", timeout=5)
    schema, did2 = ask.request("kbNames", "slotGetSchema", False, timeout=5)
    assert did == did2 == "kbNames"
    assert conf["state"] == "ON"
    assert conf["outputChannels.state.port"] == 1
    assert conf["a.b.hostname"] == "h2" and conf["output.port"] == 3
    params = schema.parameters
    kinds = {p: params.get_attribute(p, "nodeType")
             for p in params.paths(intermediate=True)}
    # every value is a described leaf; an output's "schema" is an empty node in both
    # (Karabo's layout: the data description is in the schema only)
    empty_nodes = {p for p in conf.paths() if isinstance(conf[p], Hash)}
    assert empty_nodes == {"output.schema", "a.b.schema", "outputChannels.state.schema"}
    assert {p for p, k in kinds.items() if k == 0} == set(conf.paths()) - empty_nodes
    assert all(kinds[p] == 1 for p in empty_nodes)
    for node in ("a", "a.b", "outputChannels", "outputChannels.state", "output"):
        assert kinds[node] == 1, node
    assert set(kinds.values()) == {0, 1}   # every node of the schema is described
