"""Channel monitors (BrokerInstance.register_channel_monitor) on the in-memory broker, with a
kbstream output channel: Karabo's defaults on the wire, one monitor per channel, unregister
ends everything, reconnection on announcement and on the retry timer, dead and hostile
outputs give typed errors and leave no thread behind; and the rule of ``kbstream monitor``
telling a pipeline output from a bridge endpoint."""

import threading

import numpy as np
import pytest

from kbhash import Hash, HashType, ImageData

from kbstream.broker import (BrokerInstance, InvalidInstanceId, InvalidOutputId,
                             NotStartedError, RemoteError, RequestTimeout)
from kbstream.broker.errors import MessageError
from kbstream.pipeline import ConnectionStatus, OutputChannel, PipelineConfigError
from kbstream.tools.channel_monitor import describe, is_channel_id, route

from broker_stack import wait_until
from memory_broker import MemoryBroker, MemoryTransport


@pytest.fixture
def mem():
    broker = MemoryBroker()
    made, transports = [], []

    def make(iid, start=True, **kw):
        kw.setdefault("self_check", False)
        transports.append(MemoryTransport(broker))
        inst = BrokerInstance(iid, transport=transports[-1], topic="t", **kw)
        made.append(inst)
        return inst.start() if start else inst

    yield make
    for inst in made:
        inst.stop()
    for t in transports:
        t.close()


@pytest.fixture
def output():
    outs = []

    def make(channel_id="kbPeer:output"):
        outs.append(OutputChannel(channel_id, hostname="127.0.0.1").start())
        return outs[-1]

    yield make
    for o in outs:
        o.close()


def item(i):
    h = Hash()
    h.set("node.int32", i, type=HashType.INT32)
    h.set("node.ndarray", np.full((4, 5), i, np.float32))
    return h


def send(out, input_id, i):
    """Write item ``i`` until the output sent it to ``input_id`` (its onSlowness is drop)."""
    for _ in range(400):
        before = out.stats()[input_id]["sent"]
        out.write(item(i), {"tid": 1000 + i})
        out.update(timeout=10)
        if out.stats()[input_id]["sent"] > before:
            return
        threading.Event().wait(0.025)
    pytest.fail(f"item {i} never sent: {out.stats()}")


def threads_of(name):
    return [t.name for t in threading.enumerate() if name in t.name]


def test_register_receives_with_karabo_defaults_once_per_channel_and_unregister_ends_it(
        mem, output):
    out = output()
    peer = mem("kbPeer")
    peer.add_output_channel("output", out)
    client = mem("kbMon", instance_type="client")
    got, statuses, eos = [], [], []
    assert client.register_channel_monitor(
        "kbPeer@output", data_handler=lambda d, m: got.append((m.tid, int(d["node.int32"]))),
        eos_handler=lambda ch: eos.append(ch), status_tracker=statuses.append) is True
    # the same channel again, with either separator: refused, as Karabo does
    assert client.register_channel_monitor("kbPeer:output") is False
    assert client.register_channel_monitor("kbPeer@output") is False
    input_id = "kbMon:kbPeer:output"  # the input is named after the output
    out.wait_for_inputs(copy=[input_id], timeout=20)
    hello = out.stats()[input_id]
    assert (hello["onSlowness"], hello["maxQueueLength"]) == ("drop", 2)
    mon = client.channel_monitor("kbPeer:output")
    assert mon.input.data_distribution == "copy" and mon.input.delay_on_input == 0
    wait_until(lambda: ConnectionStatus.CONNECTED in statuses, 10, what="status CONNECTED")
    assert statuses[0] == ConnectionStatus.CONNECTING and mon.last_error is None
    for i in (1, 2, 3):
        send(out, input_id, i)
    out.signal_end_of_stream(timeout=10)
    wait_until(lambda: len(got) == 3 and eos, 10, what="3 items and end of stream")
    assert got == [(1001, 1), (1002, 2), (1003, 3)]
    assert eos == [mon.input]

    assert threads_of(input_id)
    assert client.unregister_channel_monitor("kbPeer@output") is True
    assert mon.input.closed and not threads_of(input_id)
    assert client.channel_monitor("kbPeer:output") is None
    n = len(got)
    for i in (4, 5):
        out.write(item(i))
        out.update(timeout=5)
    assert len(got) == n  # no handler call after unregister
    assert client.unregister_channel_monitor("kbPeer:output") is False
    # registering again works: a new input
    assert client.register_channel_monitor("kbPeer:output", config={"onSlowness": "wait"})
    out.wait_for_inputs(copy=[input_id], timeout=20)
    wait_until(lambda: out.stats().get(input_id, {}).get("onSlowness") == "wait", 10,
               what="new hello with the configured onSlowness")


def test_input_handler_and_config_hash(mem, output):
    out = output()
    peer = mem("kbPeer")
    peer.add_output_channel("output", out)
    client = mem("kbMon", instance_type="client")
    sizes = []
    cfg = Hash("onSlowness", "wait", "maxQueueLength", 5, "connectedOutputChannels", ["x:y"])
    assert client.register_channel_monitor("kbPeer:output", input_handler=lambda b: sizes.append(
        b.size()), config=cfg)
    out.wait_for_inputs(copy=["kbMon:kbPeer:output"], timeout=20)
    assert out.stats()["kbMon:kbPeer:output"]["maxQueueLength"] == 5
    assert client.channel_monitor("kbPeer@output").input.connected_output_channels == [
        "kbPeer:output"]
    out.write(item(1))
    out.update(timeout=10)
    wait_until(lambda: sizes == [1], 10, what="input handler")


@pytest.mark.parametrize("channel_id, error", [
    ("nocolon", InvalidOutputId), (":output", InvalidOutputId), ("dev:", InvalidOutputId),
    (None, InvalidOutputId), ("bad dev:output", InvalidInstanceId)])
def test_bad_channel_ids_raise_typed_errors(mem, channel_id, error):
    client = mem("kbMon")
    with pytest.raises(error):
        client.register_channel_monitor(channel_id)


@pytest.mark.parametrize("config", [{"bogus": 1}, {"onSlowness": "later"},
                                    {"maxQueueLength": "many"}, {"request_timeout": 0},
                                    "onSlowness=wait"])
def test_bad_config_raises_typed_error_and_leaves_nothing(mem, config):
    client = mem("kbMon")
    with pytest.raises(PipelineConfigError):
        client.register_channel_monitor("kbPeer:output", config=config)
    assert client.channel_monitor("kbPeer:output") is None and not threads_of("kbPeer:output")


def test_register_needs_a_started_instance_and_close_ends_monitors(mem):
    client = mem("kbMon", start=False)
    with pytest.raises(NotStartedError):
        client.register_channel_monitor("kbPeer:output")
    client.start()
    assert client.register_channel_monitor("kbPeer:output", config={"request_timeout": 30})
    mon = client.channel_monitor("kbPeer:output")
    wait_until(lambda: mon.attempts >= 1, 10, what="first request")
    client.close()  # the pending 30 s request does not hold it up
    assert mon.input.closed and not threads_of("kbMon:kbPeer:output")
    with pytest.raises(NotStartedError):
        client.register_channel_monitor("kbPeer:other")


def test_output_that_never_answers_gives_request_timeout_and_retries(mem):
    client = mem("kbMon")
    statuses = []
    assert client.register_channel_monitor(
        "kbGhost:output", status_tracker=statuses.append,
        config={"request_timeout": 0.2, "reconnect_interval": 0.1})
    mon = client.channel_monitor("kbGhost:output")
    wait_until(lambda: mon.attempts >= 3 and isinstance(mon.last_error, RequestTimeout), 20,
               what="several timed-out attempts")
    assert mon.status == ConnectionStatus.DISCONNECTED and statuses == []
    assert mon.last_error.instance_id == "kbGhost"
    assert client.unregister_channel_monitor("kbGhost:output")
    assert not threads_of("kbMon:kbGhost:output")
    wait_until(lambda: not client._requests.pending, 5, what="no request left pending")


def _reply_of(kind):
    good = Hash("connectionType", "tcp", "hostname", "127.0.0.1", "memoryLocation", "remote")
    good.set("port", 4000, type=HashType.UINT32)

    def with_info(**changes):
        info = Hash(good)
        for k, v in changes.items():
            info[k] = v
        return Hash("success", True, "info", info)

    return {
        "not a hash": 7,
        "nothing": None,
        "no such channel": Hash("success", False, "info", Hash()),
        "success not bool": Hash("success", "yes", "info", good),
        "info not hash": Hash("success", True, "info", "127.0.0.1:4000"),
        "port text": with_info(port="4000"),
        "port zero": with_info(port=0),
        "port too big": with_info(port=70000),
        "udp": with_info(connectionType="udp"),
        "no host": with_info(hostname=""),
        "unknown host": with_info(hostname="no-such-host.invalid"),
    }[kind]


@pytest.mark.parametrize("kind, error", [
    ("not a hash", MessageError), ("nothing", MessageError), ("no such channel", RemoteError),
    ("success not bool", MessageError), ("info not hash", MessageError),
    ("port text", MessageError), ("port zero", MessageError), ("port too big", MessageError),
    ("udp", MessageError), ("no host", MessageError), ("unknown host", MessageError),
    ("raises", RemoteError)])
def test_bad_replies_give_typed_errors_and_no_connection(mem, kind, error):
    bad = mem("kbBad", start=False)
    asked = []

    def slot(arg=None, *_):
        asked.append(arg)
        if kind == "raises":
            raise ValueError("broken device")
        return _reply_of(kind)

    bad.register_slot("slotGetOutputChannelInformation", slot)
    bad.start()
    client = mem("kbMon")
    statuses = []
    client.register_channel_monitor("kbBad:output", status_tracker=statuses.append,
                                    config={"reconnect_interval": 0.1})
    mon = client.channel_monitor("kbBad:output")
    wait_until(lambda: len(asked) >= 2 and isinstance(mon.last_error, error), 20,
               what=f"{error.__name__} after {kind!r}")
    assert asked[0]["channelId"] == "output" and asked[0].get_type("processId") == HashType.INT32
    assert mon.status == ConnectionStatus.DISCONNECTED and statuses == []
    assert client.unregister_channel_monitor("kbBad:output")
    assert not threads_of("kbMon:kbBad:output")


def test_reconnects_at_once_when_the_output_announces_itself(mem, output):
    client = mem("kbMon")
    statuses = []
    # a long timer and a long request timeout: only the announcement can connect it soon
    client.register_channel_monitor("kbLate:output", status_tracker=statuses.append,
                                    config={"reconnect_interval": 120, "request_timeout": 120})
    mon = client.channel_monitor("kbLate:output")
    wait_until(lambda: mon.attempts >= 1, 10, what="first request (unanswered)")
    out = output("kbLate:output")
    late = mem("kbLate", start=False)
    late.add_output_channel("output", out)
    late.start()
    out.wait_for_inputs(copy=["kbMon:kbLate:output"], timeout=20)
    wait_until(lambda: ConnectionStatus.CONNECTED in statuses, 10, what="connected")
    assert mon.attempts == 2  # asked again on the announcement

    # the output goes away and a new one (new port) is announced: connected again at once
    out.close()
    wait_until(lambda: statuses[-1] == ConnectionStatus.DISCONNECTED, 10, what="disconnected")
    late.stop()
    out2 = output("kbLate:output")
    again = mem("kbLate", start=False)
    again.add_output_channel("output", out2)
    again.start()
    out2.wait_for_inputs(copy=["kbMon:kbLate:output"], timeout=20)
    wait_until(lambda: statuses[-1] == ConnectionStatus.CONNECTED, 10, what="reconnected")


def test_retry_timer_connects_without_an_announcement(mem, output):
    peer = mem("kbPeer")  # online, but its output is not there yet
    client = mem("kbMon")
    client.register_channel_monitor("kbPeer:output", config={"reconnect_interval": 0.2})
    mon = client.channel_monitor("kbPeer:output")
    wait_until(lambda: isinstance(mon.last_error, RemoteError), 10, what="no such channel")
    out = output()
    peer.add_output_channel("output", out)  # no announcement: only the timer finds it
    out.wait_for_inputs(copy=["kbMon:kbPeer:output"], timeout=20)
    wait_until(lambda: mon.status == ConnectionStatus.CONNECTED and mon.last_error is None, 10,
               what="connected by the retry timer")


# ---- kbstream monitor: which tool --------------------------------------------------------

@pytest.mark.parametrize("text, channel", [
    ("kbDev:output", True), ("kbDev@output", True), ("SA1_XTD2_XGM/DOOCS/MAIN:output", True),
    ("SPB_IRDA_JF4M/DET/JNGFR01:daqOutput", True), ("kbDev:node.output", True),
    ("tcp://localhost:4545", False), ("ipc:///tmp/bridge", False), ("4545", False),
    ("localhost:4545", False), ("10.0.0.1:4545", False), ("[::1]:4545", False),
    ("kbDev", False), ("kbDev:1output", False), ("", False)])
def test_channel_id_or_endpoint(text, channel):
    assert is_channel_id(text) is channel


def test_route():
    assert route(["kbDev:output", "--ntrains", "3"]) == ("channel", ["kbDev:output", "--ntrains",
                                                                     "3"])
    assert route(["--broker", "amqp://g:g@127.0.0.1:5672", "kbDev@output"])[0] == "channel"
    assert route(["-z", "PUSH", "tcp://h:1"]) == ("endpoint", ["-z", "PUSH", "tcp://h:1"])
    assert route(["--ntrains", "2", "localhost:4545"]) == (
        "endpoint", ["--ntrains", "2", "tcp://localhost:4545"])
    assert route(["4545"]) == ("endpoint", ["4545"])
    assert route(["--help"]) == ("endpoint", ["--help"])


def test_describe_lists_keys_shapes_and_types():
    h = item(3)
    h.set("node.string", "x", type=HashType.STRING)
    h.set("node.vec", [1, 2, 3], type=HashType.VECTOR_INT64)
    h.set("node.names", ["a", "b"], type=HashType.VECTOR_STRING)
    h["node.image"] = ImageData(np.zeros((3, 2), np.uint16))
    assert describe(h) == ["node.int32 INT32", "node.ndarray float32 (4, 5)",
                           "node.string STRING", "node.vec VECTOR_INT64 (3,)",
                           "node.names VECTOR_STRING (2,)", "node.image ImageData uint16 (3, 2)"]


def test_kbstream_monitor_command_runs_the_tool_its_argument_names(capsys):
    from broker_stack import free_port

    from kbstream.cli import main

    port = free_port()
    # DEVICE:CHANNEL: the channel monitor, which needs the broker (none here: status 2)
    assert main(["monitor", "kbDev:output", "--broker",
                 f"amqp://guest:guest@127.0.0.1:{port}", "--topic", "x"]) == 2
    assert "cannot connect" in capsys.readouterr().err
    # HOST:PORT: the bridge monitor on tcp://HOST:PORT (--ntrains 0: summary at once)
    assert main(["monitor", f"127.0.0.1:{port}", "--ntrains", "0"]) == 0
    assert capsys.readouterr().out.startswith("Received 0 trains")
    # the bridge monitor's help names the other form too
    with pytest.raises(SystemExit) as e:
        main(["monitor", "--help"])
    assert e.value.code == 0
    assert "kbstream monitor DEVICE:CHANNEL" in capsys.readouterr().out


def test_unregister_from_inside_a_handler(mem, output):
    out = output()
    peer = mem("kbPeer")
    peer.add_output_channel("output", out)
    client = mem("kbMon")
    results = []

    def on_data(data, meta):
        results.append(client.unregister_channel_monitor("kbPeer:output"))

    client.register_channel_monitor("kbPeer:output", data_handler=on_data,
                                    config={"onSlowness": "wait"})
    out.wait_for_inputs(copy=["kbMon:kbPeer:output"], timeout=20)
    out.write(item(1))
    out.update(timeout=10)
    wait_until(lambda: results, 10, what="the handler ran")
    assert results == [True]
    wait_until(lambda: not threads_of("kbMon:kbPeer:output"), 10, what="threads ended")
    for i in (2, 3):
        out.write(item(i))
        out.update(timeout=5)
    assert results == [True]
