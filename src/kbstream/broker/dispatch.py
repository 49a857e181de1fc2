"""Incoming messages of one instance: the slot table, the worker thread, the replies sent.

One job: take every message the transport delivers, hand replies to the request table at
once, and run slot calls in arrival order: look the slot up, call it with the body's
arguments, and answer a ``replyTo`` (or ``replyFunction``) with the return value or an error
reply. Broadcasts are never answered; messages with a bad sender or reply address are
logged and dropped.

Threads: :meth:`Dispatcher.on_message` runs in the transport's thread (decode the header,
match replies, queue the rest); slots and the callbacks posted with :meth:`Dispatcher.post`
run in the one worker thread this module owns. A slot may itself make blocking requests:
their replies are matched in the transport's thread, not here.
"""

from __future__ import annotations

import logging
import queue
import threading

from kbhash import HashType

from . import codec
from .errors import MessageError
from .protocol import is_valid_reply_address, is_valid_sender, validate_slot_name

__all__ = ["Dispatcher", "SlotCall", "NO_REPLY"]

log = logging.getLogger("kbstream.broker")

#: Returned by a slot that must not be answered at all (not even with an empty reply).
NO_REPLY = object()


class SlotCall:
    """Per-call context available to slots through :attr:`BrokerInstance.current_call`."""

    __slots__ = ("sender", "slot", "header", "broadcast")

    def __init__(self, sender, slot, header, broadcast):
        self.sender = sender
        self.slot = slot
        self.header = header
        self.broadcast = broadcast


class Dispatcher:
    """Slot table and worker thread of one instance.

    Parameters
    ----------
    instance_id : str
    exchanges : dict
        ``signals``, ``slots`` and ``global_slots`` exchange names.
    publish : callable(exchange, routing_key, header, body)
    on_reply : callable(header, body, reply_from)
        Called in the transport's thread for every reply (header ``replyFrom``).
    state : callable() -> str
        The instance's state: while ``"starting"`` only ``slotPing`` is served, once
        ``"stopped"`` nothing.
    """

    def __init__(self, instance_id, exchanges, publish, on_reply, state):
        self._own_id = instance_id
        self._ex = exchanges
        self._publish = publish
        self._on_reply = on_reply
        self._state = state
        self._slots = {}
        self._signal_handlers = {}  # "<sender>.<signal>" -> [fn(*args)]
        self._tls = threading.local()
        self._work = None
        self._worker = None
        self._stopped = False

    # ---- slot table -----------------------------------------------------------------

    def register(self, name, fn):
        """Make ``fn(*args)`` the slot ``name`` (replacing one of that name)."""
        self._slots[validate_slot_name(name)] = fn

    def has_slot(self, name) -> bool:
        return name in self._slots

    def slot_names(self) -> list:
        return sorted(self._slots)

    @property
    def current_call(self):
        """The :class:`SlotCall` running in this thread, or None."""
        return getattr(self._tls, "call", None)

    def slots(self) -> dict:
        """The default slots about the slot table itself."""
        return {"slotHasSlot": self._slot_has_slot,
                "slotGetAvailableFunctions": self._slot_available_functions}

    def _slot_has_slot(self, name=None, *_):
        return codec.Typed(name in self._slots, HashType.BOOL)

    def _slot_available_functions(self, kind="slots", *_):
        names = sorted(self._slots) if kind == "slots" else []
        return codec.Typed(names, HashType.VECTOR_STRING)

    # ---- signals of other instances ----------------------------------------------------

    def subscribe(self, sender, signal, fn):
        """Call ``fn(*args)`` (worker thread) for each ``<sender>.<signal>`` emission;
        returns the routing key to bind on the Signals exchange."""
        key = f"{sender}.{validate_slot_name(signal)}"
        self._signal_handlers.setdefault(key, []).append(fn)
        return key

    def unsubscribe(self, sender, signal, fn):
        """Forget ``fn`` for ``<sender>.<signal>``; True if no handler is left for it."""
        key = f"{sender}.{signal}"
        fns = self._signal_handlers.get(key, [])
        if fn in fns:
            fns.remove(fn)
        if not fns:
            self._signal_handlers.pop(key, None)
            return True
        return False

    def _signal(self, routing_key, sender, payload):
        fns = self._signal_handlers.get(routing_key)
        if not fns or sender != routing_key.partition(".")[0]:
            return
        args = codec.args_from_body(payload)
        for fn in list(fns):
            try:
                fn(*args)
            except Exception:
                log.exception("%s: handler of signal %s failed", self._own_id, routing_key)

    # ---- worker thread --------------------------------------------------------------

    def start(self):
        """Start the worker thread."""
        self._work = queue.Queue()
        self._worker = threading.Thread(target=self._work_loop,
                                        name=f"kbstream-broker-{self._own_id}", daemon=True)
        self._worker.start()

    def stop(self):
        """Drop whatever arrives from now on and let the worker end after its queue."""
        self._stopped = True
        if self._work is not None:
            self._work.put(None)

    def join(self, timeout):
        """Wait (at most ``timeout`` seconds) for the worker to end; not from the worker."""
        t = self._worker
        if t is not None and t is not threading.current_thread():
            t.join(max(0.0, timeout))

    def post(self, fn, *args):
        """Run ``fn(*args)`` in the worker thread, after what is queued."""
        if self._work is not None and not self._stopped:
            self._work.put((fn, args))

    def _work_loop(self):
        while True:
            item = self._work.get()
            if item is None:
                return
            if len(item) == 2:
                fn, args = item
                try:
                    fn(*args)
                except Exception:
                    log.exception("%s: internal callback failed", self._own_id)
                continue
            try:
                self._dispatch(*item)
            except Exception:
                log.exception("%s: error handling a broker message", self._own_id)

    # ---- receiving ------------------------------------------------------------------

    def on_message(self, exchange, routing_key, body):
        """The transport's callback (transport thread): match replies here, since the
        worker may be blocked in a request; queue everything else for the worker."""
        try:
            header, payload = codec.decode_message(body)
        except MessageError as e:
            log.warning("%s: ignoring malformed broker message (%s, %s): %s",
                        self._own_id, exchange, routing_key, e)
            return
        reply_from = header.get("replyFrom")
        if reply_from is not None:
            self._on_reply(header, payload, reply_from)
            return
        if self._work is not None and not self._stopped:
            self._work.put((exchange, routing_key, header, payload))

    def _dispatch(self, exchange, routing_key, header, payload):
        own_id = self._own_id
        sender = header["signalInstanceId"]
        target, _, slot = routing_key.partition(".")
        if not slot:
            log.warning("%s: ignoring message with routing key %r", own_id, routing_key)
            return
        broadcast = exchange == self._ex["global_slots"]
        if exchange == self._ex["slots"] and target != own_id:
            return  # :none: or a stray binding
        if exchange == self._ex["signals"]:
            if self._state() == "up":
                self._signal(routing_key, sender, payload)
            return
        reply_to = header.get("replyTo")
        reply_function = header.get("replyFunction")
        if not is_valid_sender(sender) or (
                reply_to is not None and not is_valid_reply_address(reply_to)) or (
                reply_function is not None and not is_valid_reply_address(reply_function)):
            log.warning("%s: ignoring a message with an invalid sender or reply address (%r, %r)",
                        own_id, str(sender)[:80], str(reply_to)[:80])
            return
        state = self._state()
        if state == "starting" and slot != "slotPing":
            return  # not up yet: stay silent (the caller retries on slotInstanceNew)
        if state == "stopped":
            return
        fn = self._slots.get(slot)
        if fn is None:
            if not broadcast and reply_to is not None:
                self._reply_error(sender, reply_to, f"'{own_id}' has no slot '{slot}'")
            elif not broadcast:
                log.info("%s: call of unknown slot %r from %s", own_id, slot, sender)
            return
        args = codec.args_from_body(payload)
        self._tls.call = SlotCall(sender, slot, header, broadcast)
        try:
            result = fn(*args)
        except Exception as e:
            log.warning("%s: slot %s called by %s failed: %s", own_id, slot, sender,
                        e, exc_info=log.isEnabledFor(logging.DEBUG))
            if not broadcast and reply_to is not None:
                self._reply_error(sender, reply_to,
                                  f"'{own_id}'.{slot} failed: {type(e).__name__}: {e}")
            return
        finally:
            self._tls.call = None
        if broadcast or result is NO_REPLY:
            return  # broadcasts are never answered
        values = () if result is None else (result if isinstance(result, tuple) else (result,))
        try:
            if reply_to is not None:
                self._publish(self._ex["slots"], f"{sender}.{reply_to}",
                              codec.make_header(own_id, reply_from=reply_to),
                              codec.body_from_args(values))
            elif reply_function is not None:
                self._publish(self._ex["slots"], f"{sender}.{reply_function}",
                              codec.make_header(own_id), codec.body_from_args(values))
        except Exception as e:  # e.g. an unencodable reply value
            log.warning("%s: reply of slot %s not sent: %s", own_id, slot, e)
            if reply_to is not None:
                self._reply_error(sender, reply_to, f"reply of {slot} not encodable: {e}")

    def _reply_error(self, requester, reply_to, message, details=""):
        self._publish(self._ex["slots"], f"{requester}.{reply_to}",
                      codec.make_header(self._own_id, reply_from=reply_to, error=True),
                      codec.body_from_args((message, details)))
