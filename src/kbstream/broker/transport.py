"""The AMQP transport of a broker instance: pika in one dedicated thread.

One job: own one connection, one queue with its bindings, and deliver every message to one
callback. :class:`Transport` is the interface a :class:`~kbstream.broker.BrokerInstance`
uses (the tests implement it in memory); :class:`PikaTransport` implements it on a real
broker, reconnecting after a loss.

Threads: the callback, ``on_message(exchange, routing_key, body)``, runs **in the
transport's own thread** (keep it short: decode the header, hand the rest to a worker);
``publish`` and ``bind`` may be called from any thread; ``on_reconnect`` runs in a thread
of its own.

Broker objects as Karabo 3 declares them (docs/wire/karabo-broker-amqp.md, sections 3 and 4): the three
exchanges ``type=topic``, non-durable, auto-delete, each kept alive by a ``:none:`` binding
of the own queue; the own queue exclusive, auto-delete, non-durable with ``x-max-length``
10000, ``x-overflow`` ``drop-head``, ``x-message-ttl`` 120000 ms, consumed with no-ack as
the exclusive consumer; when the name is taken, ``<name>:<hex clock>``.

The pika module is imported only when a :class:`PikaTransport` is created.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from .._lifecycle import Lifecycle
from .errors import BrokerConnectionError, BrokerError, NotStartedError

__all__ = ["Transport", "PikaTransport", "QUEUE_ARGUMENTS", "NONE_KEY", "MAX_PENDING",
           "queue_fallback_name"]

log = logging.getLogger("kbstream.broker.transport")


#: Largest message kbstream publishes (Karabo's broker messages are small).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024


def _check_key(key, what):
    """AMQP routing and binding keys are short strings: at most 255 bytes of UTF-8."""
    if not isinstance(key, str) or len(key.encode("utf-8", "surrogatepass")) > 255:
        raise BrokerError(f"invalid {what} {str(key)[:60]!r}...: at most 255 bytes")


def _connection_errors():
    errors = [OSError, ConnectionError]
    try:
        import pika.exceptions as pe

        errors += [pe.AMQPConnectionError, pe.AMQPChannelError, pe.StreamLostError]
    except ImportError:  # pragma: no cover - PikaTransport refuses to exist without pika
        pass
    return tuple(errors)


_CONNECTION_ERRORS = ()

QUEUE_ARGUMENTS = {"x-max-length": 10000, "x-overflow": "drop-head", "x-message-ttl": 120000}
#: Dummy routing key that keeps an auto-delete exchange alive as long as the own queue.
NONE_KEY = ":none:"
#: Outgoing messages kept while the connection is down (as the C++ client does).
MAX_PENDING = 1000


class Transport:
    """Interface of a transport (see the module docstring): what
    :class:`~kbstream.broker.BrokerInstance` calls on the object passed as its
    ``transport``. ``open`` starts it; ``close`` ends it."""

    #: The queue name actually in use (after the fallback), once open.
    queue_name: str | None = None

    def open(self, queue, exchanges, bindings, on_message, on_reconnect=None):
        """Connect, declare ``exchanges`` and ``queue``, bind, start consuming.

        Parameters
        ----------
        queue : str
            Wanted queue name ``<topic>.<instanceId>``.
        exchanges : list of str
            Exchanges to declare; the queue is bound to each with ``:none:``.
        bindings : list of (exchange, routing key)
        on_message : callable(exchange, routing_key, body)
        on_reconnect : callable(), optional
            Called (in a helper thread) after the connection was lost and restored, with
            everything redeclared.
        """
        raise NotImplementedError

    def bind(self, exchange, routing_key):
        """Add a binding of the own queue (also after reconnects)."""
        raise NotImplementedError

    def publish(self, exchange, routing_key, body: bytes):
        """Send a message; buffered (up to 1000) while the connection is down."""
        raise NotImplementedError

    def close(self, timeout=None):
        """Send what is pending, disconnect, stop the thread, within ``timeout`` seconds
        (None: the transport's own default). Idempotent."""
        raise NotImplementedError

    @property
    def connected(self) -> bool:
        raise NotImplementedError


def _describe(exc, depth=0):
    """The root cause of a pika connection error, e.g. ``ConnectionRefusedError(111, ...)``
    (pika nests the real error in workflow exceptions with empty messages)."""
    if depth < 5:
        inner = getattr(exc, "exceptions", None)
        if inner:
            return _describe(inner[-1], depth + 1)
        for attr in ("exception",):
            if isinstance(getattr(exc, attr, None), BaseException):
                return _describe(getattr(exc, attr), depth + 1)
        if exc.args and isinstance(exc.args[0], BaseException):
            return _describe(exc.args[0], depth + 1)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else repr(exc)


def queue_fallback_name(name):
    """The queue name used when ``name`` is taken: ``<name>:<hex clock>`` (as Karabo)."""
    return f"{name}:{time.monotonic_ns():x}"


class PikaTransport(Lifecycle, Transport):
    """AMQP 0-9-1 over pika's ``BlockingConnection``, owned by one daemon thread.

    Its life cycle follows kbstream's rule: the constructor starts no thread and contacts
    no broker; :meth:`open` (the transport's ``start()``, with what to declare) connects
    and starts the thread; :meth:`close` (= :meth:`stop`) ends it within
    ``close_timeout`` seconds and may be called any number of times. Wrong order raises
    :class:`~kbstream.broker.NotStartedError`.

    pika connections are not thread-safe: every operation runs in the owner thread, other
    threads hand work over with ``add_callback_threadsafe``. The thread loops
    ``process_data_events`` so that AMQP heartbeats are serviced. On connection loss it
    retries every ``reconnect_interval`` seconds through the URL list, redeclares the queue,
    exchanges and bindings, sends the buffered messages and calls ``on_reconnect``.

    Parameters
    ----------
    config : BrokerConfig
    connect_timeout : float
        ``open`` keeps trying the URL list for this many seconds; 0 = one attempt per URL.
    reconnect_interval : float
        Pause between reconnect attempts after a loss.
    name : str
        Shown as the connection name in ``rabbitmqctl list_connections``.
    close_timeout : float
        How long :meth:`close` waits for the thread to send what is pending and end.

    Raises
    ------
    BrokerConnectionError
        pika (the ``broker`` extra) is not installed.
    """

    _state_error = NotStartedError

    def __init__(self, config, *, connect_timeout=0.0, reconnect_interval=1.0,
                 name="kbstream", close_timeout=5.0):
        Lifecycle.__init__(self)
        try:
            import pika  # only here: nothing else in kbstream imports the AMQP client
        except ImportError as e:
            raise BrokerConnectionError(
                "the AMQP client pika is not installed: pip install 'kbstream[broker]'",
                [u.safe for u in config.urls]) from e

        global _CONNECTION_ERRORS
        _CONNECTION_ERRORS = _connection_errors()

        self._pika = pika
        self.config = config
        self.connect_timeout = float(connect_timeout)
        self.reconnect_interval = float(reconnect_interval)
        self.name = name
        self.close_timeout = float(close_timeout)
        self.queue_name = None
        self._wanted_queue = None
        self._conn = None
        self._chan = None
        self._thread = None
        self._lock = threading.Lock()
        self._outbox = collections.deque()
        self._new_bindings = collections.deque()
        self._bindings = []
        self._exchanges = []
        self._closing = threading.Event()
        self._connected = threading.Event()
        self._opened = threading.Event()
        self._open_error = None
        self._on_message = None
        self._on_reconnect = None
        self._dropped = 0

    # ---- public API -----------------------------------------------------------------

    @property
    def connected(self):
        return self._connected.is_set()

    def open(self, queue, exchanges, bindings, on_message, on_reconnect=None):
        """Start: connect, declare, bind, consume (see :meth:`Transport.open`); returns
        the transport.

        Raises
        ------
        BrokerConnectionError
            No broker of the list answered within ``connect_timeout``.
        NotStartedError
            Opened twice, or after :meth:`close`.
        """
        self._check_open("open()")
        if self.started:
            raise NotStartedError("transport already opened")
        self._wanted_queue = queue
        self._exchanges = list(exchanges)
        self._bindings = list(bindings)
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        return self.start()

    def _start(self):
        if self._wanted_queue is None:
            raise NotStartedError("a PikaTransport is started by open(queue, exchanges, ...)")
        self._thread = threading.Thread(target=self._run, name=f"kbstream-amqp-{self.name}",
                                        daemon=True)
        self._thread.start()
        # bounded: the thread gives up after connect_timeout (+ socket timeouts per URL)
        self._opened.wait(self.connect_timeout + 15.0 * len(self.config.urls) + 5.0)
        if self._open_error is not None:
            self._thread.join(5.0)
            raise self._open_error
        if not self._connected.is_set():
            self._closing.set()
            raise BrokerConnectionError(
                f"broker connection not established in time "
                f"({', '.join(u.safe for u in self.config.urls)})",
                [u.safe for u in self.config.urls])

    def bind(self, exchange, routing_key):
        _check_key(routing_key, "binding key")
        with self._lock:
            self._bindings.append((exchange, routing_key))
            self._new_bindings.append((exchange, routing_key))
        self._wake(self._bind_pending)

    def publish(self, exchange, routing_key, body):
        if self._closing.is_set() and (self._thread is None or not self._thread.is_alive()):
            raise NotStartedError("transport is closed")
        _check_key(routing_key, "routing key")
        if len(body) > MAX_MESSAGE_SIZE:
            raise BrokerError(f"message of {len(body)} bytes is larger than {MAX_MESSAGE_SIZE}")
        with self._lock:
            if len(self._outbox) >= MAX_PENDING:
                self._outbox.popleft()
                self._dropped += 1
                if self._dropped in (1, 10, 100) or self._dropped % 1000 == 0:
                    log.warning("broker connection down: dropped %d outgoing messages",
                                self._dropped)
            self._outbox.append((exchange, routing_key, body))
        self._wake(self._flush)

    def close(self, timeout=None):
        """Send what is pending, disconnect, end the thread; waits at most ``timeout``
        (default ``close_timeout``) seconds. Idempotent."""
        if timeout is not None:
            self.close_timeout = float(timeout)
        super().close()

    def stop(self, timeout=None):
        """Same as :meth:`close`."""
        self.close(timeout)

    def _close(self):
        self._closing.set()
        thread = self._thread
        if thread is None:
            return
        self._wake(lambda: None)
        if thread is threading.current_thread():
            return  # called from a callback in the AMQP thread: it ends by itself
        thread.join(self.close_timeout)
        if thread.is_alive():  # pragma: no cover - pika stuck in a socket call
            log.warning("AMQP thread did not stop within %.1f s", self.close_timeout)

    # ---- owner thread ---------------------------------------------------------------

    def _wake(self, fn):
        conn = self._conn
        if conn is None or not self._connected.is_set():
            return
        try:
            conn.add_callback_threadsafe(fn)
        except Exception:  # connection closing: the reconnect path flushes later
            pass

    def _params(self, url):
        pika = self._pika
        return pika.ConnectionParameters(
            host=url.host, port=url.port, virtual_host=url.vhost,
            credentials=pika.PlainCredentials(url.user, url.password),
            connection_attempts=1, socket_timeout=3.0, stack_timeout=10.0,
            blocked_connection_timeout=30.0,
            client_properties={"connection_name": self.name, "product": "kbstream"})

    def _connect_once(self):
        errors = []
        for url in self.config.urls:
            if self._closing.is_set():
                break
            try:
                conn = self._pika.BlockingConnection(self._params(url))
            except Exception as e:  # pika raises many kinds (AMQPConnectionError, OSError)
                errors.append(f"{url.safe}: {_describe(e)}")
                continue
            try:
                self._declare(conn)
            except Exception as e:
                errors.append(f"{url.safe}: declaring the queue failed: {e!r}")
                try:
                    conn.close()
                except Exception:
                    pass
                continue
            log.info("connected to broker %s, queue %s", url.safe, self.queue_name)
            return None
        return errors

    def _declare(self, conn):
        pika = self._pika
        chan = conn.channel()
        for ex in self._exchanges:
            chan.exchange_declare(exchange=ex, exchange_type="topic", durable=False,
                                  auto_delete=True)
        name = self._wanted_queue
        try:
            chan.queue_declare(queue=name, durable=False, exclusive=True, auto_delete=True,
                               arguments=QUEUE_ARGUMENTS)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 405:  # RESOURCE_LOCKED: another connection has it
                raise
            name = queue_fallback_name(self._wanted_queue)
            log.info("queue %s is in use, falling back to %s", self._wanted_queue, name)
            chan = conn.channel()
            chan.queue_declare(queue=name, durable=False, exclusive=True, auto_delete=True,
                               arguments=QUEUE_ARGUMENTS)
        for ex in self._exchanges:
            chan.queue_bind(queue=name, exchange=ex, routing_key=NONE_KEY)
        with self._lock:
            bindings = list(self._bindings)
            self._new_bindings.clear()
        for ex, key in bindings:
            chan.queue_bind(queue=name, exchange=ex, routing_key=key)
        chan.basic_consume(queue=name, on_message_callback=self._deliver, auto_ack=True,
                           exclusive=True)
        self._conn, self._chan, self.queue_name = conn, chan, name
        self._connected.set()

    def _deliver(self, chan, method, properties, body):
        try:
            self._on_message(method.exchange, method.routing_key, body)
        except Exception:  # the callback must never kill the AMQP thread
            log.exception("error in the broker message callback")

    def _bind_pending(self):
        while True:
            with self._lock:
                if not self._new_bindings:
                    return
                ex, key = self._new_bindings.popleft()
            self._chan.queue_bind(queue=self.queue_name, exchange=ex, routing_key=key)

    def _flush(self):
        chan = self._chan
        while True:
            with self._lock:
                if not self._outbox:
                    return
                ex, key, body = self._outbox[0]
            try:
                chan.basic_publish(exchange=ex, routing_key=key, body=body)
            except _CONNECTION_ERRORS:
                raise  # the connection is gone: keep the message for after the reconnect
            except Exception as e:  # this message cannot be sent at all: drop it, go on
                log.warning("dropping an outgoing broker message to %r: %s: %s", key,
                            type(e).__name__, e)
            with self._lock:
                if self._outbox and self._outbox[0][2] is body:
                    self._outbox.popleft()

    def _run(self):
        deadline = time.monotonic() + self.connect_timeout
        while True:
            errors = self._connect_once()
            if errors is None:
                break
            if self._closing.is_set() or time.monotonic() >= deadline:
                self._open_error = BrokerConnectionError(
                    "cannot connect to the Karabo broker (KARABO_BROKER): "
                    + "; ".join(errors or ["closed"]), [u.safe for u in self.config.urls])
                self._opened.set()
                return
            log.info("broker not reachable yet (%s); retrying", "; ".join(errors))
            self._closing.wait(min(self.reconnect_interval, max(0.0, deadline - time.monotonic())))
        self._opened.set()
        first = True
        while True:
            if not first:
                if not self._reconnect():
                    break
            first = False
            try:
                self._flush()
                self._bind_pending()
                while not self._closing.is_set():
                    self._conn.process_data_events(time_limit=0.5)
                    self._bind_pending()
                    self._flush()
                # closing: send what is left (slotInstanceGone), then disconnect
                self._flush()
                self._conn.close()
                self._connected.clear()
                break
            except Exception as e:  # connection lost (StreamLostError, ConnectionClosed...)
                self._connected.clear()
                if self._closing.is_set():
                    break
                log.warning("broker connection lost (%s: %s); reconnecting",
                            type(e).__name__, e)
                try:
                    self._conn.close()
                except Exception:
                    pass
        self._connected.clear()

    def _reconnect(self):
        while not self._closing.is_set():
            errors = self._connect_once()
            if errors is None:
                with self._lock:
                    self._dropped = 0
                if self._on_reconnect is not None:
                    threading.Thread(target=self._on_reconnect, name="kbstream-amqp-reconnect",
                                     daemon=True).start()
                return True
            log.debug("reconnect failed: %s", "; ".join(errors))
            self._closing.wait(self.reconnect_interval)
        return False
