"""One end-to-end contender in its own process (used by bench_bridge.py).

    python _e2e_worker.py LIBRARY SERVER_SOCK CLIENT_SOCK NSOURCES

LIBRARY is kbstream, karabo_bridge or raw-pyzmq.  The worker starts that library's server
(in a thread, fed with consecutive JF4M-like trains) and its client, receives
three warm-up trains, prints ``ready`` and then, for every line ``next`` on stdin, receives
one train and prints the number of array bytes it got.  ``quit`` (or end of input) stops.

A process per contender keeps process-wide state apart: the allocator settings that
``kbstream.Client`` applies would otherwise also speed up the peer's client measured in the
same interpreter.
"""

import queue
import sys
import threading

import numpy as np
import zmq

# run as a script: its own folder (benchmarks/) is first on sys.path
from payloads import later_train, make_train


class Feeder:
    """Keeps a server's queue full until stopped, with consecutive trains of one stream
    (the same arrays; train id and timestamps change from train to train)."""

    def __init__(self, server, data):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, args=(server, data), daemon=True)
        self.thread.start()

    def run(self, server, data):
        k = 0
        while not self.stop.is_set():
            d, m = later_train(data, k)
            while not self.stop.is_set():
                try:
                    server.feed(d, m, timeout=0.1)
                    break
                except queue.Full:
                    pass
            k += 1

    def close(self):
        self.stop.set()
        self.thread.join()


class RawServer:
    """Raw pyzmq: the same frames sent with send_multipart(copy=False), REP or PUSH."""

    def __init__(self, sock, frames):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REP if sock == "REP" else zmq.PUSH)
        self.sock.linger = 0
        self.sock.set_hwm(1)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.kind = sock
        self.frames = frames
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN if self.kind == "REP" else zmq.POLLOUT)
        while not self.done.is_set():
            if not poller.poll(50):
                continue
            if self.kind == "REP":
                self.sock.recv()
            try:
                self.sock.send_multipart(self.frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:  # the peer left between poll and send
                pass

    def close(self):
        self.done.set()
        self.thread.join()
        self.sock.close(linger=0)
        self.ctx.term()


class RawClient:
    def __init__(self, endpoint, sock):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ if sock == "REQ" else zmq.PULL)
        self.sock.linger = 0
        self.sock.set_hwm(1)
        self.sock.connect(endpoint)
        self.req = sock == "REQ"

    def next(self):
        if self.req:
            self.sock.send(b"next")
        return self.sock.recv_multipart(copy=False)

    def close(self):
        self.sock.close(linger=0)
        self.ctx.term()


def main(library, server_sock, client_sock, nsources):
    data, meta = make_train(int(nsources))
    if library == "raw-pyzmq":
        import kbstream
        server = RawServer(server_sock, kbstream.serialize(data, meta))
        client = RawClient(server.endpoint, client_sock)
        feeder = None

        def received(msg):
            return sum(len(f.buffer) for f in msg[3::4])  # the array frames
    else:
        if library == "kbstream":
            import kbstream as mod
        else:
            import karabo_bridge as mod
        server = mod.ServerInThread("tcp://127.0.0.1:0", sock=server_sock, maxlen=2)
        server.start()
        feeder = Feeder(server, data)
        client = mod.Client(server.endpoint, sock=client_sock, timeout=30)

        def received(msg):
            return sum(v.nbytes for p in msg[0].values() for v in p.values()
                       if isinstance(v, np.ndarray))
    try:
        for _ in range(3):
            client.next()  # warm up: connection, first page faults
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "next":
                break
            msg = client.next()
            print(received(msg), flush=True)
            del msg
    finally:
        if feeder is not None:
            feeder.close()
        # Servers first, while the client is still connected: karabo_bridge's PUSH server
        # can block forever in send_multipart when its PULL peer vanishes between its poll
        # and its send.
        if library == "raw-pyzmq":
            server.close()
            client.close()
        else:
            server.stop()
            if library == "kbstream":
                client.close()
            else:
                client._context.destroy(linger=0)


if __name__ == "__main__":
    main(*sys.argv[1:5])
