"""One JUNGFRAU module's pipeline output in its own process (used by bench_matcher.py).

    python _matcher_source.py CHANNEL_ID INPUT_ID KEY PORT CLOCK_FILE NSOURCES

Listens on PORT (prints ``PORT <port>``), waits for the input INPUT_ID, then sends items as fast
as the input takes them (consecutive train ids from 10_000_000_000, ``data.adc`` uint16
(16, 512, 1024), the same array each time, plus a few scalars) until its stdin closes.

The sources share one train clock, as the modules of a detector share its trigger:
CLOCK_FILE holds one int64 per source, the last train it sent, and after them a run flag;
a source never runs more than :data:`AHEAD` trains ahead of the slowest one, and sends
only while the flag is 1 (the benchmark pauses the sources while it measures another
contender).
"""

import mmap
import sys
import threading
import time

import numpy as np

from kbhash import Hash, HashType, Timestamp
from kbstream.pipeline import OutputChannel

SHAPE = (16, 512, 1024)
#: trains a source may be ahead of the slowest source
AHEAD = 2


def main(channel_id, input_id, key, port, clock_file, nsources):
    key, nsources = int(key), int(nsources)
    with open(clock_file, "r+b") as f:
        shared = np.frombuffer(mmap.mmap(f.fileno(), 8 * (nsources + 1)), dtype=np.int64)
    clock, running = shared[:nsources], shared[nsources:]
    stop = threading.Event()
    adc = np.random.default_rng(int(key)).integers(0, 16384, SHAPE, dtype=np.uint16)
    with OutputChannel(channel_id, hostname="127.0.0.1", port=int(port)) as out:
        print("PORT", out.port, flush=True)
        out.wait_for_inputs(copy=[input_id], timeout=120)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        tid = 10_000_000_000
        st = {}
        while not stop.is_set():
            while not running[0] and not stop.is_set():
                time.sleep(0.02)  # paused: the other contender is measured
            while tid - int(clock.min()) > AHEAD and not stop.is_set():
                time.sleep(0.001)  # wait for the slowest module
            h = Hash()
            h["data.adc"] = adc
            h.set("data.trainId", tid, type=HashType.UINT64)
            h["data.module"] = int(key)
            out.write(h, Timestamp(1_700_000_000 + tid // 10, (tid % 10) * 10**17, tid))
            try:
                out.update()  # the matcher's input asks for "wait": paced by the matcher
            except Exception:  # the matcher stopped first: end quietly
                break
            clock[key] = tid
            tid += 1
            if tid % 16 == 0:
                st = out.stats().get(input_id, st)
        print(f"{channel_id}: {st.get('sent')} items sent, {st.get('shm')} through shared memory",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:7])
