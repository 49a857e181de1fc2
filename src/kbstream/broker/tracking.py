"""Instance tracking: what one instance knows about the others on its topic.

One job: keep an :class:`InstanceRecord` per other instance from what it says
(``slotInstanceNew`` / ``Updated`` / ``Gone``, ``slotDiscoverAnswer``, ``slotHeartbeat``),
age the records (an instance silent for :data:`DEAD_AFTER_INTERVALS` of its heartbeat
intervals is gone, as Karabo's C++ tracker decides), and call the ``on_instance_new`` /
``on_instance_gone`` callbacks.

Threads: the slots run in the instance's worker thread, and so do the callbacks; ageing
runs in the instance's timer thread and posts its callbacks to the worker; snapshots
(:meth:`Tracker.instances`) may be taken from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from kbhash import Hash

__all__ = ["InstanceRecord", "Tracker", "TRACK_TICK", "DEAD_AFTER_INTERVALS"]

log = logging.getLogger("kbstream.broker")

#: A tracker checks for silent instances every this many seconds (C++: 3 s) ...
TRACK_TICK = 3.0
#: ... and declares an instance gone after this many heartbeat intervals without a sign of
#: life (C++: a countdown of heartbeatInterval ticks of 3 s).
DEAD_AFTER_INTERVALS = 3


@dataclass
class InstanceRecord:
    """What this instance knows about another one.

    Attributes
    ----------
    instance_id : str
    info : Hash
        The last full instanceInfo (from slotInstanceNew / Updated / DiscoverAnswer, or the
        reduced ``{type, heartbeatInterval}`` of a heartbeat when nothing else came).
    last_seen : float
        ``time.monotonic()`` of the last sign of life.
    last_heartbeat : float or None
        ``time.monotonic()`` of the last ``slotHeartbeat``.
    """

    instance_id: str
    info: Hash = field(default_factory=Hash)
    last_seen: float = 0.0
    last_heartbeat: float | None = None
    heartbeats: int = 0
    #: False after our own reconnect to the broker until the instance is seen again:
    #: its slotInstanceNew may have been sent while our queue was gone, so the next
    #: sighting (e.g. its slotDiscoverAnswer) counts as new.
    confirmed: bool = True

    @property
    def type(self):
        return self.info.get("type", "unknown")

    @property
    def heartbeat_interval(self):
        hb = self.info.get("heartbeatInterval")
        return hb if isinstance(hb, int) and hb > 0 else None


class Tracker:
    """The records of the other instances, and the callbacks on their comings and goings.

    Parameters
    ----------
    instance_id : str
        The own id (the own messages are not tracked).
    post : callable(fn, *args)
        Runs ``fn(*args)`` in the worker thread (for what the ageing finds).
    ask_info : callable(instance_id)
        Asks an instance heard only by its heartbeat for its instanceInfo.
    announced : callable(instance_id)
        Called (worker thread) when an instance sends ``slotInstanceNew``.
    """

    def __init__(self, instance_id, post, ask_info, announced):
        self._own_id = instance_id
        self._post = post
        self._ask_info = ask_info
        self._announced = announced
        self._lock = threading.Lock()
        self._records = {}
        self._new_callbacks = []
        self._gone_callbacks = []

    def on_instance_new(self, callback):
        self._new_callbacks.append(callback)
        return callback

    def on_instance_gone(self, callback):
        self._gone_callbacks.append(callback)
        return callback

    def instances(self) -> dict:
        """``{instance_id: InstanceRecord}`` (a snapshot)."""
        with self._lock:
            return {k: InstanceRecord(v.instance_id, Hash(v.info), v.last_seen,
                                      v.last_heartbeat, v.heartbeats)
                    for k, v in self._records.items()}

    def forget(self, instance_id=None):
        """Drop the record of ``instance_id`` (all records with None) without callbacks."""
        with self._lock:
            if instance_id is None:
                self._records.clear()
            else:
                self._records.pop(instance_id, None)

    def unconfirm_all(self):
        """After our own reconnect: the next sighting of every instance counts as new."""
        with self._lock:
            for rec in self._records.values():
                rec.confirmed = False

    def age(self):
        """Drop the instances silent for too long and post their gone-callbacks (timer
        thread)."""
        dead = []
        now = time.monotonic()
        with self._lock:
            for iid, rec in list(self._records.items()):
                interval = rec.heartbeat_interval or 10
                if now - rec.last_seen > DEAD_AFTER_INTERVALS * interval:
                    dead.append(self._records.pop(iid))
        for rec in dead:
            log.info("%s: %s silently disappeared (no heartbeat)", self._own_id, rec.instance_id)
            self._post(self._fire_gone, rec.instance_id, rec.info)

    # ---- slots (worker thread) ------------------------------------------------------

    def slots(self) -> dict:
        return {"slotDiscoverAnswer": self._slot_discover_answer,
                "slotInstanceNew": self._slot_instance_new,
                "slotInstanceUpdated": self._slot_instance_updated,
                "slotInstanceGone": self._slot_instance_gone,
                "slotHeartbeat": self._slot_heartbeat}

    def _slot_discover_answer(self, iid=None, info=None, *_):
        self._seen(iid, info, announce=True)

    def _slot_instance_new(self, iid=None, info=None, *_):
        self._seen(iid, info, announce=True, new=True)

    def _slot_instance_updated(self, iid=None, info=None, *_):
        self._seen(iid, info, announce=False)

    def _slot_instance_gone(self, iid=None, info=None, *_):
        if not isinstance(iid, str) or iid == self._own_id:
            return
        with self._lock:
            rec = self._records.pop(iid, None)
        self._fire_gone(iid, info if isinstance(info, Hash) else (rec.info if rec else Hash()))

    def _slot_heartbeat(self, iid=None, info=None, *_):
        if not isinstance(iid, str) or iid == self._own_id:
            return
        with self._lock:
            rec = self._records.get(iid)
            known = rec is not None
            if rec is None:
                rec = self._records[iid] = InstanceRecord(iid, Hash(info) if isinstance(
                    info, Hash) else Hash())
            rec.last_seen = rec.last_heartbeat = time.monotonic()
            rec.heartbeats += 1
        if not known:
            # a tracker that hears an unknown heartbeat asks the instance for its info
            self._ask_info(iid)

    def _seen(self, iid, info, *, announce, new=False):
        if not isinstance(iid, str) or iid == self._own_id:
            return
        info = Hash(info) if isinstance(info, Hash) else Hash()
        with self._lock:
            rec = self._records.get(iid)
            fresh = rec is None or not rec.confirmed
            if rec is None:
                rec = self._records[iid] = InstanceRecord(iid)
            rec.confirmed = True
            if len(info):
                rec.info = info
            rec.last_seen = time.monotonic()
        if new or (announce and fresh):
            for cb in list(self._new_callbacks):
                try:
                    cb(iid, rec.info)
                except Exception:
                    log.exception("%s: instance-new callback failed for %s", self._own_id, iid)
        if new:
            self._announced(iid)

    def _fire_gone(self, iid, info):
        for cb in list(self._gone_callbacks):
            try:
                cb(iid, info)
            except Exception:
                log.exception("%s: instance-gone callback failed for %s", self._own_id, iid)
