"""The bridge package's borders: declared codec API, what each module loads, the one
metadata builder, and the life cycle rule of the servers."""

import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import kbstream
from kbstream import errors
from kbstream.bridge import _codec, _pure, _rules, sender as bridge_sender
from kbstream.bridge import source_metadata, timestamp_fields


def _loaded_after(code, **env):
    """Module names loaded by a fresh interpreter that runs ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, env={**os.environ, **env})
    return set(out.stdout.split())


@pytest.mark.parametrize("codec", [_codec, _pure], ids=["cython", "pure"])
def test_both_codecs_provide_exactly_the_declared_names(codec):
    assert list(codec.__all__) == list(_rules.PUBLIC_API)
    for name in _rules.PUBLIC_API:
        assert hasattr(codec, name), name
    assert codec.ENCODE_VERSIONS == _rules.ENCODE_VERSIONS
    assert codec.MAX_DEPTH == _rules.MAX_DEPTH and codec.MAX_NDIM == _rules.MAX_NDIM
    assert codec.MAX_CONTAINERS == _rules.MAX_CONTAINERS


def test_both_codecs_agree_on_the_declared_functions():
    train = {"s": {"a": np.arange(6, dtype=np.uint16).reshape(2, 3), "x": 1.5, "n": "t"}}
    meta = {"s": source_metadata("s", 10, 1700000000, 5)}
    for version in _rules.ENCODE_VERSIONS:
        a = [bytes(f) for f in _codec.serialize(train, meta, version)]
        b = [bytes(f) for f in _pure.serialize(train, meta, version)]
        assert a == b
        da, ma = _codec.deserialize(a)
        db, mb = _pure.deserialize(b)
        assert ma == mb == meta
        assert da["s"]["a"].tolist() == db["s"]["a"].tolist() == train["s"]["a"].tolist()
    assert _codec.packb([1, "a", b"b"]) == _pure.packb([1, "a", b"b"])
    assert _codec.unpackb(b"\x93\x01\xa1a\xc4\x01b") == _pure.unpackb(b"\x93\x01\xa1a\xc4\x01b")
    assert set(_codec.make_dummy_timestamps()) == set(_pure.make_dummy_timestamps())
    assert isinstance(_codec.release_pool(), int) and _pure.release_pool() == 0


def test_compiled_codec_loads_neither_its_twin_nor_zmq():
    loaded = _loaded_after("import kbstream.bridge._codec")
    assert "kbstream.bridge._codec" in loaded
    assert "kbstream.bridge._pure" not in loaded
    assert "zmq" not in loaded


def test_pure_codec_loads_neither_the_compiled_one_nor_zmq():
    loaded = _loaded_after("import kbstream.bridge._pure", KB_IMPL="pure")
    assert "kbstream.bridge._pure" in loaded
    assert "kbstream.bridge._codec" not in loaded and "zmq" not in loaded


@pytest.mark.parametrize("source", ["_codec.pyx", "_pure.py"])
def test_codec_sources_import_only_the_rules_the_errors_and_numpy(source):
    path = os.path.join(os.path.dirname(_rules.__file__), source)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    imported = set()
    for m in re.finditer(r"^\s*(?:from\s+(\S+)\s+c?import|c?import\s+(\S+))", text, re.M):
        imported.add((m.group(1) or m.group(2)).split(".")[0] if not (m.group(1) or "").startswith(".")
                     else m.group(1))
    project = {name for name in imported if name.startswith(".")}
    assert project <= {"._rules", "..errors"}, project
    third_party = imported - project - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "cpython", "libc", "cython"}, third_party


@pytest.mark.parametrize("package", ["kbstream", "kbstream.pipeline", "kbstream.broker"])
def test_importing_a_subpackage_loads_neither_zmq_nor_the_bridge(package):
    loaded = _loaded_after(f"import {package}")
    assert "zmq" not in loaded
    assert not {m for m in loaded if m.startswith("kbstream.bridge")}


def test_bridge_names_at_the_top_are_loaded_on_first_use():
    loaded = _loaded_after("import kbstream; kbstream.serialize")
    assert "kbstream.bridge.codec" in loaded and "zmq" not in loaded  # codec only
    loaded = _loaded_after("import kbstream; kbstream.Client")
    assert "zmq" in loaded and "kbstream.bridge.client" in loaded
    assert kbstream.Client is kbstream.bridge.Client
    assert kbstream.serialize is kbstream.bridge.serialize
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        kbstream.nothing_here  # noqa: B018


def test_compiled_codec_recognises_zmq_frames_once_zmq_is_loaded():
    import zmq

    frames = [zmq.Frame(bytes(f)) for f in
              _codec.serialize({"s": {"a": np.arange(4, dtype=np.uint8)}})]
    data, _ = _codec.deserialize(frames)
    assert data["s"]["a"].base is not None and data["s"]["a"].tolist() == [0, 1, 2, 3]


def test_one_metadata_builder():
    assert timestamp_fields(1700000000, 123) == {
        "timestamp": 1700000000 + 123e-18,
        "timestamp.sec": "1700000000",
        "timestamp.frac": "000000000000000123",
    }
    meta = source_metadata("SRC", 42, 1700000000, 5 * 10**17)
    assert list(meta) == ["source", "timestamp", "timestamp.sec", "timestamp.frac",
                          "timestamp.tid"]
    assert meta["timestamp"] == 1700000000.5 and meta["timestamp.tid"] == 42
    assert source_metadata("SRC", 7) == {"source": "SRC", "timestamp.tid": 7}


def test_flattened_hash_metadata_uses_the_builder():
    import kbhash

    h = kbhash.Hash("data.x", 1)
    h.set_timestamp("data.x", kbhash.Timestamp(1700000000, 25 * 10**16, 99))
    frames = kbstream.serialize({"SRC": h})
    _, meta = kbstream.deserialize(frames)
    assert meta["SRC"] == source_metadata("SRC", 99, 1700000000, 25 * 10**16)


def test_server_life_cycle_rule(ipc_endpoint):
    server = kbstream.ServerInThread(ipc_endpoint, sock="PUSH")
    assert not server.started
    assert server.start() is server
    with pytest.raises(errors.ServerStateError, match="already started"):
        server.start()
    server.close()
    server.close()  # idempotent
    server.stop()
    assert server.closed
    with pytest.raises(errors.StateError, match="start\\(\\) on a closed ServerInThread"):
        server.start()
    with pytest.raises(errors.ServerStateError, match="feed\\(\\) on a closed"):
        server.feed({"s": {}})


def test_with_starts_an_unstarted_server_and_closes_it(ipc_endpoint):
    with kbstream.ServerInThread(ipc_endpoint, sock="PUSH") as server:
        assert server.started and not server.closed
    assert server.closed


def test_a_server_closed_before_start_releases_its_socket(ipc_endpoint):
    kbstream.ServerInThread(ipc_endpoint, sock="REP").close()
    with kbstream.ServerInThread(ipc_endpoint, sock="REP"):  # the endpoint is free again
        pass


def test_bind_failure_is_a_typed_error(tcp_endpoint):
    with kbstream.ServerInThread(tcp_endpoint, sock="PUSH"):
        with pytest.raises(errors.BindError) as info:
            kbstream.ServerInThread(tcp_endpoint, sock="PUSH")
    assert isinstance(info.value, OSError) and info.value.endpoint == tcp_endpoint


def test_sender_run_skips_a_bad_train_and_reports_it(ipc_endpoint):
    """The loop every server uses: an unencodable train is skipped, the next one sent."""
    import zmq

    trains = [({"s": {"x": object()}}, None, "bad"), ({"s": {"x": 1}}, None, "good"), None]
    outcomes, failed = [], []
    stop = threading.Event()
    s = bridge_sender.Sender(ipc_endpoint, "PUSH")
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(ipc_endpoint)
    try:
        ended = bridge_sender.run(s, lambda: trains.pop(0), stop,
                                  on_sent=lambda t, o, _tr: outcomes.append((t, o)),
                                  on_error=lambda t, e: failed.append((t, type(e))))
        got = kbstream.deserialize(pull.recv_multipart())
    finally:
        pull.close(linger=0)
        ctx.term()
        s.close()
    assert ended is True
    assert failed == [("bad", errors.EncodeError)]
    assert outcomes == [("good", bridge_sender.SENT)]
    assert got[0] == {"s": {"x": 1}}


def test_sender_stops_waiting_when_asked(ipc_endpoint):
    s = bridge_sender.Sender(ipc_endpoint, "REP")
    stop = threading.Event()
    stop.set()
    try:
        assert s.send(kbstream.serialize({"s": {"x": 1}}), stop) == (bridge_sender.STOPPED, None)
    finally:
        s.close()
    assert s.sent == 0
