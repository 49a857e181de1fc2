"""Pipeline wire format against the bytes of a real Karabo C++ session."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import kbhash
from kbhash import Hash, Timestamp
from kbstream.pipeline import ChannelMetaData, PipelineProtocolError, wire

SESSION = Path(__file__).resolve().parents[1] / "data" / "karabo_pipeline_session.json"
with open(SESSION) as _f:
    REMOTE = json.load(_f)["variants"]["remote"]
META = ChannelMetaData("capSender:output", Timestamp(1700000000, 5 * 10**17, 4242))


def _join(bufs):
    return b"".join(bytes(memoryview(b).cast("B")) for b in bufs)


def test_hello_and_updates_are_byte_identical():
    stream = bytes.fromhex(REMOTE["input_to_output"]["hex"])
    hello = wire.hello("capReceiver:input", "copy", "wait", 2)
    upd = wire.update("capReceiver:input")
    assert stream == hello + upd * 3


def test_data_and_eos_messages_are_byte_identical():
    stream = bytes.fromhex(REMOTE["output_to_input"]["hex"])
    m0 = _join(wire.data_message([(Hash("a", 1), META)]))
    arr = np.arange(6, dtype=np.uint16).reshape(2, 3)
    m1 = _join(wire.data_message([(Hash("a", 2), META), (Hash("a", 3, "arr", arr), META)]))
    assert stream == m0 + m1 + wire.eos_message()


def test_data_message_payload_is_zero_copy():
    arr = np.arange(1024, dtype=np.uint16)
    bufs = wire.data_message([(Hash("arr", arr), META)])
    assert any(np.shares_memory(np.frombuffer(b, np.uint8), arr) for b in bufs[1:])


def test_credit_window_extension_is_appended_last():
    plain = wire.hello("x:in", "copy", "wait", 2)
    ext = wire.hello("x:in", "copy", "wait", 2, credit_window=4)
    h = kbhash.decode(ext[4:])
    assert list(h) == ["reason", "instanceId", "memoryLocation", "dataDistribution", "onSlowness",
                       "maxQueueLength", "kbCreditWindow"]
    assert h["kbCreditWindow"] == 4 and h.get_type("kbCreditWindow") == kbhash.HashType.UINT32
    del h["kbCreditWindow"]
    assert kbhash.encode_bytes(h) == plain[4:]  # everything a Karabo output reads is unchanged


def _header(**keys):
    h = Hash()
    for k, (v, t) in keys.items():
        h.set(k, v, type=t)
    return kbhash.encode_bytes(h)


T = kbhash.HashType


def test_parse_header_of_captured_messages():
    for msg in REMOTE["output_to_input"]["messages"]:
        header = bytes.fromhex(msg["header_hex"])
        m = wire.parse_header(header, msg["body_length"])
        assert [sum(b) for b in m.buffers] == [it["length"] for it in msg.get("items", [])]
        if msg["kind"] == "data":
            assert all(x == META for x in m.metas)


def test_parse_header_accepts_mdl_style_without_layout():
    info = [META.to_hash()]
    header = _header(nData=(1, T.UINT32), byteSizes=([18], T.VECTOR_UINT32), sourceInfo=(info, T.VECTOR_HASH))
    m = wire.parse_header(header, 18)
    assert m.buffers == [[18]]


@pytest.mark.parametrize(
    "keys, body, message",
    [
        ({"sourceInfo": ([META.to_hash()], T.VECTOR_HASH)}, 0, "neither _bufferSetLayout_ nor byteSizes"),
        ({"sourceInfo": ([META.to_hash()], T.VECTOR_HASH), "byteSizes": ([10], T.VECTOR_UINT32)}, 11,
         "add up to 10 bytes but the body has 11"),
        ({"sourceInfo": ([], T.VECTOR_HASH), "byteSizes": ([10], T.VECTOR_UINT32)}, 10, "1 entries for 0 items"),
        ({"channelId": (0, T.UINT32), "chunkId": (0, T.UINT32)}, 0, "'local'"),
        ({"endOfStream": (1, T.INT32)}, 0, "not a BOOL"),
    ],
)
def test_parse_header_rejects_inconsistent_headers(keys, body, message):
    with pytest.raises(PipelineProtocolError, match=message):
        wire.parse_header(_header(**keys), body)


def test_parse_header_rejects_garbage():
    with pytest.raises(PipelineProtocolError, match="not a Hash archive"):
        wire.parse_header(b"\xff" * 10, 0)
    with pytest.raises(PipelineProtocolError, match="not a Hash archive"):
        wire.parse_control(struct.pack("<I", 5))


def test_metadata_coercion():
    m = ChannelMetaData.coerce({"source": "s", "tid": 7, "timestamp": 1700000000.5}, "default")
    assert (m.source, m.tid, m.timestamp.sec) == ("s", 7, 1700000000)
    assert ChannelMetaData.coerce(None, "d").source == "d"
    assert ChannelMetaData.coerce(Timestamp(1, 2, 3), "d").tid == 3
    assert ChannelMetaData.from_hash(META.to_hash()) == META
    with pytest.raises(TypeError):
        ChannelMetaData.coerce(5, "d")
