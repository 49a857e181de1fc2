"""Matching items into trains by train id: a pure state machine.

No sockets, threads or clocks here: the caller passes the time (``now``, seconds of any
monotonic clock) into every call, and gets back the trains that are ready to send.  That
makes every rule below testable directly (``tests/kbstream/test_matcher_core.py``).

Sources and offsets
    Each source has a name and an integer train-id offset: an item with train id ``t``
    from a source with offset ``k`` belongs to train ``t + k``.

``mode="match"``
    A train is ready as soon as every source has given an item for it.  The output never
    goes backwards in time: when a train becomes complete, every pending train older than
    it is given up (counted ``incomplete``, reason ``superseded``).

``mode="buffer"``
    Up to ``buffer`` (n) train ids are kept.  When the first item of train ``x`` arrives,
    every pending train with id ``<= x - n`` is flushed (ready), complete or not, oldest
    first, so the pending trains are ``x - n + 1 .. x``.  A flushed train carries exactly
    the sources whose items arrived for it.  With n = 1 a train is flushed when the next
    train starts.

The output point
    Every train id at or below the *floor* (the newest train handed out or given up) is
    final.  An item for a train at or below it is *late*: it is counted for its source
    (``late``) and opens no train, so no train id is counted twice.

Bounds
    At most ``max_pending`` trains wait for items (default 100).  When a new train would
    make one more, the oldest pending train is given up (``match``: ``incomplete``,
    reason ``buffer_full``) or flushed (``buffer``).  Trains handed out and not yet
    settled (see below) are held by the outputs, which bound them themselves.

``max_wait``
    With ``max_wait`` (seconds), :meth:`MatchCore.tick` ends every pending train whose
    first item arrived ``max_wait`` seconds ago or earlier, and every older pending train
    with it (so order is kept): ``match`` gives them up (``incomplete``, reason
    ``max_wait``), ``buffer`` flushes them.

Counters (:meth:`MatchCore.stats`)
    ``seen``        train ids opened by an item (late items open none)
    ``matched``     trains handed out with every source present
    ``sent``        trains an output delivered (:meth:`MatchCore.settle` ``"sent"``)
    ``incomplete``  trains given up because sources were missing, by reason
                    (``superseded``, ``max_wait``, ``buffer_full``; ``source_removed``:
                    in ``buffer`` mode, a train whose only items came from sources
                    removed since, which is not sent empty)
    ``dropped``     trains handed out but delivered by no output, by reason
                    (``output_full``: pushed out of a full output queue; ``no_subscriber``:
                    a PUB output without a subscriber for it; ``unencodable``: it could
                    not be serialized)
    ``pending``     trains not final yet: ``waiting`` for items plus ``queued`` (handed
                    out, not settled)

    ``seen == sent + incomplete + dropped + pending`` holds after every call.

Per source: ``received`` items, ``missing`` (trains that ended without this source's
item: given up, or flushed partial), ``latency`` (in trains: the newest train id of any
source minus this source's newest), ``rate`` (items per second over the last
:data:`RATE_WINDOW` items, falling when items stop), ``status`` (``waiting`` before the
first item, ``stale`` after :data:`STALE_AFTER` seconds without one, else ``ok``),
``late`` and ``duplicates`` (a second item of one source for one train: ignored).

Sources added and removed while running
    :meth:`MatchCore.add_source` adds a source: from then on a train is complete only
    with its item too (trains waiting at that moment included; in ``match`` mode they
    complete if the new source sends them, else a later train supersedes them).
    :meth:`MatchCore.remove_source` removes one: its items are taken out of the waiting
    trains, which may make some complete (``match`` hands them out at once, newest
    complete last, giving up older incomplete ones as usual).  ``missing`` is counted
    for the sources configured when a train ends; a removed source's counters leave
    :meth:`~MatchCore.stats` (``removed`` counts the sources removed).  The train
    counters are untouched by either, so ``seen == sent + incomplete + dropped +
    pending`` keeps holding.
"""

import collections

from .errors import MatcherConfigError, MatcherStateError, UnknownSourceError

__all__ = [
    "MatchCore",
    "Train",
    "MODES",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_BUFFER",
    "INCOMPLETE_REASONS",
    "DROPPED_REASONS",
    "RATE_WINDOW",
    "STALE_AFTER",
]

MODES = ("match", "buffer")
#: trains that may wait for items at once
DEFAULT_MAX_PENDING = 100
#: trains kept in ``buffer`` mode
DEFAULT_BUFFER = 5
#: why a train was given up
INCOMPLETE_REASONS = ("superseded", "max_wait", "buffer_full", "source_removed")
#: why a handed-out train reached no client
DROPPED_REASONS = ("output_full", "no_subscriber", "unencodable")
#: items per source the rate is computed over
RATE_WINDOW = 32
#: seconds without an item after which a source's status is ``stale``
STALE_AFTER = 2.0


class Train:
    """One train: its id, ``parts`` ``{source name: payload}`` (in the order the sources
    were configured, once handed out), when its first item arrived, and whether every
    source is present."""

    __slots__ = ("tid", "parts", "first_seen", "complete")

    def __init__(self, tid, first_seen):
        self.tid = tid
        self.parts = {}
        self.first_seen = first_seen
        self.complete = False

    def __repr__(self):
        return f"Train({self.tid}, sources={list(self.parts)}, complete={self.complete})"


class _Source:
    __slots__ = ("name", "offset", "received", "missing", "late", "duplicates", "newest", "arrivals")

    def __init__(self, name, offset):
        self.name = name
        self.offset = offset
        self.received = 0
        self.missing = 0
        self.late = 0
        self.duplicates = 0
        self.newest = None
        self.arrivals = collections.deque(maxlen=RATE_WINDOW)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MatcherConfigError(f"{name} must be an integer >= {low}, not {value!r}")
    return value


class MatchCore:
    """The matching state machine (module docstring).

    Parameters
    ----------
    sources : mapping or iterable
        ``{name: offset}``, or names (offset 0), or ``(name, offset)`` pairs.
    mode : {'match', 'buffer'}
    buffer : int
        Trains kept in ``buffer`` mode (1 .. ``max_pending``; unused in ``match`` mode).
    max_pending : int
        Most trains waiting for items at once.
    max_wait : float, optional
        Seconds a train may wait for items (see :meth:`tick`).

    Raises
    ------
    MatcherConfigError
        an option out of range, no sources, or a source named twice.
    """

    def __init__(self, sources, mode="match", buffer=DEFAULT_BUFFER, max_pending=DEFAULT_MAX_PENDING,
                 max_wait=None):
        if mode not in MODES:
            raise MatcherConfigError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode = mode
        self.max_pending = _check_int("max_pending", max_pending, 1)
        self.buffer = _check_int("buffer", buffer, 1)
        if mode == "buffer" and self.buffer > self.max_pending:
            raise MatcherConfigError(f"buffer ({buffer}) must not exceed max_pending ({max_pending})")
        if max_wait is not None:
            try:
                max_wait = float(max_wait)
            except (TypeError, ValueError):
                raise MatcherConfigError(f"max_wait must be a number of seconds, not {max_wait!r}") from None
            if not max_wait > 0:
                raise MatcherConfigError(f"max_wait must be > 0 seconds, not {max_wait!r}")
        self.max_wait = max_wait
        if hasattr(sources, "items"):
            pairs = list(sources.items())
        else:
            pairs = [(s, 0) if isinstance(s, str) else tuple(s) for s in sources]
        self._sources = {}
        for name, offset in pairs:
            if not isinstance(name, str) or not name:
                raise MatcherConfigError(f"a source name must be a non-empty str, not {name!r}")
            if name in self._sources:
                raise MatcherConfigError(f"source {name!r} is given twice")
            if isinstance(offset, bool) or not isinstance(offset, int):
                raise MatcherConfigError(f"the offset of {name!r} must be an int, not {offset!r}")
            self._sources[name] = _Source(name, offset)
        if not self._sources:
            raise MatcherConfigError("a matcher needs at least one source")
        self._names = tuple(self._sources)
        self.removed = 0
        self._pending = {}  # tid -> Train, waiting for items
        self._queued = set()  # tids handed out, not settled
        self._floor = None  # every tid <= floor is final
        self._newest = None  # newest tid of any item
        self.seen = 0
        self.matched = 0
        self.sent = 0
        self.incomplete_by = dict.fromkeys(INCOMPLETE_REASONS, 0)
        self.dropped_by = dict.fromkeys(DROPPED_REASONS, 0)

    # ------------------------------------------------------------ properties

    @property
    def sources(self):
        """``{name: offset}`` in configured order."""
        return {n: s.offset for n, s in self._sources.items()}

    @property
    def floor(self):
        """The newest train id handed out or given up (None before the first)."""
        return self._floor

    @property
    def incomplete(self):
        return sum(self.incomplete_by.values())

    @property
    def dropped(self):
        return sum(self.dropped_by.values())

    @property
    def pending(self):
        return len(self._pending) + len(self._queued)

    # ------------------------------------------------------------ input

    def add(self, source, tid, payload, now):
        """Offer one item: ``tid`` as the source sent it (its offset is added here).

        Returns the list of trains that became ready (oldest first; possibly empty).  Each
        must be passed to :meth:`settle` once its outputs are done with it.

        Raises
        ------
        UnknownSourceError
            ``source`` is not one of the matcher's sources.
        """
        src = self._sources.get(source)
        if src is None:
            raise UnknownSourceError(f"no source named {source!r}", source)
        tid = int(tid) + src.offset
        src.received += 1
        src.arrivals.append(now)
        if src.newest is None or tid > src.newest:
            src.newest = tid
        if self._newest is None or tid > self._newest:
            self._newest = tid
        floor = self._floor
        if floor is not None and tid <= floor:
            src.late += 1
            return []
        ready = []
        train = self._pending.get(tid)
        if train is None:
            if self.mode == "buffer":
                self._flush_upto(tid - self.buffer, ready)
            train = Train(tid, now)
            self._pending[tid] = train
            self.seen += 1
        elif source in train.parts:
            src.duplicates += 1
            return ready
        train.parts[source] = payload
        if len(train.parts) == len(self._names):
            train.complete = True
            if self.mode == "match":
                self._give_up_upto(tid - 1, "superseded")
                del self._pending[tid]
                self._hand_out(train, ready)
        if len(self._pending) > self.max_pending:
            oldest = min(self._pending)
            if self.mode == "match":
                self._give_up_upto(oldest, "buffer_full")
            else:
                self._flush_upto(oldest, ready)
        return ready

    def tick(self, now):
        """End the trains that waited ``max_wait`` seconds (module docstring); returns the
        trains that became ready (``buffer`` mode; ``match`` only gives trains up)."""
        ready = []
        if self.max_wait is None or not self._pending:
            return ready
        limit = now - self.max_wait
        expired = [t for t, train in self._pending.items() if train.first_seen <= limit]
        if expired:
            last = max(expired)
            if self.mode == "match":
                self._give_up_upto(last, "max_wait")
            else:
                self._flush_upto(last, ready)
        return ready

    # ------------------------------------------------------------ sources

    def add_source(self, name, offset=0):
        """Add a source (module docstring).

        Raises
        ------
        MatcherConfigError
            a bad name or offset, or a name the matcher has already.
        """
        if not isinstance(name, str) or not name:
            raise MatcherConfigError(f"a source name must be a non-empty str, not {name!r}")
        if name in self._sources:
            raise MatcherConfigError(f"source {name!r} is given twice")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise MatcherConfigError(f"the offset of {name!r} must be an int, not {offset!r}")
        self._sources[name] = _Source(name, offset)
        self._names = tuple(self._sources)
        for train in self._pending.values():
            train.complete = False

    def remove_source(self, name):
        """Remove a source; returns the trains that became ready (``match`` mode: the
        waiting trains that are complete without it).

        Raises
        ------
        UnknownSourceError
            no source of that name.
        MatcherConfigError
            it is the last source.
        """
        if name not in self._sources:
            raise UnknownSourceError(f"no source named {name!r}", name)
        if len(self._sources) == 1:
            raise MatcherConfigError("a matcher needs at least one source: the last one cannot be removed")
        del self._sources[name]
        self._names = tuple(self._sources)
        self.removed += 1
        ready = []
        n = len(self._names)
        for tid in sorted(self._pending):
            train = self._pending.get(tid)
            if train is None:  # given up while handing out a newer one
                continue
            train.parts.pop(name, None)
            if len(train.parts) == n and train.parts:
                train.complete = True
                if self.mode == "match":
                    self._give_up_upto(tid - 1, "superseded")
                    del self._pending[tid]
                    self._hand_out(train, ready)
        return ready

    # ------------------------------------------------------------ output

    def settle(self, tid, outcome, reason=None):
        """Record what the outputs did with a handed-out train.

        ``outcome`` is ``"sent"`` (at least one output delivered it) or ``"dropped"`` with
        a ``reason`` from :data:`DROPPED_REASONS`.

        Raises
        ------
        MatcherStateError
            the train was not handed out, or is settled already.
        MatcherConfigError
            an unknown outcome or reason.
        """
        if outcome == "sent":
            pass
        elif outcome == "dropped":
            if reason not in self.dropped_by:
                raise MatcherConfigError(f"dropped reason must be one of {DROPPED_REASONS}, not {reason!r}")
        else:
            raise MatcherConfigError(f"outcome must be 'sent' or 'dropped', not {outcome!r}")
        try:
            self._queued.remove(tid)
        except KeyError:
            raise MatcherStateError(f"train {tid} was not handed out or is settled already") from None
        if outcome == "sent":
            self.sent += 1
        else:
            self.dropped_by[reason] += 1

    # ------------------------------------------------------------ internals

    def _hand_out(self, train, ready):
        if train.complete:
            self.matched += 1
        else:
            for name in self._names:
                if name not in train.parts:
                    self._sources[name].missing += 1
        parts = train.parts
        train.parts = {n: parts[n] for n in self._names if n in parts}
        self._floor = train.tid
        self._queued.add(train.tid)
        ready.append(train)

    def _give_up_upto(self, tid, reason):
        """Give up every pending train with id <= tid (match mode)."""
        old = [t for t in self._pending if t <= tid]
        for t in old:
            train = self._pending.pop(t)
            for name in self._names:
                if name not in train.parts:
                    self._sources[name].missing += 1
            self.incomplete_by[reason] += 1
        if old:
            top = max(old)
            if self._floor is None or top > self._floor:
                self._floor = top

    def _flush_upto(self, tid, ready):
        """Hand out every pending train with id <= tid, oldest first (buffer mode)."""
        old = sorted(t for t in self._pending if t <= tid)
        for t in old:
            train = self._pending.pop(t)
            if train.parts:
                self._hand_out(train, ready)
            else:  # its only items came from sources removed since
                for name in self._names:
                    self._sources[name].missing += 1
                self.incomplete_by["source_removed"] += 1
                if self._floor is None or t > self._floor:
                    self._floor = t

    # ------------------------------------------------------------ statistics

    def pending_ids(self):
        """Ids of the trains waiting for items, sorted."""
        return sorted(self._pending)

    def stats(self, now):
        """``{"sources": {name: {...}}, "trains": {...}}`` (module docstring)."""
        sources = {}
        newest = self._newest
        for name, s in self._sources.items():
            arr = s.arrivals
            if len(arr) >= 2 and now > arr[0]:
                rate = (len(arr) - 1) / (now - arr[0])
            else:
                rate = 0.0
            if not arr:
                status = "waiting"
            elif now - arr[-1] > STALE_AFTER:
                status = "stale"
            else:
                status = "ok"
            sources[name] = {
                "received": s.received,
                "missing": s.missing,
                "latency": None if s.newest is None else newest - s.newest,
                "rate": rate,
                "status": status,
                "late": s.late,
                "duplicates": s.duplicates,
                "offset": s.offset,
            }
        trains = {
            "seen": self.seen,
            "matched": self.matched,
            "sent": self.sent,
            "incomplete": self.incomplete,
            "dropped": self.dropped,
            "pending": self.pending,
            "waiting": len(self._pending),
            "queued": len(self._queued),
            "incomplete_by": dict(self.incomplete_by),
            "dropped_by": dict(self.dropped_by),
        }
        return {"sources": sources, "trains": trains}
