"""kbhash against Karabo's own implementations, run for real in the side environment.

Random typed Hashes go both ways: kbhash's archive must load in karabind and
karabo.native to the same typed content, and the archive those build from the
same content must be byte-identical with kbhash's and decode to it.
"""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import kbhash
from hashcontent import hash_to_content
from hashstrategies import hashes
from kbhash import Hash, HashType

pytestmark = pytest.mark.karabo

def same_bytes_unless_nan(theirs, ours, content):
    """Byte equality; NaNs travel to the peer as JSON "nan", which drops their sign and payload."""
    if '"nan"' in json.dumps(content):
        return
    assert theirs.hex() == ours.hex()


SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(h=hashes("karabind"))
def test_karabind_loads_kbhash_archives_and_saves_identical_bytes(karabo_peer, h):
    data = kbhash.encode_bytes(h)
    content = hash_to_content(h)
    assert karabo_peer.kb_load(data) == content
    theirs = karabo_peer.kb_save(content)
    same_bytes_unless_nan(theirs, data, content)
    assert hash_to_content(kbhash.decode(theirs)) == content


@SETTINGS
@given(h=hashes("native"))
def test_karabo_native_loads_kbhash_archives_and_saves_identical_bytes(karabo_peer, h):
    data = kbhash.encode_bytes(h)
    content = hash_to_content(h)
    assert karabo_peer.nat_load(data) == content
    theirs = karabo_peer.nat_save(content)
    same_bytes_unless_nan(theirs, data, content)
    assert hash_to_content(kbhash.decode(theirs)) == content


def test_detector_hash_both_ways(karabo_peer):
    """A JUNGFRAU-like Hash (smaller frames) with timestamps, built as users do."""
    rng = np.random.default_rng(7)
    h = Hash()
    h["data.adc"] = rng.integers(0, 2**14, size=(4, 128, 256), dtype=np.uint16)
    h["data.gain"] = rng.integers(0, 3, size=(4, 128, 256), dtype=np.uint8)
    h["data.frameNumber"] = np.arange(4, dtype=np.uint64)
    h.set("data.trainId", 1234567890, type=HashType.UINT64)
    h["data.temperature"] = 21.5
    h["header.detector"] = "SPB_IRDA_JF4M/DET/JNGFR01"
    h.set_timestamp("data", kbhash.Timestamp(1700000000, 123456789 * 10**9, 1234567890))
    data = kbhash.encode_bytes(h)
    content = hash_to_content(h)
    assert karabo_peer.kb_load(data) == content
    assert karabo_peer.kb_save(content) == data
    assert karabo_peer.nat_load(data) == content


@pytest.mark.parametrize(
    "value, expected",
    [
        (1, "INT32"),
        (-1, "INT32"),
        (2**31, "UINT32"),
        (2**32, "INT64"),
        (-(2**31) - 1, "INT64"),
        (2**63, "UINT64"),
        (1.5, "DOUBLE"),
        (True, "BOOL"),
        ("s", "STRING"),
        (b"ab", "VECTOR_CHAR"),
        (None, "NONE"),
        ([1, 2], "VECTOR_INT32"),
        ([1, 2**31], "VECTOR_UINT32"),
        ([-1, 2**31], "VECTOR_INT64"),
        ([2**63], "VECTOR_UINT64"),
        ([1.0], "VECTOR_DOUBLE"),
        (["a"], "VECTOR_STRING"),
        ([], "VECTOR_STRING"),
        ([True], "VECTOR_BOOL"),
        (np.uint16(3), "UINT16"),
        (np.float32(0.5), "FLOAT"),
        (1 + 2j, "COMPLEX_DOUBLE"),
    ],
)
def test_inferred_types_are_karabinds(karabo_peer, value, expected):
    """What kbhash infers for a Python value is what karabind writes for it."""
    h = Hash("v", value)
    assert hash_to_content(h)[0]["type"] == expected
    loaded = karabo_peer.kb_load(kbhash.encode_bytes(h))
    assert loaded[0]["type"] == expected


# ---------------------------------------------------------------- where the real peers differ


def test_karabind_writes_big_endian_arrays_as_little_endian(karabo_peer):
    """isBigEndian describes the payload (docs/wire/karabo-hash-binary.md, section 5).
    karabind's binding ignores the numpy byte order: it copies big-endian bytes but writes
    isBigEndian=false, so the values change.  kbhash writes the flag and keeps the values."""
    values = [1, 2, 3]
    theirs = kbhash.decode(karabo_peer.kb_save_array(">u2", values, [3]))["x"]
    assert theirs.dtype == np.dtype("<u2")
    assert theirs.tolist() == [256, 512, 768]  # the bytes of big-endian 1, 2, 3 read as little-endian
    ours = kbhash.encode_bytes(Hash("x", np.array(values, ">u2")))
    loaded = karabo_peer.kb_load(ours)
    children = {c["key"]: c["value"] for c in loaded[0]["value"]}
    assert children["isBigEndian"] is True and children["data"]["hex"] == "000100020003"
    assert kbhash.decode(ours)["x"].tolist() == values


def test_karabind_loads_a_truncated_archive_kbhash_refuses_it(karabo_peer):
    """karabind's reader does no bounds checks: an archive announcing one node and holding
    none loads as a node with an empty key.  kbhash reports the truncation."""
    data = bytes.fromhex("01000000")
    loaded = karabo_peer.kb_load(data)
    assert len(loaded) == 1 and loaded[0]["key"] == ""
    with pytest.raises(kbhash.TruncatedError):
        kbhash.decode(data)
