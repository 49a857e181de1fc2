"""``kbstream-broker-status``: who is alive on a Karabo broker topic, and their outputs.

What to run first when a pipeline does not connect: it joins the topic as a client
instance, broadcasts ``slotDiscover``, listens to answers, announcements and heartbeats for
``--wait`` seconds, asks every device for its output channels
(``slotGetOutputChannelNames``) and prints one line per instance::

    kbstream-broker-status --broker amqp://guest:guest@127.0.0.1:5672 --topic SPB --wait 3

Exit status: 0 = listed, 2 = bad configuration or broker not reachable.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

__all__ = ["main"]


def _parser():
    p = argparse.ArgumentParser(
        prog="kbstream-broker-status",
        description="List the live Karabo instances of a broker topic with their heartbeat "
                    "age and output channels.")
    p.add_argument("--broker", help="amqp://user:password@host:port[/vhost], comma-separated "
                   "list allowed (default: $KARABO_BROKER)")
    p.add_argument("--topic", help="broker topic (default: $KARABO_BROKER_TOPIC, else the "
                   "user name)")
    p.add_argument("--wait", type=float, default=3.0,
                   help="seconds to collect discovery answers and heartbeats (default 3)")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="timeout of each slotGetOutputChannelNames request (default 2 s)")
    p.add_argument("--channel-info", action="store_true",
                   help="also ask every output channel for its host and port")
    p.add_argument("--no-outputs", action="store_true",
                   help="do not ask devices for their output channels")
    p.add_argument("--connect-timeout", type=float, default=0.0,
                   help="keep trying to reach the broker for this many seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def _age(now, t):
    return "-" if t is None else f"{now - t:.1f}s"


def main(argv=None) -> int:
    """Run the status command; return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # pika logs every failed connection attempt as an ERROR; our message says it once
    logging.getLogger("pika").setLevel(logging.INFO if args.verbose else logging.CRITICAL)

    from .errors import BrokerConfigError, BrokerConnectionError, BrokerError
    from .instance import BrokerInstance

    own_id = f"kbstream-status-{socket.gethostname().split('.')[0]}-{os.getpid()}"
    own_id = "".join(c if c.isalnum() or c in "_-/" else "_" for c in own_id)
    try:
        inst = BrokerInstance(own_id, broker=args.broker, topic=args.topic,
                              instance_type="client", heartbeat_interval=120,
                              track_heartbeats=True, connect_timeout=args.connect_timeout)
        inst.start()
    except (BrokerConfigError, BrokerConnectionError) as e:
        print(f"kbstream-broker-status: {e}", file=sys.stderr)
        return 2
    try:
        time.sleep(max(0.0, args.wait))
        records = inst.instances()
        outputs = {}
        if not args.no_outputs:
            futures = {iid: inst.request_async(iid, "slotGetOutputChannelNames",
                                               timeout=args.timeout)
                       for iid, rec in records.items() if rec.type == "device"}
            for iid, fut in futures.items():
                try:
                    (names,) = fut.wait(args.timeout + 1.0) or ([],)
                    outputs[iid] = [str(n) for n in names]
                except (BrokerError, ValueError) as e:
                    outputs[iid] = f"? ({type(e).__name__})"
        info = {}
        if args.channel_info:
            for iid, names in outputs.items():
                if isinstance(names, list):
                    for name in names:
                        try:
                            a1 = inst.resolver.request_info(f"{iid}:{name}")
                            i = a1.get("info")
                            info[(iid, name)] = (f"{i.get('hostname')}:{i.get('port')}"
                                                 if a1.get("success") is True else "no such")
                        except (BrokerError, ValueError) as e:
                            info[(iid, name)] = f"? ({type(e).__name__})"
        now = time.monotonic()
        print(f"topic {inst.config.topic!r} on {inst.config.urls[0].safe}: "
              f"{len(records)} instance(s)")
        header = f"{'INSTANCE':30} {'TYPE':8} {'HOST':16} {'CLASS':18} {'HB':>5} " \
                 f"{'LAST HB':>8} {'SEEN':>6}  OUTPUT CHANNELS"
        print(header)
        for iid in sorted(records):
            rec = records[iid]
            outs = outputs.get(iid, "")
            if isinstance(outs, list):
                outs = ", ".join(
                    n + (f" ({info[(iid, n)]})" if (iid, n) in info else "") for n in outs) or "-"
            hb = rec.heartbeat_interval
            print(f"{iid:30} {rec.type:8} {str(rec.info.get('host', '?')):16} "
                  f"{str(rec.info.get('classId', '')):18} {(str(hb) + 's') if hb else '?':>5} "
                  f"{_age(now, rec.last_heartbeat):>8} {_age(now, rec.last_seen):>6}  {outs}")
        return 0
    finally:
        inst.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
