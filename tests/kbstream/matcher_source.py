"""A pipeline output in its own process, sending JUNGFRAU-like module items for the
train matcher's end-to-end tests.

    python matcher_source.py CHANNEL_ID INPUT_ID FIRST_TID NTRAINS KEY [--skip-every K]

Prints ``PORT <port>`` once it listens, waits for the input INPUT_ID, sends NTRAINS items
(train ids FIRST_TID ...), leaving out every K-th (``i % K == K - 1``) with --skip-every,
then the end of stream, and exits when its stdin closes.  Each item: ``data.adc`` uint16
(16, 512, 128) filled with ``value(KEY, tid)``, ``data.trainId`` and ``data.key``.
"""

import argparse
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
    args = ap.parse_args()
    with OutputChannel(args.channel_id, hostname="127.0.0.1") as out:
        print("PORT", out.port, flush=True)
        out.wait_for_inputs(copy=[args.input_id], timeout=60)
        for i in range(args.ntrains):
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
            time.sleep(args.interval)
        out.signal_end_of_stream()
        print("DONE", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
