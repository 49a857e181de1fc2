"""Fuzzing the compiled decoder against the pure one with mutated archives.

Valid archives of random Hashes are damaged (bytes flipped, lengths replaced by
lies, bytes inserted or cut, the archive split into arbitrary buffers) and fed
to both decoders.  They must agree exactly: the same exception class, message
and offset, or Hashes that encode to the same bytes.  Any crash of the compiled
code kills the test run.  The number of examples is bounded (``FUZZ_EXAMPLES``,
default 400) so the test takes a few seconds.  With a small object limit
(``max_objects``) both must also fail at the same object, with the same
LimitError.
"""

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hashstrategies import hashes
from kbhash import _codec, _pure

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
LIES = [0, 1, 2, 3, 4, 7, 8, 255, 256, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def damaged(draw):
    data = bytearray(_pure.encode_bytes(draw(hashes("all"))))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "lie", "insert", "cut", "type"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif kind == "lie" and len(data) >= 4:
            i = min(i, len(data) - 4)
            data[i : i + 4] = struct.pack("<I", draw(st.sampled_from(LIES + [len(data), len(data) - i])))
        elif kind == "type" and len(data) >= 4:
            i = min(i, len(data) - 4)
            data[i : i + 4] = struct.pack("<I", draw(st.integers(0, 60)))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "cut":
            del data[i : i + draw(st.integers(1, 8))]
    return bytes(data)


def outcome(codec, data, **kwargs):
    try:
        h = codec.decode(data, **kwargs)
    except Exception as e:  # compared below: both must raise the same
        return ("error", type(e).__name__, str(e), getattr(e, "offset", None))
    try:
        return ("ok", _pure.encode_bytes(h))
    except Exception as e:
        return ("unencodable", type(e).__name__, str(e))


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(damaged())
def test_compiled_decoder_agrees_with_pure_on_damaged_archives(data):
    a = outcome(_codec, data)
    b = outcome(_pure, data)
    assert a == b
    if a[0] == "error":
        assert a[1] in ("DecodeError", "TruncatedError", "UnknownTypeError"), a


@FUZZ
@given(damaged(), st.integers(0, 40))
def test_object_limit_agrees_on_damaged_archives(data, max_objects):
    a = outcome(_codec, data, max_objects=max_objects)
    b = outcome(_pure, data, max_objects=max_objects)
    assert a == b
    if a[0] == "error":
        assert a[1] in ("DecodeError", "TruncatedError", "UnknownTypeError", "LimitError"), a


@FUZZ
@given(hashes("all"), st.integers(0, 60))
def test_object_limit_agrees_on_valid_archives(h, max_objects):
    data = _pure.encode_bytes(h)
    a = outcome(_codec, data, max_objects=max_objects)
    assert a == outcome(_pure, data, max_objects=max_objects)
    assert a[0] == "ok" or a[1] == "LimitError", a


@FUZZ
@given(damaged(), st.lists(st.integers(0, 400), max_size=4), st.integers(0, 12))
def test_object_limit_agrees_on_split_archives(data, cuts, max_objects):
    cuts = sorted(min(c, len(data)) for c in cuts)
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    a = outcome(_codec, pieces, max_objects=max_objects)
    assert a == outcome(_pure, pieces, max_objects=max_objects)
    assert a[:2] != ("error", "TypeError"), a


@FUZZ
@given(damaged(), st.lists(st.integers(0, 400), max_size=4))
def test_split_buffers_agree(data, cuts):
    cuts = sorted(min(c, len(data)) for c in cuts)
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    a = outcome(_codec, pieces)
    b = outcome(_pure, pieces)
    assert a == b
    if a[0] == "ok":
        assert a == outcome(_codec, data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes(data):
    assert outcome(_codec, data) == outcome(_pure, data)
