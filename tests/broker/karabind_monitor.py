"""Karabo's own channel monitor (karabind ``DeviceClient.registerChannelMonitor``) for the
tests, run with the side interpreter; ``KARABO_BROKER`` / ``KARABO_BROKER_TOPIC`` select the
broker.

``karabind_monitor.py CLIENT_ID DEVICE:CHANNEL`` registers the monitor and prints one JSON
object per line: ``{"event": "registered", "ok": bool}``, ``{"event": "status", "status"}``,
``{"event": "data", "tid", "source", "leaves"}`` (every leaf of the item:
``[path, type, value or array digest]``, see ``leaves``), ``{"event": "eos"}``. Commands on
stdin (JSON lines): ``{"cmd": "register"}`` (again: prints the result),
``{"cmd": "unregister"}``, ``{"cmd": "quit"}``.
"""

import hashlib
import json
import sys
import threading

import numpy as np

import karabind as kb


def out(obj):
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def digest(a):
    a = np.ascontiguousarray(a)
    return [str(a.dtype), list(a.shape), hashlib.sha1(a.tobytes()).hexdigest()]


def leaves(h, prefix=""):
    """``[[path, kind, value], ...]`` sorted by path; arrays as ``[dtype, shape, sha1]``."""
    res = []
    for key in h.getKeys():
        path = prefix + key
        value = h[key]
        if isinstance(value, kb.Hash):
            res += leaves(value, path + ".")
        elif isinstance(value, np.ndarray):
            res.append([path, "array", digest(value)])
        elif isinstance(value, kb.ImageData):
            res.append([path + ".pixels.data", "array", digest(value.getData())])
        elif isinstance(value, (bool, int, float, str)):
            res.append([path, "scalar", value])
        elif isinstance(value, (list, tuple)):
            res.append([path, "vector", [v if isinstance(v, (bool, int, float, str)) else str(v)
                                         for v in value]])
        else:
            res.append([path, type(value).__name__, str(value)])
    return sorted(res)


def main():
    kb.Logger.configure(kb.Hash("level", "ERROR"))
    loop = threading.Thread(target=kb.EventLoop.work, daemon=True)
    loop.start()
    kb.EventLoop.addThread(2)
    client_id, channel = sys.argv[1], sys.argv[2]
    client = kb.DeviceClient(client_id)

    def on_data(data, meta):
        out({"event": "data", "source": meta["source"],
             "tid": meta.getAttribute("timestamp", "tid"), "leaves": leaves(data)})

    def on_status(status):
        out({"event": "status", "status": str(status).rsplit(".", 1)[-1]})

    def register():
        ok = client.registerChannelMonitor(channel, on_data,
                                           eosHandler=lambda ch: out({"event": "eos"}),
                                           statusTracker=on_status)
        out({"event": "registered", "ok": bool(ok)})

    register()
    try:
        for line in sys.stdin:
            try:
                cmd = json.loads(line).get("cmd")
            except ValueError:
                continue
            if cmd == "quit":
                break
            if cmd == "register":
                register()
            elif cmd == "unregister":
                out({"event": "unregistered", "ok": bool(client.unregisterChannelMonitor(channel))})
    finally:
        client.unregisterChannelMonitor(channel)
        client = None  # the C++ client goes while the event loop still runs
        kb.EventLoop.stop()
        loop.join(10)


if __name__ == "__main__":
    main()
