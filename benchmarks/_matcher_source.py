"""One JUNGFRAU module's pipeline output in its own process (used by bench_matcher.py).

    python _matcher_source.py CHANNEL_ID INPUT_ID KEY PORT

Listens on PORT (prints ``PORT <port>``), waits for the input INPUT_ID, then sends items as fast
as the input takes them (consecutive train ids from 10_000_000_000, ``data.adc`` uint16
(16, 512, 1024), the same array each time, plus a few scalars) until its stdin closes.
"""

import sys
import threading

import numpy as np

from kbhash import Hash, HashType, Timestamp
from kbstream.pipeline import OutputChannel

SHAPE = (16, 512, 1024)


def main(channel_id, input_id, key, port):
    stop = threading.Event()
    adc = np.random.default_rng(int(key)).integers(0, 16384, SHAPE, dtype=np.uint16)
    with OutputChannel(channel_id, hostname="127.0.0.1", port=int(port)) as out:
        print("PORT", out.port, flush=True)
        out.wait_for_inputs(copy=[input_id], timeout=120)
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        tid = 10_000_000_000
        while not stop.is_set():
            h = Hash()
            h["data.adc"] = adc
            h.set("data.trainId", tid, type=HashType.UINT64)
            h["data.module"] = int(key)
            out.write(h, Timestamp(1_700_000_000 + tid // 10, (tid % 10) * 10**17, tid))
            try:
                out.update()  # the matcher's input asks for "wait": paced by the matcher
            except Exception:  # the matcher stopped first: end quietly
                break
            tid += 1


if __name__ == "__main__":
    main(*sys.argv[1:5])
