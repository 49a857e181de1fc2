"""Real Karabo C++ pipeline channels (karabind 3.1.2) as test peers in their own processes.

:class:`KaraboPipelineOutput` and :class:`KaraboPipelineInput` each start
``pipeline_driver.py`` (next to this file) with the Python 3.12 side interpreter (see
:func:`peers.karabo.karabo_python`) and talk to it with one JSON object per line; the
driver's docstring is the protocol. A reader thread collects replies and events; every wait
has a timeout, and a driver that does not answer a command in time is killed.

Usage (``tests/`` is the import root)::

    from peers.pipeline import KaraboPipelineInput, KaraboPipelineOutput, pipeline_item

    with KaraboPipelineOutput() as out, KaraboPipelineInput([out.id]) as inp:
        inp.connect(out.port)
        out.wait_inputs(copy=[inp.id])
        out.write([pipeline_item(0, frames=(16, 512, 1024), image=True)])
        out.eos()
        items, eos = inp.receive_stream(timeout=10)

To test kbstream's own output, point a :class:`KaraboPipelineInput` at it
(``inp.connect(port)`` with ``outputs=["<our id>:<channel>"]``); to test kbstream's input,
connect it to ``out.port`` and wait with ``out.wait_inputs(copy=["<our input id>"])``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from peers.karabo import SETUP_HINT, PeerDied, PeerError, PeerTimeout, karabo_python
from peers.pipeline_driver import array_checksum, make_array, make_scalars

DRIVER = Path(__file__).resolve().with_name("pipeline_driver.py")

__all__ = [
    "KaraboPipelineInput", "KaraboPipelineOutput", "PipelinePeer", "Pending",
    "PeerError", "PeerTimeout", "PeerDied", "pipeline_item", "expected_checksum",
    "expected_image_checksum", "expected_values", "make_array", "array_checksum",
    "karabo_python",
]


def pipeline_item(index: int, *, frames=(4, 8), dtype: str = "uint16", fill: str = "index",
                  source: str | None = None, tid: int | None = None,
                  sec: int | None = None, frac: int | None = None, image=False,
                  scalars: int = 0) -> dict:
    """An ITEM for :meth:`KaraboPipelineOutput.write` (see the driver's docstring)."""
    item = {"index": int(index), "frames": [int(f) for f in frames], "dtype": dtype,
            "fill": fill, "image": image, "scalars": int(scalars)}
    for key, value in (("source", source), ("tid", tid), ("sec", sec), ("frac", frac)):
        if value is not None:
            item[key] = value
    return item


def expected_checksum(item: dict) -> int | None:
    """crc32 that the input reports for ``data.image`` of this ITEM."""
    arr = make_array(item.get("fill", "index"), item["index"], item.get("frames", [4, 8]),
                     item.get("dtype", "uint16"))
    return None if arr is None else array_checksum(arr)


def expected_image_checksum(item: dict) -> int | None:
    """crc32 of the ImageData pixels of this ITEM (None without an image)."""
    image = item.get("image", False)
    if not image:
        return None
    image = image if isinstance(image, dict) else {}
    fill = item.get("fill", "index")
    arr = make_array(image.get("fill", fill if fill != "none" else "index"), item["index"],
                     image.get("shape", [32, 64]), image.get("dtype", "uint16"))
    return array_checksum(arr)


def expected_values(item: dict) -> dict:
    """``{path: value}`` of the scalars (``index`` and ``header.kNN``) of this ITEM."""
    values = {"index": item["index"]}
    for path, _tname, value in make_scalars(item["index"], item.get("scalars", 0)):
        values[path] = value
    return values


class Pending:
    """A command sent but not yet answered; :meth:`result` waits for the reply."""

    def __init__(self, peer: PipelinePeer, rid: int, op: str, timeout: float):
        self.peer, self.rid, self.op, self.timeout = peer, rid, op, timeout

    def done(self) -> bool:
        with self.peer._cond:
            return self.rid in self.peer._replies

    def result(self, timeout: float | None = None) -> dict:
        return self.peer._result(self, self.timeout if timeout is None else timeout)


class PipelinePeer:
    """A running ``pipeline_driver.py`` process (base of the output and input peers).

    ``timeout`` is the default for commands; a command that gets no reply in time kills
    the driver (:class:`PeerTimeout`). Event waits raise :class:`PeerTimeout` too but leave
    the driver running (use :meth:`poll_event` for "nothing arrives" checks). ``stderr`` of
    the driver goes to ``log_path`` (a temporary file, removed after a clean exit); its tail
    is in :class:`PeerDied` messages.
    """

    mode = ""

    def __init__(self, options: dict, *, python: str | None = None, timeout: float = 30.0,
                 start_timeout: float = 30.0, log_path: str | os.PathLike | None = None):
        python = python or karabo_python()
        if not python:
            raise FileNotFoundError(f"no Karabo side interpreter: {SETUP_HINT}")
        if not Path(python).exists():
            raise FileNotFoundError(f"Karabo side interpreter {python} does not exist: "
                                    f"{SETUP_HINT}")
        self.python = python
        self.timeout = timeout
        self.options = dict(options)
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix=f"karabo-pipeline-{self.mode}-",
                                            suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self._cond = threading.Condition()
        self._replies: dict = {}
        self._all_events: list = []
        self._pending_events: list = []
        self._eof = False
        self._closed = True             # until the process exists
        self._killed = False
        self._ids = itertools.count(1)
        self._proc = subprocess.Popen(
            [python, "-u", str(DRIVER), self.mode, json.dumps(self.options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, encoding="utf-8", bufsize=1,
        )
        self._closed = False
        self._reader = threading.Thread(target=self._read_lines,
                                         name=f"karabo-pipeline-{self.mode}-reader",
                                         daemon=True)
        self._reader.start()
        try:
            self.ready = self._wait_ready(start_timeout)
        except BaseException:
            self.close(kill=True)
            raise
        self.id = self.ready["id"]
        self.pid = self.ready.get("pid")

    # ---- plumbing ---------------------------------------------------------------------

    def _read_lines(self):
        try:
            for line in self._proc.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = {"event": "garbage", "line": line}
                with self._cond:
                    if "event" in obj:
                        self._all_events.append(obj)
                        self._pending_events.append(obj)
                    else:
                        self._replies[obj.get("id")] = obj
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _log_tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _died(self, what: str) -> PeerDied:
        code = self._proc.poll()
        return PeerDied(f"Karabo pipeline driver ({self.mode}) exited (code {code}) "
                        f"{what}; driver log {self.log_path}:\n{self._log_tail()}")

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._pending_events:
                    if ev["event"] in ("ready", "failed"):
                        self._pending_events.remove(ev)
                        if ev["event"] == "failed":
                            raise PeerError(f"driver could not start: {ev.get('error')}; "
                                            f"log {self.log_path}:\n{self._log_tail()}")
                        return ev
                if self._eof:
                    raise self._died("before it was ready")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PeerTimeout(f"Karabo pipeline driver ({self.mode}) not ready "
                                      f"within {timeout} s (log {self.log_path})")
                self._cond.wait(remaining)

    def send(self, op: str, *, timeout: float | None = None, **fields) -> Pending:
        """Send a command without waiting; ``.result()`` waits for its reply."""
        if self._closed:
            raise PeerDied(f"Karabo pipeline peer ({self.mode}) is closed")
        rid = next(self._ids)
        line = json.dumps(dict(fields, op=op, id=rid), allow_nan=False)
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            err = self._died(f"(cannot send {op!r}: {exc})")
            self.close(kill=True)
            raise err from None
        return Pending(self, rid, op, self.timeout if timeout is None else timeout)

    def _result(self, pending: Pending, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while pending.rid not in self._replies:
                if self._eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            reply = self._replies.pop(pending.rid, None)
        if reply is None:
            if self._eof and not self._killed:
                err = self._died(f"during {pending.op!r}")
                self.close(kill=True)
                raise err
            self.close(kill=True)
            raise PeerTimeout(f"Karabo pipeline driver ({self.mode}) gave no answer to "
                              f"{pending.op!r} within {timeout} s; killed (log "
                              f"{self.log_path}):\n{self._log_tail()}")
        if not reply.get("ok"):
            raise PeerError(f"{pending.op}: {reply.get('error', reply)}")
        return reply

    def request(self, op: str, *, timeout: float | None = None, **fields) -> dict:
        """Send a command and return its reply (``ok`` true); see :class:`PipelinePeer`."""
        return self.send(op, timeout=timeout, **fields).result()

    def ping(self) -> bool:
        return bool(self.request("ping")["pong"])

    # ---- events -----------------------------------------------------------------------

    def events(self, kind: str | None = None) -> list:
        """All events received so far (consumed or not), optionally of one kind."""
        with self._cond:
            return [e for e in self._all_events if kind is None or e["event"] == kind]

    def poll_event(self, kind: str, timeout: float = 0.0, where=None) -> dict | None:
        """Like :meth:`wait_event` but returns None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self._pending_events:
                    if ev["event"] == kind and (where is None or where(ev)):
                        self._pending_events.remove(ev)
                        return ev
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def wait_event(self, kind: str, timeout: float | None = None, where=None) -> dict:
        """Take the oldest not yet taken event of ``kind`` (and ``where(event)`` true),
        waiting up to ``timeout`` s (default: the peer's) for it."""
        timeout = self.timeout if timeout is None else timeout
        ev = self.poll_event(kind, timeout, where)
        if ev is None:
            if self._eof and not self._closed:
                raise self._died(f"while waiting for a {kind!r} event")
            raise PeerTimeout(f"no {kind!r} event from the Karabo pipeline driver "
                              f"({self.mode}) within {timeout} s; events so far: "
                              f"{self._summary()}")
        return ev

    def collect(self, kind: str, n: int, timeout: float | None = None) -> list:
        """Take ``n`` events of ``kind``; one deadline for all of them."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        out = []
        try:
            for _ in range(n):
                out.append(self.wait_event(kind, max(0.0, deadline - time.monotonic())))
        except PeerTimeout:
            raise PeerTimeout(f"only {len(out)} of {n} {kind!r} events within {timeout} s; "
                              f"events so far: {self._summary()}") from None
        return out

    def take_all(self, kind: str | None = None) -> list:
        """Take every pending event (of ``kind``) without waiting."""
        with self._cond:
            taken = [e for e in self._pending_events if kind is None or e["event"] == kind]
            self._pending_events = [e for e in self._pending_events if e not in taken]
            return taken

    def _summary(self) -> str:
        with self._cond:
            kinds = {}
            for e in self._all_events:
                kinds[e["event"]] = kinds.get(e["event"], 0) + 1
            errors = [e for e in self._all_events if e["event"] == "error"]
        return f"{kinds}" + (f"; errors: {errors[:3]}" if errors else "")

    def errors(self) -> list:
        """``error`` events: Python exceptions inside the driver's C++ callbacks."""
        return self.events("error")

    # ---- life cycle -------------------------------------------------------------------

    @property
    def returncode(self):
        return self._proc.poll()

    def close(self, timeout: float = 15.0, *, kill: bool = False) -> None:
        """Tear the channel down (``close`` command) and end the driver; it is killed if it
        does not exit within ``timeout`` s, or at once with ``kill=True``."""
        if self._closed:
            return
        self._closed = True
        if kill:
            self._killed = True
            self._proc.kill()
        else:
            try:
                rid = next(self._ids)
                self._proc.stdin.write(json.dumps({"op": "close", "id": rid}) + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
        try:
            self._proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._killed = True
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5.0)
        if not self._reader.is_alive():     # never close a pipe another thread reads
            self._proc.stdout.close()
        self._log.close()
        if self._own_log and not self._killed and self._proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close(kill=True)


class KaraboPipelineOutput(PipelinePeer):
    """A C++ ``OutputChannel`` (a TCP server on 127.0.0.1, ephemeral port by default).

    Attributes: ``id`` ("peerSender:output"), ``port``, ``info`` (``getInformation()``:
    connectionType, hostname, port).
    """

    mode = "output"

    def __init__(self, instance: str = "peerSender", channel: str = "output", *,
                 port: int = 0, hostname: str = "127.0.0.1",
                 no_input_shared: str | None = None, connections: bool = False,
                 threads: int = 2, **kwargs):
        options = {"instance": instance, "channel": channel, "port": port,
                   "hostname": hostname, "connections": connections, "threads": threads}
        if no_input_shared is not None:
            options["noInputShared"] = no_input_shared
        super().__init__(options, **kwargs)
        self.port = int(self.ready["port"])
        self.info = self.ready["info"]

    def wait_inputs(self, copy=(), shared=(), timeout: float = 10.0) -> None:
        """Wait until the output has registered (processed the hello of) these inputs;
        :class:`PeerError` naming the missing ids after ``timeout`` s."""
        self.request("wait_inputs", copy=list(copy), shared=list(shared), within=timeout,
                     timeout=timeout + 10.0)

    def write_async(self, items, *, update: bool = True, safe: bool = False,
                    timeout: float | None = None) -> Pending:
        """``write()`` the ITEMs (see :func:`pipeline_item`) then ``update()``; the reply
        (``elapsed``, ``update_elapsed``, ``count``) comes after ``update()`` returned."""
        return self.send("write", items=list(items), update=update, safe=safe,
                         timeout=timeout)

    def write(self, items, *, update: bool = True, safe: bool = False,
              timeout: float | None = None) -> dict:
        return self.write_async(items, update=update, safe=safe, timeout=timeout).result()

    def update(self, *, safe: bool = False, timeout: float | None = None) -> dict:
        return self.request("update", safe=safe, timeout=timeout)

    def stream_async(self, count: int, item: dict | None = None, *, start: int = 0,
                     per_update: int = 1, eos: bool = False, safe: bool = False,
                     timeout: float | None = None) -> Pending:
        """``count`` items made from the ``item`` template (index start...), one
        ``update()`` per ``per_update`` items; reply ``elapsed``, ``first_t``, ``last_t``."""
        item = dict(item or {})
        item.pop("index", None)
        return self.send("stream", count=count, item=item, start=start,
                         per_update=per_update, eos=eos, safe=safe, timeout=timeout)

    def stream(self, count: int, item: dict | None = None, **kwargs) -> dict:
        timeout = kwargs.pop("timeout", None)
        return self.stream_async(count, item, timeout=timeout, **kwargs).result()

    def eos_async(self, *, timeout: float | None = None) -> Pending:
        return self.send("eos", timeout=timeout)

    def eos(self, *, timeout: float | None = None) -> dict:
        """``signalEndOfStream()`` (blocks while a ``wait`` input has no credit)."""
        return self.eos_async(timeout=timeout).result()

    def register_selector(self, mode: str = "round_robin", target: str = "") -> None:
        """``registerSharedInputSelector``: round_robin (sorted ids), first, fixed
        (``target``), drop (always "")."""
        self.request("register_selector", mode=mode, target=target)

    def query_info(self) -> dict:
        """``{"info": getInformation(), "selected": {id: n}, "offered": [ids]}``."""
        reply = self.request("info")
        return {k: reply[k] for k in ("info", "selected", "offered")}

    def connection_tables(self) -> list:
        """Tables of the ``connections`` events (needs ``connections=True``)."""
        return [e["table"] for e in self.events("connections")]


class KaraboPipelineInput(PipelinePeer):
    """A C++ ``InputChannel`` (a TCP client); ``connect()`` it to an output's port.

    ``outputs`` is its ``connectedOutputChannels``: ``connect()`` refuses any other output
    string. Attribute ``id`` ("peerReceiver:input", what it sends in its hello).
    """

    mode = "input"

    def __init__(self, outputs=("peerSender:output",), *, instance: str = "peerReceiver",
                 channel: str = "input", data_distribution: str = "copy",
                 on_slowness: str = "wait", max_queue_length: int = 2, min_data: int = 1,
                 respond_to_eos: bool = True, delay_on_input: int = 0, sleep: float = 0.0,
                 quiet: bool = False, checksum: bool = True, values: bool = True,
                 array_key: str = "data.image", image_key: str = "data.img",
                 threads: int = 2, **kwargs):
        if isinstance(outputs, str):
            outputs = [outputs]
        options = {"instance": instance, "channel": channel, "outputs": list(outputs),
                   "dataDistribution": data_distribution, "onSlowness": on_slowness,
                   "maxQueueLength": max_queue_length, "minData": min_data,
                   "respondToEndOfStream": respond_to_eos, "delayOnInput": delay_on_input,
                   "sleep": sleep, "quiet": quiet, "checksum": checksum, "values": values,
                   "array_key": array_key, "image_key": image_key, "threads": threads}
        super().__init__(options, **kwargs)
        self.outputs = list(outputs)

    def connect(self, port: int, host: str = "127.0.0.1", output: str | None = None, *,
                memory_location: str = "remote", timeout: float | None = None) -> dict:
        """``connectSync`` to ``host:port`` as ``output`` (default: the first of
        ``outputs``); raises :class:`PeerError` with the C++ text if it fails."""
        fields = {"host": host, "port": int(port), "memoryLocation": memory_location}
        if output:
            fields["output"] = output
        return self.request("connect", timeout=timeout, **fields)

    def disconnect(self, output: str | None = None, *, timeout: float | None = None) -> dict:
        fields = {"output": output} if output else {}
        return self.request("disconnect", timeout=timeout, **fields)

    def status(self) -> dict:
        """``{"status": {output: "CONNECTED", ...}, "count": items received so far}``."""
        reply = self.request("status")
        return {"status": reply["status"], "count": reply["count"]}

    def items(self) -> list:
        """Every ``data`` event so far (consumed or not)."""
        return self.events("data")

    def wait_items(self, n: int, timeout: float | None = None) -> list:
        return self.collect("data", n, timeout)

    def wait_connection(self, status: str = "CONNECTED", output: str | None = None,
                        timeout: float | None = None) -> dict:
        return self.wait_event("connection", timeout, lambda e: e["status"] == status and
                               (output is None or e["output"] == output))

    def wait_eos(self, timeout: float | None = None) -> dict:
        return self.wait_event("eos", timeout)

    def wait_stats(self, timeout: float | None = None) -> dict:
        """The ``stats`` event of a quiet input (sent at EOS)."""
        return self.wait_event("stats", timeout)

    def receive_stream(self, timeout: float | None = None) -> tuple[list, dict]:
        """Wait for the next EOS; return the data events taken up to it, and the EOS.

        Data handlers run before the EOS handler (the C++ input marks the pot EOS only after
        the data), so every item of the stream is in the list.
        """
        eos = self.wait_eos(timeout)
        with self._cond:
            cut = next(i for i, e in enumerate(self._all_events) if e is eos)
            before = set(map(id, self._all_events[:cut]))
            items = [e for e in self._pending_events
                     if e["event"] == "data" and id(e) in before]
            self._pending_events = [e for e in self._pending_events
                                    if not (e["event"] == "data" and id(e) in before)]
        return items, eos
