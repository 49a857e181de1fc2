"""Hostile peers: bounds on what one bridge message may cost the receiver.

* decode amplification: a message decodes into at most ``max_containers`` msgpack maps
  and arrays (all frames together); the compiled codec counts them on every path
  (templates, remembered values, header fast path and memo) exactly as the pure twin;
* the client's receive limit (``ZMQ_MAXMSGSIZE``);
* the REP server's bound on a whole request.

Memory is measured in child processes (VmHWM / VmRSS of /proc/self/status), never by time.
See docs/safety-bridge.md.
"""

import json
import os
import subprocess
import sys

import msgpack
import numpy as np
import pytest

import kbstream
from kbstream import errors
from kbstream.bridge import _codec, _pure, _rules, source_metadata

from test_bridge_support import canon, example_train, rich_train


def _run_child(script, *args, timeout=300):
    """Run ``script`` in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                         capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- decode amplification: the container budget ---------------------------------------


def _count_containers(frames):
    """Maps and arrays in a message, counted with the msgpack package (an oracle apart
    from both codecs): every msgpack frame of the message, at every depth."""
    def count(v):
        if isinstance(v, dict):
            return 1 + sum(count(x) for x in v.values())
        if isinstance(v, list):
            return 1 + sum(count(x) for x in v)
        return 0

    def load(f):
        return msgpack.unpackb(bytes(f), raw=False, strict_map_key=False)

    if len(frames) == 1:
        return count(load(frames[0]))
    total = 0
    for i in range(0, len(frames), 2):
        hdr = load(frames[i])
        total += count(hdr)
        if hdr["content"] == "msgpack":
            total += count(load(frames[i + 1]))
    return total


def _stream_train(k, *, renamed=False, meta_renamed=False, flat_lists=False, sources=2):
    """Train ``k`` of a stream: the train id and one value change every train, nested
    lists and maps in the payload; ``renamed``: one payload key in the middle differs from
    the other trains; ``meta_renamed``: so does one metadata key, after a list value;
    ``flat_lists``: every payload value is a list (nothing for the decoder to remember)."""
    data, meta = {}, {}
    for j in range(sources):
        src = f"DET/JF{j:02d}:daqOutput"
        props = {
            "data.adc": np.full((2, 3), k, np.uint16),
            "header.pulseCount": 16,
            "header.f": 0.5 + k,
            "header.nested": [k, [1, 2], {"a": [k, {}]}],
            "header.s": "value",
            "header.map": {"x": {"y": [], "z": [k]}},
            "data.trainId": 10_000 + k,
            "data.cells": np.arange(4, dtype=np.uint8),
        }
        if flat_lists:
            props = {key: ([k, [k]] if key == "header.f" else [k]) for key in props}
        if renamed:
            props = {("header.S" if key == "header.s" else key): v for key, v in props.items()}
        data[src] = props
        m = source_metadata(src, 10_000 + k, 1_700_000_000 + k, 0)
        if meta_renamed:
            # same number of keys, a list before the one that differs
            m = {("origin" if key == "timestamp.sec" else key):
                 ([v, [k]] if key == "timestamp" else v) for key, v in m.items()}
        meta[src] = m
    return data, meta


def _frames(data, meta, version="2.2"):
    return [bytes(f) for f in _pure.serialize(data, meta, version)]


def _outcome(mod, frames, limit):
    try:
        return ("ok", canon(mod.deserialize(frames, max_containers=limit)))
    except errors.ProtocolError as e:
        return ("error", type(e), str(e), e.frame_index, e.offset)


MESSAGES = {
    "example-2.2": _frames(*example_train()),
    "example-1.0": _frames(*example_train(), "1.0"),
    "rich-2.2": _frames(*rich_train()),
    "rich-1.0": _frames(*rich_train(), "1.0"),
    "stream-2.2": _frames(*_stream_train(5)),
    "stream-renamed-2.2": _frames(*_stream_train(6, renamed=True)),
    "stream-meta-renamed-2.2": _frames(*_stream_train(7, meta_renamed=True)),
    "stream-1.0": _frames(*_stream_train(5), "1.0"),
    "lists-2.2": _frames(*_stream_train(5, flat_lists=True)),
    "lists-renamed-2.2": _frames(*_stream_train(6, flat_lists=True, renamed=True)),
}
# what the compiled decoder saw before the message: nothing new, the same message (every
# value remembered), the train before (same keys, some values differ)
WARMUPS = {
    "none": [],
    "same": None,
    "previous": [_frames(*_stream_train(4)), _frames(*_stream_train(3))],
    "lists": [_frames(*_stream_train(4, flat_lists=True))] * 2,
}


@pytest.mark.parametrize("warm", list(WARMUPS))
@pytest.mark.parametrize("name", list(MESSAGES))
def test_container_limit_compiled_and_pure_agree_at_every_limit(name, warm):
    """For every limit from 0 to one past the message's container count, both codecs give
    the same result or the same error (type, message, frame, offset), whatever the
    compiled decoder remembered from earlier messages (its fast paths all count)."""
    frames = MESSAGES[name]
    needed = _count_containers(frames)
    assert needed > 5
    warmups = [frames, frames] if WARMUPS[warm] is None else WARMUPS[warm]
    for limit in range(needed + 2):
        for w in warmups:
            _codec.deserialize(w)
        compiled = _outcome(_codec, frames, limit)
        pure = _outcome(_pure, frames, limit)
        assert compiled == pure, (limit, compiled, pure)
        if limit >= needed:
            assert compiled[0] == "ok", (limit, compiled)
        else:
            assert compiled[:2] == ("error", errors.AmplificationError), (limit, compiled)


@pytest.mark.parametrize("impl_name", ["cython", "pure"])
def test_exactly_at_the_limit_passes_one_more_raises(impl_name):
    mod = {"cython": _codec, "pure": _pure}[impl_name]
    n = 1000
    frame = msgpack.packb([{}] * (n - 1))          # the list and its n - 1 maps
    assert mod.unpackb(frame, max_containers=n) == [{}] * (n - 1)
    with pytest.raises(errors.AmplificationError) as info:
        mod.unpackb(frame, max_containers=n - 1)
    e = info.value
    assert isinstance(e, errors.ProtocolError) and isinstance(e, ValueError)
    # the list header takes 3 bytes (0xdc + 2), each empty map 1: the last map is too many
    assert (e.frame_index, e.offset, e.limit) == (0, 3 + n - 2, n - 1)
    assert str(e) == (f"frame 0: msgpack map or array at offset {3 + n - 2} is one more "
                      f"than the {n - 1} containers one message may hold")
    # one message: the budget spans its frames (header + payload here: 1 + 1 + 1 + 3)
    frames = [msgpack.packb({"source": "s", "content": "msgpack", "metadata": {}}),
              msgpack.packb({"a": [[], {}]})]
    assert mod.deserialize(frames, max_containers=6)[0] == {"s": {"a": [[], {}]}}
    with pytest.raises(errors.AmplificationError) as info:
        mod.deserialize(frames, max_containers=5)
    assert (info.value.frame_index, info.value.offset) == (1, 5)


def test_container_count_of_a_detector_train_is_small():
    """The default leaves room: a JUNGFRAU-like train needs a handful per source."""
    frames = MESSAGES["stream-2.2"]
    assert _count_containers(frames) < 64
    assert _rules.MAX_CONTAINERS == 1 << 20
    assert _codec.MAX_CONTAINERS == _pure.MAX_CONTAINERS == kbstream.bridge.MAX_CONTAINERS


@pytest.mark.parametrize("impl_name", ["cython", "pure"])
def test_max_containers_argument(impl_name):
    mod = {"cython": _codec, "pure": _pure}[impl_name]
    frames = MESSAGES["example-2.2"]
    plain = canon(mod.deserialize(frames))
    assert canon(mod.deserialize(frames, max_containers=None)) == plain
    assert canon(mod.deserialize(frames, max_containers=np.int64(1000))) == plain
    with pytest.raises(ValueError, match=r"^max_containers must be >= 0, got -1$"):
        mod.deserialize(frames, max_containers=-1)
    for bad in (1.5, True, "3"):
        with pytest.raises(TypeError, match=r"^max_containers must be an int or None, got"):
            mod.deserialize(frames, max_containers=bad)
    with pytest.raises(TypeError):
        mod.deserialize(frames, 1000)      # keyword only: the peer's signature stays


def test_front_deserialize_passes_the_limit():
    frames = MESSAGES["example-2.2"]
    assert canon(kbstream.deserialize(frames)) == canon(_pure.deserialize(frames))
    with pytest.raises(errors.AmplificationError):
        kbstream.deserialize(frames, max_containers=3)


_FLOOD = r"""
import json, sys
impl = sys.argv[1]
limit = None if sys.argv[2] == "default" else int(sys.argv[2])
if impl == "pure":
    from kbstream.bridge._pure import deserialize
else:
    from kbstream.bridge._codec import deserialize
from kbstream import errors

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

n = 16 * 1024 * 1024 - 8
# a 16 MiB 1.0 reply: {"s": [{}, {}, ... ]} (one byte per empty map)
frame = b"\x81\xa1s\xdd" + n.to_bytes(4, "big") + b"\x80" * n
base = status("VmHWM")
try:
    deserialize([frame], max_containers=limit)
    outcome = "decoded"
except errors.AmplificationError as e:
    outcome = type(e).__name__
print(json.dumps({"outcome": outcome, "growth": status("VmHWM") - base}))
"""


@pytest.mark.parametrize("impl_name", ["cython", "pure"])
def test_a_frame_of_empty_maps_stays_within_the_budget(impl_name):
    """The issue's reply: 16 MiB of empty maps made 16.7 M dicts (+1.2 GiB peak, both
    codecs, measured).  Now the decode stops after MAX_CONTAINERS: the peak is 1 M empty
    dicts (64 MiB) and the list slots filled so far (measured +56 MiB), freed with the
    error."""
    res = _run_child(_FLOOD, impl_name, "default")
    assert res["outcome"] == "AmplificationError"
    assert res["growth"] < 256 << 20, res
