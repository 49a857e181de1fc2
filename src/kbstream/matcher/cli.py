"""``kbstream-bridge`` (also ``kbstream bridge``): match pipeline outputs, serve the trains.

    kbstream-bridge SOURCE... [--mode match|buffer] [--buffer N] [--max-wait S]
                    [--port PORT_OR_ENDPOINT] [-z REP|PUB|PUSH] [--protocol-version 2.2|1.0]
                    [--stats FILE]

Each SOURCE is ``[ALIAS@]DEVICE:CHANNEL=HOST:PORT``.  Runs until SIGINT or SIGTERM, then
closes the inputs and the output, writes the statistics as JSON to ``--stats`` (if given)
and prints a one-line summary.  Options and counters: ``docs/matcher.md``.
"""

import argparse
import json
import logging
import signal
import sys
import threading

from .core import DEFAULT_BUFFER, MODES
from .errors import MatcherError

__all__ = ["main", "summary"]

log = logging.getLogger("kbstream.matcher")


def _parser():
    ap = argparse.ArgumentParser(
        prog="kbstream-bridge",
        description="Match the items of Karabo pipeline outputs by train id and serve each "
                    "matched train to Karabo Bridge clients.")
    ap.add_argument("sources", nargs="+", metavar="SOURCE",
                    help="[ALIAS@]DEVICE:CHANNEL=HOST:PORT (a pipeline output and its endpoint)")
    ap.add_argument("--mode", choices=MODES, default="match",
                    help="match: send a train once every source has it; buffer: keep N trains "
                         "and send the oldest, complete or not (default match)")
    ap.add_argument("--buffer", type=int, default=DEFAULT_BUFFER, metavar="N",
                    help=f"trains kept in buffer mode (default {DEFAULT_BUFFER})")
    ap.add_argument("--max-wait", type=float, default=None, metavar="SECONDS",
                    help="end a train that waited this long for items (match: give it up; "
                         "buffer: send it as it is)")
    ap.add_argument("--port", default="4545", metavar="PORT_OR_ENDPOINT",
                    help="bridge port (all interfaces) or ZeroMQ endpoint (default 4545)")
    ap.add_argument("-z", "--socket", dest="sock", choices=("REP", "PUB", "PUSH"), default="REP",
                    help="bridge socket type (default REP)")
    ap.add_argument("--protocol-version", choices=("2.2", "1.0"), default="2.2",
                    help="Karabo Bridge protocol version (default 2.2)")
    ap.add_argument("--stats", metavar="FILE", help="write the statistics as JSON here at exit")
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


def main(argv=None):
    """Run the matcher until SIGINT / SIGTERM; returns the exit status (2: bad arguments)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .karabo import main_karabo, wants_broker

    if wants_broker(args):  # Karabo broker side
        return main_karabo(args)
    from ..errors import KbStreamError
    from .matcher import TrainMatcher

    try:
        matcher = TrainMatcher(args.sources, [(args.port, args.sock)], mode=args.mode, buffer=args.buffer,
                               max_wait=args.max_wait, protocol_version=args.protocol_version)
    except (MatcherError, KbStreamError) as e:
        print(f"kbstream-bridge: {e}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with matcher:
            print(f"kbstream-bridge: {len(matcher.specs)} sources, {args.mode} mode, serving on "
                  f"{matcher.endpoints[0]} ({args.sock})", flush=True)
            while not done.wait(0.5):
                pass
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
