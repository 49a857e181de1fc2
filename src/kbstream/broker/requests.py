"""Request/reply of one instance: the table of pending requests and their futures.

One job: send a request with a fresh ``replyTo`` (a UUID), keep its future until the reply
(header ``replyFrom``) arrives, turn an error reply into :class:`RemoteError`, and fail it
with :class:`RequestTimeout` when the time is up (the broker drops messages nobody is bound
for, so an offline target never answers).

Threads: requests are sent from any thread; replies are matched in the transport's thread
(so a slot that itself waits for a reply in the worker thread does not block it); expiry
runs in a ``threading.Timer`` per request with a timeout, or in the waiting thread; the
done-callbacks of a :class:`ReplyFuture` run on a small shared thread pool.
"""

from __future__ import annotations

import concurrent.futures
import threading
import uuid

from . import codec
from .errors import RemoteError, RequestTimeout

__all__ = ["ReplyFuture", "Requests"]

#: How long a waiter gives a reply that was matched just as its time ran out to be set.
_GRACE = 1.0

_callback_pool = None
_callback_pool_lock = threading.Lock()


def _callbacks():
    global _callback_pool
    with _callback_pool_lock:
        if _callback_pool is None:
            _callback_pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="kbstream-callbacks")
        return _callback_pool


def complete(fut, outcome):
    """Set a future's result (or exception, when ``outcome`` is one) unless already done."""
    if fut.done():
        return
    try:
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
    except concurrent.futures.InvalidStateError:
        pass


class ReplyFuture(concurrent.futures.Future):
    """The future of a request: its result is the tuple of reply values.

    Its done-callbacks run on a small thread pool, never on the broker's I/O thread, so a
    callback may block, even on another request.

    Attributes
    ----------
    kb_reply_to : str
        The request's ``replyTo``.
    instance_id, slot : str
        Where the request went.
    """

    def __init__(self, table, reply_to, instance_id, slot):
        super().__init__()
        self._table = table
        self.kb_reply_to = reply_to
        self.instance_id = instance_id
        self.slot = slot

    def add_done_callback(self, fn):
        super().add_done_callback(lambda f: _callbacks().submit(fn, f))

    def abandon(self, exc):
        """Fail the request with ``exc`` and forget it: a reply that still comes is ignored."""
        self._table.cancel(self.kb_reply_to, exc)

    def wait(self, timeout):
        """The reply values within ``timeout`` seconds.

        Raises
        ------
        RequestTimeout
            No reply in time (the request is forgotten).
        RemoteError
            The slot answered with an error reply.
        """
        try:
            return self.result(timeout)
        except TimeoutError:  # concurrent.futures.TimeoutError, or the future's own outcome
            if self.done():
                return self.result()
        self._table.expire(self.kb_reply_to, timeout)
        try:  # a reply matched at this very moment is being set: give it a moment
            return self.result(_GRACE)
        except TimeoutError:
            if self.done():
                return self.result()
        raise RequestTimeout(self._table.timeout_message(self.instance_id, self.slot, timeout),
                             self.instance_id, self.slot, timeout)


class Requests:
    """The pending requests of one instance.

    Parameters
    ----------
    instance_id : str
        The sender id put into request headers.
    exchange : str
        The ``<topic>.Slots`` exchange requests go to.
    publish : callable(exchange, routing_key, header, body)
    topic : str
        Named in timeout messages.
    """

    def __init__(self, instance_id, exchange, publish, topic):
        self._own_id = instance_id
        self._exchange = exchange
        self._publish = publish
        self._topic = topic
        self._lock = threading.Lock()
        self._pending = {}  # replyTo -> ReplyFuture

    @property
    def pending(self) -> int:
        """Number of requests waiting for their reply."""
        return len(self._pending)

    def send(self, instance_id, slot, args, timeout=None) -> ReplyFuture:
        """Publish ``<instance_id>.<slot>(*args)`` with a fresh ``replyTo``; return its future.

        With ``timeout`` the future fails with :class:`RequestTimeout` after that many
        seconds. A publish error is raised here and leaves nothing pending.
        """
        reply_to = str(uuid.uuid4())
        fut = ReplyFuture(self, reply_to, instance_id, slot)
        with self._lock:
            self._pending[reply_to] = fut
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, self.expire, (reply_to, timeout))
            timer.daemon = True
            timer.start()
            fut.add_done_callback(lambda _f, t=timer: t.cancel())
        try:
            self._publish(self._exchange, f"{instance_id}.{slot}",
                          codec.make_header(self._own_id, reply_to=reply_to),
                          codec.body_from_args(args))
        except BaseException:
            with self._lock:
                self._pending.pop(reply_to, None)
            if timer is not None:
                timer.cancel()
            raise
        return fut

    def timeout_message(self, instance_id, slot, timeout):
        return (f"no reply from {instance_id}.{slot} within {timeout:g} s (is {instance_id!r} "
                f"online in topic {self._topic!r}?)")

    def expire(self, reply_to, timeout):
        """Fail a request with :class:`RequestTimeout` if it is still pending."""
        with self._lock:
            fut = self._pending.pop(reply_to, None)
        if fut is not None and not fut.done():
            complete(fut, RequestTimeout(self.timeout_message(fut.instance_id, fut.slot, timeout),
                                         fut.instance_id, fut.slot, timeout))

    def cancel(self, reply_to, exc):
        """Fail a pending request with ``exc`` and forget it."""
        with self._lock:
            fut = self._pending.pop(reply_to, None)
        if fut is not None:
            complete(fut, exc)

    def fail_all(self, make_exc):
        """Fail every pending request with ``make_exc(future)`` (when the instance closes)."""
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for fut in pending:
            complete(fut, make_exc(fut))

    def on_reply(self, header, payload, reply_from):
        """Match a reply (transport thread): complete its future, or drop a late one."""
        with self._lock:
            fut = self._pending.pop(reply_from, None)
        if fut is None or fut.done():
            return  # late (timed out) or not ours
        args = codec.args_from_body(payload)
        if header.get("error") is True:
            msg = args[0] if args and isinstance(args[0], str) else ""
            details = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            iid, slot = fut.instance_id, fut.slot
            outcome = RemoteError(f"{iid}.{slot} failed: {msg}", iid, slot, msg, details)
        else:
            outcome = args
        complete(fut, outcome)
