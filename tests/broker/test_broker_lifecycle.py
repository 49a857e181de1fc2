"""The broker layer under kbstream's common rules, without a broker: the life cycle of
instances and transports, typed errors, the test double kept out of the public API, and
the device view's sections."""

import threading

import pytest

import kbstream.broker
from kbhash import Hash, HashType

from kbstream.errors import EncodeError, KbStreamError, StateError
from kbstream.broker import (BrokerConfigError, BrokerInstance, InvalidOutputId, InvalidSlotName,
                             NotStartedError, RequestTimeout, split_output_id)
from kbstream.broker.device_view import Leaf, Node

from broker_stack import wait_until
from memory_broker import MemoryBroker, MemoryTransport


def instance_threads():
    return {t.name for t in threading.enumerate()
            if t.name.startswith("kbstream-broker") or t.name.startswith("kbstream-amqp")}


@pytest.fixture
def transport():
    t = MemoryTransport(MemoryBroker())
    yield t
    t.close()


def test_not_started_error_is_a_state_error_of_the_broker():
    assert issubclass(NotStartedError, StateError)
    assert issubclass(NotStartedError, kbstream.broker.BrokerError)
    assert issubclass(NotStartedError, RuntimeError)


def test_memory_double_is_not_public():
    assert not hasattr(kbstream.broker, "MemoryBroker")
    assert not hasattr(kbstream.broker, "MemoryTransport")
    assert "MemoryBroker" not in kbstream.broker.__all__
    import kbstream.broker.transport as tr

    assert not hasattr(tr, "MemoryTransport") and not hasattr(tr, "topic_matches")


def test_constructor_starts_no_thread_and_contacts_nobody(transport):
    before = instance_threads()
    inst = BrokerInstance("kbQuiet", transport=transport, topic="t")
    assert instance_threads() == before
    assert transport.queue_name is None  # not opened
    assert inst.state == "new" and not inst.started and not inst.closed
    inst.close()


def test_start_returns_self_close_is_idempotent_and_start_again_fails(transport):
    inst = BrokerInstance("kbLife", transport=transport, topic="t", self_check=False)
    assert inst.start() is inst
    assert inst.state == "up"
    with pytest.raises(NotStartedError, match="already started"):
        inst.start()
    inst.close()
    inst.close()
    inst.stop(timeout=1.0)  # the keyword of earlier versions is still accepted
    assert inst.state == "stopped" and inst.closed
    with pytest.raises(NotStartedError, match="closed"):
        inst.start()
    with pytest.raises(NotStartedError):
        inst.request("kbOther", "slotPing", timeout=0.1)


def test_close_ends_the_instance_threads_and_leaves_a_passed_in_transport_open(transport):
    inst = BrokerInstance("kbThreads", transport=transport, topic="t", self_check=False)
    inst.start()
    assert any(n.endswith("kbThreads") for n in instance_threads())
    inst.close(timeout=2.0)
    assert not any(n.endswith("kbThreads") for n in instance_threads())
    assert transport.connected  # objects passed in are never closed
    published = [k for _, k, _ in transport.broker.published]
    assert published[-1] == "kbThreads.slotInstanceGone"


def test_close_of_a_never_started_instance():
    inst = BrokerInstance("kbNever", transport=MemoryTransport(MemoryBroker()), topic="t")
    inst.stop()
    assert inst.state == "stopped"
    with pytest.raises(NotStartedError):
        inst.start()


def test_with_starts_if_needed_and_closes(transport):
    with BrokerInstance("kbWith", transport=transport, topic="t", self_check=False) as inst:
        assert inst.state == "up"
    assert inst.state == "stopped"
    t2 = MemoryTransport(transport.broker)
    started = BrokerInstance("kbWith2", transport=t2, topic="t", self_check=False).start()
    with started as same:  # already started: entered as it is
        assert same is started and same.state == "up"
    assert started.state == "stopped"
    t2.close()


def test_close_while_starting_ends_the_start(transport):
    inst = BrokerInstance("kbRace", transport=transport, topic="t", self_check=True)
    errors = []

    def start():
        try:
            inst.start()
        except NotStartedError as e:
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    wait_until(lambda: inst._requests.pending == 1, 5, what="self-check in flight")
    inst.close()
    t.join(10)
    assert not t.is_alive() and len(errors) == 1
    assert inst.state == "stopped"
    assert not any(n.endswith("kbRace") for n in instance_threads())
    published = [k for _, k, _ in transport.broker.published]
    assert "kbRace.slotInstanceNew" not in published


def test_pending_requests_fail_when_the_instance_closes(transport):
    inst = BrokerInstance("kbWaiter", transport=transport, topic="t", self_check=False).start()
    fut = inst.request_async("kbNobody", "slotPing", 1)
    inst.close()
    with pytest.raises(NotStartedError, match="kbNobody.slotPing"):
        fut.result(5)


def test_reply_future_wait_raises_request_timeout(transport):
    inst = BrokerInstance("kbAsk", transport=transport, topic="t", self_check=False).start()
    try:
        fut = inst.request_async("kbNobody", "slotPing", 1, timeout=0.1)
        with pytest.raises(RequestTimeout) as ei:
            fut.wait(5)
        assert (ei.value.instance_id, ei.value.slot) == ("kbNobody", "slotPing")
        fut = inst.request_async("kbNobody", "slotPing", 1)  # no timer: wait() expires it
        with pytest.raises(RequestTimeout, match="within 0.1 s"):
            fut.wait(0.1)
        assert inst._requests.pending == 0
    finally:
        inst.close()


def test_bad_arguments_raise_typed_errors(transport):
    for bad in (0, -5, "soon", None):
        with pytest.raises(BrokerConfigError, match="heartbeat_interval"):
            BrokerInstance("kbBad", transport=transport, heartbeat_interval=bad)
    inst = BrokerInstance("kbSlots", transport=transport, topic="t", self_check=False)
    for bad in ("", "a b", None, 5):
        with pytest.raises(InvalidSlotName):
            inst.register_slot(bad, lambda: None)
    for bad in ("nochannel", ":x", "x:", 5):
        with pytest.raises(InvalidOutputId):
            split_output_id(bad)
    assert issubclass(InvalidOutputId, ValueError) and issubclass(InvalidSlotName, ValueError)


def test_unencodable_arguments_raise_the_kbstream_encode_error(transport):
    inst = BrokerInstance("kbEnc", transport=transport, topic="t", self_check=False).start()
    try:
        with pytest.raises(EncodeError) as ei:
            inst.call("kbOther", "slotX", 2**70)
        assert isinstance(ei.value, KbStreamError)
        with pytest.raises(EncodeError):
            inst.request("kbOther", "slotX", object(), timeout=1)
        assert inst._requests.pending == 0  # a failed send leaves nothing pending
    finally:
        inst.close()


def test_output_info_that_is_not_a_hash_gives_no_connection_details(transport):
    inst = BrokerInstance("kbOutBad", transport=transport, topic="t")
    inst.add_output_channel("output", lambda: "not a hash")
    reply = inst._channels.slot_output_information(Hash("channelId", "output"))
    assert reply["success"] is False
    assert inst.configuration()["output.port"] == 0
    from kbstream.broker.channels import connection_details

    with pytest.raises(BrokerConfigError, match="must be a Hash"):
        connection_details(lambda: "not a hash")


def test_device_view_sections_extend_configuration_and_schema(transport):
    inst = BrokerInstance("kbView", transport=transport, topic="t")
    seen_taken = []

    def pipeline(taken):
        seen_taken.append(taken)
        return [Node("extra", "Extra", (("displayType", "OutputChannel", HashType.STRING),)),
                Leaf("extra.count", 7, HashType.UINT64, "Count",
                     (("unitSymbol", "#", HashType.STRING),))]

    assert inst.device_view.add_section(pipeline) is pipeline
    conf = inst.configuration()
    assert conf["extra.count"] == 7 and conf.get_type("extra.count") == HashType.UINT64
    assert "deviceId" in seen_taken[0] and "extra" not in seen_taken[0]
    params = inst.schema().parameters
    assert params.get_attribute("extra", "nodeType") == 1
    assert params.get_attribute("extra", "displayType") == "OutputChannel"
    assert params.get_attribute("extra.count", "nodeType") == 0
    assert params.get_attribute("extra.count", "unitSymbol") == "#"
    assert params.get_attribute("extra.count", "valueType") == "UINT64"
    assert params.get_attribute("state", "displayType") == "State"


def test_pika_transport_life_cycle():
    pytest.importorskip("pika")
    from kbstream.broker.config import BrokerConfig
    from kbstream.broker.transport import PikaTransport

    before = instance_threads()
    t = PikaTransport(BrokerConfig.resolve("amqp://guest:guest@127.0.0.1:1", "t"))
    assert instance_threads() == before and not t.started
    with pytest.raises(NotStartedError, match="open"):
        t.start()  # started by open(queue, ...), which knows what to declare
    assert t.closed
    t.close()
    t.stop(timeout=0.5)
    with pytest.raises(NotStartedError):
        t.open("t.q", [], [], lambda *a: None)
    with pytest.raises(NotStartedError, match="closed"):
        t.publish("t.Slots", "a.b", b"x")
    wait_until(lambda: instance_threads() == before, 5, what="no transport thread")
