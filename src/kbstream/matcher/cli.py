"""``kbstream-bridge`` (also ``kbstream bridge``): match pipeline outputs, serve the trains.

    kbstream-bridge SOURCE... [--offset NAME=N]... [--mode match|buffer] [--buffer N]
                    [--max-wait S] [--port PORT_OR_ENDPOINT[,SOCK][,missing]]...
                    [-z REP|PUB|PUSH] [--protocol-version 2.2|1.0] [--use-infiniband]
                    [--append-detector-modules] [--on-slowness drop|queueDrop|wait]
                    [--when-full drop|wait]
                    [--stats FILE] [--interval S] [--quiet]

Each SOURCE is ``[ALIAS@]DEVICE:CHANNEL=HOST:PORT``.  Runs until SIGINT or SIGTERM, then
closes the inputs and the outputs, writes the statistics as JSON to ``--stats`` (if
given), prints a one-line summary and exits with status 0.  While it runs, a table of the
sources, trains and clients refreshes about once a second on a terminal; when stdout is
not a terminal, one plain line per interval is printed instead.  Options and counters:
``docs/matcher.md``.
"""

import argparse
import json
import logging
import signal
import sys
import threading
import time

from .core import DEFAULT_BUFFER, MODES
from .errors import MatcherError

__all__ = ["main", "summary", "status_line", "status_table", "parse_offset"]

log = logging.getLogger("kbstream.matcher")


def parse_offset(text):
    """``NAME=N`` -> ``(NAME, N)`` (N an integer, may be negative)."""
    name, eq, number = text.rpartition("=")
    try:
        if not eq or not name:
            raise ValueError
        return name, int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=N with an integer N, not {text!r}") from None


def _parser():
    ap = argparse.ArgumentParser(
        prog="kbstream-bridge",
        description="Match the items of Karabo pipeline outputs by train id and serve each "
                    "matched train to Karabo Bridge clients.")
    ap.add_argument("sources", nargs="+", metavar="SOURCE",
                    help="[ALIAS@]DEVICE:CHANNEL=HOST:PORT (a pipeline output and its endpoint)")
    ap.add_argument("--offset", action="append", type=parse_offset, default=[], metavar="NAME=N",
                    help="train-id offset of source NAME (its alias or DEVICE:CHANNEL): its item "
                         "for train t belongs to train t+N; repeatable")
    ap.add_argument("--mode", choices=MODES, default="match",
                    help="match: send a train once every source has it; buffer: keep N trains "
                         "and send the oldest, complete or not (default match)")
    ap.add_argument("--buffer", type=int, default=DEFAULT_BUFFER, metavar="N",
                    help=f"trains kept in buffer mode (default {DEFAULT_BUFFER})")
    ap.add_argument("--max-wait", type=float, default=None, metavar="SECONDS",
                    help="end a train that waited this long for items (match: give it up; "
                         "buffer: send it as it is)")
    ap.add_argument("--port", action="append", default=None, metavar="PORT_OR_ENDPOINT[,SOCK][,missing]",
                    help="a bridge output: port (all interfaces) or ZeroMQ endpoint, optionally "
                         "its own socket type and 'missing' (list the sources a train lacks in "
                         "its metadata); repeatable (default 4545)")
    ap.add_argument("-z", "--socket", dest="sock", choices=("REP", "PUB", "PUSH"), default="REP",
                    help="bridge socket type of outputs that name none (default REP)")
    ap.add_argument("--protocol-version", choices=("2.2", "1.0"), default="2.2",
                    help="Karabo Bridge protocol version (default 2.2)")
    ap.add_argument("--use-infiniband", action="store_true",
                    help="bind outputs given as a port number on the ib0 interface")
    ap.add_argument("--append-detector-modules", action="store_true",
                    help="combine AGIPD, LPD, DSSC or JUNGFRAU module sources into one source "
                         "(as karabo-bridge-serve-run)")
    ap.add_argument("--on-slowness", choices=("drop", "queueDrop", "wait"), default="drop",
                    help="what the sources do when the matcher falls behind (the inputs' "
                         "onSlowness; default drop, as Karabo's)")
    ap.add_argument("--when-full", choices=("drop", "wait"), default="drop",
                    help="when a client is slow and its output queue full: drop the oldest train "
                         "(default; the sources never wait) or make the inputs wait")
    ap.add_argument("--stats", metavar="FILE", help="write the statistics as JSON here at exit")
    ap.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                    help="seconds between two refreshes of the table / status lines (default 1)")
    ap.add_argument("--quiet", action="store_true", help="no table or status lines while running")
    # Karabo broker side (kbstream.matcher.karabo; docs/matcher-karabo.md)
    kb = ap.add_argument_group("Karabo broker", "sources DEVICE:CHANNEL without =HOST:PORT and "
                               "slow sources DEVICE.property are found through the broker")
    kb.add_argument("--broker", help="amqp://user:password@host:port[/vhost], comma-separated "
                    "list allowed (default: $KARABO_BROKER)")
    kb.add_argument("--topic", help="broker topic (default: $KARABO_BROKER_TOPIC, else the user name)")
    kb.add_argument("--instance-id", help="the matcher's Karabo instance id "
                    "(default kbstream-bridge-<host>-<pid>)")
    kb.add_argument("--karabo-output", metavar="NAME",
                    help="also send the matched trains on the Karabo pipeline output <instance-id>:NAME")
    return ap


def summary(stats):
    """One line: the train counters and the sources' received / missing items."""
    t = stats["trains"]
    src = ", ".join(f"{name} {s['received']} received / {s['missing']} missing"
                    for name, s in stats["sources"].items())
    return (f"kbstream-bridge: {t['seen']} trains seen, {t['matched']} matched, {t['sent']} sent, "
            f"{t['incomplete']} incomplete, {t['dropped']} dropped, {t['pending']} pending; {src}")


def _out_rate(stats, previous, dt):
    if previous is None or dt <= 0:
        return 0.0
    return max(0, stats["trains"]["sent"] - previous["trains"]["sent"]) / dt


def status_line(stats, rate=0.0):
    """One plain line (no control characters): trains, clients, and per source
    received / missing / latency / rate / status."""
    t = stats["trains"]
    src = "; ".join(f"{name} {s['received']} rcv {s['missing']} miss lat {s['latency']} "
                    f"{s['rate']:.1f}/s {s['status']}" for name, s in stats["sources"].items())
    return (f"trains seen {t['seen']} matched {t['matched']} sent {t['sent']} incomplete "
            f"{t['incomplete']} dropped {t['dropped']} pending {t['pending']} | {rate:.1f} trains/s | "
            f"clients {stats.get('clients', 0)} | {src}")


def status_table(stats, rate=0.0):
    """The live view: a rich Table of the sources, titled with the train counters."""
    from rich.table import Table

    t = stats["trains"]
    table = Table(
        title=(f"trains: {t['seen']} seen, {t['matched']} matched, {t['sent']} sent, "
               f"{t['incomplete']} incomplete, {t['dropped']} dropped, {t['pending']} pending  "
               f"| {rate:.1f} trains/s | {stats.get('clients', 0)} clients"),
        title_justify="left")
    for col in ("source", "received", "missing", "latency", "rate /s", "status"):
        table.add_column(col, justify="left" if col in ("source", "status") else "right")
    for name, s in stats["sources"].items():
        table.add_row(name, str(s["received"]), str(s["missing"]),
                      "-" if s["latency"] is None else str(s["latency"]), f"{s['rate']:.1f}", s["status"])
    return table


def watch(matcher, args, done):
    """Show ``matcher.stats()`` every ``args.interval`` seconds until ``done`` is set: a live
    rich table on a terminal, one plain status line per interval otherwise, nothing with
    ``--quiet`` (the plain and the broker command both run this)."""
    live = None
    tty = not args.quiet and sys.stdout.isatty()
    previous, last = None, time.monotonic()
    if tty:
        from rich.console import Console
        from rich.live import Live

        live = Live(status_table(matcher.stats()), console=Console(), auto_refresh=False)
        live.start()
    try:
        while not done.wait(args.interval):
            if args.quiet:
                continue
            st, now = matcher.stats(), time.monotonic()
            rate = _out_rate(st, previous, now - last)
            previous, last = st, now
            if live is not None:
                live.update(status_table(st, rate), refresh=True)
            else:
                print(status_line(st, rate), flush=True)
    finally:
        if live is not None:
            live.stop()


def wants_broker(args):
    """True when ``kbstream-bridge`` needs the broker: a broker option, a slow source, or
    a fast source without ``=HOST:PORT``."""
    from .slow import is_slow_source

    if args.broker or args.topic or args.instance_id or args.karabo_output:
        return True
    return any(is_slow_source(s) or "=" not in s for s in args.sources)


def _build(args):
    """``(matcher, outputs)`` from the command line: a :class:`TrainMatcher`, or a
    :class:`KaraboMatcher` when the broker is needed (:func:`wants_broker`)."""
    from .matcher import TrainMatcher, parse_output

    outputs = [(ep, sock, {"report_missing": missing})
               for ep, sock, missing in (parse_output(p, args.sock) for p in (args.port or ["4545"]))]
    options = dict(mode=args.mode, buffer=args.buffer, max_wait=args.max_wait,
                   protocol_version=args.protocol_version, offsets=dict(args.offset),
                   use_infiniband=args.use_infiniband,
                   append_detector_modules=args.append_detector_modules,
                   input_options={"onSlowness": args.on_slowness}, when_full=args.when_full)
    if not wants_broker(args):
        return TrainMatcher(args.sources, outputs, **options), outputs
    from .karabo import KaraboMatcher, default_instance_id

    logging.getLogger("pika").setLevel(logging.CRITICAL)
    return KaraboMatcher(args.sources, outputs, instance_id=args.instance_id or default_instance_id(),
                         broker=args.broker, topic=args.topic, karabo_output=args.karabo_output,
                         broker_options={"exit_on_sigterm": False}, **options), outputs


def _start_error(matcher, e):
    """The message for a matcher that could not start; a broker that cannot be reached
    names the sources that needed it."""
    from ..broker import BrokerConnectionError

    text = f"kbstream-bridge: {e}"
    if isinstance(e, BrokerConnectionError):
        unresolved = [s.name for s in matcher.specs if s.host is None] + matcher.slow.names()
        if unresolved:
            text += (f"; {'each of ' if len(unresolved) > 1 else ''}"
                     f"{', '.join(map(repr, unresolved))} has no endpoint (=HOST:PORT) and is "
                     "found through the broker")
    return text


def main(argv=None):
    """Run the matcher until SIGINT / SIGTERM; returns the exit status (2: bad arguments,
    or a matcher that cannot start, e.g. no broker reachable)."""
    from ..errors import KbStreamError

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.interval <= 0:
        print("kbstream-bridge: --interval must be > 0", file=sys.stderr)
        return 2
    try:
        matcher, outputs = _build(args)
    except (MatcherError, KbStreamError) as e:
        print(f"kbstream-bridge: {e}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            matcher.start()
        except KbStreamError as e:
            print(_start_error(matcher, e), file=sys.stderr)
            matcher.close()
            return 2
        try:
            outs = ", ".join(f"{ep} ({sock})" for ep, (_, sock, _) in zip(matcher.endpoints, outputs))
            where = ""
            if hasattr(matcher, "instance_id"):
                where = (f", {len(matcher.slow.names())} slow; Karabo instance "
                         f"{matcher.instance_id!r} on topic {matcher.instance.config.topic!r}")
            print(f"kbstream-bridge: {len(matcher.specs)} sources, {args.mode} mode, serving on "
                  f"{outs}{where}", flush=True)
            watch(matcher, args, done)
        finally:
            matcher.close()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    stats = matcher.stats()
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(stats, f, indent=1)
    print(summary(stats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
