"""A pipeline output in its own process, sending JUNGFRAU-like module items for the
train matcher's end-to-end tests.

    python matcher_source.py CHANNEL_ID INPUT_ID FIRST_TID NTRAINS KEY [--skip-every K]
        [--interval S] [--jitter S] [--port P] [--start I] [--stop I] [--report-gone]

Prints ``PORT <port>`` once it listens (on ``--port``, default any), waits for the input
INPUT_ID, sends the items ``i`` in ``--start .. --stop`` (default 0 .. NTRAINS; train id
FIRST_TID + i), leaving out every K-th (``i % K == K - 1``) with --skip-every, sleeping
``--interval`` plus a random 0 .. ``--jitter`` seconds after each, then the end of
stream; prints ``DONE`` (with --report-gone then ``GONE`` once no input is connected any
more) and exits when its stdin closes.  Each item: ``data.adc`` uint16
(16, 512, 128) filled with ``value(KEY, tid)``, ``data.trainId`` and ``data.key``.
"""

import argparse
import random
import sys
import time

import numpy as np

from kbhash import Hash, HashType, Timestamp
from kbstream.pipeline import OutputChannel

SHAPE = (16, 512, 128)


def value(key, tid):
    """The value every pixel of source ``key``'s item for train ``tid`` has."""
    return (tid % 1000) * 16 + key


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("channel_id")
    ap.add_argument("input_id")
    ap.add_argument("first_tid", type=int)
    ap.add_argument("ntrains", type=int)
    ap.add_argument("key", type=int)
    ap.add_argument("--skip-every", type=int, default=0)
    ap.add_argument("--interval", type=float, default=0.01)
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--report-gone", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.key)
    stop = args.ntrains if args.stop is None else args.stop
    with OutputChannel(args.channel_id, hostname="127.0.0.1", port=args.port) as out:
        print("PORT", out.port, flush=True)
        out.wait_for_inputs(copy=[args.input_id], timeout=60)
        for i in range(args.start, stop):
            tid = args.first_tid + i
            if args.skip_every and i % args.skip_every == args.skip_every - 1:
                continue
            h = Hash()
            h["data.adc"] = np.full(SHAPE, value(args.key, tid), dtype=np.uint16)
            h.set("data.trainId", tid, type=HashType.UINT64)
            h["data.key"] = args.key
            ts = Timestamp.now(tid)
            out.write(h, ts)
            out.update()
            time.sleep(args.interval + rng.uniform(0, args.jitter))
        out.signal_end_of_stream()
        print("DONE", flush=True)
        if args.report_gone:
            deadline = time.monotonic() + 120
            while out.connection_count() and time.monotonic() < deadline:
                time.sleep(0.02)
            print("GONE" if not out.connection_count() else "STILL CONNECTED", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
