"""TrainMatcher in one process: source grammar, construction errors, life cycle, buffer mode,
max-wait, PUB without subscribers, and what a client gets."""

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kbstream
from kbhash import Hash, Timestamp
from kbstream.errors import BindError, StateError
from kbstream.matcher import (
    MatcherConfigError,
    SourceSpecError,
    TrainMatcher,
    UnresolvedSourceError,
    parse_source,
)
from kbstream.matcher.matcher import SourceSpec
from kbstream.pipeline import OutputChannel

# ---------------------------------------------------------------- the source grammar


def test_parse_source_full_grammar():
    s = parse_source("JF1@SPB_IRDA_JF4M/DET/JNGFR01:daqOutput=10.0.0.5:4040")
    assert (s.name, s.device, s.channel, s.host, s.port) == \
        ("JF1", "SPB_IRDA_JF4M/DET/JNGFR01", "daqOutput", "10.0.0.5", 4040)
    assert s.output_id == "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"
    s = parse_source("SA1/XTD2/XGM:output")
    assert (s.name, s.host, s.port) == ("SA1/XTD2/XGM:output", None, None)
    s = parse_source("D:out=[::1]:4040")
    assert (s.host, s.port) == ("::1", 4040)
    assert parse_source(s) is s


@pytest.mark.parametrize("text", [
    "", "NOCHANNEL", ":out", "dev:", "a:b:c", "@dev:out", "dev:out=host", "dev:out=host:0",
    "dev:out=host:70000", "dev:out=:4040", "dev:out=host:port", "my dev:out=h:1",
])
def test_parse_source_refuses_bad_text(text):
    with pytest.raises(SourceSpecError) as e:
        parse_source(text)
    assert isinstance(e.value, ValueError) and e.value.spec == text


def test_parse_source_refuses_non_strings():
    with pytest.raises(SourceSpecError):
        parse_source(42)


def test_a_source_without_endpoint_needs_a_resolver(tmp_path):
    with pytest.raises(UnresolvedSourceError) as e:
        TrainMatcher(["SPB/DET/JF:daqOutput"], [f"ipc://{tmp_path}/a"])
    assert "has no endpoint" in str(e.value)
    # with a resolver the source is accepted (connected through it once started)
    m = TrainMatcher(["SPB/DET/JF:daqOutput"], [f"ipc://{tmp_path}/a"], resolver={})
    m.close()


@pytest.mark.parametrize("kwargs", [
    {"mode": "zip"}, {"queue_length": 0}, {"protocol_version": "3.0"}, {"outputs": []},
    {"outputs": [("ipc:///tmp/x", "DEALER")]}, {"offsets": {"nobody": 1}}, {"max_wait": -1},
])
def test_bad_options_are_typed_errors(kwargs, tmp_path):
    kwargs.setdefault("outputs", [f"ipc://{tmp_path}/b"])
    with pytest.raises(MatcherConfigError):
        TrainMatcher(["D:o=h:1"], **kwargs)


def test_two_sources_with_one_name_are_refused(tmp_path):
    with pytest.raises(MatcherConfigError):
        TrainMatcher(["X@D:o=h:1", "X@E:o=h:2"], [f"ipc://{tmp_path}/c"])


def test_a_failing_bind_releases_the_outputs_bound_before(tcp_endpoint):
    with pytest.raises(BindError):
        TrainMatcher(["D:o=h:1"], [tcp_endpoint, "tcp://300.0.0.1:1"])
    # the first endpoint is free again (a second bind of a TCP port would fail)
    TrainMatcher(["D:o=h:1"], [tcp_endpoint]).close()


def test_bad_input_options_release_the_outputs(tcp_endpoint):
    from kbstream.pipeline import PipelineConfigError

    with pytest.raises(PipelineConfigError):
        TrainMatcher(["D:o=h:1"], [tcp_endpoint], input_options={"onSlowness": "sometimes"})
    TrainMatcher(["D:o=h:1"], [tcp_endpoint]).close()


def test_life_cycle(tmp_path):
    m = TrainMatcher(["D:o=127.0.0.1:1"], [f"ipc://{tmp_path}/f"])
    assert m.endpoints == [f"ipc://{tmp_path}/f"]
    m.start()
    with pytest.raises(StateError):
        m.start()
    m.close()
    m.close()
    with pytest.raises(StateError):
        m.start()
    assert m.stats()["outputs"][0]["endpoint"] == f"ipc://{tmp_path}/f"
    TrainMatcher(["D:o=127.0.0.1:1"], [f"ipc://{tmp_path}/g"]).close()  # never started


# ---------------------------------------------------------------- in-process data


class Outputs:
    """Pipeline outputs in this process, one per source name."""

    def __init__(self, names):
        self.channels = [OutputChannel(f"{n}:output", hostname="127.0.0.1").start() for n in names]
        self.names = names

    def specs(self):
        return [f"{n}@{n}:output=127.0.0.1:{c.port}" for n, c in zip(self.names, self.channels)]

    def wait(self, iid):
        for k, c in enumerate(self.channels):
            c.wait_for_inputs(copy=[f"{iid}:input{k}"], timeout=30)

    def send(self, k, tid, n=0):
        h = Hash()
        h["data.image"] = np.full((4, 8), tid * 10 + k, dtype=np.int32)
        h["data.n"] = n
        self.channels[k].write(h, Timestamp(1_700_000_000, 5 * 10**17, tid))
        self.channels[k].update()

    def close(self):
        for c in self.channels:
            c.close()


def _wait_for(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_buffer_mode_delivers_partial_trains_with_the_sources_that_arrived(tmp_path):
    outs = Outputs(["A", "B", "C"])
    ep = f"ipc://{tmp_path}/buf"
    iid = "m_buffer"
    try:
        with TrainMatcher(outs.specs(), [(ep, "PUSH")], mode="buffer", buffer=2, instance_id=iid,
                          queue_length=50, input_options={"onSlowness": "wait"}) as m, \
                kbstream.Client(ep, sock="PULL", timeout=30) as client:
            outs.wait(iid)
            present = {100: "ABC", 101: "A", 102: "BC", 103: "AC", 104: "ABC"}
            sent = dict.fromkeys("ABC", 0)
            for tid, which in present.items():
                for k, name in enumerate("ABC"):
                    if name in which:
                        outs.send(k, tid)
                        sent[name] += 1
                        # the matching sees the items in the order they were sent
                        _wait_for(lambda: m.stats()["sources"][name]["received"] == sent[name], "an item")
            got = [client.next() for _ in range(3)]  # 104 - 2 = 102 and older are flushed
            stats = m.stats()
    finally:
        outs.close()
    for (data, meta), tid in zip(got, (100, 101, 102)):
        assert list(data) == list(present[tid])
        for name in data:
            k = "ABC".index(name)
            assert (data[name]["data.image"] == tid * 10 + k).all()
            assert meta[name]["timestamp.tid"] == tid and meta[name]["source"] == name
            assert meta[name]["timestamp.sec"] == "1700000000"
            assert meta[name]["timestamp.frac"] == "500000000000000000"
    tr = stats["trains"]
    assert tr["seen"] == 5 and tr["matched"] == 1 and tr["incomplete"] == 0
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    assert stats["sources"]["B"]["missing"] == 1 and stats["sources"]["A"]["missing"] == 1


def test_max_wait_gives_up_a_train_that_never_completes(tmp_path):
    outs = Outputs(["A", "B"])
    iid = "m_wait"
    try:
        with TrainMatcher(outs.specs(), [f"ipc://{tmp_path}/w"], max_wait=0.2, instance_id=iid,
                          input_options={"onSlowness": "wait"}) as m:
            outs.wait(iid)
            outs.send(0, 7)
            _wait_for(lambda: m.stats()["trains"]["incomplete"] == 1, "the train to be given up")
            stats = m.stats()
    finally:
        outs.close()
    tr = stats["trains"]
    assert tr["incomplete_by"]["max_wait"] == 1 and tr["pending"] == 0 and tr["seen"] == 1
    assert stats["sources"]["B"]["missing"] == 1


def test_pub_without_subscriber_counts_dropped_and_status_shows_connections(tmp_path):
    outs = Outputs(["A"])
    iid = "m_pub"
    try:
        m = TrainMatcher(outs.specs(), [(f"ipc://{tmp_path}/p", "PUB")], instance_id=iid,
                         input_options={"onSlowness": "wait"})
        assert m.stats()["sources"]["A"]["status"] == "disconnected"
        with m:
            m.wait_connected(30)
            outs.wait(iid)
            for tid in (1, 2, 3):
                outs.send(0, tid)
            _wait_for(lambda: m.stats()["trains"]["dropped"] == 3, "the PUB output to drop")
            stats = m.stats()
    finally:
        outs.close()
    tr = stats["trains"]
    assert tr["dropped_by"]["no_subscriber"] == 3 and tr["sent"] == 0 and tr["matched"] == 3
    assert stats["sources"]["A"]["status"] == "ok"
    assert stats["outputs"][0]["sock"] == "PUB" and stats["outputs"][0]["dropped"] == 3


def test_offsets_align_sources(tmp_path):
    outs = Outputs(["A", "B"])
    ep = f"ipc://{tmp_path}/off"
    iid = "m_off"
    try:
        with TrainMatcher(outs.specs(), [(ep, "PUSH")], offsets={"B": 3}, instance_id=iid,
                          input_options={"onSlowness": "wait"}) as m, \
                kbstream.Client(ep, sock="PULL", timeout=30) as client:
            outs.wait(iid)
            outs.send(0, 50)
            outs.send(1, 47)  # B is three trains behind
            data, meta = client.next()
            stats = m.stats()
    finally:
        outs.close()
    assert meta["A"]["timestamp.tid"] == meta["B"]["timestamp.tid"] == 50
    assert (data["B"]["data.image"] == 47 * 10 + 1).all()
    assert stats["sources"]["B"]["offset"] == 3


def test_a_train_the_bridge_cannot_encode_is_counted_dropped(tmp_path):
    outs = Outputs(["A"])
    ep = f"ipc://{tmp_path}/enc"
    iid = "m_enc"
    try:
        with TrainMatcher(outs.specs(), [(ep, "PUSH")], instance_id=iid,
                          input_options={"onSlowness": "wait"}) as m, \
                kbstream.Client(ep, sock="PULL", timeout=30) as client:
            outs.wait(iid)
            h = Hash()
            h["data.z"] = 1 + 2j  # a Karabo complex: no bridge encoding for it
            outs.channels[0].write(h, Timestamp(1, 0, 5))
            outs.channels[0].update()
            outs.send(0, 6)
            data, meta = client.next()  # the next train still arrives
            _wait_for(lambda: m.stats()["trains"]["sent"] == 1, "the second train")
            stats = m.stats()
    finally:
        outs.close()
    assert meta["A"]["timestamp.tid"] == 6
    tr = stats["trains"]
    assert tr["dropped_by"]["unencodable"] == 1 and tr["sent"] == 1 and tr["pending"] == 0


# ---------------------------------------------------------------- outputs, sources while running


def test_parse_output_grammar():
    from kbstream.matcher import parse_output

    assert parse_output(4545) == (4545, "REP", False)
    assert parse_output("4545", "PUB") == ("4545", "PUB", False)
    assert parse_output("tcp://*:1,PUSH,missing") == ("tcp://*:1", "PUSH", True)
    assert parse_output("ipc:///x,missing", "PUB") == ("ipc:///x", "PUB", True)
    assert parse_output(("ipc:///x", "PUSH")) == ("ipc:///x", "PUSH", False)
    assert parse_output(("ipc:///x", "PUSH", {"report_missing": True})) == ("ipc:///x", "PUSH", True)
    for bad in ("tcp://*:1,DEALER", ("ipc:///x", "SUB"), ("ipc:///x", "PUSH", {"hwm": 3}), ("x",), None):
        with pytest.raises(MatcherConfigError):
            parse_output(bad)


def test_parse_offset_and_status_line_are_plain():
    import argparse

    from kbstream.matcher.cli import parse_offset, status_line, status_table

    assert parse_offset("SPB/DET/JF:daqOutput=-3") == ("SPB/DET/JF:daqOutput", -3)
    assert parse_offset("A=+2") == ("A", 2)
    for bad in ("A", "=3", "A=x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_offset(bad)
    stats = {"trains": dict(seen=3, matched=2, sent=2, incomplete=1, dropped=0, pending=0), "clients": 1,
             "sources": {"A": dict(received=3, missing=0, latency=0, rate=10.0, status="ok"),
                         "B": dict(received=0, missing=3, latency=None, rate=0.0, status="waiting")}}
    line = status_line(stats, 9.5)
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert "sent 2" in line and "clients 1" in line and "B 0 rcv 3 miss" in line
    assert status_table(stats).row_count == 2


def test_sources_added_and_removed_while_running(tmp_path):
    outs = Outputs(["A", "B", "C"])
    ep = f"ipc://{tmp_path}/chg"
    iid = "m_change"
    try:
        specs = outs.specs()
        with TrainMatcher(specs[:2], [(ep, "PUSH")], instance_id=iid, queue_length=50,
                          input_options={"onSlowness": "wait"}) as m, \
                kbstream.Client(ep, sock="PULL", timeout=30) as client:
            for k in (0, 1):
                outs.channels[k].wait_for_inputs(copy=[f"{iid}:input{k}"], timeout=30)
            outs.send(0, 1)
            outs.send(1, 1)
            first = client.next()
            outs.send(0, 2)
            _wait_for(lambda: m.stats()["trains"]["waiting"] == 1, "train 2 waiting for B")
            m.remove_source("B")  # train 2 now only needs A: it goes out at once
            second = client.next()
            with pytest.raises(kbstream.matcher.UnknownSourceError):
                m.remove_source("B")
            m.add_source(specs[2])  # C is the third input made: input2
            outs.channels[2].wait_for_inputs(copy=[f"{iid}:input2"], timeout=30)
            outs.send(0, 3)
            _wait_for(lambda: m.stats()["sources"]["A"]["received"] == 3, "A's item 3")
            assert m.stats()["trains"]["waiting"] == 1  # 3 waits for C
            outs.send(2, 3)
            third = client.next()
            with pytest.raises(MatcherConfigError):
                m.add_source(specs[2])
            _wait_for(lambda: m.stats()["trains"]["sent"] == 3, "the third train settled")
            stats = m.stats()
    finally:
        outs.close()
    assert [list(d) for d, _ in (first, second, third)] == [["A", "B"], ["A"], ["A", "C"]]
    assert [next(iter(md.values()))["timestamp.tid"] for _, md in (first, second, third)] == [1, 2, 3]
    assert (third[0]["C"]["data.image"] == 3 * 10 + 2).all()
    tr = stats["trains"]
    assert (tr["seen"], tr["matched"], tr["sent"], tr["pending"]) == (3, 3, 3, 0)
    assert list(stats["sources"]) == ["A", "C"] and stats["sources"]["C"]["connects"] == 1
    with pytest.raises(StateError):
        m.add_source(specs[1])


def test_detector_modules_are_stacked_as_the_replay_does(tmp_path):
    ids = [f"SPB_IRDA_JF4M/DET/JNGFR{k:02d}:daqOutput" for k in (1, 2, 4)]  # module 3 absent
    channels = [OutputChannel(c, hostname="127.0.0.1").start() for c in ids]
    ep = f"ipc://{tmp_path}/app"
    iid = "m_append"
    try:
        specs = [f"{c}=127.0.0.1:{ch.port}" for c, ch in zip(ids, channels)]
        with TrainMatcher(specs, [(ep, "PUSH")], instance_id=iid, append_detector_modules=True,
                          input_options={"onSlowness": "wait"}) as m, \
                kbstream.Client(ep, sock="PULL", timeout=30) as client:
            for k, ch in enumerate(channels):
                ch.wait_for_inputs(copy=[f"{iid}:input{k}"], timeout=30)
                h = Hash()
                h["data.adc"] = np.full((2, 8, 4), k + 1, dtype=np.uint16)
                h["data.frameNumber"] = k
                ch.write(h, Timestamp(1_700_000_000, 0, 9))
                ch.update()
            data, meta = client.next()
            assert m.stats()["trains"]["matched"] == 1
    finally:
        for ch in channels:
            ch.close()
    name = "SPB_IRDA_JF4M/DET/APPEND"
    assert list(data) == [name] and meta[name]["source"] == name and meta[name]["timestamp.tid"] == 9
    adc = data[name]["data.adc"]
    assert adc.shape == (2, 4, 8, 4) and adc.dtype == np.uint16
    assert [int(adc[:, i].max()) for i in range(4)] == [1, 2, 0, 3]  # module 3 filled with 0
    assert data[name]["data.frameNumber"] == 0  # the other keys of the first module


def test_clients_are_counted_and_infiniband_binds_a_port(tmp_path):
    outs = Outputs(["A"])
    ep = f"ipc://{tmp_path}/cl"
    try:
        m = TrainMatcher(outs.specs(), [(ep, "PUSH"), (0, "PUB")], use_infiniband=True, instance_id="m_cl")
        with m:
            assert m.endpoints[1].startswith("tcp://")  # no ib0 here: every interface
            with kbstream.Client(ep, sock="PULL", timeout=30):
                _wait_for(lambda: m.stats()["outputs"][0]["clients"] == 1, "the client")
                assert m.stats()["clients"] == 1
            _wait_for(lambda: m.stats()["clients"] == 0, "the client to leave")
    finally:
        outs.close()


# ---------------------------------------------------------------- the identity end to end


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(order=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 25)), min_size=1, max_size=40,
                      unique=True),
       mode=st.sampled_from(["match", "buffer"]), queue_length=st.integers(1, 3))
def test_every_train_seen_ends_exactly_once_through_real_sockets(tmp_path_factory, order, mode, queue_length):
    """Items in a random order (per source and across sources) through real pipeline
    connections into a matcher with a PUSH output (a client draining it) and a PUB output
    nobody listens to: every train id seen ends as exactly one of sent, incomplete,
    dropped or pending; the client gets exactly the trains counted sent, in increasing
    order, each with its sources' own data."""
    tmp = tmp_path_factory.mktemp("ident")
    outs = Outputs(["A", "B", "C"])
    ep = f"ipc://{tmp}/push"
    iid = "m_ident"
    got = []
    try:
        with TrainMatcher(outs.specs(), [(ep, "PUSH"), (f"ipc://{tmp}/pub", "PUB")], mode=mode, buffer=3,
                          max_wait=0.3, queue_length=queue_length, instance_id=iid,
                          input_options={"onSlowness": "wait"}) as m, \
                kbstream.Client(ep, sock="PULL", timeout=0.2) as client:
            outs.wait(iid)
            for k, tid in order:
                outs.send(k, tid)
            per_source = [sum(1 for k, _ in order if k == i) for i in range(3)]
            _wait_for(lambda: [s["received"] for s in m.stats()["sources"].values()] == per_source, "the items")

            def settled():
                try:
                    got.append(client.next())
                except kbstream.ChannelTimeout:
                    pass
                return m.stats()["trains"]["pending"] == 0

            _wait_for(settled, "every train to end")
            stats = m.stats()
            while len(got) < stats["trains"]["sent"]:  # the last ones may still be on the way
                try:
                    got.append(client.next())
                except kbstream.ChannelTimeout:
                    break
    finally:
        outs.close()
    tr = stats["trains"]
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    assert tr["pending"] == 0 and len(got) == tr["sent"]
    tids = [next(iter(md.values()))["timestamp.tid"] for _, md in got]
    assert tids == sorted(set(tids))
    for data, meta in got:
        tid = next(iter(meta.values()))["timestamp.tid"]
        for name in data:
            assert (name, tid) in {("ABC"[k], t) for k, t in order}
            assert (data[name]["data.image"] == tid * 10 + "ABC".index(name)).all()
        if mode == "match":
            assert list(data) == ["A", "B", "C"]


def test_when_full_wait_paces_the_inputs_by_the_client_and_drops_nothing(tmp_path):
    import threading

    outs = Outputs(["A"])
    ep = f"ipc://{tmp_path}/wf"
    iid = "m_wait_full"
    n = 8
    try:
        with TrainMatcher(outs.specs(), [(ep, "REP")], instance_id=iid, queue_length=1, when_full="wait",
                          input_options={"onSlowness": "wait"}) as m:
            outs.wait(iid)
            sender = threading.Thread(target=lambda: [outs.send(0, tid) for tid in range(1, n + 1)])
            sender.start()
            # nobody asks yet: the matcher holds one train queued and one in the sender, the
            # input its own few items; the rest waits in the source instead of being dropped
            _wait_for(lambda: m.stats()["trains"]["matched"] >= 2, "the first trains")
            assert m.stats()["trains"]["dropped"] == 0
            with kbstream.Client(ep, sock="REQ", timeout=30) as client:
                got = [client.next() for _ in range(n)]
            sender.join(30)
            _wait_for(lambda: m.stats()["trains"]["sent"] == n, "every train settled")
            stats = m.stats()
    finally:
        outs.close()
    assert [md["A"]["timestamp.tid"] for _, md in got] == list(range(1, n + 1))
    tr = stats["trains"]
    assert (tr["seen"], tr["sent"], tr["dropped"], tr["pending"]) == (n, n, 0, 0)
    with pytest.raises(MatcherConfigError):
        TrainMatcher(["D:o=127.0.0.1:1"], [f"ipc://{tmp_path}/g"], when_full="block")


@pytest.mark.parametrize("version", ["2.2", "1.0"])
def test_the_missing_list_decodes_with_either_client_library(version):
    """What a report_missing output adds is plain metadata: karabo_bridge's and kbstream's
    decoders both return it as sent, in either protocol version."""
    karabo_bridge = pytest.importorskip("karabo_bridge")
    import zmq

    from kbstream.bridge import source_metadata
    from kbstream.matcher import MISSING_KEY

    data = {"A": {"data.image": np.arange(6, dtype=np.uint16).reshape(2, 3), "data.n": 1}}
    meta = {"A": {**source_metadata("A", 7, 1_700_000_000, 0), MISSING_KEY: ["B", "C"]}}
    frames = [bytes(f) for f in kbstream.serialize(data, meta, version)]
    for decode in (kbstream.deserialize, karabo_bridge.deserialize):
        d, m = decode([zmq.Frame(f) for f in frames])
        assert list(m["A"][MISSING_KEY]) == ["B", "C"] and m["A"]["timestamp.tid"] == 7
        assert (d["A"]["data.image"] == data["A"]["data.image"]).all()
