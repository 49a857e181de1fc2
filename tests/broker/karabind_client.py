"""Karabo's own broker clients (karabind, Python 3.12 side environment) for the tests.

Run by ``broker_stack.py`` with the side interpreter; ``KARABO_BROKER`` and
``KARABO_BROKER_TOPIC`` select the broker. One JSON object per output line.

Modes:

``client ID``
    A ``DeviceClient`` with instance tracking. Prints ``{"event": "new"|"gone", "id", "type"}``
    as the monitors fire, and answers commands read from stdin (one JSON object per line):
    ``{"cmd": "topology"}``, ``{"cmd": "get", "id", "key"}``, ``{"cmd": "schema", "id"}``,
    ``{"cmd": "execute", "id", "slot"}``, ``{"cmd": "outschema", "id", "channel"}`` (the
    output channel's data schema, as ``getOutputChannelSchema`` gives it),
    ``{"cmd": "set", "id", "key", "value"}`` (``DeviceClient.set``), ``{"cmd": "quit"}``.
``ask ID DEVICE:CHANNEL N``
    A ``SignalSlotable`` asks ``slotGetOutputChannelInformation`` N times (after 20 warm-up
    requests when N > 1); prints the reply and the round-trip times in milliseconds.
``kill ID SERVER``
    A ``SignalSlotable`` calls ``SERVER.slotKillServer``.
"""

import json
import os
import socket
import sys
import threading
import time

import karabind as kb


def out(obj):
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def attrs_to_dict(attrs):
    d = {}
    try:
        for node in attrs:
            k, v = node.getKey(), node.getValue()
            d[str(k)] = v if isinstance(v, (int, float, str, bool)) else str(v)
    except Exception as e:  # pragma: no cover - karabind API differences
        d["_error"] = repr(e)
    return d


def hash_to_dict(h):
    d = {}
    for k in h.getKeys():
        v = h[k]
        if isinstance(v, kb.Hash):
            d[k] = hash_to_dict(v)
        else:
            d[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
            try:
                d[k + "@type"] = str(h.getType(k))
            except Exception:
                pass
    return d


def client_mode(client_id):
    client = kb.DeviceClient(client_id)

    def on_new(entry):
        for kind in entry.getKeys():
            for iid in entry[kind].getKeys():
                if iid != client_id:
                    out({"event": "new", "id": iid, "type": kind,
                         "t": time.monotonic()})

    def on_gone(iid, info):
        if iid != client_id:
            out({"event": "gone", "id": iid, "t": time.monotonic()})

    client.registerInstanceNewMonitor(on_new)
    client.registerInstanceGoneMonitor(on_gone)
    client.enableInstanceTracking()
    out({"event": "ready"})
    for line in sys.stdin:
        try:
            cmd = json.loads(line)
        except ValueError:
            continue
        name = cmd.get("cmd")
        try:
            if name == "quit":
                out({"reply": "quit"})
                break
            if name == "topology":
                topo = client.getSystemTopology()
                res = {}
                for kind in topo.getKeys():
                    for iid in topo[kind].getKeys():
                        res[iid] = {"kind": kind,
                                    "attrs": attrs_to_dict(topo[kind].getAttributes(iid))}
                servers = sorted(client.getServers())
                by_server = {}
                for sid in servers:
                    try:
                        by_server[sid] = sorted(client.getDevices(sid))
                    except Exception as e:  # pragma: no cover - karabind API differences
                        by_server[sid] = repr(e)
                out({"reply": "topology", "devices": sorted(client.getDevices()),
                     "servers": servers, "devices_by_server": by_server,
                     "instances": res})
            elif name == "outschema":
                h = client.getOutputChannelSchema(cmd["id"], cmd["channel"])
                paths = list(h.getPaths())
                attrs = {}
                for p in paths:
                    attrs[p] = attrs_to_dict(h.getAttributes(p))
                out({"reply": "outschema", "paths": paths, "attrs": attrs})
            elif name == "set":
                client.set(cmd["id"], cmd["key"], cmd["value"])
                out({"reply": "set", "ok": True})
            elif name == "get":
                out({"reply": "get", "value": client.get(cmd["id"], cmd["key"])})
            elif name == "schema":
                sch = client.getDeviceSchema(cmd["id"])
                paths = list(sch.getPaths())
                out({"reply": "schema", "root": sch.getRootName(), "paths": paths,
                     "leaves": {p: {"type": str(sch.getValueType(p)),
                                    "readOnly": bool(sch.isAccessReadOnly(p)),
                                    # data-schema leaves have none (in C++ too)
                                    "displayedName": (sch.getDisplayedName(p)
                                                      if sch.hasDisplayedName(p) else None)}
                                for p in paths if sch.isLeaf(p)},
                     "nodes": [p for p in sch.getKeys() if sch.isNode(p)]})
            elif name == "execute":
                client.execute(cmd["id"], cmd["slot"], cmd.get("timeout", 5))
                out({"reply": "execute", "ok": True})
            else:
                out({"reply": name, "error": "unknown command"})
        except Exception as e:
            out({"reply": name, "error": f"{type(e).__name__}: {e}"})
    del client


def ask_mode(my_id, target, n):
    device, channel = target.split(":")
    me = kb.SignalSlotable(my_id)
    me.start()
    arg = kb.Hash("channelId", channel, "hostname", socket.gethostname())
    arg.setAs("processId", os.getpid(), kb.Types.INT32)
    warm = 20 if n > 1 else 0
    times = []
    reply = None
    for i in range(warm + n):
        t0 = time.perf_counter()
        (reply,) = me.request(device, "slotGetOutputChannelInformation", arg).waitForReply(3000)
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warm:
            times.append(dt)
    out({"reply": hash_to_dict(reply), "ms": times})
    del me


def kill_mode(my_id, server):
    me = kb.SignalSlotable(my_id)
    me.start()
    me.call(server, "slotKillServer")
    time.sleep(0.5)
    out({"killed": server})
    del me


def main():
    kb.Logger.configure(kb.Hash("level", "ERROR"))
    loop = threading.Thread(target=kb.EventLoop.work, daemon=True)
    loop.start()
    try:
        mode = sys.argv[1]
        if mode == "client":
            client_mode(sys.argv[2])
        elif mode == "ask":
            ask_mode(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        elif mode == "kill":
            kill_mode(sys.argv[2], sys.argv[3])
        else:
            sys.exit(f"unknown mode {mode!r}")
    finally:
        kb.EventLoop.stop()
        loop.join(10)


if __name__ == "__main__":
    main()
