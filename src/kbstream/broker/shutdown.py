"""Goodbye when the program ends: the ``atexit`` hook and the SIGTERM handler.

One job: make every started :class:`~kbstream.broker.BrokerInstance` broadcast
``slotInstanceGone`` also when the program just ends (returns from ``main``, calls
``sys.exit``, or gets SIGTERM), so other Karabo instances do not wait three heartbeat
intervals to notice.

Threads: instances register and unregister from any thread; the ``atexit`` hook runs in
the main thread at interpreter exit; the SIGTERM handler runs in the main thread.
"""

from __future__ import annotations

import atexit
import threading
import weakref

__all__ = ["install_sigterm_exit", "register", "unregister"]

#: How long the exit hook lets each instance take to close.
EXIT_CLOSE_TIMEOUT = 2.0

_live_instances = weakref.WeakSet()


def register(instance):
    """Close ``instance`` (with a bounded timeout) when the program ends."""
    _live_instances.add(instance)


def unregister(instance):
    _live_instances.discard(instance)


@atexit.register
def _close_all_at_exit():  # slotInstanceGone also when the program just ends
    # the devices first, then their servers (the order of Karabo's servers)
    live = sorted(_live_instances, key=lambda i: i.instance_info.get("type") == "server")
    for inst in live:
        try:
            inst.close(timeout=EXIT_CLOSE_TIMEOUT)
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def install_sigterm_exit():
    """Make SIGTERM end the program like ``sys.exit`` so that live instances say goodbye.

    With Python's default, SIGTERM kills the process at once: no ``atexit`` handler runs
    and other Karabo instances only notice after about three heartbeat intervals.  This
    installs a handler that raises ``SystemExit(128 + SIGTERM)`` in the main thread, so
    ``finally`` blocks and the ``atexit`` hook that closes every live
    :class:`~kbstream.broker.BrokerInstance` (``slotInstanceGone``) run.  It does nothing,
    and returns False, outside the main thread or when the program already handles SIGTERM
    (a handler other than the default is never replaced).
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        current = signal.getsignal(signal.SIGTERM)
    except (AttributeError, ValueError):  # pragma: no cover - no SIGTERM here
        return False
    if current is _exit_on_sigterm:
        return True
    if current is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return True
