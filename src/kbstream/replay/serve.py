"""``karabo-bridge-serve-run`` and ``karabo-bridge-serve-files``: replay runs.

Every option of extra_data's commands keeps its meaning (bridge spec,
sections 10.4, 11.4 and 11.5); additions: ``--exclude``, real timestamps
from ``INDEX/timestamp`` by default, ``--rate``, ``--repeat``/``--loop``
(train ids keep increasing), ``--trains START:STOP:STEP``,
``--protocol-version``, ``--prefetch``, a progress bar on stderr and a final
summary.

Data path: a :class:`~kbstream.replay.prefetch.Prefetcher` thread reads trains
ahead into a bounded pool of buffers; the sender loop (this thread) owns its
ZeroMQ socket, serializes each train with ``kbstream.serialize`` and sends the
frames with ``copy=False``: array frames point into the reader's buffers.
A train's buffers go back to the pool only once every tracked frame has been
released by libzmq (``zmq.MessageTracker``), so memory stays bounded by
``prefetch + 1`` trains and nothing is copied in user space.
"""

import argparse
import collections
import fcntl
import logging
import re
import socket
import struct
import sys
import time

import numpy as np

from .errors import (BindError, NoMatchError, PatternError, ReplayError, RunFileError,
                     RunNotFoundError)
from .prefetch import Prefetcher
from .reader import RunReader
from .runs import files_for_run, run_files
from .select import select_sources

__all__ = ["serve_run_main", "serve_files_main", "serve_data", "make_endpoint",
           "ReplayStats", "DetectorAppender", "BindError"]

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


def parse_train_slice(text):
    """``START:STOP:STEP`` (positions in the selected trains, Python slice rules)."""
    parts = text.split(":")
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(f"expected START:STOP:STEP, not {text!r}")
    try:
        vals = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers in START:STOP:STEP, not {text!r}") from None
    if len(vals) == 1:
        v = vals[0]
        return slice(v, None if v == -1 else v + 1) if v is not None else slice(None)
    if len(vals) == 3 and vals[2] == 0:
        raise argparse.ArgumentTypeError("STEP must not be 0")
    return slice(*vals)


# -- detector modules ----------------------------------------------------------------

_XTDF_RE = re.compile(r"^(?P<det>.+)/DET/(?P<mod>\d+)CH0:xtdf$")
_JF_RE = re.compile(r"^(?P<det>.+)/DET/JNGFR(?P<mod>\d+):daqOutput$")


class DetectorAppender:
    """Stack the module sources of one multi-module detector into one source.

    AGIPD, LPD, DSSC (``<det>/DET/<n>CH0:xtdf``, modules 0..15, keys
    ``image.data/gain/mask``) and JUNGFRAU (``<det>/DET/JNGFR<n>:daqOutput``,
    modules 1..N, keys ``data.adc/gain/mask``).  The new source
    ``<det>/DET/APPEND`` starts from the first module's dict; stacked arrays
    have the module axis at -3 (as ``extra_data.stack_detector_data``), with
    NaN (floats) or 0 filling missing modules.  The module sources are removed.
    """

    def __init__(self, sources, all_sources):
        self.modules = {}
        self.keys = ()
        for regex, keys, base in ((_XTDF_RE, ("image.data", "image.gain", "image.mask"), 0),
                                  (_JF_RE, ("data.adc", "data.gain", "data.mask"), 1)):
            found = {}
            for s in sources:
                m = regex.match(s)
                if m:
                    found.setdefault(m.group("det"), {})[s] = int(m.group("mod")) - base
            if found:
                det = sorted(found)[0]
                self.modules = found[det]
                self.keys = keys
                self.name = f"{det}/DET/APPEND"
                everything = [int(m.group("mod")) - base for m in map(regex.match, all_sources)
                              if m and m.group("det") == det]
                if base == 0:
                    self.nmodules = 8 if "500K" in det else 16
                else:
                    self.nmodules = max(everything) + 1
                self.nmodules = max(self.nmodules, max(self.modules.values()) + 1)
                break
        if not self.modules:
            raise NoMatchError("--append-detector-modules: no AGIPD, LPD, DSSC or JUNGFRAU "
                               "module sources selected")

    def __call__(self, item):
        if item.error is not None:
            return item
        present = [s for s in sorted(self.modules) if s in item.data and
                   any(k in item.data[s] for k in self.keys)]
        mods = sorted(self.modules)
        if not present:
            for s in mods:
                item.data.pop(s, None)
                item.metadata.pop(s, None)
            return item
        first = item.data[present[0]]
        out = dict(first)
        for key in self.keys:
            arrays = {s: item.data[s][key] for s in present if key in item.data[s]}
            if not arrays:
                continue
            ref = next(iter(arrays.values()))
            shape = ref.shape[:-2] + (self.nmodules,) + ref.shape[-2:] if ref.ndim >= 2 else None
            if shape is None:
                continue
            buf_name = (self.name, key)
            if item.slot is not None:
                stacked = item.slot.buffer(buf_name, shape, ref.dtype)
            else:
                stacked = np.empty(shape, ref.dtype)
            filled = set()
            for s, a in arrays.items():
                if a.shape == ref.shape:
                    stacked[..., self.modules[s], :, :] = a
                    filled.add(self.modules[s])
            for m in range(self.nmodules):
                if m not in filled:
                    stacked[..., m, :, :] = np.nan if stacked.dtype.kind == "f" else 0
            out[key] = stacked
            item.nbytes += stacked.nbytes
        meta = dict(item.metadata[present[0]])
        meta["source"] = self.name
        for s in mods:
            src = item.data.pop(s, None)
            item.metadata.pop(s, None)
            for k in self.keys:
                v = (src or {}).get(k)
                if isinstance(v, np.ndarray):
                    item.nbytes -= v.nbytes
        item.data[self.name] = out
        item.metadata[self.name] = meta
        return item


# -- progress and statistics ----------------------------------------------------------

class ReplayStats:
    """Counters of one replay, and the progress bar on stderr."""

    def __init__(self, total, stream=None, progress=True, interval=0.25):
        self.total = total  # None when endless
        self.stream = stream if stream is not None else sys.stderr
        self.progress = progress
        self.interval = interval
        self.sent = 0
        self.skipped = 0
        self.bytes = 0
        self.last_tid = None
        self.start = time.perf_counter()
        self._last_print = 0.0
        self._drawn = None   # (sent, skipped) of the last line drawn
        self._window = collections.deque(maxlen=20)
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def sent_train(self, tid, nbytes):
        now = time.perf_counter()
        self.sent += 1
        self.bytes += nbytes
        self.last_tid = tid
        self._window.append((now, nbytes))
        if self.progress and now - self._last_print >= self.interval:
            self._last_print = now
            self._draw(now)

    def _rates(self, now=None):
        now = now if now is not None else time.perf_counter()
        w = self._window
        if len(w) >= 2 and w[-1][0] > w[0][0]:
            dt = w[-1][0] - w[0][0]
            return (len(w) - 1) / dt, sum(b for _, b in list(w)[1:]) / dt
        dt = now - self.start
        return (self.sent / dt, self.bytes / dt) if dt > 0 else (0.0, 0.0)

    def _draw(self, now):
        tps, bps = self._rates(now)
        if self.total:
            frac = min(1.0, self.sent / self.total)
            bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
            count = f"{self.sent}/{self.total}"
        else:
            bar, count = "~" * 30, f"{self.sent}"
        line = (f"[{bar}] {count} trains  {tps:6.1f} trains/s  {bps / 1e9:5.2f} GB/s  "
                f"train {self.last_tid}")
        if self.skipped:
            line += f"  ({self.skipped} skipped)"
        self.stream.write(("\r" + line) if self._tty else (line + "\n"))
        self.stream.flush()
        self._drawn = (self.sent, self.skipped)

    def finish(self):
        # the final state, unless a log (not a terminal) already has that very line
        if self.progress and self.sent and (
                self._tty or self._drawn != (self.sent, self.skipped)):
            self._draw(time.perf_counter())
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()

    @property
    def elapsed(self):
        return time.perf_counter() - self.start

    def summary(self):
        dt = self.elapsed
        tps = self.sent / dt if dt > 0 else 0.0
        gbs = self.bytes / dt / 1e9 if dt > 0 else 0.0
        text = (f"Sent {self.sent} trains ({self.bytes / 1e9:.3f} GB) in {dt:.2f} s: "
                f"{tps:.1f} trains/s, {gbs:.2f} GB/s")
        if self.skipped:
            text += f"; skipped {self.skipped} unreadable trains"
        return text


# -- sending ----------------------------------------------------------------------------

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


# -- command line ----------------------------------------------------------------------

def _common_options(ap):
    ap.add_argument("--include", action="append", metavar="PATTERN",
                    help="select sources (and keys): 'SRCGLOB' or 'SRCGLOB[KEYGLOB]'; repeatable")
    ap.add_argument("--exclude", action="append", metavar="PATTERN", default=[],
                    help="remove sources (or keys with [KEYGLOB]); repeatable")
    ap.add_argument("--append-detector-modules", action="store_true",
                    help="combine AGIPD, LPD, DSSC or JUNGFRAU module sources into one source")
    ap.add_argument("--dummy-timestamps", action="store_true",
                    help="create timestamps when the files have none (INDEX/timestamp)")
    ap.add_argument("--no-file-timestamps", action="store_true",
                    help="do not send INDEX/timestamp from the files (as extra_data)")
    ap.add_argument("--use-infiniband", action="store_true",
                    help="bind on the ib0 interface when a TCP port number is given")
    ap.add_argument("-z", "--socket-type", choices=SOCKET_TYPES, default="REP",
                    help="ZeroMQ socket type (default REP)")
    ap.add_argument("--rate", type=float, default=None, metavar="HZ",
                    help="send at most HZ trains per second (the facility runs at 10)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="send the trains N times; train ids keep increasing")
    ap.add_argument("--loop", action="store_true", help="repeat forever")
    ap.add_argument("--trains", type=parse_train_slice, default=None, metavar="START:STOP:STEP",
                    help="send only these positions of the selected trains")
    ap.add_argument("--protocol-version", choices=["1.0", "2.2"], default="2.2")
    ap.add_argument("--prefetch", type=int, default=4, metavar="N",
                    help="trains read ahead of the sender (default 4)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--no-mmap", action="store_true",
                    help="read into reused buffers instead of sending from file mappings")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _list_sources(reader, out):
    print("Available sources:", file=out)
    for s in sorted(reader.all_sources):
        print(f"  {s}", file=out)


def _run(args, reader, selection, endpoint, require, out, err):
    stats = serve_data(
        reader, selection, endpoint, sock=args.socket_type, require=require,
        trains=args.trains, repeat=args.repeat, loop=args.loop, rate=args.rate,
        protocol_version=args.protocol_version, dummy_timestamps=args.dummy_timestamps,
        timestamps=not args.no_file_timestamps,
        append_detector_modules=args.append_detector_modules, prefetch=args.prefetch,
        progress=not args.no_progress, out=out, err=err)
    print(stats.summary(), file=out)
    return 0


def _main(prog, argv, out, err):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog=prog, description=(
        "Replay a European XFEL run over the Karabo bridge protocol."))
    if prog == "karabo-bridge-serve-run":
        ap.add_argument("proposal", help="proposal number, e.g. 700000 or p700000")
        ap.add_argument("run", help="run number, e.g. 12 or r0012")
        ap.add_argument("--port", default="0",
                        help="TCP port or ZeroMQ endpoint (default 0: a random port)")
        ap.add_argument("--allow-partial", action="store_true",
                        help="also send trains where some selected data is missing")
        ap.add_argument("--data", default="all",
                        help="raw, proc or all (raw + proc, proc preferred; default)")
    else:
        ap.add_argument("path", help="run directory or single HDF5 file")
        ap.add_argument("port", help="TCP port or ZeroMQ endpoint")
        ap.add_argument("--source", default=None, metavar="GLOB", help="source glob (default *)")
        ap.add_argument("--key", default=None, metavar="GLOB", help="key glob (default *)")
        ap.add_argument("--require-all", action="store_true",
                        help="only send trains where all selected data is present")
    _common_options(ap)
    args = ap.parse_args(argv)
    if args.verbose:
        logging.getLogger("kbstream").setLevel(logging.DEBUG)
    if args.prefetch < 1:
        ap.error("--prefetch must be at least 1")
    try:
        if prog == "karabo-bridge-serve-run":
            files, override = files_for_run(args.proposal, args.run, data=args.data)
            require = "any" if args.allow_partial else "all"
        else:
            files, override = run_files(args.path), []
            require = "all" if args.require_all else None
        reader = RunReader(files, override=override, skip_bad_files=True)
        reader.use_mmap = not args.no_mmap
    except (RunNotFoundError, RunFileError) as e:
        print(f"{prog}: error: {e}", file=err)
        return 2
    with reader:
        for path, e in reader.bad_files:
            print(f"{prog}: warning: skipped unreadable file {path}: {e}", file=err)
        if prog == "karabo-bridge-serve-run" and not args.include:
            _list_sources(reader, out)
            print("Please select at least one source with --include", file=err)
            return 1
        try:
            selection = select_sources(reader, args.include, args.exclude,
                                       getattr(args, "source", None), getattr(args, "key", None))
            endpoint = make_endpoint(args.port, args.use_infiniband)
            return _run(args, reader, selection, endpoint, require, out, err)
        except (PatternError, NoMatchError) as e:
            print(f"{prog}: error: {e}", file=err)
            return 2
        except (ReplayError, BindError) as e:
            print(f"{prog}: error: {e}", file=err)
            return 1
        except KeyboardInterrupt:
            print("\nStopped.", file=out)
            return 130
        except ImportError as e:
            print(f"{prog}: error: {e}", file=err)
            return 1


def serve_run_main(argv=None, out=None, err=None):
    """``karabo-bridge-serve-run PROPOSAL RUN --include ...``; returns the exit status."""
    return _main("karabo-bridge-serve-run", argv, out or sys.stdout, err or sys.stderr)


def serve_files_main(argv=None, out=None, err=None):
    """``karabo-bridge-serve-files PATH PORT``; returns the exit status."""
    return _main("karabo-bridge-serve-files", argv, out or sys.stdout, err or sys.stderr)


main = serve_run_main

if __name__ == "__main__":
    raise SystemExit(serve_run_main())
