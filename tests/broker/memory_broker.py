"""An in-memory broker for the broker unit tests (a test double, not part of kbstream).

:class:`MemoryBroker` routes messages between :class:`MemoryTransport` objects the way
RabbitMQ does for Karabo; a :class:`MemoryTransport` implements
:class:`kbstream.broker.transport.Transport` and is passed to
``BrokerInstance(..., transport=MemoryTransport(broker))``. The instance opens it; whoever
made it closes it (after the instance).

Threads: each transport delivers in a thread of its own, as the real one does.
"""

from __future__ import annotations

import collections
import logging
import queue as _queue
import threading
import time

from kbstream.broker.errors import BrokerConnectionError
from kbstream.broker.transport import MAX_PENDING, NONE_KEY, Transport, queue_fallback_name

__all__ = ["MemoryBroker", "MemoryTransport", "topic_matches"]

log = logging.getLogger("kbstream.broker.transport")


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: words split at ``.``, ``*`` = one word, ``#`` = zero or more."""
    p = pattern.split(".")
    k = key.split(".")

    def match(i, j):
        while i < len(p):
            if p[i] == "#":
                if i == len(p) - 1:
                    return True
                return any(match(i + 1, jj) for jj in range(j, len(k) + 1))
            if j >= len(k) or (p[i] != "*" and p[i] != k[j]):
                return False
            i += 1
            j += 1
        return j == len(k)

    return match(0, 0)


class MemoryBroker:
    """An in-memory topic router with the broker behaviour Karabo relies on.

    Topic exchanges, per-queue bindings with ``*`` / ``#`` matching, one delivery per queue
    however many bindings match, messages nobody is bound for dropped silently, exclusive
    queues (a second open of the same name gets the fallback name), and :meth:`restart`,
    which drops every queue and binding and makes the transports reconnect.
    """

    def __init__(self):
        self._lock = threading.RLock()
        self.exchanges = set()
        self.queues = {}  # name -> MemoryTransport
        self.bindings = []  # (exchange, pattern, queue)
        self.published = []  # (exchange, routing key, body), for tests
        self.up = True

    def _declare(self, transport, queue, exchanges, bindings):
        with self._lock:
            if not self.up:
                raise BrokerConnectionError("memory broker is down")
            name = queue
            if name in self.queues:
                name = queue_fallback_name(queue)
            self.queues[name] = transport
            self.exchanges.update(exchanges)
            for ex in exchanges:
                self.bindings.append((ex, NONE_KEY, name))
            for ex, key in bindings:
                self.bindings.append((ex, key, name))
            return name

    def _bind(self, queue, exchange, key):
        with self._lock:
            if queue in self.queues:
                self.bindings.append((exchange, key, queue))

    def _remove(self, queue):
        with self._lock:
            self.queues.pop(queue, None)
            self.bindings = [b for b in self.bindings if b[2] != queue]

    def publish(self, exchange, routing_key, body):
        """Route one message (also usable by tests to inject raw bytes)."""
        with self._lock:
            if not self.up:
                return False
            self.published.append((exchange, routing_key, bytes(body)))
            targets = {q for ex, pat, q in self.bindings
                       if ex == exchange and topic_matches(pat, routing_key)}
            receivers = [self.queues[q] for q in sorted(targets) if q in self.queues]
        for t in receivers:
            t._inbox.put((exchange, routing_key, bytes(body)))
        return True

    def restart(self, down_seconds=0.05):
        """Simulate a broker restart: all queues and bindings are lost, transports reconnect."""
        with self._lock:
            self.up = False
            transports = list(self.queues.values())
            self.queues.clear()
            self.bindings.clear()
            self.exchanges.clear()
        for t in transports:
            t._lost()
        time.sleep(down_seconds)
        with self._lock:
            self.up = True
        for t in transports:
            t._inbox.put(_RECONNECT)


_RECONNECT = object()
_STOP = object()


class MemoryTransport(Transport):
    """A :class:`Transport` on a :class:`MemoryBroker`; delivers in its own thread."""

    def __init__(self, broker: MemoryBroker, name="kbstream"):
        self.broker = broker
        self.name = name
        self.queue_name = None
        self._inbox = _queue.Queue()
        self._thread = None
        self._connected = False
        self._outbox = collections.deque()
        self._lock = threading.Lock()

    @property
    def connected(self):
        return self._connected

    def open(self, queue, exchanges, bindings, on_message, on_reconnect=None):
        self._wanted = queue
        self._exchanges = list(exchanges)
        self._bindings = list(bindings)
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self.queue_name = self.broker._declare(self, queue, self._exchanges, self._bindings)
        self._connected = True
        self._thread = threading.Thread(target=self._run, name=f"kbstream-mem-{self.name}",
                                        daemon=True)
        self._thread.start()

    def bind(self, exchange, routing_key):
        self._bindings.append((exchange, routing_key))
        if self._connected:
            self.broker._bind(self.queue_name, exchange, routing_key)

    def publish(self, exchange, routing_key, body):
        with self._lock:
            if not self._connected:
                if len(self._outbox) >= MAX_PENDING:
                    self._outbox.popleft()
                self._outbox.append((exchange, routing_key, body))
                return
        self.broker.publish(exchange, routing_key, body)

    def close(self, timeout=None):
        if self._thread is None:
            return
        self.broker._remove(self.queue_name)
        self._connected = False
        self._inbox.put(_STOP)
        self._thread.join(5.0 if timeout is None else timeout)
        self._thread = None

    def _lost(self):
        with self._lock:
            self._connected = False

    def _run(self):
        while True:
            item = self._inbox.get()
            if item is _STOP:
                return
            if item is _RECONNECT:
                self.queue_name = self.broker._declare(self, self._wanted, self._exchanges,
                                                       self._bindings)
                with self._lock:
                    self._connected = True
                    pending = list(self._outbox)
                    self._outbox.clear()
                for msg in pending:
                    self.broker.publish(*msg)
                if self._on_reconnect is not None:
                    threading.Thread(target=self._on_reconnect, daemon=True).start()
                continue
            try:
                self._on_message(*item)
            except Exception:
                log.exception("error in the broker message callback")
