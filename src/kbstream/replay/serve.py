"""Streaming a selection of a run on a ZeroMQ socket: :func:`serve_data`.

Data path: a :class:`~kbstream.replay.prefetch.Prefetcher` thread reads trains
ahead into a bounded pool of buffers; the sender loop (this thread) owns its
ZeroMQ socket, serializes each train with ``kbstream.serialize`` and sends the
frames with ``copy=False``: array frames point into the reader's buffers.
A train's buffers go back to the pool only once every tracked frame has been
released by libzmq (``zmq.MessageTracker``), so memory stays bounded by
``prefetch + 1`` trains and nothing is copied in user space.

The command lines that call it are in :mod:`kbstream.replay.cli`.
"""

import collections
import fcntl
import logging
import socket
import struct
import sys
import time

from .detectors import DetectorAppender
from .errors import BindError, NoMatchError
from .prefetch import Prefetcher
from .progress import ReplayStats

__all__ = ["serve_data", "make_endpoint", "SOCKET_TYPES"]

log = logging.getLogger(__name__)

#: pyzmq copies frames smaller than this even with copy=False; we copy them
#: ourselves (cheap) so that their buffers are free at once.
TRACK_THRESHOLD = 65536
SOCKET_TYPES = ("REP", "PUB", "PUSH")


def _default_serialize():
    """``kbstream.serialize`` (the compiled bridge codec)."""
    try:
        import kbstream
        return kbstream.serialize
    except (ImportError, AttributeError) as e:
        raise ImportError("kbstream.serialize is not available: build kbstream's compiled "
                          "core (pip install -e .)") from e


def _ib0_address():
    """IPv4 address of interface ``ib0``, or None (Linux SIOCGIFADDR)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        res = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", b"ib0"))
        return socket.inet_ntoa(res[20:24])
    except OSError:
        return None
    finally:
        s.close()


def make_endpoint(port, use_infiniband=False):
    """ZeroMQ endpoint for ``port``: a number gives ``tcp://*:<port>``.

    As extra_data: an int or an all-digit string is a TCP port bound on all
    interfaces (on ``ib0``'s address with ``use_infiniband`` when it has
    one); anything else is used verbatim.
    """
    text = str(port)
    if isinstance(port, int) or text.isdigit():
        host = "*"
        if use_infiniband:
            host = _ib0_address() or "*"
            if host == "*":
                log.warning("no InfiniBand interface ib0 with an IPv4 address; binding on *")
        return f"tcp://{host}:{int(text)}"
    return text


def _wrap_frames(zmq, frames):
    """Frames for ``send_multipart(copy=False)`` and the trackers of those we must wait for."""
    out, tracked = [], []
    for f in frames:
        if isinstance(f, (bytes, zmq.Frame)):
            out.append(f)
            continue
        mv = memoryview(f)
        if mv.nbytes < TRACK_THRESHOLD:
            out.append(mv.tobytes())  # small: copy now, buffer free at once
        else:
            fr = zmq.Frame(mv, copy=False, track=True)
            out.append(fr)
            tracked.append(fr)
    return out, tracked


def serve_data(reader, selection, endpoint, *, sock="REP", require=None, trains=None,
               repeat=1, loop=False, rate=None, protocol_version="2.2",
               dummy_timestamps=False, timestamps=True, append_detector_modules=False,
               prefetch=4, serialize=None, context=None, progress=True, out=None,
               err=None, max_trains=None, ready=None, stop_event=None, poll_ms=100,
               flush_timeout=10.0):
    """Stream the ``selection`` of ``reader`` on a new ZeroMQ socket.

    Parameters
    ----------
    reader : RunReader
    selection : dict
        {source: [keys]} (see :func:`~kbstream.replay.select.select_sources`).
    endpoint : str
        Where to bind (see :func:`make_endpoint`).
    sock : {'REP', 'PUB', 'PUSH'}
    require : {None, 'all', 'any'}
        Which trains to send (see :meth:`RunReader.select_trains`).
    trains : slice, optional
        Positions in the selected train list.
    repeat : int
        Passes over the trains; train ids keep increasing from pass to pass.
    loop : bool
        Repeat forever (until interrupted).
    rate : float, optional
        Trains per second (10 is the facility's rate); as fast as possible
        (REP: as fast as requested) when None.
    prefetch : int
        Trains read ahead; memory is bounded by ``prefetch + 1`` trains.
    serialize : callable, optional
        ``serialize(data, metadata, protocol_version=, dummy_timestamps=)``;
        default ``kbstream.serialize``.
    context : zmq.Context, optional
        Not destroyed; the socket is always closed.
    ready : callable, optional
        Called with the bound endpoint once the socket is bound.
    stop_event : threading.Event, optional
        Stop early when set.

    Returns
    -------
    ReplayStats
    """
    import zmq

    serialize = serialize or _default_serialize()
    if sock not in SOCKET_TYPES:
        raise ValueError(f"socket type must be one of {SOCKET_TYPES}, not {sock!r}")
    out = out if out is not None else sys.stdout
    tids = reader.select_trains(selection, require)
    if trains is not None:
        tids = tids[trains]
    if len(tids) == 0:
        raise NoMatchError("no trains to send for this selection"
                           + (" (no train has data from every selected source; try "
                              "--allow-partial)" if require == "all" else ""))
    span = int(tids.max()) - int(tids.min()) + 1
    npass = None if loop else max(1, int(repeat))

    def train_iter():
        p = 0
        while npass is None or p < npass:
            for t in tids:
                yield int(t), int(t) + p * span
            p += 1

    transform = None
    if append_detector_modules:
        transform = DetectorAppender(selection, reader.all_sources)
    total = None if npass is None else len(tids) * npass
    if max_trains is not None:
        total = max_trains if total is None else min(total, max_trains)
    stats = ReplayStats(total, stream=err, progress=progress)

    ctx = context or zmq.Context()
    linger_ms = 0  # on errors and interruptions: drop what is queued
    s = ctx.socket(getattr(zmq, sock))
    s.linger = 0
    if sock != "REP":
        s.sndhwm = max(2, prefetch)
    try:
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            raise BindError(f"cannot bind {endpoint}: {e}", endpoint) from e
        bound = s.getsockopt_string(zmq.LAST_ENDPOINT)
        print(f"Streamer started on: {bound}", file=out, flush=True)
        if ready is not None:
            ready(bound)
        pf = Prefetcher(reader, selection, train_iter(), depth=prefetch, transform=transform,
                        timestamps=timestamps)
        inflight = collections.deque()
        poller = zmq.Poller()
        poller.register(s, zmq.POLLIN if sock == "REP" else zmq.POLLOUT)

        def release_done(block=False):
            while inflight and (block or inflight[0][0] is None or inflight[0][0].done):
                tracker, item = inflight[0]
                if tracker is not None and not tracker.done:
                    tracker.wait()
                inflight.popleft()
                pf.release(item)

        next_time = time.perf_counter()
        try:
            pf.start()
            while max_trains is None or stats.sent < max_trains:
                if stop_event is not None and stop_event.is_set():
                    break
                item = pf.get()
                if item is None:
                    break
                if item.error is not None:
                    stats.skipped += 1
                    log.warning("skipping train %d: %s", item.file_train_id, item.error)
                    pf.release(item)
                    continue
                frames = serialize(item.data, item.metadata, protocol_version=protocol_version,
                                   dummy_timestamps=dummy_timestamps)
                frames, tracked = _wrap_frames(zmq, frames)
                if rate:
                    delay = next_time - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    next_time = max(next_time + 1.0 / rate, time.perf_counter() - 1.0 / rate)
                # Wait until the peer asks (REP) or the socket can take a message,
                # giving buffers back to the reader meanwhile.
                while True:
                    if stop_event is not None and stop_event.is_set():
                        break
                    if poller.poll(poll_ms if not inflight else min(poll_ms, 5)):
                        break
                    release_done()
                if stop_event is not None and stop_event.is_set():
                    pf.release(item)
                    break
                if sock == "REP":
                    request = s.recv()
                    if request != b"next":
                        log.warning("unexpected request %r on the REP socket; sending the "
                                    "next train anyway", request[:40])
                s.send_multipart(frames, copy=False)
                tracker = zmq.MessageTracker(*tracked) if tracked else None
                inflight.append((tracker, item))
                # Only the in-flight queue may keep this train's arrays alive.
                del frames, tracked
                release_done()
                stats.sent_train(item.train_id, item.nbytes)
            # libzmq may hold the last message until the socket closes; its
            # buffers stay alive through pyzmq's references, and nothing will
            # overwrite them now, so close with a linger instead of waiting.
            if stop_event is None or not stop_event.is_set():
                linger_ms = int(flush_timeout * 1000)
        finally:
            pf.close()
    finally:
        stats.finish()
        s.close(linger=linger_ms)
        if context is None:
            ctx.term()  # waits up to the linger for queued trains to go out
    return stats


def __getattr__(name):
    # The command-line entry points live in kbstream.replay.cli; kbstream.cli still
    # imports them from here (lazily, so that this module does not import cli).
    if name in ("serve_run_main", "serve_files_main"):
        from . import cli
        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
