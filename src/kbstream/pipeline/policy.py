"""Who gets which message: an output channel's delivery policy as a pure state machine.

No sockets, no threads, no clocks: :class:`DeliveryPolicy` is told what happens (an input
connected with its hello, it granted credit, it went away, a message was written, a send
finished, a deadline passed) and answers with decisions.  The output channel calls it
with its lock held and does the sending itself.

The model
---------
Every message gets a sequence number.  For each input the policy keeps

- ``waiting``: messages that wait for its credit, in sequence order (a ``queueDrop``
  queue, an end of stream that found no credit, and a ``wait`` input's message while the
  writer waits for it);
- ``outbox``: messages whose credit is taken and that are to be sent now, in order;
- the message being sent (at most one: one sender per input at a time).

The shared inputs have, besides their own ``waiting``, one ``shared queue``: messages for
whichever shared input takes them first, and end-of-stream markers that every shared
input must take.  An input takes the message with the lowest sequence number among its own
waiting messages and the shared entries meant for it.

Invariant (after every event): an input with credit that is not being sent to in the
background has nothing waiting for it.  So a message goes to an input's outbox at once
only when nothing older waits for that input, and nothing is ever reordered.

Each event returns the inputs (their keys) that got something in their outbox while no
sender was busy with them; the caller then *serves* them: ``next_send(key)`` hands out
the next message and makes the caller that input's only sender until ``end_send``.  Any
thread may serve any input.

Slow inputs: a message whose ``delivery`` is set is the writer's own memory, so the
writer must stay until it is sent.  For an input it need not wait for (:meth:`waits`
is False: ``drop`` / ``queueDrop`` copy inputs, shared inputs unless
``no_input_shared="wait"``), the writer can :meth:`detach` its message instead: the
entry is replaced by the message's one copy and the writer stops waiting for that input.
A detached send in flight goes on *in the background*, and so do copies handed out with
``next_send(key, background=True)``.  While an input is sent to in the background it is
treated as having no credit (its own ``onSlowness``, or ``no_input_shared``, applies to
new messages and it takes nothing from the shared queue), so a slow input holds at most
one message in flight besides its bounded queue, and costs nobody else anything.

Options (the input's from its hello, the pool's from the output)
----------------------------------------------------------------
- copy ``drop``: no credit when the message is written -> dropped for that input;
- copy ``queueDrop``: queued, at most ``max_queue`` data messages and ``max_queue_bytes``
  bytes; when full the **oldest** is dropped (the newest message always stays, so one
  message larger than the byte cap still gets through);
- copy ``wait``: the writer waits until the input grants credit (:meth:`expire` when its
  deadline passes: the data message is dropped for that input);
- shared: one input of the pool gets each message: the first one with credit
  (``load-balanced``), the next one in id order (``round-robin``), or the one the
  ``selector(ids)`` callback names; ``no_input_shared`` (drop / queueDrop / wait) applies
  when that input (or, load-balanced, every input) has no credit.
- End of stream is never dropped and never evicted: copy inputs without credit get it
  queued (``wait`` inputs: the writer waits first), every shared input gets it through an
  end-of-stream marker in the shared queue (``no_input_shared="wait"``: the writer waits
  until each has taken it).

Counting: every message offered while a copy input is connected is, for that input,
exactly one of ``sent``, ``dropped``, ``queued`` (waiting) or ``sending`` (outbox or in
flight).  A shared data message is exactly one of: sent to (or sending to, or queued for)
one shared input, queued in the shared queue, or dropped (``SHARED`` counter, or the
targeted input's ``dropped`` when a full queue evicts it).  Each entry carries its size
in bytes (``nbytes``); ``queued_bytes`` sums the waiting ones, per input and for the pool.

Bounds in bytes: ``max_queue_bytes`` caps each queue (an input's own, and the shared
queue), ``max_total_bytes`` all of them together (counted per queue: a message queued for
two inputs counts twice).  Beyond the total, the oldest data of the queue holding the most
bytes is dropped, again keeping each queue's newest message; an end of stream, and a
message a writer waits for, are never dropped.  So what the queues hold is at most the
total plus one message per queue.
"""

import collections

from .errors import PipelineError

__all__ = [
    "DeliveryPolicy",
    "Delivery",
    "Entry",
    "SHARED",
    "SEND",
    "QUEUE",
    "WAIT",
    "DROP_NO_CREDIT",
    "DROP_NO_SHARED_INPUT",
    "DROP_SELECTOR",
    "DROP_TIMEOUT",
    "MODES",
]

#: Values of ``distribution_mode`` (onSlowness / noInputShared values: wire.ON_SLOWNESS).
MODES = ("load-balanced", "round-robin")

#: Key of the shared pool in :meth:`DeliveryPolicy.counters` and :attr:`Delivery.outcome`.
SHARED = "__shared__"

# What happened to one message for one input (or the pool): Delivery.outcome values.
SEND = "send"
QUEUE = "queue"
WAIT = "wait"
DROP_NO_CREDIT = "drop: no credit"
DROP_NO_SHARED_INPUT = "drop: no shared input ready"
DROP_SELECTOR = "drop: the selector named no shared input"
DROP_TIMEOUT = "drop: no credit in time"


class Entry:
    """One message in a queue or an outbox.

    ``payload`` is what the caller sends (opaque to the policy).  ``delivery`` is set while
    the writer of the message waits for this entry (its payload may be the caller's own
    memory); copies made for queues have none.  ``pending`` is set on a shared
    end-of-stream marker: the keys of the shared inputs that have not taken it yet.
    """

    __slots__ = ("seq", "payload", "eos", "nbytes", "delivery", "pending")

    def __init__(self, seq, payload, eos, nbytes, delivery=None, pending=None):
        self.seq = seq
        self.payload = payload
        self.eos = eos
        self.nbytes = nbytes
        self.delivery = delivery
        self.pending = pending

    def __repr__(self):
        kind = "eos" if self.eos else "data"
        return f"<Entry {self.seq} {kind}{'' if self.delivery is None else ' owed'}>"


class Delivery:
    """The policy's answer to :meth:`DeliveryPolicy.offer`, and what the writer waits on.

    Attributes
    ----------
    seq : int
        The message's sequence number.
    outcome : dict
        Input id (or :data:`SHARED`) -> ``SEND``, ``QUEUE``, ``WAIT`` or a ``DROP_*``
        reason (updated by :meth:`DeliveryPolicy.expire`).
    serve : list
        Keys of inputs to serve now (see :meth:`DeliveryPolicy.next_send`).
    owed : set
        Keys (or :data:`SHARED`) whose send of this message the writer still waits for;
        the writer may return when it is empty.
    late : list
        Ids of the inputs that gave no credit before the deadline (after ``expire``).
    error : Exception or None
        What the shared selector raised (the message was dropped for the pool).
    """

    __slots__ = ("seq", "eos", "entry", "outcome", "serve", "owed", "late", "error", "marker", "_copy")

    def __init__(self, seq, payload, eos, nbytes):
        self.seq = seq
        self.eos = eos
        self.entry = Entry(seq, payload, eos, nbytes, self)
        self.outcome = {}
        self.serve = []
        self.owed = set()
        self.late = []
        self.error = None
        self.marker = None
        self._copy = None

    @property
    def done(self):
        """True when the writer need not wait any longer."""
        return not self.owed

    def __repr__(self):
        return f"<Delivery {self.seq} {self.outcome} owed={len(self.owed)}>"


class _Input:
    """The policy's state of one connected input."""

    __slots__ = ("key", "id", "shared", "on_slowness", "max_queue", "window", "credits",
                 "waiting", "outbox", "sending", "sent", "dropped", "queued_bytes", "ndata", "background")

    def __init__(self, key, input_id, shared, on_slowness, max_queue, window):
        self.key = key
        self.id = input_id
        self.shared = shared
        self.on_slowness = on_slowness
        self.max_queue = max_queue
        self.window = window
        self.credits = window  # the hello is the first credit (Karabo); a window asks for more
        self.waiting = collections.deque()  # Entry without credit yet, in sequence order
        self.outbox = collections.deque()  # Entry with credit taken, to be sent in order
        self.sending = None  # the Entry its one sender is sending now
        self.sent = 0
        self.dropped = 0
        self.queued_bytes = 0
        self.ndata = 0  # data entries in waiting
        self.background = False  # sent to in the background: no new messages meanwhile


class DeliveryPolicy:
    """The delivery state of one output channel (not thread safe: the caller locks).

    Parameters
    ----------
    no_input_shared : {"drop", "queueDrop", "wait"}
    distribution_mode : {"load-balanced", "round-robin"}
    selector : callable, optional
        ``selector(sorted shared ids) -> id``; "" or an unknown id drops the message.
        Called during :meth:`offer`; what it raises is kept in ``Delivery.error`` and the
        message is dropped for the pool.
    shared_queue_length : int
        Data messages the shared queue holds under ``queueDrop`` (oldest dropped).
    copy : callable, optional
        ``copy(payload) -> payload`` the queues can keep after the writer returned; called
        at most once per message, only when the message is queued or detached.
    max_queue_bytes : int, optional
        Bytes each queue may hold (None: no bound in bytes).
    max_total_bytes : int, optional
        Bytes all queues together may hold (None: no bound).
    """

    def __init__(self, no_input_shared="drop", distribution_mode="load-balanced", selector=None,
                 shared_queue_length=10, copy=None, max_queue_bytes=None, max_total_bytes=None):
        self.no_input_shared = no_input_shared
        self.distribution_mode = distribution_mode
        self.selector = selector
        self.shared_queue_length = max(1, int(shared_queue_length))
        self.copy = copy if copy is not None else _same
        self.max_queue_bytes = max_queue_bytes
        self.max_total_bytes = max_total_bytes
        self.shared_dropped = 0
        self._inputs = {}  # key -> _Input, in the order they connected
        self._by_id = {}  # input id -> _Input
        self._nshared = 0
        self._ready = []  # shared inputs with credit, in the order they got it
        self._shared_queue = collections.deque()  # Entry: data for any shared input; EOS markers
        self._shared_data = 0  # data entries in the shared queue
        self._shared_bytes = 0
        self._total_bytes = 0  # queued_bytes of every input plus the shared queue's
        self._seq = 0
        self._rr = 0

    # ------------------------------------------------------------ inputs

    def connect(self, key, input_id, *, shared=False, on_slowness="drop", max_queue=2, window=1):
        """An input sent its hello; returns the keys to serve (it may take queued messages).

        ``key`` identifies the connection (any hashable, never reused while connected);
        disconnect an input before connecting another one with the same id.
        """
        if key in self._inputs or input_id in self._by_id:
            raise PipelineError(f"input {input_id!r} is connected already")
        rec = _Input(key, input_id, bool(shared), on_slowness, max(1, int(max_queue)), max(1, int(window)))
        self._inputs[key] = rec
        self._by_id[input_id] = rec
        serve = []
        if rec.shared:
            self._nshared += 1
            self._ready.append(rec)
            self._fill(rec, serve)
        return serve

    def disconnect(self, key):
        """The input is gone; returns True if a send to it is still in flight.

        What waited for it is forgotten (a writer waiting for it stops waiting); shared data
        it held counts as dropped for the pool.  With the last shared input gone, the shared
        queue is emptied (its data counts as dropped).
        """
        rec = self._inputs.pop(key, None)
        if rec is None:
            return False
        del self._by_id[rec.id]
        for queue in (rec.outbox, rec.waiting):
            for e in queue:
                if e.delivery is not None:
                    e.delivery.owed.discard(key)
                if rec.shared and not e.eos:
                    self.shared_dropped += 1
            queue.clear()
        self._total_bytes -= rec.queued_bytes
        rec.queued_bytes = rec.ndata = 0
        if rec.shared:
            self._nshared -= 1
            if rec in self._ready:
                self._ready.remove(rec)
            for e in [e for e in self._shared_queue if e.pending is not None and key in e.pending]:
                e.pending.discard(key)
                if e.delivery is not None:
                    e.delivery.owed.discard(key)
                if not e.pending:
                    self._shared_remove(e)
            if not self._nshared:
                for e in self._shared_queue:
                    if not e.eos:
                        self.shared_dropped += 1
                    if e.delivery is not None:
                        e.delivery.owed.discard(SHARED)
                self._shared_queue.clear()
                self._total_bytes -= self._shared_bytes
                self._shared_data = self._shared_bytes = 0
        return rec.sending is not None

    def credit(self, key):
        """The input granted one credit (``update``); returns the keys to serve."""
        rec = self._inputs.get(key)
        if rec is None:
            return []
        if rec.credits < rec.window:
            rec.credits += 1
        serve = []
        if rec.background:  # its send in the background ends first (end_send)
            return serve
        if rec.shared and rec not in self._ready:
            self._ready.append(rec)
        self._fill(rec, serve)
        return serve

    # ------------------------------------------------------------ messages

    def offer(self, payload, eos=False, nbytes=0):
        """A message was written: decide for every input; returns its :class:`Delivery`."""
        d = Delivery(self._seq, payload, eos, nbytes)
        self._seq += 1
        outcome = d.outcome
        for rec in self._inputs.values():
            if rec.shared:
                continue
            if rec.credits > 0 and not rec.waiting and not rec.background:
                self._to_outbox(rec, d.entry, d.serve)
                outcome[rec.id] = SEND
            elif rec.on_slowness == "wait":
                self._enqueue(rec, d.entry)
                d.owed.add(rec.key)
                outcome[rec.id] = WAIT
            elif eos or rec.on_slowness == "queueDrop":
                self._enqueue(rec, self._copied(d))
                self._trim(rec.waiting, rec.max_queue, rec)
                outcome[rec.id] = QUEUE
            else:
                rec.dropped += 1
                outcome[rec.id] = DROP_NO_CREDIT
        if self._nshared:
            if eos:
                self._offer_shared_eos(d)
            else:
                self._offer_shared(d)
        self._trim_total()
        return d

    def _offer_shared(self, d):
        target = None
        if self.selector is not None:
            try:
                chosen = self.selector(self._shared_ids())
            except Exception as e:  # a user callback: drop the message, never fail the writer
                d.error = e
                chosen = ""
            target = self._by_id.get(chosen) if isinstance(chosen, str) and chosen else None
            if target is None or not target.shared:
                self.shared_dropped += 1
                d.outcome[SHARED] = DROP_SELECTOR
                return
        elif self.distribution_mode == "round-robin":
            ids = self._shared_ids()
            target = self._by_id[ids[self._rr % len(ids)]]
            self._rr += 1
        # by the invariant, an input with credit has nothing waiting: it is ready
        if target is None:
            send = self._ready[0] if self._ready else None
        else:
            send = target if target.credits > 0 and not target.background else None
        if send is not None:
            self._to_outbox(send, d.entry, d.serve)
            d.outcome[SHARED] = d.outcome[send.id] = SEND
        elif self.no_input_shared == "wait":
            if target is None:
                self._shared_append(d.entry)
                d.owed.add(SHARED)
            else:
                self._enqueue(target, d.entry)
                d.owed.add(target.key)
            d.outcome[SHARED] = WAIT
        elif self.no_input_shared == "queueDrop":
            if target is None:
                self._shared_append(self._copied(d))
                self._trim(self._shared_queue, self.shared_queue_length, None)
            else:
                self._enqueue(target, self._copied(d))
                self._trim(target.waiting, target.max_queue, target)
            d.outcome[SHARED] = QUEUE
        else:
            self.shared_dropped += 1
            d.outcome[SHARED] = DROP_NO_SHARED_INPUT

    def _offer_shared_eos(self, d):
        """Every shared input gets the end of stream, after what was queued before it."""
        shared = [rec for rec in self._inputs.values() if rec.shared]
        wait = self.no_input_shared == "wait"
        marker = Entry(d.seq, self._copied(d).payload, True, d.entry.nbytes, d if wait else None,
                       {rec.key for rec in shared})
        d.marker = marker
        if wait:
            d.owed.update(marker.pending)
        self._shared_append(marker)
        if self.no_input_shared == "queueDrop":
            self._trim(self._shared_queue, self.shared_queue_length, None)
        d.outcome[SHARED] = WAIT if wait else QUEUE
        for rec in shared:
            self._fill(rec, d.serve)

    def expire(self, d):
        """The writer's deadline passed: stop waiting for credit.

        A waiting data message is dropped (``DROP_TIMEOUT``; the pool's counter for a shared
        one), a waiting end of stream stays queued (a copy); ``d.late`` names the inputs.
        Sends already handed out stay owed: the writer still waits for them.
        """
        for rec in self._inputs.values():
            if rec.key not in d.owed or d.entry not in rec.waiting:
                continue
            d.owed.discard(rec.key)
            queue = rec.waiting
            at = _index(queue, d.entry)
            if rec.shared:
                self._unqueue(rec, at)
                self.shared_dropped += 1
                d.outcome[SHARED] = DROP_TIMEOUT
                d.late.append("a shared input")
            elif d.eos:
                queue[at] = self._copied(d)
                d.outcome[rec.id] = QUEUE
                d.late.append(rec.id)
            else:
                self._unqueue(rec, at)
                rec.dropped += 1
                d.outcome[rec.id] = DROP_TIMEOUT
                d.late.append(rec.id)
        if SHARED in d.owed:
            d.owed.discard(SHARED)
            if d.entry in self._shared_queue:
                self._shared_remove(d.entry)
                self.shared_dropped += 1
            d.outcome[SHARED] = DROP_TIMEOUT
            d.late.append("a shared input")
        marker = d.marker
        if marker is not None and marker.delivery is not None:
            d.marker = None
            if marker.pending:
                d.owed.difference_update(marker.pending)
                d.late.extend(sorted(self._inputs[k].id for k in marker.pending))
                # the marker stays (an end of stream is never dropped), no longer owed; the
                # inputs that took it already keep it, owed (their sends are handed out)
                queue = self._shared_queue
                queue[_index(queue, marker)] = Entry(marker.seq, marker.payload, True, marker.nbytes,
                                                     None, marker.pending)
                marker.pending = None
        self._trim_total()

    # ------------------------------------------------------------ sending

    def head(self, key):
        """The message :meth:`next_send` would hand out now, or None (it stays queued)."""
        rec = self._inputs.get(key)
        if rec is None or rec.sending is not None or not rec.outbox:
            return None
        return rec.outbox[0]

    def next_send(self, key, background=False, owned_only=False):
        """The next message to send to ``key``, or None (nothing to send, or another
        caller is its sender).  The caller is its only sender until :meth:`end_send`.

        ``background=True``: only a copy (an entry no writer waits for), and the input
        counts as sent to in the background until that send ends.  ``owned_only=True``:
        only an entry a writer waits for (its payload is the writer's memory).
        """
        rec = self._inputs.get(key)
        if rec is None or rec.sending is not None or not rec.outbox:
            return None
        e = rec.outbox[0]
        if (background and e.delivery is not None) or (owned_only and e.delivery is None):
            return None
        rec.outbox.popleft()
        rec.sending = e
        if background:
            self._to_background(rec)
        return e

    def end_send(self, key, entry, ok=True):
        """The send of ``entry`` (from :meth:`next_send`) finished; True if the input was
        disconnected meanwhile (the caller then releases what it holds for it).  After a
        failed send (``ok=False``) the caller disconnects the input; otherwise it serves
        ``key`` again (a send in the background may have kept messages waiting)."""
        rec = self._inputs.get(key)
        mine = rec is not None and rec.sending is entry
        if mine:
            rec.sending = None
            if ok:
                rec.sent += 1
            if rec.background:
                rec.background = False
                if rec.shared and rec.credits > 0:
                    self._ready.append(rec)
                self._fill(rec, [])
        if entry.delivery is not None:
            entry.delivery.owed.discard(key)
        return not mine

    def waits(self, key):
        """True when the writer of a message may wait for this input: a copy ``wait``
        input, or a shared input when ``no_input_shared`` is ``"wait"``."""
        rec = self._inputs.get(key)
        if rec is None:
            return False
        return self.no_input_shared == "wait" if rec.shared else rec.on_slowness == "wait"

    def detach(self, key, entry, copy=True, queued_only=False):
        """The writer of ``entry`` stops waiting for ``key``; returns what replaces it.

        ``entry`` is in the input's outbox, or being sent to it by the caller, which goes
        on in the background with the returned entry (not with ``queued_only``).  The
        replacement carries the message's one copy (``copy=False``: no payload, for a
        sender whose buffers own their bytes already); the writer no longer owes this
        input anything.  None (nothing changed) when the entry is not there, is no
        writer's, or the input is gone.
        """
        rec = self._inputs.get(key)
        d = entry.delivery
        if rec is None or d is None:
            return None
        in_flight = rec.sending is entry
        if in_flight:
            if queued_only:
                return None
        elif not any(e is entry for e in rec.outbox):
            return None
        if copy:
            new = Entry(entry.seq, self._copied(d).payload, entry.eos, entry.nbytes)
        else:
            new = Entry(entry.seq, None, entry.eos, entry.nbytes)
        if in_flight:
            rec.sending = new
            self._to_background(rec)
        else:
            rec.outbox[_index(rec.outbox, entry)] = new
        d.owed.discard(key)
        return new

    # ------------------------------------------------------------ queries

    def input_ids(self, shared=None):
        """Ids of the connected inputs (all, only shared, or only copy), in connection order."""
        return [rec.id for rec in self._inputs.values() if shared is None or rec.shared == shared]

    def kinds(self):
        """``{input id: shared (bool)}`` of the connected inputs."""
        return {rec.id: rec.shared for rec in self._inputs.values()}

    def counters(self):
        """Per input id: sent, dropped, queued, sending, queued_bytes, shared, onSlowness,
        maxQueueLength, credit_window, background (sent to in the background now); under
        :data:`SHARED`: the pool's dropped, queued and queued_bytes."""
        out = {
            rec.id: {"sent": rec.sent, "dropped": rec.dropped, "queued": len(rec.waiting),
                     "sending": len(rec.outbox) + (rec.sending is not None),
                     "queued_bytes": rec.queued_bytes, "shared": rec.shared,
                     "onSlowness": rec.on_slowness, "maxQueueLength": rec.max_queue,
                     "credit_window": rec.window, "background": rec.background}
            for rec in self._inputs.values()
        }
        out[SHARED] = {"dropped": self.shared_dropped, "queued": self._shared_data,
                       "queued_bytes": self._shared_bytes}
        return out

    @property
    def total_bytes(self):
        """Bytes in all queues together (per queue: a message queued twice counts twice)."""
        return self._total_bytes

    def problems(self):
        """Broken invariants, as text (empty when all hold); for tests."""
        out = []
        ready = [rec for rec in self._inputs.values() if rec.shared and rec.credits > 0 and not rec.background]
        if sorted(map(id, ready)) != sorted(map(id, self._ready)):
            out.append("ready list differs from the shared inputs with credit")
        for rec in self._inputs.values():
            if not 0 <= rec.credits <= rec.window:
                out.append(f"{rec.id}: credits {rec.credits} outside [0, {rec.window}]")
            if rec.credits > 0 and not rec.background and (
                    rec.waiting or (rec.shared and self._first_shared(rec) is not None)):
                out.append(f"{rec.id}: has credit and waiting messages")
            if rec.background and rec.sending is None:
                out.append(f"{rec.id}: in the background without a send")
            if rec.ndata != sum(1 for e in rec.waiting if not e.eos):
                out.append(f"{rec.id}: data count {rec.ndata} wrong")
            seqs = [e.seq for e in rec.waiting]
            if seqs != sorted(seqs) or [e.seq for e in rec.outbox] != sorted(e.seq for e in rec.outbox):
                out.append(f"{rec.id}: queue out of order")
            if rec.queued_bytes != sum(e.nbytes for e in rec.waiting):
                out.append(f"{rec.id}: queued_bytes {rec.queued_bytes} wrong")
        seqs = [e.seq for e in self._shared_queue]
        if seqs != sorted(seqs):
            out.append("shared queue out of order")
        if self._shared_data != sum(1 for e in self._shared_queue if not e.eos):
            out.append("shared data count wrong")
        if self._shared_bytes != sum(e.nbytes for e in self._shared_queue):
            out.append("shared queued_bytes wrong")
        if self._total_bytes != self._shared_bytes + sum(rec.queued_bytes for rec in self._inputs.values()):
            out.append("total queued bytes wrong")
        if self._shared_queue and not self._nshared:
            out.append("shared queue without shared inputs")
        if any(e.pending is not None and not e.pending for e in self._shared_queue):
            out.append("end-of-stream marker that no input waits for")
        return out

    # ------------------------------------------------------------ internals

    def _shared_ids(self):
        return sorted(rec.id for rec in self._inputs.values() if rec.shared)

    def _copied(self, d):
        """The entry the queues keep for ``d``: its payload copied once, no writer waiting."""
        if d._copy is None:
            e = d.entry
            d._copy = Entry(e.seq, self.copy(e.payload), e.eos, e.nbytes)
        return d._copy

    def _enqueue(self, rec, e):
        rec.waiting.append(e)
        rec.queued_bytes += e.nbytes
        self._total_bytes += e.nbytes
        if not e.eos:
            rec.ndata += 1

    def _unqueue(self, rec, at):
        """Remove and return ``rec.waiting[at]``."""
        e = rec.waiting[at]
        del rec.waiting[at]
        rec.queued_bytes -= e.nbytes
        self._total_bytes -= e.nbytes
        if not e.eos:
            rec.ndata -= 1
        return e

    def _shared_append(self, e):
        self._shared_queue.append(e)
        self._shared_bytes += e.nbytes
        self._total_bytes += e.nbytes
        if not e.eos:
            self._shared_data += 1

    def _shared_remove(self, e):
        del self._shared_queue[_index(self._shared_queue, e)]
        self._shared_bytes -= e.nbytes
        self._total_bytes -= e.nbytes
        if not e.eos:
            self._shared_data -= 1

    def _to_background(self, rec):
        rec.background = True
        if rec.shared and rec in self._ready:
            self._ready.remove(rec)

    def _trim(self, queue, limit, rec):
        """Drop the oldest queued data beyond ``limit`` messages or ``max_queue_bytes``
        (the newest data message, an end of stream, and a message a writer waits for are
        never dropped); counted on ``rec``, or the pool for None."""
        cap = self.max_queue_bytes
        while True:
            if rec is None:
                ndata, nbytes = self._shared_data, self._shared_bytes
            else:
                ndata, nbytes = rec.ndata, rec.queued_bytes
            if ndata <= 1 or (ndata <= limit and (cap is None or nbytes <= cap)):
                return
            if not self._evict(queue, rec):
                return

    def _evict(self, queue, rec):
        """Drop the oldest data message of ``queue`` that may be dropped; False if none."""
        for at, victim in enumerate(queue):
            if not victim.eos and victim.delivery is None:
                break
        else:
            return False
        if rec is None:
            self._shared_remove(victim)
            self.shared_dropped += 1
        else:
            self._unqueue(rec, at)
            rec.dropped += 1
        return True

    def _trim_total(self):
        """Beyond ``max_total_bytes``: drop the oldest data of the fullest queues."""
        cap = self.max_total_bytes
        if cap is None or self._total_bytes <= cap:
            return
        queues = [(rec.queued_bytes, rec.waiting, rec) for rec in self._inputs.values() if rec.ndata > 1]
        if self._shared_data > 1:
            queues.append((self._shared_bytes, self._shared_queue, None))
        while self._total_bytes > cap and queues:
            queues.sort(key=lambda q: q[0], reverse=True)
            _, queue, rec = queues[0]
            if not self._evict(queue, rec):
                del queues[0]
                continue
            if rec is None:
                ndata, nbytes = self._shared_data, self._shared_bytes
            else:
                ndata, nbytes = rec.ndata, rec.queued_bytes
            if ndata > 1:
                queues[0] = (nbytes, queue, rec)
            else:
                del queues[0]

    def _first_shared(self, rec):
        """The first shared-queue entry ``rec`` may take, or None."""
        key = rec.key
        for e in self._shared_queue:
            if e.pending is None or key in e.pending:
                return e
        return None

    def _take_next(self, rec):
        """Remove and return the next message waiting for ``rec`` (lowest sequence number)."""
        own = rec.waiting[0] if rec.waiting else None
        sh = self._first_shared(rec) if rec.shared and self._shared_queue else None
        if own is not None and (sh is None or own.seq < sh.seq):
            return self._unqueue(rec, 0)
        if sh is None:
            return None
        if sh.pending is not None:  # an end-of-stream marker: every shared input takes it
            sh.pending.discard(rec.key)
            if not sh.pending:
                self._shared_remove(sh)
        else:
            self._shared_remove(sh)
            if sh.delivery is not None:  # the writer now waits for this input's send
                sh.delivery.owed.discard(SHARED)
        return sh

    def _to_outbox(self, rec, e, serve):
        rec.outbox.append(e)
        rec.credits -= 1
        if rec.shared and rec.credits <= 0 and rec in self._ready:
            self._ready.remove(rec)
        if e.delivery is not None:
            e.delivery.owed.add(rec.key)
        if rec.sending is None and rec.key not in serve:
            serve.append(rec.key)

    def _fill(self, rec, serve):
        """Move what waits for ``rec`` to its outbox while it has credit (none while it is
        sent to in the background)."""
        while rec.credits > 0 and not rec.background:
            e = self._take_next(rec)
            if e is None:
                return
            self._to_outbox(rec, e, serve)


def _same(payload):
    return payload


def _index(queue, entry):
    """Position of ``entry`` (by identity) in a deque."""
    for i, e in enumerate(queue):
        if e is entry:
            return i
    raise PipelineError(f"{entry!r} is not in the queue")  # a broken invariant, never input
