"""``kbstream simulate``: a Karabo Bridge server of simulated detector data.

A drop-in for ``karabo-bridge-server-sim``: the same positional port and options
(``-z/--server-socket``, ``-d/--detector``, ``-p/--protocol``, ``-s/--serialisation``,
``-r/--raw``, ``-n/--nsources``, ``-g/--gen``, ``--data-like``, ``--debug``), plus
``--rate`` (trains per second, 10 by default as at the facility; 0 = as fast as the
client takes them), ``--ntrains`` and ``--first-train``.  The data is what the detectors'
pipelines send (:mod:`kbstream.tools.detectors`): one source per module, JUNGFRAU, AGIPD,
LPD and ePix100, raw or corrected, with a pattern a picture shows.

Differences from the peer, on purpose: ``-n`` sets the number of module sources (the
peer copies one stacked source n times); ``-s pickle`` is refused (unpickling network
data runs code); protocol ``2.1`` is not produced (2.2 and 1.0 are); ``--data-like`` is
accepted for compatibility, the module arrays always have the layout the detectors'
pipelines send (frames first).
"""

import argparse
import logging
import signal
import sys
import threading
import time

from ..bridge import sender as _sender
from .detectors import make_detector

__all__ = ["main", "simulated_trains"]

log = logging.getLogger("kbstream.tools")


def simulated_trains(detector, first_train=10_000, ntrains=None, rate=10.0, stop=None):
    """Yield ``(data, metadata)`` of consecutive trains at ``rate`` Hz (0: no pacing)."""
    tid = first_train
    interval = 1.0 / rate if rate else 0.0
    next_time = time.perf_counter()
    while ntrains is None or tid < first_train + ntrains:
        if stop is not None and stop.is_set():
            return
        if interval:
            delay = next_time - time.perf_counter()
            if delay > 0 and stop is not None and stop.wait(delay):
                return
            elif delay > 0 and stop is None:
                time.sleep(delay)
            next_time = max(next_time + interval, time.perf_counter() - interval)
        yield detector.train(tid)
        tid += 1


def _parser():
    ap = argparse.ArgumentParser(prog="kbstream simulate", description=(
        "Run a Karabo bridge server producing simulated detector data."))
    ap.add_argument("port", help="TCP port to bind (all interfaces), or a ZeroMQ endpoint")
    ap.add_argument("-z", "--server-socket", choices=_sender.SOCKET_TYPES, default="REP",
                    help="socket type of the server (default REP)")
    ap.add_argument("-d", "--detector", default="AGIPD",
                    help="JUNGFRAU, AGIPD, AGIPDModule, LPD or ePix100 (default AGIPD)")
    ap.add_argument("-p", "--protocol", choices=["1.0", "2.1", "2.2"], default="2.2",
                    help="bridge protocol version (default 2.2; 2.1 is not produced)")
    ap.add_argument("-s", "--serialisation", choices=["msgpack", "pickle"], default="msgpack",
                    help="only msgpack (pickle is refused)")
    ap.add_argument("-r", "--raw", action="store_true",
                    help="raw data as the DAQ gets it (default: corrected data)")
    ap.add_argument("-n", "--nsources", type=int, default=None,
                    help="number of module sources (default: the whole detector)")
    ap.add_argument("-g", "--gen", choices=["random", "zeros", "pattern"], default="pattern",
                    help="pixel values: a pattern with noise (random, pattern) or zeros")
    ap.add_argument("--data-like", choices=["online", "file"], default="online",
                    help="accepted for compatibility; arrays always have the pipelines' layout")
    ap.add_argument("--rate", type=float, default=10.0,
                    help="trains per second (default 10; 0: as fast as taken)")
    ap.add_argument("--ntrains", type=int, default=None, help="stop after N trains")
    ap.add_argument("--first-train", type=int, default=10_000, help="first train id")
    ap.add_argument("--debug", action="store_true", help="debug logging")
    return ap


def main(argv=None, out=None):
    """Run the simulator until interrupted (or ``--ntrains``); returns the exit status."""
    out = sys.stdout if out is None else out
    ap = _parser()
    args = ap.parse_args(argv)
    if args.debug:
        logging.getLogger("kbstream").setLevel(logging.DEBUG)
    if args.serialisation == "pickle":
        ap.error("pickle is refused: unpickling data from the network runs code; use msgpack")
    if args.protocol == "2.1":
        ap.error("protocol 2.1 is not produced by kbstream; use 2.2 (or 1.0)")
    if args.nsources is not None and args.nsources < 1:
        ap.error("--nsources must be at least 1")
    try:
        det = make_detector(args.detector, raw=args.raw, modules=args.nsources,
                            gen="zeros" if args.gen == "zeros" else "pattern")
    except ValueError as e:
        ap.error(str(e))
    stop = threading.Event()
    handler = lambda *_: stop.set()  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    snd = _sender.Sender(args.port, args.server_socket, hwm=1)
    sent = [0]
    try:
        print(f"Simulated {det.name} ({'raw' if args.raw else 'corrected'}, "
              f"{det.modules} sources) on {snd.endpoint}", file=out, flush=True)
        trains = simulated_trains(det, args.first_train, args.ntrains, args.rate, stop)

        def next_train():
            item = next(trains, None)
            return None if item is None else (item[0], item[1], None)

        def on_sent(_token, outcome, _tracker):
            if outcome is _sender.SENT:
                sent[0] += 1

        _sender.run(snd, next_train, stop, protocol_version=args.protocol, on_sent=on_sent)
    finally:
        snd.close(linger=1.0)
        for s, h in previous.items():
            signal.signal(s, h)
    print(f"Sent {sent[0]} trains ({snd.dropped} dropped with no subscriber)", file=out)
    return 0
