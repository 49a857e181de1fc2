"""One life cycle for every kbstream object that owns threads or sockets.

The rule (docs/conventions.md): constructing an object checks its arguments and may
bind its listening socket (so its address is known at once), but starts no thread and
contacts no peer.  ``start()`` begins the work and returns the object; ``close()`` ends
it, releases everything the object made, returns within a bounded time whatever the
peers do, and may be called any number of times.  ``stop()`` is the same as ``close()``
(the name ``karabo_bridge.ServerInThread`` users know).  ``with obj:`` starts the object
if it is not started yet and closes it on exit.

Wrong order raises :class:`~kbstream.errors.StateError` (a ``RuntimeError``):
``start()`` twice, or ``start()`` after ``close()``.
"""

import threading

from .errors import StateError

__all__ = ["Lifecycle"]


class Lifecycle:
    """Mixin: ``start()`` / ``close()`` / ``stop()`` / context manager over two hooks.

    Subclasses implement ``_start()`` (begin the work) and ``_close()`` (end it; called
    at most once, also for an object that was never started), and call
    ``Lifecycle.__init__(self)`` early in their constructor.  :attr:`_state_error` is the
    exception class raised for a wrong call order.
    """

    _state_error = StateError

    def __init__(self):
        self._lc_lock = threading.Lock()
        self._lc_started = False
        self._lc_closed = False

    @property
    def started(self):
        """True once :meth:`start` has run (also after :meth:`close`)."""
        return self._lc_started

    @property
    def closed(self):
        """True once :meth:`close` has been called."""
        return self._lc_closed

    def start(self):
        """Begin the work (threads, connections); returns the object."""
        with self._lc_lock:
            if self._lc_closed:
                raise self._state_error(f"start() on a closed {type(self).__name__}")
            if self._lc_started:
                raise self._state_error(f"{type(self).__name__} already started")
            self._lc_started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """End the work and release everything; idempotent, bounded in time."""
        with self._lc_lock:
            if self._lc_closed:
                return
            self._lc_closed = True
        self._close()

    def stop(self):
        """Same as :meth:`close`."""
        self.close()

    def _check_open(self, what):
        """Raise the state error if the object is closed (``what`` names the call)."""
        if self._lc_closed:
            raise self._state_error(f"{what} on a closed {type(self).__name__}")

    def _check_started(self, what):
        """Raise the state error unless the object is started and not closed."""
        self._check_open(what)
        if not self._lc_started:
            raise self._state_error(f"{what} before start() of {type(self).__name__}")

    def __enter__(self):
        if not self._lc_started:
            self.start()
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    def _start(self):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _close(self):  # pragma: no cover - every subclass defines it
        raise NotImplementedError
