"""Karabo's C++ pipeline channels (karabind) as the pipeline benchmark's contenders.

Each peer is ``tests/peers/pipeline_driver.py`` run as a script (not imported) with the
Python 3.12 interpreter that has karabind: ``$KBSTREAM_KARABO_PYTHON``, else
``<repo>/.venv-karabo/bin/python``, else this interpreter when it has karabind (the
benchmark environment of ``scripts/bench.sh``).  The driver's docstring is the protocol
(one JSON object per line); this client sends one command at a time and keeps the
events until asked for, which is all a throughput run needs.
"""

import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "peers" / "pipeline_driver.py"

__all__ = ["karabo_python", "pipeline_item", "KaraboPipelineOutput", "KaraboPipelineInput"]


def karabo_python():
    """The interpreter that runs the Karabo peers, or None when there is none."""
    explicit = os.environ.get("KBSTREAM_KARABO_PYTHON")
    if explicit:
        return explicit
    side = ROOT / ".venv-karabo" / "bin" / "python"
    if side.exists():
        return str(side)
    return sys.executable if importlib.util.find_spec("karabind") is not None else None


def pipeline_item(index, *, frames=(4, 8), dtype="uint16", fill="index", scalars=0):
    """An ITEM of the driver's ``write`` / ``stream`` commands (no image, default meta)."""
    return {"index": int(index), "frames": [int(f) for f in frames], "dtype": dtype, "fill": fill,
            "image": False, "scalars": int(scalars)}


class _Peer:
    mode = ""

    def __init__(self, options, timeout=60.0):
        python = karabo_python()
        if python is None:
            raise FileNotFoundError("no interpreter with karabind for the Karabo peers")
        self.timeout = timeout
        self._ids = iter(range(1, 1 << 62))
        self._lines = queue.Queue()
        self._events = []
        self._proc = subprocess.Popen([python, "-u", str(DRIVER), self.mode, json.dumps(options)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self._take(lambda o: o.get("event") in ("ready", "failed"), timeout)
        if self.ready["event"] == "failed":
            self.close()
            raise RuntimeError(f"Karabo {self.mode} peer did not start: {self.ready.get('error')}")

    def _read(self):
        for line in self._proc.stdout:
            if line.strip():
                self._lines.put(json.loads(line))
        self._lines.put(None)

    def _take(self, match, timeout):
        """The first object (kept or arriving) for which ``match`` is true."""
        for i, obj in enumerate(self._events):
            if match(obj):
                return self._events.pop(i)
        while True:
            obj = self._lines.get(timeout=timeout)
            if obj is None:
                raise RuntimeError(f"Karabo {self.mode} peer exited (code {self._proc.poll()})")
            if match(obj):
                return obj
            self._events.append(obj)

    def request(self, op, timeout=None, **fields):
        rid = next(self._ids)
        self._proc.stdin.write(json.dumps(dict(fields, op=op, id=rid)) + "\n")
        self._proc.stdin.flush()
        reply = self._take(lambda o: "event" not in o and o.get("id") == rid, timeout or self.timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"Karabo {self.mode} peer: {op}: {reply.get('error')}")
        return reply

    def close(self):
        if self._proc.poll() is None:
            try:
                self._proc.stdin.write(json.dumps({"op": "close", "id": 0}) + "\n")
                self._proc.stdin.close()
            except OSError:
                pass
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(5)


class KaraboPipelineOutput(_Peer):
    """A C++ OutputChannel on 127.0.0.1 (ephemeral port): ``port``, ``info``."""

    mode = "output"

    def __init__(self, instance="peerSender", channel="output"):
        super().__init__({"instance": instance, "channel": channel, "port": 0, "hostname": "127.0.0.1"})
        self.port = int(self.ready["port"])
        self.info = self.ready["info"]

    def wait_inputs(self, copy=(), shared=(), timeout=10.0):
        self.request("wait_inputs", copy=list(copy), shared=list(shared), within=timeout,
                     timeout=timeout + 10.0)

    def stream(self, count, item, eos=True, timeout=None):
        """``count`` items from the template ``item``, one update each, then the end of stream."""
        item = {k: v for k, v in item.items() if k != "index"}
        return self.request("stream", timeout, count=count, item=item, start=0, per_update=1, eos=eos,
                            safe=False)


class KaraboPipelineInput(_Peer):
    """A C++ InputChannel (copy, wait) of ``outputs``; id ``peerReceiver:input``."""

    mode = "input"

    def __init__(self, outputs, quiet=True, checksum=False):
        super().__init__({"outputs": list(outputs), "onSlowness": "wait", "quiet": quiet,
                          "checksum": checksum})

    def connect(self, port, output):
        return self.request("connect", host="127.0.0.1", port=int(port), output=output,
                            memoryLocation="remote")

    def wait_stats(self, timeout=600.0):
        """The ``stats`` event a quiet input sends at the end of stream."""
        return self._take(lambda o: o.get("event") == "stats", timeout)
