"""A small threaded TCP relay that records what two peers send each other.

Listens on ``127.0.0.1:<ephemeral>``, forwards every accepted connection to ``target`` and
keeps both byte streams with the time each chunk was seen. Usage::

    with TcpRelay(("127.0.0.1", out.port)) as relay:
        inp.connect(relay.port)                 # the client talks to the relay
        ...
        conn = relay.wait_connection()
        conn.client_bytes()                     # what the client sent (e.g. hello, updates)
        conn.server_bytes()                     # what the server sent (data messages)
        conn.chunks                             # [(time.monotonic(), "c2s" | "s2c", bytes)]

Recording is capped (``record_limit`` bytes per direction and connection, default 64 MiB;
``None`` = unlimited); bytes beyond it are still forwarded and counted (``c2s_total``,
``s2c_total``). ``close_connections()`` cuts every live connection (both sides see EOF or a
reset), e.g. to test a peer's disconnect handling. Half-closes are passed on.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["TcpRelay", "RelayConnection"]

C2S, S2C = "c2s", "s2c"


class RelayConnection:
    """One relayed connection: client (accepted) <-> server (target)."""

    def __init__(self, number: int, client: socket.socket, server: socket.socket,
                 client_addr, record_limit: int | None):
        self.number = number
        self.client_addr = client_addr
        self.client = client
        self.server = server
        self.record_limit = record_limit
        self.opened = time.monotonic()
        self.chunks: list[tuple[float, str, bytes]] = []
        self.c2s_total = 0
        self.s2c_total = 0
        self.c2s_recorded = 0
        self.s2c_recorded = 0
        self.closed_directions: dict[str, float] = {}   # direction -> time of its EOF
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._threads = [
            threading.Thread(target=self._pump, args=(client, server, C2S), daemon=True,
                             name=f"relay-{number}-c2s"),
            threading.Thread(target=self._pump, args=(server, client, S2C), daemon=True,
                             name=f"relay-{number}-s2c"),
        ]
        for t in self._threads:
            t.start()

    def _record(self, direction: str, data: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            if direction == C2S:
                self.c2s_total += len(data)
                recorded = self.c2s_recorded
            else:
                self.s2c_total += len(data)
                recorded = self.s2c_recorded
            if self.record_limit is not None:
                data = data[:max(0, self.record_limit - recorded)]
            if data:
                self.chunks.append((now, direction, data))
                if direction == C2S:
                    self.c2s_recorded += len(data)
                else:
                    self.s2c_recorded += len(data)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                self._record(direction, data)
                dst.sendall(data)
        except OSError as exc:
            with self._lock:
                self.errors.append(f"{direction}: {exc!r}")
        finally:
            with self._lock:
                self.closed_directions[direction] = time.monotonic()
                both = len(self.closed_directions) == 2
            try:
                dst.shutdown(socket.SHUT_WR)      # pass the half-close on
            except OSError:
                pass
            if both:
                self._close_sockets()
                self._done.set()

    def _close_sockets(self) -> None:
        for sock in (self.client, self.server):
            try:
                sock.close()
            except OSError:
                pass

    # ---- inspection -------------------------------------------------------------------

    def client_bytes(self) -> bytes:
        """Recorded bytes client -> server (input -> output in a pipeline)."""
        with self._lock:
            return b"".join(d for _, k, d in self.chunks if k == C2S)

    def server_bytes(self) -> bytes:
        """Recorded bytes server -> client (output -> input in a pipeline)."""
        with self._lock:
            return b"".join(d for _, k, d in self.chunks if k == S2C)

    def timeline(self) -> list[tuple[float, str, int]]:
        """``[(seconds since open, direction, chunk length)]``."""
        with self._lock:
            return [(t - self.opened, k, len(d)) for t, k, d in self.chunks]

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """True once both directions have ended."""
        return self._done.wait(timeout)

    def wait_bytes(self, direction: str, n: int, timeout: float = 10.0) -> bool:
        """True once at least ``n`` bytes went through in ``direction`` (c2s or s2c)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                total = self.c2s_total if direction == C2S else self.s2c_total
            if total >= n:
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        """Cut the connection (both sockets shut down and closed)."""
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5.0)
        self._close_sockets()
        self._done.set()


class TcpRelay:
    """Accepts on ``listen`` (default 127.0.0.1, ephemeral port) and relays to ``target``."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0),
                 *, record_limit: int | None = 64 << 20, connect_timeout: float = 5.0):
        self.target = (target[0], int(target[1]))
        self.record_limit = record_limit
        self.connect_timeout = connect_timeout
        self.connections: list[RelayConnection] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(listen)
        self._listener.listen(16)
        self.host, self.port = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name="relay-accept")
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _accept_loop(self) -> None:
        number = 0
        while True:
            try:
                client, addr = self._listener.accept()
            except OSError:
                break                                   # listener closed
            try:
                server = socket.create_connection(self.target, self.connect_timeout)
                server.settimeout(None)
            except OSError as exc:
                with self._cond:
                    self.errors.append(f"connect to {self.target}: {exc!r}")
                client.close()                          # the client sees EOF
                continue
            conn = RelayConnection(number, client, server, addr, self.record_limit)
            number += 1
            with self._cond:
                self.connections.append(conn)
                self._cond.notify_all()

    def wait_connection(self, index: int = 0, timeout: float = 10.0) -> RelayConnection:
        """The ``index``-th accepted connection, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.connections) <= index:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"relay: connection #{index} not made within "
                                       f"{timeout} s (errors: {self.errors})")
                self._cond.wait(remaining)
            return self.connections[index]

    def close_connections(self) -> None:
        """Cut every live connection; the relay keeps accepting new ones."""
        with self._cond:
            conns = list(self.connections)
        for conn in conns:
            conn.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5.0)
        self.close_connections()

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
