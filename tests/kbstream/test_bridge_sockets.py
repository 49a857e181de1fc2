"""Servers and client over real sockets: interop with karabo_bridge / extra_data in both
directions for every socket pair and protocol version, and the fixed traps of the peers."""

import queue
import threading
import time

import numpy as np
import pytest
import zmq

from test_bridge_support import canon, rich_train

import kbstream
from kbstream import errors

kb = pytest.importorskip("karabo_bridge")

PAIRS = [("REP", "REQ"), ("PUSH", "PULL"), ("PUB", "SUB")]
TIMEOUT = 20  # seconds: only a guard against hanging, never asserted on


def wait_for(condition):
    """Poll a condition set by the server thread (counters are updated after the send)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def interop_train(tid):
    data, meta = rich_train(tid)
    data["DET/A:daqOutput"].pop("header.np_u64")
    return data, meta


def expected(version, tid):
    """What karabo_bridge's own client would get from its own server."""
    data, meta = interop_train(tid)
    return kb.deserialize([zmq.Frame(bytes(f)) for f in kb.serialize(data, meta, version)])


def feed_until_received(server, client, version, first_tid=1):
    """Feed trains until the client gets one (PUB drops trains before the subscription)."""
    result = {}

    def receive():
        try:
            result["msg"] = client.next()
        except Exception as e:  # noqa: BLE001 - reported below
            result["err"] = e

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    tid = first_tid
    deadline = time.monotonic() + TIMEOUT
    while t.is_alive() and time.monotonic() < deadline:
        try:
            server.feed(*interop_train(tid), block=True, timeout=0.05)
            tid += 1
        except queue.Full:
            pass
        t.join(0.02)
    t.join(1)
    assert "err" not in result, result.get("err")
    assert "msg" in result, "no train received"
    return result["msg"]


def assert_same_train(got, version):
    d, m = got
    tid = next(iter(m.values()))["timestamp.tid"]
    ed, em = expected(version, tid)
    assert m == em
    assert canon(d) == canon(ed)
    assert d["DET/A:daqOutput"]["data.adc"].shape == (2, 4, 8)


@pytest.mark.parametrize("version", ["2.2", "1.0"])
@pytest.mark.parametrize("server_sock, client_sock", PAIRS)
def test_kbstream_server_to_peer_client(endpoint, server_sock, client_sock, version):
    with kbstream.ServerInThread(endpoint, sock=server_sock, protocol_version=version) as server:
        client = kb.Client(server.endpoint, sock=client_sock, timeout=TIMEOUT)
        try:
            got = feed_until_received(server, client, version)
        finally:
            client._context.destroy(linger=0)  # the peer client has no close()
    assert_same_train(got, version)
    assert wait_for(lambda: server.trains_sent >= 1)


@pytest.mark.parametrize("version", ["2.2", "1.0"])
@pytest.mark.parametrize("server_sock, client_sock", PAIRS)
def test_peer_server_to_kbstream_client(endpoint, server_sock, client_sock, version):
    with kb.ServerInThread(endpoint, sock=server_sock, protocol_version=version) as server:
        with kbstream.Client(server.endpoint, sock=client_sock, timeout=TIMEOUT) as client:
            got = feed_until_received(server, client, version)
    assert_same_train(got, version)


@pytest.mark.parametrize("server_sock, client_sock", PAIRS)
def test_extra_data_zmqstreamer_to_kbstream_client(monkeypatch, server_sock, client_sock):
    """extra_data's ZMQStreamer binds tcp://*:PORT; rebound to 127.0.0.1 for the test."""
    export = pytest.importorskip("extra_data.export")
    from karabo_bridge import server as kb_server

    original = kb_server.Sender.__init__

    def local_only(self, endpoint, *args, **kw):
        original(self, endpoint.replace("tcp://*:", "tcp://127.0.0.1:"), *args, **kw)

    monkeypatch.setattr(kb_server.Sender, "__init__", local_only)
    with pytest.warns(DeprecationWarning, match="karabo_bridge.ServerInThread"):
        streamer = export.ZMQStreamer(0, sock=server_sock)
    assert streamer.endpoint.startswith("tcp://127.0.0.1:")
    with streamer:
        with kbstream.Client(streamer.endpoint, sock=client_sock, timeout=TIMEOUT) as client:
            got = feed_until_received(streamer, client, "2.2")
    assert_same_train(got, "2.2")


@pytest.mark.parametrize("version", ["2.2", "1.0"])
@pytest.mark.parametrize("server_sock, client_sock", PAIRS)
def test_bridge_simulator_to_kbstream_client(ipc_endpoint, server_sock, client_sock, version):
    from karabo_bridge.server import SimServerInThread

    sim = SimServerInThread(ipc_endpoint, sock=server_sock, protocol_version=version,
                            detector="AGIPDModule", raw=True, debug=False)
    with sim:
        with kbstream.Client(ipc_endpoint, sock=client_sock, timeout=TIMEOUT) as client:
            data, meta = client.next()
    (src,) = data
    assert src == "SPB_DET_AGIPD1M-1/DET/0CH0:xtdf"
    img = data[src]["image.data"]
    assert img.dtype == np.uint16 and img.shape == (128, 512, 64)
    assert meta[src]["timestamp.tid"] >= 10000000000
    assert set(meta[src]) >= {"timestamp", "timestamp.sec", "timestamp.frac", "timestamp.tid"}
    assert data[src]["image.pulseId"].dtype == np.uint64


def test_kbstream_zmqstreamer_explicit_endpoint(ipc_endpoint):
    with kbstream.ZMQStreamer(ipc_endpoint, sock="PUSH") as streamer:
        with kbstream.Client(ipc_endpoint, sock="PULL", timeout=TIMEOUT) as client:
            streamer.feed({"s": {"x": 1, "a": np.arange(3)}}, {"s": {"timestamp.tid": 7}})
            d, m = client.next()
    assert d["s"]["x"] == 1 and d["s"]["a"].tolist() == [0, 1, 2] and m == {"s": {"timestamp.tid": 7}}


def test_port_number_binds_all_interfaces():
    """Documented convention, checked without binding: a bare port is tcp://*:PORT."""
    from kbstream.bridge import parse_endpoint

    assert parse_endpoint(4545) == "tcp://*:4545"
    assert parse_endpoint("4545") == "tcp://*:4545"
    assert parse_endpoint("tcp://127.0.0.1:0") == "tcp://127.0.0.1:0"
    for bad in (4545.0, True, None):
        with pytest.raises(TypeError):
            parse_endpoint(bad)


def test_inproc_with_shared_context():
    ctx = zmq.Context()
    try:
        with kbstream.ServerInThread("inproc://kbs-test", sock="PUSH", context=ctx) as server:
            with kbstream.Client("inproc://kbs-test", sock="PULL", context=ctx, timeout=TIMEOUT) as c:
                server.feed({"s": {"a": np.ones(4)}})
                d, _ = c.next()
        assert d["s"]["a"].sum() == 4
        assert not ctx.closed, "a context passed in is never terminated"
    finally:
        ctx.term()


# ---- fixed traps --------------------------------------------------------------------------


def test_req_client_survives_timeout(endpoint):
    with kbstream.ServerInThread(endpoint) as server:
        with kbstream.Client(server.endpoint, timeout=0.2) as client:
            with pytest.raises(errors.ChannelTimeout) as info:
                client.next()
            assert isinstance(info.value, TimeoutError)
            assert info.value.endpoint == server.endpoint
            assert str(info.value) == f"No data received from {server.endpoint} in the last 200 ms"
            server.feed({"s": {"n": 1}})  # answers the request that timed out
            server.feed({"s": {"n": 2}})
            client._timeout = TIMEOUT  # (private) a long timeout for the socket made next
            d, _ = client.next()
    assert d == {"s": {"n": 2}}, "the stale reply to the timed-out request is discarded"


def test_peer_req_client_returns_stale_reply_after_timeout(endpoint):
    """Real karabo_bridge behaviour: the next call returns the reply to the old request."""
    with kbstream.ServerInThread(endpoint) as server:
        client = kb.Client(server.endpoint, timeout=0.2)
        try:
            with pytest.raises(TimeoutError):
                client.next()
            server.feed({"s": {"n": 1}})
            server.feed({"s": {"n": 2}})
            client._socket.setsockopt(zmq.RCVTIMEO, TIMEOUT * 1000)
            d, _ = client.next()
        finally:
            client._context.destroy(linger=0)
    assert d == {"s": {"n": 1}}


def test_client_does_not_destroy_passed_context(ipc_endpoint):
    ctx = zmq.Context()
    try:
        with kbstream.Client(ipc_endpoint, context=ctx):
            pass
        assert not ctx.closed
        s = ctx.socket(zmq.PAIR)  # still usable
        s.close(linger=0)
    finally:
        ctx.term()


def test_peer_client_destroys_passed_context(ipc_endpoint):
    ctx = zmq.Context()
    with kb.Client(ipc_endpoint, context=ctx):
        pass
    assert ctx.closed


def test_bad_message_raises_and_client_stays_usable(ipc_endpoint):
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.bind(ipc_endpoint)
    try:
        with kbstream.Client(ipc_endpoint, sock="PULL", timeout=TIMEOUT) as client:
            push.send_multipart([b"\x81\xa6source", b"\x80", b"x"])
            with pytest.raises(errors.ProtocolError, match="odd number of frames"):
                client.next()
            push.send_multipart([b"\xc1", b"\x80"])
            with pytest.raises(errors.ProtocolError, match="invalid msgpack byte"):
                client.next()
            push.send_multipart(kbstream.serialize({"s": {"ok": True}}), copy=False)
            assert client.next()[0] == {"s": {"ok": True}}
    finally:
        push.close()
        ctx.term()


def test_rep_bad_request_keeps_the_train(ipc_endpoint):
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.rcvtimeo = TIMEOUT * 1000
    try:
        with kbstream.ServerInThread(ipc_endpoint) as server:
            server.feed({"s": {"n": 1}})
            req.connect(ipc_endpoint)
            req.send(b"hello")
            assert req.recv_multipart() == [b"Error: bad request hello"]
            req.send(b"next")
            d, _ = kbstream.deserialize(req.recv_multipart())
            assert d == {"s": {"n": 1}}, "the train survives a bad request"
            assert wait_for(lambda: server.trains_sent == 1)
            assert server.bad_requests == 1
            # a kbstream client keeps working after another client misbehaved
            with kbstream.Client(ipc_endpoint, timeout=TIMEOUT) as client:
                server.feed({"s": {"n": 2}})
                assert client.next()[0] == {"s": {"n": 2}}
    finally:
        req.close()
        ctx.term()


def test_peer_rep_bad_request_loses_the_train(ipc_endpoint):
    """Real karabo_bridge behaviour, for comparison.

    See docs/wire/karabo-bridge-protocol.md, section 2.
    """
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.rcvtimeo = TIMEOUT * 1000
    try:
        with kb.ServerInThread(ipc_endpoint) as server:
            server.feed({"s": {"n": 1}})
            server.feed({"s": {"n": 2}})
            req.connect(ipc_endpoint)
            req.send(b"hello")
            assert req.recv_multipart() == [b"Error: bad request hello"]
            req.send(b"next")
            d, _ = kb.deserialize(req.recv_multipart())
            assert d == {"s": {"n": 2}}
    finally:
        req.close()
        ctx.term()


def test_kbstream_client_reports_server_error_text(ipc_endpoint):
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    rep.bind(ipc_endpoint)
    try:
        with kbstream.Client(ipc_endpoint, timeout=TIMEOUT) as client:
            t = threading.Thread(target=lambda: (rep.recv_multipart(), rep.send(b"Error: busy")))
            t.start()
            with pytest.raises(errors.ServerError, match=r"^server replied 'Error: busy'$"):
                client.next()
            t.join()
    finally:
        rep.close()
        ctx.term()


@pytest.mark.parametrize("sock", ["REP", "PUSH", "PUB"])
def test_stop_never_blocks_on_slow_or_dead_client(ipc_endpoint, sock):
    server = kbstream.ServerInThread(ipc_endpoint, sock=sock, maxlen=2)
    server.start()
    ctx = zmq.Context()
    peer = ctx.socket({"REP": zmq.REQ, "PUSH": zmq.PULL, "PUB": zmq.SUB}[sock])
    peer.linger = 0
    peer.rcvhwm = 1
    peer.connect(ipc_endpoint)
    if sock == "REP":
        peer.send(b"next")  # asks and never reads
    big = {"s": {"a": np.zeros(1 << 20, np.uint8)}}
    server.feed(big)
    server.feed(big)
    if sock == "PUB":
        for _ in range(10):  # PUB never waits: nothing accumulates
            server.feed(big, timeout=TIMEOUT)
        assert wait_for(lambda: server.queue_depth == 0)
    else:
        with pytest.raises(queue.Full):
            for _ in range(10):  # the queue is bounded: memory cannot grow
                server.feed(big, timeout=0.2)
    peer.close()  # the client dies
    ctx.term()
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive(), "stop() blocked"
    with pytest.raises(errors.ServerStateError):
        server.feed(big)


def test_feed_queue_full_non_blocking(ipc_endpoint):
    with kbstream.ServerInThread(ipc_endpoint, sock="PUSH", maxlen=1) as server:
        server.feed({"s": {}})
        with pytest.raises(queue.Full):
            for _ in range(5):
                server.feed({"s": {}}, block=False)
        assert server.queue_depth <= 1


def test_pub_counts_trains_without_subscriber(ipc_endpoint):
    with kbstream.ServerInThread(ipc_endpoint, sock="PUB") as server:
        for i in range(5):
            server.feed({"s": {"i": i}})
        assert wait_for(lambda: server.trains_dropped == 5)
        assert server.trains_sent == 0
        with kbstream.Client(ipc_endpoint, sock="SUB", timeout=TIMEOUT) as client:
            d, _ = feed_until_received(server, client, "2.2")
        assert wait_for(lambda: server.trains_sent >= 1)
        assert server.stats()["trains_dropped"] >= 5


def test_counters_and_rate(ipc_endpoint):
    with kbstream.ServerInThread(ipc_endpoint, sock="PUSH") as server:
        with kbstream.Client(ipc_endpoint, sock="PULL", timeout=TIMEOUT) as client:
            for i in range(4):
                server.feed({"s": {"i": i}})
            got = [client.next()[0]["s"]["i"] for _ in range(4)]
        assert wait_for(lambda: server.trains_sent == 4)
        stats = server.stats()
    assert got == [0, 1, 2, 3]
    assert stats["trains_sent"] == 4 and stats["trains_dropped"] == 0 and stats["errors"] == 0
    assert stats["rate"] > 0 and stats["queue_depth"] == 0


def test_bad_train_is_skipped_and_counted(ipc_endpoint, caplog):
    with kbstream.ServerInThread(ipc_endpoint, sock="PUSH") as server:
        with kbstream.Client(ipc_endpoint, sock="PULL", timeout=TIMEOUT) as client:
            server.feed({"s": {"bad": object()}})
            server.feed({"s": {"good": 1}})
            assert client.next()[0] == {"s": {"good": 1}}
        assert server.errors == 1
    assert "cannot serialize" in caplog.text


def test_constructor_errors(ipc_endpoint):
    with pytest.raises(ValueError, match=r"^Unsupported socket type: DEALER$"):
        kbstream.ServerInThread(ipc_endpoint, sock="DEALER")
    with pytest.raises(ValueError, match=r"^Unknown protocol version 2.1$"):
        kbstream.ServerInThread(ipc_endpoint, protocol_version="2.1")
    with pytest.raises(NotImplementedError, match=r"^Unsupported socket: DEALER$"):
        kbstream.Client(ipc_endpoint, sock="DEALER")
    with pytest.raises(ValueError, match=r"^Only serialization supported is msgpack$"):
        kbstream.Client(ipc_endpoint, ser="pickle")
    server = kbstream.ServerInThread(ipc_endpoint)
    server.start()
    with pytest.raises(errors.ServerStateError):
        server.start()
    server.stop()
    server.stop()  # idempotent
    assert server.stats()["trains_sent"] == 0


def test_client_iteration(ipc_endpoint):
    with kbstream.ServerInThread(ipc_endpoint, sock="PUSH") as server:
        with kbstream.Client(ipc_endpoint, sock="PULL", timeout=TIMEOUT) as client:
            for i in range(3):
                server.feed({"s": {"i": i}})
            assert iter(client) is client
            got = [d["s"]["i"] for d, _ in (next(client) for _ in range(3))]
    assert got == [0, 1, 2]
    with pytest.raises(errors.ServerStateError):
        client.next()


def _sub(ctx, endpoint, *topics):
    """A subscriber that sends every subscription it is given, duplicates included (an
    XSUB, as a raw peer can): a SUB socket would filter the duplicates itself."""
    s = ctx.socket(zmq.XSUB)
    s.linger = 0
    s.connect(endpoint)
    for t in topics:
        s.send(b"\x01" + t)
    return s


def _settle_counts(server, n):
    """Feed ``n`` trains one by one; return how (sent, dropped) grew."""
    sent, dropped = server.trains_sent, server.trains_dropped
    for i in range(n):
        server.feed({"s": {"i": i}})
        assert wait_for(lambda: server.trains_sent + server.trains_dropped
                        == sent + dropped + i + 1)
    return server.trains_sent - sent, server.trains_dropped - dropped


def test_pub_after_a_double_subscriber_left_counts_trains_as_dropped(ipc_endpoint):
    """A subscriber that subscribed twice and left: later trains reach nobody."""
    ctx = zmq.Context()
    try:
        with kbstream.ServerInThread(ipc_endpoint, sock="PUB") as server:
            sub = _sub(ctx, ipc_endpoint, b"", b"")
            assert wait_for(lambda: _settle_counts(server, 1)[0] == 1)  # subscribed
            sub.close(linger=0)
            # once the disconnection has reached the server, nothing is sent any more
            assert wait_for(lambda: _settle_counts(server, 1) == (0, 1))
            assert _settle_counts(server, 20) == (0, 20)
    finally:
        ctx.term()


def test_pub_counts_only_trains_some_subscription_matches(ipc_endpoint):
    """Two subscribers, one leaves: still sent. A subscriber whose topic matches no train
    (the first frame is a msgpack header) receives nothing: dropped."""
    ctx = zmq.Context()
    try:
        with kbstream.ServerInThread(ipc_endpoint, sock="PUB") as server:
            a = _sub(ctx, ipc_endpoint, b"")
            b = _sub(ctx, ipc_endpoint, b"")
            assert wait_for(lambda: _settle_counts(server, 1)[0] == 1)
            a.close(linger=0)
            time.sleep(0.3)
            assert _settle_counts(server, 5) == (5, 0)
            other = _sub(ctx, ipc_endpoint, b"no such topic")
            b.close(linger=0)
            assert wait_for(lambda: _settle_counts(server, 1) == (0, 1))
            assert _settle_counts(server, 5) == (0, 5)
            other.close(linger=0)
    finally:
        ctx.term()
