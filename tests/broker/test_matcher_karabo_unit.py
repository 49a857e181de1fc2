"""The train matcher's Karabo side without RabbitMQ: slow data as of a train, property
keys, signal subscriptions, and a whole KaraboMatcher on the in-memory broker (source
found by name, slow data, statistics published with signalChanged, Karabo output, goodbye).
"""

import threading

import numpy as np
import pytest

from kbhash import Hash, HashType, Timestamp

from kbstream.broker import BrokerInstance
from kbstream.matcher import SourceSpecError
from kbstream.matcher.cli import wants_broker
from kbstream.matcher.karabo import KaraboMatcher, property_key, split_sources
from kbstream.matcher.slow import HISTORY, SlowData, is_slow_source, parse_slow_source

from broker_stack import wait_until
from memory_broker import MemoryBroker, MemoryTransport


def changed(path, value, tid, sec=1_700_000_000, frac=0):
    h = Hash()
    h.set(path, value)
    h.set_timestamp(path, Timestamp(sec, frac, tid))
    return h


# ---- slow sources ----------------------------------------------------------------------------

def test_slow_source_grammar():
    assert parse_slow_source("SA1/XTD2/XGM.pulseEnergy.photonFlux") == \
        ("SA1/XTD2/XGM", "pulseEnergy.photonFlux")
    assert is_slow_source("DEV.prop") and not is_slow_source("DEV:output")
    assert not is_slow_source("DEV:output=127.0.0.1:4040")
    assert not is_slow_source("a.b@DEV:output")
    for bad in ("DEV", "DEV.", ".prop", "DEV.a..b", "DE V.x", "DEV.p-q", 3):
        with pytest.raises(SourceSpecError):
            parse_slow_source(bad)
    with pytest.raises(SourceSpecError):
        SlowData(["DEV.a", "DEV.a"])
    assert split_sources(["A:o", "B.p", "C:o=h:1"]) == (["A:o", "C:o=h:1"], ["B.p"])


def test_slow_value_as_of_each_train():
    slow = SlowData(["DEV.a", "DEV.node", "OTHER.x"])
    # the initial configuration fills what has no value yet, never over a newer value
    assert slow.update("DEV", changed("a", 1, 100)) == 1
    assert slow.update("DEV", changed("a", 0, 50), initial=True) == 0
    assert slow.update("DEV", changed("a", 2, 105)) == 1
    node = Hash()
    node.set("node.x", 7)
    node.set("node.y", 8.5)
    node.set_timestamp("node", Timestamp(1_700_000_001, 5, 0))  # no train id: applies at once
    assert slow.update("DEV", node) == 1
    assert slow.update("UNKNOWN", changed("a", 9, 1)) == 0

    def at(tid):
        data, meta = {}, {}
        slow.attach(tid, data, meta)
        return data, meta

    data, meta = at(99)  # before the first value of a: only the node
    assert data["DEV"] == {"node.x": 7, "node.y": 8.5, "node.timestamp": pytest.approx(1_700_000_001),
                           "node.timestamp.sec": "1700000001",
                           "node.timestamp.frac": "000000000000000005", "node.timestamp.tid": 0}
    assert meta["DEV"]["timestamp.tid"] == 99 and meta["DEV"]["source"] == "DEV"
    data, _ = at(104)
    assert data["DEV"]["a"] == 1 and data["DEV"]["a.timestamp.tid"] == 100
    data, _ = at(105)
    assert data["DEV"]["a"] == 2 and data["DEV"]["a.timestamp.tid"] == 105
    assert "OTHER" not in data  # no value yet: left out, counted
    st = slow.stats()
    assert st["DEV.a"] == {"updates": 2, "missing": 1, "tid": 105, "status": "ok"}
    assert st["OTHER.x"] == {"updates": 0, "missing": 3, "tid": 0, "status": "waiting"}
    assert slow.latest("DEV.a").value == 2


def test_slow_history_is_bounded():
    slow = SlowData(["DEV.a"])
    for tid in range(1, 3 * HISTORY):
        slow.update("DEV", changed("a", tid, tid))
    data = {}
    slow.attach(2, data, {})  # too old: its value is no longer known
    assert data == {}
    slow.attach(3 * HISTORY, data, {})
    assert data["DEV"]["a"] == 3 * HISTORY - 1


def test_property_keys_are_karabo_keys_and_unique():
    taken = set()
    assert property_key("SPB_DET/JF:daqOutput", taken) == "SPB_DET_JF_daqOutput"
    assert property_key("SPB_DET/JF@daqOutput", taken) == "SPB_DET_JF_daqOutput_2"
    assert property_key("1st:x", taken) == "s_1st_x"


def test_cli_uses_the_broker_only_when_needed():
    from kbstream.matcher.cli import _parser

    p = _parser()
    assert not wants_broker(p.parse_args(["A:o=127.0.0.1:4040"]))
    assert wants_broker(p.parse_args(["A:o"]))
    assert wants_broker(p.parse_args(["A:o=127.0.0.1:4040", "B.p"]))
    assert wants_broker(p.parse_args(["A:o=127.0.0.1:4040", "--topic", "x"]))
    assert wants_broker(p.parse_args(["A:o=127.0.0.1:4040", "--karabo-output", "out"]))


def test_cli_bad_broker_url_is_exit_2(capsys):
    from kbstream.matcher.cli import main

    assert main(["A:o", "--broker", "http://nowhere", "--port", "tcp://127.0.0.1:0"]) == 2
    assert "amqp" in capsys.readouterr().err
    assert main(["A:o", "B.", "--broker", "amqp://127.0.0.1:1", "--port", "tcp://127.0.0.1:0"]) == 2


# ---- on the in-memory broker -------------------------------------------------------------------

@pytest.fixture
def mem():
    broker = MemoryBroker()
    made, transports = [], []

    def transport():
        transports.append(MemoryTransport(broker))
        return transports[-1]

    def make(iid, **kw):
        kw.setdefault("self_check", False)
        inst = BrokerInstance(iid, transport=transport(), topic="t", **kw)
        made.append(inst)
        return inst

    make.transport = transport
    yield make
    for inst in made:
        inst.stop()
    for t in transports:
        t.close()


def test_signals_of_other_instances(mem):
    a, b, c = mem("kbA").start(), mem("kbB").start(), mem("kbC").start()
    got = []
    a.connect_signal("kbB", "signalChanged", lambda *args: got.append(args))
    b.emit("signalChanged", changed("x", 1, 5), "kbB")
    c.emit("signalChanged", changed("x", 2, 6), "kbC")  # not subscribed
    wait_until(lambda: got, 5)
    (cfg, dev), = got
    assert dev == "kbB" and cfg["x"] == 1 and cfg.get_timestamp("x").tid == 5
    fn = got.append
    a.connect_signal("kbC", "signalChanged", fn)
    a.disconnect_signal("kbC", "signalChanged", fn)
    c.emit("signalChanged", changed("x", 3, 7), "kbC")
    b.emit("signalChanged", changed("x", 4, 8), "kbB")
    wait_until(lambda: len(got) == 2, 5)
    assert got[1][1] == "kbB"
    # a message on kbB's routing key sent by another instance is not kbB's signal
    from kbstream.broker import codec

    c._publish(c._ex["signals"], "kbB.signalChanged", codec.make_header("kbC"),
               codec.body_from_args((changed("x", 5, 9), "kbB")))
    b.emit("signalChanged", changed("x", 6, 10), "kbB")
    wait_until(lambda: len(got) == 3, 5)
    assert [args[0]["x"] for args in got] == [1, 4, 6]


def test_karabo_matcher_on_the_memory_broker(mem, tmp_path):
    import karabo_bridge

    from kbstream.pipeline import InputChannel, OutputChannel

    out = OutputChannel("kbSrc:output", hostname="127.0.0.1").start()
    src = mem("kbSrc")
    src.add_output_channel("output", out)
    src.start()
    slow_dev = mem("kbSlow").start()
    slow_dev.register_slot("slotGetConfiguration",
                           lambda *_: (changed("motor.position", 0.5, 5), "kbSlow"))
    watcher = mem("kbWatch").start()
    published, gone = [], []
    watcher.connect_signal("kbMatcher", "signalChanged", lambda h, iid: published.append(h))
    watcher.on_instance_gone(lambda iid, info: gone.append(iid))

    endpoint = f"ipc://{tmp_path}/bridge"
    km = KaraboMatcher(["kbSrc:output", "kbSlow.motor.position"], [(endpoint, "PUSH")],
                       instance_id="kbMatcher", karabo_output="out",
                       karabo_output_options={"hostname": "127.0.0.1"}, stats_interval=0.2,
                       broker_options={"transport": mem.transport(), "self_check": False},
                       topic="t")
    reader = mem("kbReader").start()
    items = []
    inp = InputChannel("kbReader:input", ["kbMatcher:out"], resolver=reader.resolver)

    def on_item(d, m):
        stamp = d.get_timestamp("motor.position") if m.source == "kbSlow" else None
        items.append((m.source, m.tid, d.get("motor.position"), stamp))

    inp.register_data_handler(on_item)
    reader.add_input_channel(inp)
    client = karabo_bridge.Client(endpoint, sock="PULL", timeout=20)
    try:
        km.start()
        km.wait_connected(20)
        inp.start()
        inp.wait_connected(timeout=20)
        wait_until(lambda: km.stats()["slow"]["kbSlow.motor.position"]["updates"] == 1, 10)
        slow_dev.emit("signalChanged", changed("motor.position", 1.5, 10), "kbSlow")
        wait_until(lambda: km.stats()["slow"]["kbSlow.motor.position"]["tid"] == 10, 10)
        out.wait_for_inputs(copy=["kbMatcher:input0"], timeout=20)
        for tid in (9, 10, 11):
            h = Hash()
            h["data.x"] = np.arange(4, dtype=np.int32) + tid
            out.write(h, Timestamp.now(tid))
            out.update()
        trains = [client.next() for _ in range(3)]
        wait_until(lambda: len(items) == 6, 20)
        wait_until(lambda: published and published[-1]["trains.sent"] == 3, 10)
        assert km.instance.configuration()["trains.sent"] == 3
        last = published[-1]
        assert last.get_timestamp("trains.sent").sec > 0
        assert last["sources.kbSrc_output.name"] == "kbSrc:output"
        assert last["sources.kbSrc_output.received"] == 3
        assert last["slowSources.kbSlow_motor_position.tid"] == 10
        schema = km.instance.schema()
        assert schema is not None
    finally:
        client.__exit__(None, None, None)  # karabo_bridge.Client has no close()
        inp.close()
        km.close()
        out.close()
    assert [m["kbSrc:output"]["timestamp.tid"] for _, m in trains] == [9, 10, 11]
    for (data, meta), (value, vtid) in zip(trains, [(0.5, 5), (1.5, 10), (1.5, 10)]):
        tid = meta["kbSrc:output"]["timestamp.tid"]
        assert (data["kbSrc:output"]["data.x"] == np.arange(4) + tid).all()
        assert data["kbSlow"]["motor.position"] == value
        assert data["kbSlow"]["motor.position.timestamp.tid"] == vtid
        assert meta["kbSlow"]["timestamp.tid"] == tid
    # the Karabo output: per train one item per source, with the train's id
    assert [(s, t) for s, t, _, _ in items] == [("kbSrc:output", 9), ("kbSlow", 9),
                                             ("kbSrc:output", 10), ("kbSlow", 10),
                                             ("kbSrc:output", 11), ("kbSlow", 11)]
    # slow values keep their own timestamp as attributes, the Karabo way
    assert [(v, ts.tid) for s, _, v, ts in items if s == "kbSlow"] == [(0.5, 5), (1.5, 10), (1.5, 10)]
    st = km.stats()
    assert st["karabo_output"] == {"written": 3, "dropped": 0}
    t = st["trains"]
    assert t["seen"] == t["sent"] + t["incomplete"] + t["dropped"] + t["pending"] == 3
    # close: the last statistics went out, then the instance said goodbye
    wait_until(lambda: "kbMatcher" in gone, 10)
    assert st["published"] == len(published)


def test_karabo_matcher_refuses_bad_sources(mem):
    kw = {"broker_options": {"transport": mem.transport()}, "topic": "t",
          "outputs": [("tcp://127.0.0.1:0", "PUSH")]}
    with pytest.raises(SourceSpecError):
        KaraboMatcher(["A:o", "B.p", "B.p"], **kw)  # a slow source twice
    with pytest.raises(SourceSpecError):
        KaraboMatcher(["X@A:o", "X.p"], **kw)  # the slow device would replace source X
    from kbstream.matcher import MatcherConfigError
    with pytest.raises(MatcherConfigError):
        KaraboMatcher(["A.p"], **kw)


def test_slow_values_take_the_bridge_form():
    """Whatever a property holds (a list of Hashes, an ImageData, an NDArray) is attached
    in the form the bridge serializer takes, so a slow value can never make a train
    unencodable."""
    import karabo_bridge

    from kbhash import ImageData

    slow = SlowData(["DEV.table", "DEV.image", "DEV.vec"])
    h = Hash()
    h.set("table", [Hash({"a": 1}), Hash({"a": 2})])
    h.set("image", ImageData(np.ones((3, 4), np.uint16)))
    h.set("vec", np.arange(5, dtype=np.float32))
    for key in ("table", "image", "vec"):
        h.set_timestamp(key, Timestamp(1_700_000_000, 0, 7))
    assert slow.update("DEV", h) == 3
    data, meta = {}, {}
    slow.attach(8, data, meta)
    frames = karabo_bridge.serialize(data, meta)
    back, back_meta = karabo_bridge.deserialize(frames)
    d = back["DEV"]
    assert [dict(r) for r in d["table"]] == [{"a": 1}, {"a": 2}]
    assert d["image.data"].shape == (3, 4)
    assert (d["vec"] == np.arange(5)).all()
    assert d["vec.timestamp.tid"] == 7 and back_meta["DEV"]["timestamp.tid"] == 8


def test_karabo_output_counts_every_train_pushed_even_at_close():
    """The matcher's Karabo output drops the oldest queued train when the channel is slow
    and counts it; trains still queued when it closes are counted too: written +
    dropped == pushed, nothing vanishes."""

    from kbstream.matcher.karabo import KaraboOutput

    class SlowChannel:
        channel_id = "kbMatcher:output"

        def __init__(self):
            self.entered = threading.Event()
            self.items = []

        def start(self):
            return self

        def close(self):
            pass

        def write(self, data, meta):
            self.items.append(data)

        def update(self, timeout=None):
            self.entered.set()
            # slow until the output is told to stop: then train 1 completes
            wait_until(lambda: out._stop, 30, what="close() called")

    channel = SlowChannel()
    out = KaraboOutput(channel, queue_length=2).start()
    out.push(1, {"A": {"x": 1}}, {"A": {}})
    assert channel.entered.wait(30)  # train 1 is in the slow update
    for tid in range(2, 7):           # 2..6: only two fit in the queue
        out.push(tid, {"A": {"x": tid}}, {"A": {}})
    assert out.dropped == 3           # 2, 3, 4 pushed out by 5 and 6
    out.close()                       # 1 finishes; 5 and 6 are still queued
    assert out.written == 1
    assert out.written + out.dropped == 6
