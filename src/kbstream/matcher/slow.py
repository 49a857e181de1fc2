"""Slow (control) data for the train matcher: ``DEVICE.property`` values on every train.

A slow source names one property of a Karabo device, ``DEVICE.property`` (the property
path may have dots: ``DEVICE.node.int32``; a device id has none).  Its values come from
the device's ``signalChanged`` on the broker (each changed property with its own
``sec`` / ``frac`` / ``tid`` timestamp attributes), the first one from
``slotGetConfiguration``.  :class:`SlowData` keeps the last :data:`HISTORY` values of each
property and, for every train the matcher hands out, attaches the value *as of that
train*: the newest value whose own train id is not after the train's (a value stamped
without a train id, tid 0, applies from its arrival on).

Layout in a bridge train (docs/matcher-karabo.md), following what the bridge gives for
control data of a run (``<key>.value`` / ``<key>.timestamp`` there)::

    data["DEVICE"]["property"]                  the value
    data["DEVICE"]["property.timestamp"]        its own time, float seconds
    data["DEVICE"]["property.timestamp.sec"]    str, as in the bridge metadata
    data["DEVICE"]["property.timestamp.frac"]   str, 18 digits of attoseconds
    data["DEVICE"]["property.timestamp.tid"]    int, the train id the device stamped
    metadata["DEVICE"]                          source DEVICE, the train's id, the
                                                newest of its properties' timestamps

A device that has no value as of a train yet is left out of that train (counted per
property as ``missing``).  Slow sources never hold a train back: they are not matched.

Threads: :meth:`SlowData.update` runs in the broker instance's worker thread;
:meth:`SlowData.attach` in an input's handler thread with the matching lock held.  One
small lock guards the histories; no I/O under it.
"""

import collections
import threading

from kbhash import Hash

from ..bridge import flatten_hash
from ..bridge._rules import source_metadata, timestamp_fields
from .errors import SourceSpecError

__all__ = ["SlowData", "SlowValue", "is_slow_source", "parse_slow_source", "HISTORY"]

#: values kept per property, for "as of the train" lookups of trains a little behind
HISTORY = 32


def is_slow_source(text):
    """True for ``DEVICE.property`` (no ``:`` before an ``=``), False for
    ``[ALIAS@]DEVICE:CHANNEL[=HOST:PORT]``."""
    return isinstance(text, str) and ":" not in text.partition("=")[0] and "." in text


def parse_slow_source(text):
    """``DEVICE.property`` -> ``(device, property)``.

    Raises
    ------
    SourceSpecError
        no ``.``, an empty part, or characters a Karabo id or key cannot have.
    """
    if not isinstance(text, str):
        raise SourceSpecError(f"a slow source must be a str DEVICE.property, not {text!r}", text)
    device, dot, prop = text.partition(".")
    if not dot or not device or not prop or any(p == "" for p in prop.split(".")):
        raise SourceSpecError(f"slow source {text!r}: expected DEVICE.property", text)
    if any(not (c.isalnum() or c in "_/-") for c in device):
        raise SourceSpecError(f"slow source {text!r}: a device id has only letters, digits, "
                              "'_', '/' and '-'", text)
    if any(not (c.isalnum() or c in "_.") for c in prop):
        raise SourceSpecError(f"slow source {text!r}: a property path has only letters, "
                              "digits, '_' and '.'", text)
    return device, prop


class SlowValue:
    """One value of a property with its own timestamp (``sec``, ``frac``, ``tid``)."""

    __slots__ = ("value", "sec", "frac", "tid")

    def __init__(self, value, sec=0, frac=0, tid=0):
        self.value = value
        self.sec = sec
        self.frac = frac
        self.tid = tid

    def __repr__(self):
        return f"SlowValue({self.value!r}, tid={self.tid})"


class _Prop:
    __slots__ = ("history", "updates", "missing")

    def __init__(self):
        self.history = collections.deque(maxlen=HISTORY)
        self.updates = 0
        self.missing = 0


class SlowData:
    """The slow sources of one matcher.

    Parameters
    ----------
    sources : iterable of str
        ``DEVICE.property`` texts.

    Raises
    ------
    SourceSpecError
        a text that is not ``DEVICE.property``, or one given twice.
    """

    def __init__(self, sources):
        self._lock = threading.Lock()
        self._devices = {}  # device -> {property: _Prop}
        for text in sources:
            device, prop = parse_slow_source(text)
            props = self._devices.setdefault(device, {})
            if prop in props:
                raise SourceSpecError(f"slow source {text!r} given twice", text)
            props[prop] = _Prop()

    @property
    def devices(self):
        """The device ids, in the order given."""
        return list(self._devices)

    def names(self):
        """``DEVICE.property`` of every slow source."""
        return [f"{d}.{p}" for d, props in self._devices.items() for p in props]

    def update(self, device, config, initial=False):
        """Take the wanted properties out of ``config`` (a Hash: a ``signalChanged``
        argument, or with ``initial`` the ``slotGetConfiguration`` answer, which only
        fills properties that have no value yet).  Returns how many values were taken."""
        props = self._devices.get(device)
        if props is None or not isinstance(config, Hash):
            return 0
        taken = 0
        flat = None
        for prop, p in props.items():
            try:
                present = prop in config
            except (KeyError, TypeError, ValueError):  # a path through a non-Hash node
                present = False
            if not present:
                continue
            if flat is None:  # the values in the bridge's form (arrays, ImageData, ...)
                flat = flatten_hash(config)[0]
            if prop in flat:
                value = flat[prop]
            else:  # a node: its leaves
                head = prop + "."
                value = {k[len(head):]: x for k, x in flat.items() if k.startswith(head)}
                if not value:
                    continue
            try:
                ts = config.get_timestamp(prop)
                sec, frac, tid = ts.sec, ts.frac, ts.tid
            except (KeyError, TypeError, ValueError, AttributeError):
                sec = frac = tid = 0
            v = SlowValue(value, int(sec), int(frac), int(tid))
            with self._lock:
                if initial and p.history:
                    continue
                p.history.append(v)
                p.updates += 1
            taken += 1
        return taken

    def latest(self, name):
        """The newest :class:`SlowValue` of ``DEVICE.property``, or None."""
        device, prop = parse_slow_source(name)
        with self._lock:
            h = self._devices[device][prop].history
            return h[-1] if h else None

    def attach(self, tid, data, metadata):
        """Train hook (:meth:`TrainMatcher.add_train_hook`): add each device's values as
        of train ``tid`` to ``data`` and ``metadata``."""
        with self._lock:
            for device, props in self._devices.items():
                values = {}
                newest = None
                for prop, p in props.items():
                    chosen = None
                    for v in reversed(p.history):
                        if v.tid == 0 or v.tid <= tid:
                            chosen = v
                            break
                    if chosen is None:
                        p.missing += 1
                        continue
                    if isinstance(chosen.value, dict):
                        for k, x in chosen.value.items():
                            values[f"{prop}.{k}"] = x
                    else:
                        values[prop] = chosen.value
                    fields = timestamp_fields(chosen.sec, chosen.frac)
                    values[f"{prop}.timestamp"] = fields["timestamp"]
                    values[f"{prop}.timestamp.sec"] = fields["timestamp.sec"]
                    values[f"{prop}.timestamp.frac"] = fields["timestamp.frac"]
                    values[f"{prop}.timestamp.tid"] = chosen.tid
                    if newest is None or (chosen.sec, chosen.frac) > (newest.sec, newest.frac):
                        newest = chosen
                if values:
                    data[device] = values
                    metadata[device] = source_metadata(device, tid, newest.sec, newest.frac)

    def stats(self):
        """``{DEVICE.property: {updates, missing, tid, status}}``: values received,
        trains that went without one, the train id of the newest value, and ``ok`` or
        ``waiting`` (no value yet)."""
        out = {}
        with self._lock:
            for device, props in self._devices.items():
                for prop, p in props.items():
                    last = p.history[-1] if p.history else None
                    out[f"{device}.{prop}"] = {
                        "updates": p.updates,
                        "missing": p.missing,
                        "tid": last.tid if last is not None else 0,
                        "status": "ok" if last is not None else "waiting",
                    }
        return out
