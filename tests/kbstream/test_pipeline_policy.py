"""The output channel's delivery policy, driven directly (no sockets, no threads).

A ``Driver`` plays the output channel: it connects inputs, grants credit, offers
messages and serves what the policy hands out, recording what every input got.  Each
option has its own tests; a seeded random walk over all of them checks the invariants:
nothing reordered, an end of stream never dropped, the counters adding up exactly.
"""

import itertools
import random

import pytest

from kbstream.pipeline import PipelineError
from kbstream.pipeline.policy import (
    DROP_NO_CREDIT,
    DROP_NO_SHARED_INPUT,
    DROP_SELECTOR,
    DROP_TIMEOUT,
    QUEUE,
    SEND,
    SHARED,
    WAIT,
    DeliveryPolicy,
)


class Copy:
    """What the policy's copy function makes of a payload (so tests see copies)."""

    def __init__(self, payload):
        self.payload = payload

    def __eq__(self, other):
        return isinstance(other, Copy) and other.payload == self.payload

    def __repr__(self):
        return f"Copy({self.payload!r})"


class Driver:
    """Plays the output channel around a DeliveryPolicy.

    Inputs are named by id; the policy's key of an input is ``(id, generation)`` so a
    reconnection is a new key.  ``received[key]`` lists ``(seq, payload)`` in arrival
    order; ``got[id]`` is that of the input's current connection.  With ``hold`` set for
    an input, its next send stays in flight until :meth:`finish`.
    """

    def __init__(self, **options):
        self.copies = []
        self.policy = DeliveryPolicy(copy=self._copy, **options)
        self.keys = {}
        self.gen = itertools.count()
        self.received = {}
        self.hold = set()
        self.bg = set()  # ids whose copies are sent in the background (next_send background=True)
        self.in_flight = {}  # key -> entry

    @property
    def got(self):
        return {iid: self.received[key] for iid, key in self.keys.items()}

    def _copy(self, payload):
        self.copies.append(payload)
        return Copy(payload)

    def key(self, iid):
        return self.keys[iid]

    def connect(self, iid, **options):
        key = self.keys[iid] = (iid, next(self.gen))
        self.received[key] = []
        self.serve(self.policy.connect(key, iid, **options))
        return key

    def disconnect(self, iid):
        return self.policy.disconnect(self.keys.pop(iid))

    def credit(self, iid, n=1):
        for _ in range(n):
            self.serve(self.policy.credit(self.keys[iid]))

    def write(self, payload, eos=False, nbytes=0):
        d = self.policy.offer(payload, eos, nbytes)
        self.serve(d.serve)
        return d

    def serve(self, keys):
        for key in keys:
            while key not in self.in_flight:
                entry = self.policy.next_send(key, background=True) if key[0] in self.bg else None
                if entry is None:
                    entry = self.policy.next_send(key)
                if entry is None:
                    break
                if key[0] in self.hold:
                    self.in_flight[key] = entry
                    break
                self.received[key].append((entry.seq, entry.payload))
                assert not self.policy.end_send(key, entry)

    def detach(self, iid):
        """The writer stops waiting for the send in flight to ``iid``: it goes on in the
        background with the message's copy."""
        key = next(k for k in self.in_flight if k[0] == iid)
        new = self.policy.detach(key, self.in_flight[key])
        assert new is not None and new.delivery is None
        self.in_flight[key] = new
        return new

    def background(self, iid):
        """Take the next copy for ``iid`` as a background sender and hold it in flight."""
        key = self.keys[iid]
        entry = self.policy.next_send(key, background=True)
        if entry is not None:
            self.in_flight[key] = entry
        return entry

    def finish(self, iid, ok=True):
        """Complete the send in flight to ``iid`` (whatever its key was); True if the input
        had gone meanwhile."""
        key = next(k for k in self.in_flight if k[0] == iid)
        entry = self.in_flight.pop(key)
        if ok:
            self.received[key].append((entry.seq, entry.payload))
        gone = self.policy.end_send(key, entry, ok)
        if not gone:
            self.serve([key])
        return gone

    def payloads(self, iid, key=None):
        got = self.received[key if key is not None else self.keys[iid]]
        return [p.payload if isinstance(p, Copy) else p for _, p in got]

    def stats(self, iid=None):
        c = self.policy.counters()
        return c if iid is None else c[iid]

    def check(self):
        assert self.policy.problems() == []
        self.check_bounds()

    def check_bounds(self):
        """Each queue within its bounds (its newest message aside), all of them within the
        total unless nothing they hold may be dropped."""
        p = self.policy
        queues = [(rec.waiting, rec.max_queue) for rec in p._inputs.values()
                  if (rec.on_slowness == "queueDrop" and not rec.shared)
                  or (rec.shared and p.no_input_shared == "queueDrop")]
        if p.no_input_shared == "queueDrop":
            queues.append((p._shared_queue, p.shared_queue_length))
        droppable = 0
        for queue, length in queues:
            data = [e for e in queue if not e.eos]
            nbytes = sum(e.nbytes for e in queue)
            if len(data) > 1:
                assert len(data) <= length, (len(data), length)
                if p.max_queue_bytes is not None:
                    assert nbytes <= p.max_queue_bytes, (nbytes, p.max_queue_bytes)
                droppable += sum(1 for e in data[:-1] if e.delivery is None)
        if p.max_total_bytes is not None and p.total_bytes > p.max_total_bytes:
            assert droppable == 0, (p.total_bytes, p.max_total_bytes)


# ------------------------------------------------------- copy / drop


def test_copy_drop_sends_with_credit_and_drops_without():
    t = Driver()
    t.connect("a", on_slowness="drop")  # the hello is one credit
    d0 = t.write("m0")
    d1 = t.write("m1")
    assert d0.outcome == {"a": SEND} and d0.done
    assert d1.outcome == {"a": DROP_NO_CREDIT} and d1.done
    t.credit("a")
    t.write("m2")
    assert t.payloads("a") == ["m0", "m2"]
    assert t.stats("a") | {} == {"sent": 2, "dropped": 1, "queued": 0, "sending": 0, "queued_bytes": 0,
                                 "shared": False, "onSlowness": "drop", "maxQueueLength": 2,
                                 "credit_window": 1, "background": False}
    assert t.copies == []  # nothing was queued: nothing copied
    t.check()


def test_credit_never_exceeds_the_window():
    t = Driver()
    t.connect("a", window=3)
    t.credit("a", 5)  # an input that over-grants still has 3 messages in flight at most
    for i in range(5):
        t.write(i)
    assert t.payloads("a") == [0, 1, 2] and t.stats("a")["dropped"] == 2


def test_nothing_connected_discards_silently():
    t = Driver()
    d = t.write("m")
    assert d.outcome == {} and d.done and d.serve == []
    assert t.stats() == {SHARED: {"dropped": 0, "queued": 0, "queued_bytes": 0}}


def test_an_id_connected_twice_is_refused():
    t = Driver()
    t.connect("a")
    with pytest.raises(PipelineError, match="connected already"):
        t.policy.connect(("a", "other key"), "a")


# ------------------------------------------------------- copy / queueDrop


def test_copy_queue_drop_drops_the_oldest_when_full():
    t = Driver()
    t.connect("a", on_slowness="queueDrop", max_queue=2)
    for i in range(5):
        d = t.write(i, nbytes=10)
        assert d.outcome == {"a": SEND if i == 0 else QUEUE}
    assert t.stats("a")["queued"] == 2 and t.stats("a")["dropped"] == 2
    assert t.stats("a")["queued_bytes"] == 20
    t.credit("a", 3)
    assert t.got["a"] == [(0, 0), (3, Copy(3)), (4, Copy(4))]  # 1 and 2 were evicted
    assert t.copies == [1, 2, 3, 4]  # one copy per queued message
    t.check()


def test_one_copy_per_message_for_all_queues():
    t = Driver()
    for iid in "abc":
        t.connect(iid, on_slowness="queueDrop")
    t.write("takes the hello credits")
    t.write("m")
    assert t.copies == ["m"]
    for iid in "abc":
        t.credit(iid)
        assert t.got[iid][-1][1] == Copy("m")


def test_queued_messages_are_sent_before_new_ones():
    t = Driver()
    t.connect("a", on_slowness="queueDrop", max_queue=10, window=4)
    for i in range(4):
        t.write(i)  # four credits
    t.write(4)
    t.write(5)  # queued
    t.credit("a")  # frees one slot: 4 goes, 5 still waits
    d = t.write(6)
    assert d.outcome == {"a": QUEUE}  # never overtakes 5
    t.credit("a", 3)
    assert t.payloads("a") == list(range(7))
    t.check()


# ------------------------------------------------------- copy / wait


def test_copy_wait_holds_the_writer_until_credit():
    t = Driver()
    t.connect("a", on_slowness="wait")
    t.write("m0")
    d = t.write("m1")
    assert d.outcome == {"a": WAIT} and not d.done and d.owed == {t.key("a")}
    assert t.stats("a")["queued"] == 1 and t.copies == []  # the writer's own memory
    t.credit("a")
    assert d.done and t.got["a"] == [(0, "m0"), (1, "m1")]
    t.check()


def test_copy_wait_deadline_drops_data_for_that_input_only():
    t = Driver()
    t.connect("slow", on_slowness="wait")
    t.connect("fast", on_slowness="drop", window=8)
    t.write("m0")
    d = t.write("m1")
    assert d.outcome == {"slow": WAIT, "fast": SEND} and not d.done
    t.policy.expire(d)
    assert d.done and d.late == ["slow"] and d.outcome["slow"] == DROP_TIMEOUT
    assert t.stats("slow")["dropped"] == 1 and t.stats("slow")["queued"] == 0
    t.credit("slow")
    t.write("m2")
    assert t.payloads("slow") == ["m0", "m2"] and t.payloads("fast") == ["m0", "m1", "m2"]
    t.check()


def test_copy_wait_end_of_stream_stays_queued_after_the_deadline():
    t = Driver()
    t.connect("a", on_slowness="wait")
    t.write("m0")
    d = t.write("EOS", eos=True)
    t.policy.expire(d)
    assert d.done and d.late == ["a"] and d.outcome["a"] == QUEUE
    assert t.stats("a")["queued"] == 1 and t.copies == ["EOS"]  # kept as a copy
    d2 = t.write("next stream")  # waits behind the end of stream
    t.credit("a")
    assert t.payloads("a") == ["m0", "EOS"] and not d2.done
    t.credit("a")
    assert t.payloads("a") == ["m0", "EOS", "next stream"] and d2.done
    t.check()


def test_copy_wait_input_gone_releases_the_writer_without_lateness():
    t = Driver()
    t.connect("a", on_slowness="wait")
    t.write("m0")
    d = t.write("m1")
    assert t.disconnect("a") is False
    assert d.done and d.late == []
    t.policy.expire(d)  # a deadline after the fact changes nothing
    assert d.late == []


def test_a_send_in_flight_is_owed_until_it_completes_even_after_the_deadline():
    t = Driver()
    t.hold.add("a")
    t.connect("a", on_slowness="wait")
    d = t.write("m0")
    assert not d.done and t.stats("a")["sending"] == 1
    t.policy.expire(d)
    assert not d.done and d.late == []  # it had credit: not late, just being sent
    t.finish("a")
    assert d.done and t.stats("a")["sent"] == 1


# ------------------------------------------------------- end of stream (copy)


@pytest.mark.parametrize("policy", ["drop", "queueDrop"])
def test_end_of_stream_without_credit_is_queued_never_dropped(policy):
    t = Driver()
    t.connect("a", on_slowness=policy, max_queue=1)
    t.write("m0")
    d = t.write("EOS", eos=True)
    assert d.outcome == {"a": QUEUE} and d.done
    for i in range(1, 4):
        t.write(f"m{i}")  # the next stream, behind the end of stream
    t.credit("a", 3)
    expected = ["m0", "EOS", "m3"] if policy == "queueDrop" else ["m0", "EOS"]
    assert t.payloads("a") == expected
    assert t.stats("a")["dropped"] == 3 - (policy == "queueDrop")
    t.check()


def test_queued_end_of_stream_is_never_evicted():
    t = Driver()
    t.connect("a", on_slowness="queueDrop", max_queue=1)
    t.write(0)
    for k in range(3):
        t.write(f"EOS{k}", eos=True)
        t.write(f"d{k}")
    assert t.stats("a")["queued"] == 4  # three ends of stream + one data message
    t.credit("a", 10)
    assert t.payloads("a") == [0, "EOS0", "EOS1", "EOS2", "d2"]
    assert t.stats("a")["dropped"] == 2


# ------------------------------------------------------- shared / load-balanced


def shared_pool(n=2, **options):
    t = Driver(**options)
    ids = [f"w{k}" for k in range(n)]
    for iid in ids:
        t.connect(iid, shared=True)
    return t, ids


def test_load_balanced_goes_to_the_first_input_that_got_credit():
    t, (w0, w1) = shared_pool()
    t.write("m0")  # w0 connected first
    t.write("m1")
    t.credit(w1)
    t.credit(w0)
    t.write("m2")  # w1 got its credit first
    t.write("m3")
    assert t.payloads(w0) == ["m0", "m3"] and t.payloads(w1) == ["m1", "m2"]
    d = t.write("m4")
    assert d.outcome == {SHARED: DROP_NO_SHARED_INPUT} and t.stats()[SHARED]["dropped"] == 1
    t.check()


def test_load_balanced_queue_drop_shares_one_queue_and_drops_the_oldest():
    t, (w0, w1) = shared_pool(no_input_shared="queueDrop", shared_queue_length=2)
    t.write("m0")
    t.write("m1")
    for i in range(2, 6):
        assert t.write(f"m{i}", nbytes=5).outcome == {SHARED: QUEUE}
    assert t.stats()[SHARED] == {"dropped": 2, "queued": 2, "queued_bytes": 10}
    t.credit(w1)
    t.credit(w0)
    assert t.payloads(w1) == ["m1", "m4"] and t.payloads(w0) == ["m0", "m5"]
    t.check()


def test_load_balanced_wait_is_taken_by_whichever_input_grants_credit():
    t, (w0, w1) = shared_pool(no_input_shared="wait")
    t.write("m0")
    t.write("m1")
    d = t.write("m2")
    assert d.outcome == {SHARED: WAIT} and d.owed == {SHARED}
    assert t.stats()[SHARED]["queued"] == 1 and t.copies == []
    t.credit(w1)
    assert d.done and t.payloads(w1) == ["m1", "m2"]
    t.check()


def test_load_balanced_wait_deadline_drops_for_the_pool():
    t, (w0, w1) = shared_pool(no_input_shared="wait")
    t.write("m0")
    t.write("m1")
    d = t.write("m2")
    t.policy.expire(d)
    assert d.done and d.late == ["a shared input"] and d.outcome[SHARED] == DROP_TIMEOUT
    assert t.stats()[SHARED] == {"dropped": 1, "queued": 0, "queued_bytes": 0}
    t.check()


def test_last_shared_input_gone_empties_the_shared_queue():
    t, (w0, w1) = shared_pool(no_input_shared="wait")
    t.write("m0")
    t.write("m1")
    d = t.write("m2")
    t.disconnect(w0)
    assert not d.done  # w1 may still take it
    t.disconnect(w1)
    assert d.done and d.late == [] and t.stats()[SHARED]["dropped"] == 1
    t.check()


# ------------------------------------------------------- shared / round-robin


def test_round_robin_goes_through_the_ids_in_order():
    t = Driver(distribution_mode="round-robin", no_input_shared="wait")
    for iid in ("w2", "w0", "w1"):  # connection order does not matter: id order does
        t.connect(iid, shared=True, window=10)
    for i in range(6):
        assert t.write(i).outcome[SHARED] == SEND
    assert [t.payloads(w) for w in ("w0", "w1", "w2")] == [[0, 3], [1, 4], [2, 5]]


def test_round_robin_target_without_credit_drop():
    t = Driver(distribution_mode="round-robin")
    t.connect("w0", shared=True)
    t.connect("w1", shared=True, window=5)
    for i in range(4):
        t.write(i)
    assert t.payloads("w0") == [0] and t.payloads("w1") == [1, 3]
    assert t.stats()[SHARED]["dropped"] == 1  # 2 was w0's turn


def test_round_robin_target_without_credit_queue_drop_uses_its_own_queue():
    t = Driver(distribution_mode="round-robin", no_input_shared="queueDrop")
    t.connect("w0", shared=True, max_queue=1)
    t.connect("w1", shared=True, window=10)
    for i in range(8):
        t.write(i)
    # w0's turns after the first: 2, 4, 6; its queue holds one: 2 and 4 are evicted
    assert t.stats("w0")["queued"] == 1 and t.stats("w0")["dropped"] == 2
    t.credit("w0", 2)
    assert t.payloads("w0") == [0, 6] and t.payloads("w1") == [1, 3, 5, 7]
    t.check()


def test_round_robin_target_without_credit_wait():
    t = Driver(distribution_mode="round-robin", no_input_shared="wait")
    t.connect("w0", shared=True)
    t.connect("w1", shared=True, window=10)
    t.write(0)
    t.write(1)
    d = t.write(2)  # w0's turn, no credit
    assert d.outcome == {SHARED: WAIT} and d.owed == {t.key("w0")}
    t.credit("w1")  # credit of another input does not help
    assert not d.done
    t.credit("w0")
    assert d.done and t.payloads("w0") == [0, 2]


def test_round_robin_wait_target_gone_drops_without_lateness():
    t = Driver(distribution_mode="round-robin", no_input_shared="wait")
    t.connect("w0", shared=True)
    t.connect("w1", shared=True)
    t.write(0)
    t.write(1)
    d = t.write(2)
    t.disconnect("w0")
    assert d.done and d.late == [] and t.stats()[SHARED]["dropped"] == 1


def test_round_robin_wait_deadline():
    t = Driver(distribution_mode="round-robin", no_input_shared="wait")
    t.connect("w0", shared=True)
    t.write(0)
    d = t.write(1)
    t.policy.expire(d)
    assert d.done and d.late == ["a shared input"] and t.stats()[SHARED]["dropped"] == 1
    assert t.stats("w0")["queued"] == 0
    t.check()


# ------------------------------------------------------- shared / selector


def test_selector_names_the_input_and_sees_the_sorted_ids():
    seen = []

    def pick(ids):
        seen.append(ids)
        return ids[-1]

    t = Driver(selector=pick, no_input_shared="wait")
    t.connect("w1", shared=True, window=4)
    t.connect("w0", shared=True, window=4)
    t.connect("c", on_slowness="drop")  # copy inputs are not offered
    for i in range(3):
        t.write(i)
    assert seen == [["w0", "w1"]] * 3 and t.payloads("w1") == [0, 1, 2] and t.payloads("w0") == []


@pytest.mark.parametrize("answer", ["", "nobody:input", "c", None, 42])
def test_selector_naming_no_shared_input_drops(answer):
    t = Driver(selector=lambda ids: answer, no_input_shared="wait")
    t.connect("w0", shared=True)
    t.connect("c")
    d = t.write("m")
    assert d.outcome == {"c": SEND, SHARED: DROP_SELECTOR} and d.done
    assert t.stats()[SHARED]["dropped"] == 1 and t.payloads("w0") == []


def test_selector_that_raises_drops_and_reports():
    def broken(ids):
        raise KeyError("oops")

    t = Driver(selector=broken)
    t.connect("w0", shared=True)
    d = t.write("m")
    assert isinstance(d.error, KeyError) and d.outcome == {SHARED: DROP_SELECTOR} and d.done


@pytest.mark.parametrize("no_input_shared, queued, dropped", [("drop", 0, 1), ("queueDrop", 1, 0)])
def test_selector_target_without_credit(no_input_shared, queued, dropped):
    t = Driver(selector=lambda ids: "w0", no_input_shared=no_input_shared)
    t.connect("w0", shared=True)
    t.connect("w1", shared=True)
    t.write(0)
    t.write(1)
    assert t.stats("w0")["queued"] == queued and t.stats()[SHARED]["dropped"] == dropped
    assert t.payloads("w1") == []


def test_selector_target_without_credit_wait():
    t = Driver(selector=lambda ids: "w0", no_input_shared="wait")
    t.connect("w0", shared=True)
    t.write(0)
    d = t.write(1)
    assert not d.done
    t.credit("w0")
    assert d.done and t.payloads("w0") == [0, 1]


# ------------------------------------------------------- shared end of stream


@pytest.mark.parametrize("no_input_shared", ["drop", "queueDrop", "wait"])
def test_every_shared_input_gets_the_end_of_stream_after_older_data(no_input_shared):
    t, (w0, w1) = shared_pool(no_input_shared=no_input_shared)
    t.write("m0")
    t.write("m1")  # both credits used
    if no_input_shared == "queueDrop":
        t.write("m2")  # in the shared queue
    d = t.write("EOS", eos=True)
    assert d.done == (no_input_shared != "wait")
    t.write("next")  # the next stream must not overtake the end of stream
    t.credit(w0)
    t.credit(w1)
    t.credit(w0, 2)
    t.credit(w1, 2)
    assert d.done
    for w in (w0, w1):
        seqs = [s for s, _ in t.got[w]]
        assert seqs == sorted(seqs) and "EOS" in t.payloads(w)
    got = t.payloads(w0) + t.payloads(w1)
    assert got.count("EOS") == 2
    if no_input_shared == "queueDrop":
        assert "m2" in t.payloads(w0)  # queued before the end of stream: w0 took it first
        assert t.payloads(w0).index("m2") < t.payloads(w0).index("EOS")
    t.check()


def test_shared_end_of_stream_wait_deadline_names_the_late_inputs():
    t, (w0, w1) = shared_pool(no_input_shared="wait")
    t.write("m0")
    t.write("m1")
    t.credit(w1)
    d = t.write("EOS", eos=True)
    assert not d.done and t.payloads(w1) == ["m1", "EOS"]
    t.policy.expire(d)
    assert d.done and d.late == [w0]
    t.credit(w0)  # the end of stream is still there for w0
    assert t.payloads(w0) == ["m0", "EOS"]
    t.check()


def test_shared_end_of_stream_taken_before_the_deadline_stays_owed_until_sent():
    t = Driver(no_input_shared="wait")
    t.hold.add("s1")
    t.connect("s1", shared=True)
    t.connect("s2", shared=True)
    t.write("m0")  # s1 takes it and holds it in flight
    t.write("m1")  # s2 takes it
    t.finish("s1")
    t.credit("s1")
    d = t.write("EOS", eos=True)  # s1 takes the marker (in flight), s2 has no credit
    assert t.key("s1") in d.owed and t.key("s2") in d.owed
    t.policy.expire(d)
    assert d.late == ["s2"] and d.owed == {t.key("s1")}  # s1's send is handed out: still owed
    t.finish("s1")
    assert d.done
    t.credit("s2")
    assert t.payloads("s2")[-1] == "EOS"
    t.check()


def test_shared_input_gone_is_no_longer_owed_the_end_of_stream():
    t, (w0, w1) = shared_pool(no_input_shared="wait")
    t.write("m0")
    t.write("m1")
    d = t.write("EOS", eos=True)
    t.disconnect(w0)
    assert d.owed == {t.key(w1)}
    t.credit(w1)
    assert d.done and t.stats()[SHARED]["queued"] == 0
    t.check()


def test_a_shared_input_connecting_later_takes_queued_data_not_an_old_end_of_stream():
    t, (w0,) = shared_pool(1, no_input_shared="queueDrop")
    t.write("m0")
    t.write("EOS", eos=True)  # for w0 only
    t.write("m1")
    t.connect("w9", shared=True)
    assert t.payloads("w9") == ["m1"]
    t.credit(w0)
    assert t.payloads(w0) == ["m0", "EOS"]
    t.check()


# ------------------------------------------------------- one sender at a time


def test_one_sender_per_input_and_order_kept_while_a_send_is_in_flight():
    t = Driver()
    t.hold.add("a")
    t.connect("a", on_slowness="queueDrop", window=4, max_queue=10)
    d0 = t.write("m0")  # in flight
    d1 = t.write("m1")  # credit taken, waits for the sender
    assert d1.serve == [] and t.policy.next_send(t.key("a")) is None  # the sender is busy
    assert t.stats("a")["sending"] == 2 and not d1.done
    t.hold.clear()
    t.finish("a")  # the same sender goes on with m1
    assert d0.done and d1.done and t.payloads("a") == ["m0", "m1"]


def test_disconnect_during_a_send_tells_the_sender():
    t = Driver()
    t.hold.add("a")
    t.connect("a")
    d = t.write("m0")
    assert t.disconnect("a") is True  # a send is in flight: its sender releases the input
    assert not d.done  # the writer's memory is still being sent
    assert t.finish("a") is True and d.done
    t.connect("a")  # the same id again: a new key, a fresh start
    assert t.stats("a")["sent"] == 0


def test_failed_send_is_not_counted_as_sent():
    t = Driver()
    t.hold.add("a")
    t.connect("a")
    d = t.write("m0")
    assert t.finish("a", ok=False) is False and d.done
    assert t.stats("a")["sent"] == 0
    t.disconnect("a")  # what the output does after a failed send


# ------------------------------------------------------- bounds in bytes


def test_queue_drop_is_bounded_in_bytes_and_keeps_the_newest():
    t = Driver(max_queue_bytes=25)
    t.connect("a", on_slowness="queueDrop", max_queue=100)
    t.write("m0", nbytes=10)  # the hello's credit
    for i in range(1, 6):
        assert t.write(f"m{i}", nbytes=10).outcome == {"a": QUEUE}
    st = t.stats("a")
    assert st["queued"] == 2 and st["queued_bytes"] == 20 and st["dropped"] == 3
    t.write("big", nbytes=100)  # alone beyond the cap: the newest always stays
    st = t.stats("a")
    assert st["queued"] == 1 and st["queued_bytes"] == 100 and st["dropped"] == 5
    t.credit("a", 3)
    assert t.payloads("a") == ["m0", "big"]
    t.check()


def test_an_end_of_stream_is_never_dropped_for_bytes():
    t = Driver(max_queue_bytes=10, max_total_bytes=10)
    t.connect("a", on_slowness="queueDrop", max_queue=100)
    t.write("m0", nbytes=8)
    t.write("EOS", eos=True, nbytes=8)
    t.write("m1", nbytes=8)
    t.write("m2", nbytes=8)  # m1 goes; the end of stream stays
    assert t.stats("a")["queued"] == 2 and t.stats("a")["dropped"] == 1
    t.credit("a", 3)
    assert t.payloads("a") == ["m0", "EOS", "m2"]
    t.check()


def test_the_shared_queue_is_bounded_in_bytes():
    t = Driver(no_input_shared="queueDrop", shared_queue_length=100, max_queue_bytes=30)
    t.connect("s", shared=True)
    t.write("m0", nbytes=10)
    for i in range(1, 8):
        assert t.write(f"m{i}", nbytes=10).outcome == {SHARED: QUEUE}
    assert t.stats()[SHARED] == {"dropped": 4, "queued": 3, "queued_bytes": 30}
    t.check()


def test_all_queues_together_are_bounded_and_the_fullest_gives_way():
    t = Driver(max_total_bytes=50)
    t.connect("a", on_slowness="queueDrop", max_queue=100)
    t.connect("b", on_slowness="queueDrop", max_queue=100)
    t.write("m0", nbytes=10)  # the hello credits
    t.credit("b", 1)
    for i in range(1, 4):
        t.write(f"m{i}", nbytes=10)  # a queues 3, b has credit for m1 then queues 2
    assert (t.stats("a")["queued_bytes"], t.stats("b")["queued_bytes"]) == (30, 20)
    t.write("m4", nbytes=10)  # 70 > 50: a (the fullest) drops its oldest two
    st = t.stats()
    assert (st["a"]["queued_bytes"], st["b"]["queued_bytes"]) == (20, 30) and t.policy.total_bytes == 50
    assert (st["a"]["dropped"], st["b"]["dropped"]) == (2, 0)
    t.write("m5", nbytes=100)  # the newest of each queue stays, whatever the total
    assert (t.stats("a")["queued"], t.stats("b")["queued"]) == (1, 1) and t.policy.total_bytes == 200
    t.credit("a", 2)
    t.credit("b", 2)
    assert t.payloads("a") == ["m0", "m5"] and t.payloads("b") == ["m0", "m1", "m5"]
    t.check()


# ------------------------------------------------------- slow inputs: detach, background


@pytest.mark.parametrize("slowness", ["drop", "queueDrop"])
def test_a_detached_send_goes_on_in_the_background_and_the_input_takes_nothing_new(slowness):
    t = Driver()
    t.hold.add("a")
    t.connect("a", on_slowness=slowness, window=4, max_queue=2)
    t.connect("w", on_slowness="wait")
    d0 = t.write("m0")
    assert not d0.done and d0.owed == {t.key("a")}  # "w" got it at once
    assert not t.policy.waits(t.key("a")) and t.policy.waits(t.key("w"))
    copy = t.detach("a")
    assert d0.done and copy.payload == Copy("m0") and t.copies == ["m0"]
    assert t.stats("a")["background"] and t.stats("a")["sending"] == 1
    t.credit("w")
    d1 = t.write("m1")  # "a" has credit left but is busy in the background
    assert d1.outcome["a"] == (DROP_NO_CREDIT if slowness == "drop" else QUEUE) and d1.done
    t.credit("a")  # kept for later: nothing moves while the background send lasts
    assert t.stats("a")["sending"] == 1
    t.hold.clear()
    t.finish("a")
    assert not t.stats("a")["background"]
    t.credit("w")
    t.write("m2")  # credit again: sent at once
    assert t.payloads("a") == ["m0", "m2"] if slowness == "drop" else ["m0", "m1", "m2"]
    assert t.stats("a")["sent"] + t.stats("a")["dropped"] == 3
    t.check()


def test_a_message_waiting_in_an_outbox_behind_a_send_can_be_detached():
    t = Driver()
    t.hold.add("a")
    t.connect("a", on_slowness="drop", window=4)
    t.write("m0")  # in flight, held
    d1 = t.write("m1")  # in the outbox behind it
    key = t.key("a")
    assert t.policy.next_send(key) is None  # the sender is busy
    assert t.policy.detach(key, d1.entry, queued_only=True).payload == Copy("m1")
    assert d1.done and t.policy.detach(key, d1.entry) is None  # nothing left to detach
    assert t.policy.head(key) is None
    t.hold.clear()
    t.finish("a")
    assert t.payloads("a") == ["m0", "m1"]
    t.check()


def test_next_send_hands_copies_to_the_background_and_writers_their_own():
    t = Driver()
    t.connect("a", on_slowness="queueDrop", max_queue=5)
    t.write("m0")
    t.write("m1")  # queued: a copy
    key = t.key("a")
    t.policy.credit(key)  # the copy goes to the outbox, nobody serves it yet
    assert t.policy.head(key).payload == Copy("m1")
    assert t.policy.next_send(key, owned_only=True) is None
    entry = t.background("a")
    assert entry.payload == Copy("m1") and t.stats("a")["background"]
    t.finish("a")
    assert not t.stats("a")["background"] and t.payloads("a") == ["m0", "m1"]
    t.check()


def test_a_shared_input_busy_in_the_background_leaves_the_pool_until_its_send_ends():
    t = Driver(no_input_shared="queueDrop", shared_queue_length=5)
    t.hold.add("s1")
    t.connect("s1", shared=True, window=2)
    t.connect("s2", shared=True)
    d = t.write("m0")  # s1 got credit first
    assert d.outcome["s1"] == SEND
    t.detach("s1")
    t.write("m1")  # s1 has a credit left but is busy: s2 takes it
    t.write("m2")  # queued for the pool
    assert t.payloads("s2") == ["m1"] and t.stats()[SHARED]["queued"] == 1
    t.hold.clear()
    t.finish("s1")  # back in the pool: it takes the queued one
    assert t.payloads("s1") == ["m0", "m2"]
    t.check()


# ------------------------------------------------------- random walk over every option


def _random_walk(seed, steps=300):
    rng = random.Random(seed)
    options = dict(no_input_shared=rng.choice(["drop", "queueDrop", "wait"]),
                   distribution_mode=rng.choice(["load-balanced", "round-robin"]),
                   shared_queue_length=rng.randint(1, 4))
    if rng.random() < 0.25:
        options["selector"] = lambda ids: rng.choice(ids + [""])
    if rng.random() < 0.5:
        options["max_queue_bytes"] = rng.randint(5, 30)
    if rng.random() < 0.5:
        options["max_total_bytes"] = rng.randint(10, 60)
    t = Driver(**options)
    names = [f"c{k}" for k in range(3)] + [f"s{k}" for k in range(3)]
    offered = {}  # copy input id -> messages offered while connected
    open_ = []  # deliveries the writer still waits for
    eos_owed = {}  # input id -> end-of-stream payloads it must get while connected
    n = 0

    def live():
        return [i for i in names if i in t.keys]

    for _ in range(steps):
        r = rng.random()
        iid = rng.choice(names)
        if r < 0.15 and iid not in t.keys:
            offered[iid] = 0
            eos_owed[iid] = []
            t.connect(iid, shared=iid.startswith("s"), window=rng.randint(1, 3), max_queue=rng.randint(1, 3),
                      on_slowness=rng.choice(["drop", "queueDrop", "wait"]))
        elif r < 0.2 and iid in t.keys:
            if t.disconnect(iid):
                t.finish(iid, ok=rng.random() < 0.5)
            t.hold.discard(iid)
        elif r < 0.5 and iid in t.keys:
            t.credit(iid)
        elif r < 0.55 and iid in t.keys:
            t.hold.add(iid)
        elif r < 0.6 and any(k[0] == iid for k in t.in_flight):
            t.hold.discard(iid)
            t.finish(iid)
        elif r < 0.62 and iid in t.keys:
            t.bg ^= {iid}  # its copies from now on in the background, or no longer
        elif r < 0.68 and iid in t.keys and not t.policy.waits(t.key(iid)):
            # the writers stop waiting for an input they need not wait for
            key = t.key(iid)
            if key in t.in_flight and t.in_flight[key].delivery is not None:
                t.detach(iid)
            for d in open_:
                t.policy.detach(key, d.entry, queued_only=True)
        elif r < 0.74 and open_:
            t.policy.expire(open_.pop(rng.randrange(len(open_))))
        else:
            eos = rng.random() < 0.15
            payload = f"EOS{n}" if eos else n
            n += 1
            for i in live():
                if i.startswith("c"):
                    offered[i] += 1
                if eos:
                    eos_owed[i].append(payload)
            d = t.write(payload, eos=eos, nbytes=rng.randint(0, 9))
            if rng.random() < 0.4:  # as update() does: no waiting for inputs that need none
                for key in [k for k in d.owed if k != SHARED and not t.policy.waits(k)]:
                    if t.in_flight.get(key) is d.entry:
                        t.detach(key[0])
                    else:
                        t.policy.detach(key, d.entry, queued_only=True)
            if not d.done:
                open_.append(d)
            open_ = [x for x in open_ if not x.done]
        t.check()
        c = t.stats()
        for i in live():
            st = c[i]
            if i.startswith("c"):  # every message: exactly one of these
                assert offered[i] == st["sent"] + st["dropped"] + st["queued"] + st["sending"], (i, st)
            assert st["sent"] == len(t.got[i])

    # the end: deadlines pass, sends complete, every input grants enough credit
    for d in open_:
        t.policy.expire(d)
    t.hold.clear()
    for key in list(t.in_flight):
        t.finish(key[0])
    for i in live():
        t.credit(i, n + 1)  # more than there are messages (shared markers included)
    assert all(d.done for d in open_)
    t.check()
    c = t.stats()
    for i in live():
        seqs = [s for s, _ in t.got[i]]
        assert seqs == sorted(set(seqs)), f"{i} got {seqs}: reordered or twice"
        got = t.payloads(i)
        for eos in eos_owed[i]:  # an end of stream is never dropped
            assert got.count(eos) == 1, (i, eos, got)
        assert c[i]["queued"] == 0 and c[i]["sending"] == 0
        if i.startswith("c"):
            assert offered[i] == c[i]["sent"] + c[i]["dropped"]
    # the shared pool: no data message reached two shared inputs (or one twice)
    shared_data = [p for key in t.received if key[0].startswith("s")
                   for p in t.payloads(key[0], key) if isinstance(p, int)]
    assert len(shared_data) == len(set(shared_data))


@pytest.mark.parametrize("seed", range(150))
def test_random_walk_keeps_order_end_of_stream_and_counts(seed):
    _random_walk(seed)


def test_shared_counters_add_up_exactly():
    """With inputs that never leave: every shared data message offered is exactly one of
    sent (to one input), queued, or dropped (by the pool or by a full input queue)."""
    for seed in range(40):
        rng = random.Random(1000 + seed)
        t = Driver(no_input_shared=rng.choice(["drop", "queueDrop", "wait"]),
                   distribution_mode=rng.choice(["load-balanced", "round-robin"]),
                   shared_queue_length=rng.randint(1, 3))
        ids = [f"s{k}" for k in range(rng.randint(1, 3))]
        for iid in ids:
            t.connect(iid, shared=True, window=rng.randint(1, 2), max_queue=rng.randint(1, 2))
        n = 0
        for _ in range(200):
            if rng.random() < 0.4:
                t.credit(rng.choice(ids))
            else:
                d = t.write(n)
                n += 1
                if not d.done:
                    t.policy.expire(d)
            c = t.stats()
            sent = sum(len(t.got[i]) for i in ids)
            held = sum(c[i]["queued"] + c[i]["sending"] + c[i]["dropped"] for i in ids)
            assert n == sent + held + c[SHARED]["queued"] + c[SHARED]["dropped"], (seed, n, c)
        t.check()


def test_events_of_unknown_inputs_change_nothing_and_queries_list_the_inputs():
    t = Driver()
    t.connect("c", on_slowness="wait")
    t.connect("s", shared=True)
    assert t.policy.disconnect(("nobody", 0)) is False
    assert t.policy.credit(("nobody", 0)) == []
    assert t.policy.next_send(("nobody", 0)) is None
    assert t.policy.input_ids() == ["c", "s"]
    assert t.policy.input_ids(shared=True) == ["s"] and t.policy.input_ids(shared=False) == ["c"]
    assert t.policy.kinds() == {"c": False, "s": True}
    t.check()
