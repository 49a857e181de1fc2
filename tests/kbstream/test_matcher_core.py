"""The matching state machine, driven directly: modes, offsets, bounds, max-wait, counters."""

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kbstream.errors import KbStreamError
from kbstream.matcher.core import DROPPED_REASONS, MatchCore
from kbstream.matcher.errors import MatcherConfigError, MatcherStateError, UnknownSourceError

ABCD = ("A", "B", "C", "D")


def tids(trains):
    return [t.tid for t in trains]


def balanced(core):
    tr = core.stats(0.0)["trains"]
    assert tr["seen"] == tr["sent"] + tr["incomplete"] + tr["dropped"] + tr["pending"]
    assert tr["pending"] == tr["waiting"] + tr["queued"]
    assert tr["incomplete"] == sum(tr["incomplete_by"].values())
    assert tr["dropped"] == sum(tr["dropped_by"].values())
    return tr


# ---------------------------------------------------------------- match mode


def test_match_sends_a_train_when_every_source_has_it():
    core = MatchCore(ABCD)
    for s in "ABC":
        assert core.add(s, 10, f"{s}10", 0.0) == []
    (train,) = core.add("D", 10, "D10", 0.1)
    assert train.tid == 10 and train.complete
    assert train.parts == {"A": "A10", "B": "B10", "C": "C10", "D": "D10"}
    tr = balanced(core)
    assert (tr["seen"], tr["matched"], tr["queued"], tr["waiting"]) == (1, 1, 1, 0)
    core.settle(10, "sent")
    tr = balanced(core)
    assert (tr["sent"], tr["pending"]) == (1, 0)


def test_match_parts_follow_the_configured_source_order_and_keep_the_payload_object():
    core = MatchCore(ABCD)
    payloads = {s: object() for s in ABCD}
    out = []
    for s in reversed(ABCD):
        out += core.add(s, 5, payloads[s], 0.0)
    (train,) = out
    assert list(train.parts) == list(ABCD)
    assert all(train.parts[s] is payloads[s] for s in ABCD)


def test_match_never_goes_backwards_a_later_complete_train_drops_earlier_ones():
    core = MatchCore(("A", "B"))
    core.add("A", 1, 0, 0.0)
    core.add("A", 2, 0, 0.0)
    core.add("A", 3, 0, 0.0)
    assert tids(core.add("B", 3, 0, 0.0)) == [3]
    tr = balanced(core)
    assert tr["incomplete_by"]["superseded"] == 2
    assert core.floor == 3
    # B's items for the given-up trains come late: counted, no train opened again
    assert core.add("B", 1, 0, 0.0) == []
    assert core.add("B", 2, 0, 0.0) == []
    st_ = core.stats(0.0)
    assert st_["sources"]["B"]["late"] == 2
    assert st_["sources"]["B"]["missing"] == 2
    assert st_["sources"]["A"]["missing"] == 0
    assert balanced(core)["seen"] == 3


def test_offsets_shift_a_sources_train_ids():
    core = MatchCore({"A": 0, "B": 2, "C": -1})
    core.add("A", 100, "a", 0.0)
    core.add("B", 98, "b", 0.0)
    (train,) = core.add("C", 101, "c", 0.0)
    assert train.tid == 100 and train.parts == {"A": "a", "B": "b", "C": "c"}
    assert core.sources == {"A": 0, "B": 2, "C": -1}


def test_duplicate_items_are_counted_and_ignored():
    core = MatchCore(("A", "B"))
    core.add("A", 1, "first", 0.0)
    core.add("A", 1, "second", 0.0)
    (train,) = core.add("B", 1, "b", 0.0)
    assert train.parts["A"] == "first"
    assert core.stats(0.0)["sources"]["A"]["duplicates"] == 1
    assert balanced(core)["seen"] == 1


def test_single_source_matches_every_item():
    core = MatchCore(["A"])
    out = []
    for t in (1, 2, 4):
        out += core.add("A", t, t, 0.0)
    assert tids(out) == [1, 2, 4]


def test_bounded_buffer_gives_up_the_oldest_train():
    core = MatchCore(("A", "B"), max_pending=3)
    for t in range(1, 6):
        core.add("A", t, t, 0.0)
    assert core.pending_ids() == [3, 4, 5]
    tr = balanced(core)
    assert tr["incomplete_by"]["buffer_full"] == 2
    assert core.floor == 2
    assert core.add("B", 2, 0, 0.0) == []  # late now
    assert tids(core.add("B", 3, 0, 0.0)) == [3]


def test_max_wait_gives_up_trains_in_order():
    core = MatchCore(("A", "B"), max_wait=1.0)
    core.add("A", 1, 0, 0.0)
    core.add("A", 2, 0, 0.5)
    core.add("B", 3, 0, 0.2)  # an older first item for a newer train
    assert core.tick(0.9) == []
    assert core.pending_ids() == [1, 2, 3]
    assert core.tick(1.3) == []  # 3 (first item at 0.2) expired: 1 and 2 go with it
    assert core.pending_ids() == []
    tr = balanced(core)
    assert tr["incomplete_by"]["max_wait"] == 3
    assert core.floor == 3


def test_without_max_wait_tick_does_nothing():
    core = MatchCore(("A", "B"))
    core.add("A", 1, 0, 0.0)
    assert core.tick(1e9) == [] and core.pending_ids() == [1]


# ---------------------------------------------------------------- buffer mode


def test_buffer_flushes_partial_trains_with_exactly_the_sources_that_arrived():
    core = MatchCore(ABCD, mode="buffer", buffer=2)
    core.add("A", 1, "a1", 0.0)
    core.add("C", 1, "c1", 0.0)
    assert core.add("A", 2, "a2", 0.0) == []  # keeps 1 and 2
    (t1,) = core.add("B", 3, "b3", 0.0)  # train 3 starts: 1 (<= 3 - 2) is flushed
    assert t1.tid == 1 and not t1.complete and t1.parts == {"A": "a1", "C": "c1"}
    src = core.stats(0.0)["sources"]
    assert (src["B"]["missing"], src["D"]["missing"], src["A"]["missing"]) == (1, 1, 0)
    tr = balanced(core)
    assert (tr["matched"], tr["queued"], tr["waiting"]) == (0, 1, 2)


def test_buffer_keeps_complete_trains_until_their_turn_and_counts_them_matched():
    core = MatchCore(("A", "B"), mode="buffer", buffer=3)
    core.add("A", 10, 0, 0.0)
    assert core.add("B", 10, 0, 0.0) == []  # complete, but the buffer holds it
    assert core.add("A", 12, 0, 0.0) == []
    (t,) = core.add("A", 13, 0, 0.0)
    assert t.tid == 10 and t.complete
    assert balanced(core)["matched"] == 1


def test_buffer_one_flushes_when_the_next_train_starts_and_a_gap_flushes_all():
    core = MatchCore(("A", "B"), mode="buffer", buffer=1)
    core.add("A", 1, 0, 0.0)
    core.add("B", 1, 0, 0.0)
    core.add("A", 2, 0, 0.0)
    core.add("A", 2, 0, 0.0)
    assert core.pending_ids() == [2]
    assert tids(core.add("B", 50, 0, 0.0)) == [2]
    core2 = MatchCore(("A",), mode="buffer", buffer=5)
    for t in (1, 2, 3):
        core2.add("A", t, 0, 0.0)
    assert tids(core2.add("A", 100, 0, 0.0)) == [1, 2, 3]


def test_buffer_max_wait_flushes_partial_trains():
    core = MatchCore(("A", "B"), mode="buffer", buffer=10, max_wait=0.5)
    core.add("A", 1, "a", 0.0)
    core.add("A", 2, "a", 0.3)
    out = core.tick(0.6)
    assert tids(out) == [1] and out[0].parts == {"A": "a"}
    assert tids(core.tick(1.0)) == [2]
    assert balanced(core)["queued"] == 2


def test_buffer_overflow_flushes_the_oldest():
    core = MatchCore(("A", "B"), mode="buffer", buffer=3, max_pending=3)
    # ids inside one window cannot exceed 3 trains; late arrivals cannot reopen one
    for t in (5, 6, 7):
        core.add("A", t, 0, 0.0)
    assert tids(core.add("A", 8, 0, 0.0)) == [5]
    assert core.add("B", 5, 0, 0.0) == []
    assert core.stats(0.0)["sources"]["B"]["late"] == 1


# ---------------------------------------------------------------- settle, stats, errors


def test_settle_counts_each_outcome_and_refuses_a_second_settle():
    core = MatchCore(["A"])
    for t in range(1, 6):
        core.add("A", t, 0, 0.0)
    core.settle(1, "sent")
    core.settle(2, "dropped", "output_full")
    core.settle(3, "dropped", "no_subscriber")
    core.settle(4, "dropped", "unencodable")
    tr = balanced(core)
    assert (tr["sent"], tr["dropped"], tr["pending"]) == (1, 3, 1)
    assert tr["dropped_by"] == {r: 1 for r in DROPPED_REASONS}
    with pytest.raises(MatcherStateError):
        core.settle(1, "sent")
    with pytest.raises(MatcherStateError):
        core.settle(99, "sent")
    with pytest.raises(MatcherConfigError):
        core.settle(5, "dropped", "bored")
    with pytest.raises(MatcherConfigError):
        core.settle(5, "lost")
    core.settle(5, "sent")
    assert balanced(core)["pending"] == 0


def test_source_statistics_latency_rate_status():
    core = MatchCore(("A", "B"))
    st0 = core.stats(0.0)["sources"]
    assert st0["A"]["status"] == "waiting" and st0["A"]["latency"] is None and st0["A"]["rate"] == 0.0
    for i in range(11):
        core.add("A", 100 + i, 0, i * 0.1)
    core.add("B", 104, 0, 0.5)
    s = core.stats(1.0)["sources"]
    assert s["A"]["latency"] == 0 and s["B"]["latency"] == 6
    assert s["A"]["rate"] == pytest.approx(10.0)
    assert s["A"]["status"] == "ok" and s["A"]["received"] == 11
    assert core.stats(10.0)["sources"]["A"]["status"] == "stale"
    assert core.stats(10.0)["sources"]["A"]["rate"] < 1.2  # falls when items stop


@pytest.mark.parametrize("kwargs", [
    {"mode": "zip"}, {"buffer": 0}, {"max_pending": 0}, {"mode": "buffer", "buffer": 101}, {"max_wait": 0},
    {"max_wait": "soon"}, {"max_pending": 2.5}, {"buffer": True},
])
def test_bad_options_raise_config_errors(kwargs):
    with pytest.raises(MatcherConfigError) as e:
        MatchCore(("A",), **kwargs)
    assert isinstance(e.value, (ValueError, KbStreamError))


@pytest.mark.parametrize("sources", [[], ["A", "A"], {"A": 1.5}, [""], [("A", "x")]])
def test_bad_sources_raise_config_errors(sources):
    with pytest.raises(MatcherConfigError):
        MatchCore(sources)


def test_unknown_source_is_a_typed_error():
    core = MatchCore(("A",))
    with pytest.raises(UnknownSourceError) as e:
        core.add("Z", 1, 0, 0.0)
    assert isinstance(e.value, ValueError) and e.value.spec == "Z"


# ---------------------------------------------------------------- random walks


def _walk(core, ops, rng_outcomes):
    """Run ops against core; check the invariants after each step. Returns handed-out trains."""
    accepted = {}  # tid -> {source: payload} the core took for it
    offered = {s: 0 for s in core.sources}  # items offered per configured source
    out = []
    handed = set()
    queued = []
    now = 0.0
    for op in ops:
        kind = op[0]
        if kind == "item" and op[1] not in core.sources:
            with pytest.raises(UnknownSourceError):
                core.add(op[1], op[2], None, now)
            ready = []
        elif kind == "add_source":
            ready = []
            if op[1] in core.sources:
                with pytest.raises(MatcherConfigError):
                    core.add_source(op[1], op[2])
            else:
                core.add_source(op[1], op[2])
                offered[op[1]] = 0
        elif kind == "remove_source":
            ready = []
            if op[1] not in core.sources:
                with pytest.raises(UnknownSourceError):
                    core.remove_source(op[1])
            elif len(core.sources) == 1:
                with pytest.raises(MatcherConfigError):
                    core.remove_source(op[1])
            else:
                ready = core.remove_source(op[1])
                del offered[op[1]]
                for parts in accepted.values():
                    parts.pop(op[1], None)
        elif kind == "item":
            _, s, t = op
            offered[s] += 1
            before = core.stats(now)["sources"][s]
            payload = (s, t)
            ready = core.add(s, t, payload, now)
            after = core.stats(now)["sources"][s]
            if after["late"] == before["late"] and after["duplicates"] == before["duplicates"]:
                accepted.setdefault(t + core.sources[s], {})[s] = payload
        elif kind == "tick":
            now += op[1]
            ready = core.tick(now)
        else:  # settle the oldest queued train
            ready = []
            if queued:
                tid = queued.pop(0)
                outcome = rng_outcomes.choice(["sent", "sent", "dropped"])
                core.settle(tid, outcome, rng_outcomes.choice(DROPPED_REASONS) if outcome == "dropped" else None)
        for train in ready:
            assert train.tid not in handed
            handed.add(train.tid)
            # exactly the items that arrived for this train, the very objects
            assert train.parts == accepted[train.tid]
            assert all(train.parts[s] is accepted[train.tid][s] for s in train.parts)
            assert train.complete == (len(train.parts) == len(core.sources))
            if core.mode == "match":
                assert train.complete
            queued.append(train.tid)
            out.append(train)
        balanced(core)
        assert len(core.pending_ids()) <= core.max_pending
        assert {s: v["received"] for s, v in core.stats(now)["sources"].items()} == offered
    tids_out = tids(out)
    assert tids_out == sorted(set(tids_out))  # strictly increasing, in both modes
    return out


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("item"), st.sampled_from("ABC"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.floats(0.0, 0.6)),
        st.tuples(st.just("settle")),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, mode=st.sampled_from(["match", "buffer"]), buffer=st.integers(1, 6),
       max_pending=st.integers(6, 12), max_wait=st.one_of(st.none(), st.floats(0.1, 2.0)),
       seed=st.integers(0, 2**16))
def test_random_walk_counters_add_up_and_output_is_ordered(ops, mode, buffer, max_pending, max_wait, seed):
    core = MatchCore({"A": 0, "B": 1, "C": -2}, mode=mode, buffer=buffer, max_pending=max_pending,
                     max_wait=max_wait)
    _walk(core, ops, random.Random(seed))


_ops_changing_sources = st.lists(
    st.one_of(
        st.tuples(st.just("item"), st.sampled_from("ABCDE"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.floats(0.0, 0.6)),
        st.tuples(st.just("settle")),
        st.tuples(st.just("add_source"), st.sampled_from("ABCDE"), st.integers(-2, 2)),
        st.tuples(st.just("remove_source"), st.sampled_from("ABCDE")),
    ),
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(ops=_ops_changing_sources, mode=st.sampled_from(["match", "buffer"]), buffer=st.integers(1, 6),
       max_wait=st.one_of(st.none(), st.floats(0.1, 2.0)), seed=st.integers(0, 2**16))
def test_random_arrivals_with_sources_added_and_removed_every_train_ends_once(ops, mode, buffer, max_wait, seed):
    """Randomized arrival orders while sources come and go: every train id seen is exactly
    one of sent, incomplete, dropped or pending after every step; the output is ordered;
    a handed-out train has exactly the items of the sources configured then."""
    core = MatchCore({"A": 0, "B": 1}, mode=mode, buffer=buffer, max_pending=8, max_wait=max_wait)
    out = _walk(core, ops, random.Random(seed))
    # settle everything handed out: nothing queued is left, the identity still holds
    for train in out:
        try:
            core.settle(train.tid, "sent")
        except MatcherStateError:
            pass  # settled by the walk already
    tr = balanced(core)
    assert tr["queued"] == 0 and tr["pending"] == tr["waiting"]


def test_removing_a_source_completes_the_trains_that_only_lacked_it():
    core = MatchCore(("A", "B", "C"))
    core.add("A", 1, "a1", 0.0)
    core.add("B", 1, "b1", 0.0)
    core.add("A", 2, "a2", 0.0)
    core.add("C", 2, "c2", 0.0)
    ready = core.remove_source("C")  # train 1 has A, B: complete; train 2 still lacks B
    assert tids(ready) == [1] and ready[0].parts == {"A": "a1", "B": "b1"} and ready[0].complete
    assert core.pending_ids() == [2]
    assert "C" not in core.stats(0.0)["sources"] and core.removed == 1
    ready = core.add("B", 2, "b2", 0.0)
    assert tids(ready) == [2] and ready[0].parts == {"A": "a2", "B": "b2"}
    with pytest.raises(UnknownSourceError):
        core.remove_source("C")
    core.remove_source("B")
    with pytest.raises(MatcherConfigError):
        core.remove_source("A")
    balanced(core)


def test_an_added_source_is_needed_from_then_on():
    core = MatchCore(("A",), mode="match")
    assert tids(core.add("A", 1, "a1", 0.0)) == [1]
    core.add_source("B", 1)
    assert core.add("A", 2, "a2", 0.0) == []  # train 2 waits for B now
    ready = core.add("B", 1, "b", 0.0)  # B's train 1 is train 2 with its offset
    assert tids(ready) == [2] and ready[0].parts == {"A": "a2", "B": "b"}
    with pytest.raises(MatcherConfigError):
        core.add_source("B")


def test_buffer_mode_does_not_send_a_train_left_empty_by_a_removed_source():
    core = MatchCore(("A", "B"), mode="buffer", buffer=2)
    core.add("B", 1, "b1", 0.0)
    core.add("A", 2, "a2", 0.0)
    core.remove_source("B")
    ready = core.add("A", 3, "a3", 0.0)  # flushes train 1, which has nothing left
    assert ready == []
    tr = balanced(core)
    assert tr["incomplete_by"]["source_removed"] == 1
    assert tids(core.add("A", 4, "a4", 0.0)) == [2]


@pytest.mark.parametrize("mode", ["match", "buffer"])
def test_long_random_walk_with_realistic_streams(mode):
    """Four sources, mostly in order with jitter, losses and one lagging source."""
    rng = random.Random(1234 + len(mode))
    ops = []
    for t in range(1000, 3000):
        for s in "ABC":
            if rng.random() > 0.05:
                ops.append(("item", s, t + rng.choice([0, 0, 0, 1, -1])))
        if t % 3:
            ops.append(("item", "D", t - 2))  # D lags two trains and skips every 3rd
        ops.append(("tick", 0.1))
        ops.append(("settle",))
    core = MatchCore(dict.fromkeys(ABCD, 0), mode=mode, buffer=4, max_wait=5.0)
    out = _walk(core, ops, random.Random(5))
    tr = balanced(core)
    assert tr["seen"] > 1900 and len(out) > 400


def test_importing_the_matcher_loads_neither_zmq_nor_the_pipeline():
    code = ("import sys, kbstream.matcher; "
            "print(sorted(m for m in ('zmq', 'kbstream.pipeline', 'kbstream.bridge.sender') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
