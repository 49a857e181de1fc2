"""A plain kbstream bridge server in its own process (used by bench_matcher.py): the
same JF4M train (8 modules, payloads.py) sent from memory, consecutive train ids.

    python _bridge_server.py ENDPOINT SOCK

Prints ``ready`` once bound; serves until its stdin closes.
"""

import sys

import kbstream

# run as a script: its own folder (benchmarks/) is first on sys.path
from _e2e_worker import Feeder
from payloads import make_train


def main(endpoint, sock):
    data, _ = make_train(8)
    server = kbstream.ServerInThread(endpoint, sock=sock, maxlen=2)
    server.start()
    feeder = Feeder(server, data)
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        feeder.close()
        server.stop()


if __name__ == "__main__":
    main(*sys.argv[1:3])
