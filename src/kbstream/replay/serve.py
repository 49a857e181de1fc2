"""Streaming a selection of a run on a bridge server socket: :func:`serve_data`.

Data path: a :class:`~kbstream.replay.prefetch.Prefetcher` thread reads trains
ahead into a bounded pool of buffers; this thread hands them to the one bridge
sender loop (:func:`kbstream.bridge.sender.run` on a
:class:`kbstream.bridge.sender.Sender`: endpoint rules, socket options, REP /
PUB / PUSH behaviour, pacing to a rate), which serializes each train with
``kbstream.serialize`` and sends the frames with ``copy=False``: array frames
point into the reader's buffers.  A train's buffers go back to the pool only
once libzmq has released every tracked frame (``zmq.MessageTracker``), so
memory stays bounded by ``prefetch + 1`` trains; the only copy is the reader's
``pread`` from the page cache into those buffers.

Skip and say: a train that cannot be read is skipped with a warning naming its file,
source, key and train; a key (or source) that cannot be encoded is left out of its train
and the rest is sent; both are counted by cause in the reader's
:class:`~kbstream.replay.progress.Problems`, whose line ends the summary.

The command lines that call it are in :mod:`kbstream.replay.cli`.
"""

import collections
import logging
import os
import sys
import threading

from ..bridge import codec as _codec, sender as _sender
from ..errors import ChannelTimeout
from .detectors import DetectorAppender
from .errors import NoMatchError, RunFileError, TruncatedFileError
from .prefetch import Prefetcher
from .progress import ReplayStats

__all__ = ["serve_data", "SOCKET_TYPES"]

log = logging.getLogger(__name__)

#: the socket types a replay can serve on (those of the bridge sender)
SOCKET_TYPES = _sender.SOCKET_TYPES

#: how long the loop waits for the next train while frames are in flight (seconds):
#: short, so that buffers libzmq has released go back to the reader soon
_INFLIGHT_POLL = 0.005


def serve_data(reader, selection, endpoint, *, sock="REP", require=None, trains=None,
               repeat=1, loop=False, rate=None, protocol_version="2.2",
               dummy_timestamps=False, timestamps=True, append_detector_modules=False,
               prefetch=4, serialize=None, context=None, progress=True, out=None,
               err=None, max_trains=None, ready=None, stop_event=None,
               use_infiniband=False, flush_timeout=10.0, append_xtdf_only=False):
    """Stream the ``selection`` of ``reader`` on a new bridge server socket.

    Parameters
    ----------
    reader : RunReader
    selection : dict
        {source: [keys]} (see :func:`~kbstream.replay.select.select_sources`).
    endpoint : str or int
        Where to bind: a port number binds ``tcp://*:PORT``, any other string
        is used verbatim (:func:`kbstream.bridge.sender.parse_endpoint`).
    sock : {'REP', 'PUB', 'PUSH'}
        As the bridge sender: REP answers ``next`` with a train and any other
        request with ``Error: bad request ...``; PUB never waits and counts
        trains nobody subscribed to as dropped; PUSH waits for a PULL peer.
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
    protocol_version : {'2.2', '1.0'}
    prefetch : int
        Trains read ahead; memory is bounded by ``prefetch + 1`` trains.
    append_detector_modules : bool
        Stack the module sources of a multi-module detector into one source
        (:class:`~kbstream.replay.detectors.DetectorAppender`).
    append_xtdf_only : bool
        Only AGIPD, LPD and DSSC modules, as extra_data's commands (JUNGFRAU modules
        stay separate sources).
    serialize : callable, optional
        ``serialize(data, metadata, protocol_version, dummy_timestamps)``;
        default ``kbstream.serialize``.  When it fails on a train, the keys (or
        sources) it fails on alone are left out and the rest is sent; a train
        that fails without such a key is skipped.  Both are counted and said.
    context : zmq.Context, optional
        Not destroyed; the socket is always closed.
    max_trains : int, optional
        Stop after this many trains handed to the socket (sent or dropped).
    ready : callable, optional
        Called with the bound endpoint once the socket is bound.
    stop_event : threading.Event, optional
        Stop early when set.
    use_infiniband : bool
        Bind a bare port number on interface ``ib0``.
    flush_timeout : float
        Seconds queued trains may take to leave at the end (not when stopped).

    Returns
    -------
    ReplayStats

    Raises
    ------
    ValueError
        Unknown socket type or protocol version.
    NoMatchError
        No train to send for this selection.
    kbstream.BindError
        The endpoint cannot be bound.
    """
    if sock not in SOCKET_TYPES:
        raise ValueError(f"socket type must be one of {SOCKET_TYPES}, not {sock!r}")
    if protocol_version not in _codec.ENCODE_VERSIONS:
        raise ValueError(f"protocol version must be one of {_codec.ENCODE_VERSIONS}, "
                         f"not {protocol_version!r}")
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

    problems = reader.problems
    transform = None
    if append_detector_modules:
        transform = DetectorAppender(selection, reader.all_sources,
                                     jungfrau=not append_xtdf_only, problems=problems)
        if not transform.modules:
            transform = None
    total = None if npass is None else len(tids) * npass
    if max_trains is not None:
        total = max_trains if total is None else min(total, max_trains)
    stats = ReplayStats(total, stream=err, progress=progress, problems=problems)
    encode = _leaving_out_unencodable(serialize or _codec.serialize, problems)
    stop = stop_event if stop_event is not None else threading.Event()

    sender = _sender.Sender(endpoint, sock, context=context, hwm=max(2, prefetch),
                            use_infiniband=use_infiniband)
    linger = 0.0  # on errors and interruptions: drop what is queued
    try:
        bound = sender.bound_endpoint
        print(f"Streamer started on: {bound}", file=out, flush=True)
        if ready is not None:
            ready(bound)
        pf = Prefetcher(reader, selection, train_iter(), depth=prefetch, transform=transform,
                        timestamps=timestamps)
        inflight = collections.deque()  # (tracker or None, item), in sending order

        def release_done():
            while inflight and (inflight[0][0] is None or inflight[0][0].done):
                pf.release(inflight.popleft()[1])

        def next_train():
            release_done()
            if max_trains is not None and stats.sent + stats.dropped >= max_trains:
                return None
            try:
                item = pf.get(timeout=_INFLIGHT_POLL if inflight else _sender.POLL_INTERVAL)
            except ChannelTimeout:
                return _sender.EMPTY
            if item is None:
                return None
            if item.error is not None:
                stats.skipped += 1
                _report_skip(problems, item)
                pf.release(item)
                return _sender.EMPTY
            return item.data, item.metadata, item

        def on_sent(item, outcome, tracker):
            if outcome is _sender.SENT:
                stats.sent_train(item.train_id, item.nbytes)
            elif outcome is _sender.DROPPED:
                stats.dropped_train(item.train_id)
            # Only the in-flight queue may keep this train's arrays alive.
            inflight.append((tracker, item))
            release_done()

        def on_error(item, exc):
            stats.skipped += 1
            problems.skipped_train(
                "train", "cannot be encoded",
                f"skipped train {item.file_train_id}: it cannot be encoded "
                f"({type(exc).__name__}: {exc})")
            pf.release(item)

        try:
            pf.start()
            finished = _sender.run(
                sender, next_train, stop, protocol_version=protocol_version,
                dummy_timestamps=dummy_timestamps, serialize=encode, rate=rate,
                idle=release_done, track=True, on_sent=on_sent, on_error=on_error)
            # libzmq may hold the last message until the socket closes; its
            # buffers stay alive through pyzmq's references, and nothing will
            # overwrite them now, so close with a linger instead of waiting.
            if finished:
                linger = flush_timeout
        finally:
            pf.close()
    finally:
        stats.finish()
        sender.close(linger=linger)  # waits up to the linger for queued trains to go out
    return stats


def _report_skip(problems, item):
    """Say why ``item``'s train is skipped: its file, source, key and train id."""
    e = item.error
    source, key, path = (getattr(e, a, None) for a in ("source", "key", "path"))
    if isinstance(e, TruncatedFileError):
        cause = "truncated file"
    elif isinstance(e, RunFileError):
        cause = "unreadable data"
    else:
        cause = type(e).__name__
    subject = " ".join(x for x in (source, os.path.basename(path) if path else None) if x)
    where = " ".join(x for x in (source, key) if x)
    problems.skipped_train(subject or "train", cause,
                           f"skipped train {item.file_train_id}: "
                           f"{where + ': ' if where else ''}{e}")


def _leaving_out_unencodable(serialize, problems):
    """``serialize`` that, when a train fails, leaves out the keys (or sources) that fail
    on their own and encodes the rest; the train is lost only when no such part is found.
    Costs nothing while trains encode."""

    def encode(data, metadata, protocol_version, dummy_timestamps):
        try:
            return serialize(data, metadata, protocol_version, dummy_timestamps)
        except Exception:  # noqa: BLE001 - which part is at fault is found below
            bad = _unencodable(serialize, data, metadata, protocol_version)
            if not bad:
                raise
        for source, key, e in bad:
            if key is None:
                data.pop(source, None)
                if metadata is not None:
                    metadata.pop(source, None)
                subject = source
            else:
                data[source].pop(key, None)
                subject = f"{source} {key}"
            problems.left_out(
                subject, "cannot be encoded",
                f"{subject}: cannot be encoded ({type(e).__name__}: {e}); left out of each "
                f"train where it fails, the rest of the train is sent")
        return serialize(data, metadata, protocol_version, dummy_timestamps)

    return encode


def _unencodable(serialize, data, metadata, protocol_version):
    """[(source, key or None, error)] of the parts of a train that fail to encode alone."""
    bad = []
    for source, props in data.items():
        meta = None if metadata is None else {source: metadata.get(source, {})}
        try:
            serialize({source: props}, meta, protocol_version, False)
            continue
        except Exception as e:  # noqa: BLE001 - recorded
            whole = e
        keys = []
        if isinstance(props, dict):
            for key, value in props.items():
                try:
                    serialize({source: {key: value}}, meta, protocol_version, False)
                except Exception as e:  # noqa: BLE001 - recorded
                    keys.append((source, key, e))
        bad.extend(keys or [(source, None, whole)])
    return bad
