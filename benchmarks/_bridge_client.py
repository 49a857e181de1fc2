"""A Karabo Bridge client in its own process (used by bench_matcher.py).

    python _bridge_client.py ENDPOINT SOCK NSOURCES

Connects a kbstream.Client, receives three warm-up trains, prints ``ready``; then for
every line ``take K`` receives K trains and prints ``<seconds> <ok>`` (the time for the
K trains, measured here, and whether each had NSOURCES sources with their arrays).
"""

import sys
import time

import numpy as np

import kbstream


def main(endpoint, sock, nsources):
    nsources = int(nsources)
    with kbstream.Client(endpoint, sock=sock, timeout=120) as client:
        for _ in range(3):
            client.next()
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if words[:1] != ["take"]:
                break
            ok = True
            t0 = time.perf_counter()
            for _ in range(int(words[1])):
                data, meta = client.next()
                ok = ok and len(data) == nsources and all(
                    isinstance(p.get("data.adc"), np.ndarray) and p["data.adc"].shape == (16, 512, 1024)
                    for p in data.values())
                del data, meta
            print(f"{time.perf_counter() - t0:.6f} {int(ok)}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
