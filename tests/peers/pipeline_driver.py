"""A real Karabo C++ pipeline channel (karabind 3.1.2) in its own process, driven over JSON.

Run with the Python 3.12 side environment (``scripts/karabo-env.sh``)::

    .venv-karabo/bin/python tests/peers/pipeline_driver.py output '{"port": 0}'
    .venv-karabo/bin/python tests/peers/pipeline_driver.py input '{"outputs": ["peerSender:output"]}'

It imports neither ``kbhash`` nor ``kbstream``: every byte on the pipeline socket comes from
Karabo's C++ OutputChannel / InputChannel. The client is ``tests/peers/pipeline.py``. The
module can also be imported *without* karabind (karabind is imported in :func:`main` only),
so that the client shares :func:`make_array`, :func:`array_checksum` and
:func:`make_scalars` with it: what the output sends is reproducible on the test side.

Control protocol
----------------
One JSON object per line on stdin (commands) and on stdout (replies and events), flushed.

- A command is ``{"op": ..., "id": <any>, ...}``; its reply is ``{"ok": true, "id": <same>,
  "op": ..., ...}`` or ``{"ok": false, "id": ..., "op": ..., "error": "<Type>: <text>"}``.
  Commands run one after another on the main thread, in order (``write``/``eos`` block
  while ``update()`` waits for credit; the driver reads the next command afterwards).
- An event is ``{"event": <kind>, "t": <time.time()>, ...}``, written whenever it happens
  (from C++ event-loop threads); events and replies interleave.
- End of stdin acts as ``close``. Errors in handlers are reported as
  ``{"event": "error", "where": ..., "error": ...}``; stderr carries tracebacks and the
  C++ log (level WARN).

Options (argv[2], a JSON object; all optional)
----------------------------------------------
both: ``instance`` (default ``peerSender`` / ``peerReceiver``), ``channel`` (``output`` /
``input``), ``threads`` (extra event-loop threads, default 2), ``log_level`` ("WARN").

output: ``hostname`` ("127.0.0.1"), ``port`` (0 = ephemeral; sent as UINT32),
``noInputShared`` ("drop" | "queueDrop" | "wait"), ``connections`` (true: emit
``connections`` events from ``registerShowConnectionsHandler``).

input: ``outputs`` (``connectedOutputChannels``, list of "id:channel"; default
["peerSender:output"]), ``dataDistribution`` ("copy"), ``onSlowness`` ("wait"),
``maxQueueLength`` (2, UINT32), ``minData`` (1, UINT32), ``respondToEndOfStream`` (true),
``delayOnInput`` (0 ms, INT32), ``sleep`` (seconds to sleep in the data handler, 0),
``quiet`` (false: no per-item events, only ``stats`` at EOS), ``checksum`` (true: crc32 of
the array bytes; set false for cheap throughput runs), ``array_key`` ("data.image"),
``image_key`` ("data.img"), ``values`` (true: scalar values and types per item).

Output mode
-----------
Startup event: ``{"event": "ready", "mode": "output", "id": "<instance>:<channel>", "port":
P, "info": {"connectionType", "hostname", "port"}, "pid": ...}``.

- ``{"op": "wait_inputs", "copy": [ids], "shared": [ids], "within": s}``: poll
  ``hasRegisteredCopyInputChannel`` / ``hasRegisteredSharedInputChannel`` until all are
  registered; error reply on timeout (naming the missing ids).
- ``{"op": "write", "items": [ITEM, ...], "update": true, "safe": false}``: ``write()`` each
  item, then ``update(safeNDArray=safe)`` (unless ``update`` is false: the items wait for a
  later ``update``/``eos``). Reply ``{"elapsed", "update_elapsed", "count"}`` after
  ``update()`` returned.
- ``{"op": "update", "safe": false}``: ``update()`` alone.
- ``{"op": "stream", "count": N, "start": 0, "per_update": 1, "item": ITEM, "eos": false}``:
  N items with ``index`` start..start+N-1 (``tid`` = item tid + i when given), ``update()``
  after every ``per_update`` items and after the last; then ``signalEndOfStream()`` if
  ``eos``. Reply ``{"elapsed", "count", "first_t", "last_t"}`` (no JSON per item: for
  throughput runs).
- ``{"op": "eos"}``: ``signalEndOfStream()``; reply ``{"elapsed"}``.
- ``{"op": "register_selector", "mode": "round_robin" | "first" | "drop" | "fixed", "target":
  id}``: ``registerSharedInputSelector``; round robin goes over the ids in sorted order.
- ``{"op": "info"}``: ``{"info": getInformation(), "selected": {id: count}, "offered":
  [[ids] of the last selector call]}``.
- ``{"op": "close"}``: tear down (channel dropped while the loop runs, then loop stopped)
  and exit after the reply.

ITEM: ``{"index": i, "frames": [16, 512, 1024], "dtype": "uint16", "fill": "index",
"source": "<id>", "tid": i, "sec": s, "frac": attoseconds, "image": false, "scalars": 0}``:

- Hash ``index`` (INT32), ``data.image`` = :func:`make_array` (fill ``index`` = np.full with
  the index, ``ramp`` = arange + index, ``random`` = seeded by the index, ``const`` = a
  cached zero array, ``none`` = no array); ``frames`` default ``[4, 8]``;
- ``image``: true or ``{"shape", "dtype", "fill", "encoding"}`` adds
  ``ImageData(make_array(...), encoding=GRAY)`` under ``data.img`` (default shape [32, 64],
  uint16, same fill);
- ``scalars``: n adds ``header.k00`` ... from :func:`make_scalars` (INT32, DOUBLE, STRING,
  UINT64 in turn);
- meta ``ChannelMetaData(source, Timestamp(Epochstamp(sec, frac), TimeId(tid)))``. ``source``
  defaults to the output id, ``tid`` to the index; without ``sec`` the Epochstamp is "now"
  (``frac`` alone is ignored).

Input mode
----------
Startup event: ``{"event": "ready", "mode": "input", "id": "<instance>:<channel>", "pid":
...}``.

- ``{"op": "connect", "host": "127.0.0.1", "port": P, "output": "id:ch", "memoryLocation":
  "remote"}``: ``connectSync`` with ``connectionType=tcp``, ``port`` as UINT32; error reply
  with the C++ text if it returns one. ``output`` defaults to the first of ``outputs``.
- ``{"op": "disconnect", "output": optional}``: ``disconnect(params)`` for that output (or
  all connected).
- ``{"op": "status"}``: ``{"status": {output: "CONNECTED", ...}, "count": items so far}``.
- ``{"op": "close"}``: disconnect all, tear down, exit.

Events:

- ``{"event": "data", "n": running number (0 based), "index", "source", "tid", "sec", "frac",
  "keys": [paths], "shape", "dtype", "checksum" (crc32 of the C-order bytes, or null),
  "image": {"shape", "dtype", "dims", "encoding", "bitsPerPixel", "roiOffsets", "binning",
  "checksum"} (only if present), "values": {path: scalar}, "types": {path: "INT32", ...}}``.
  Not in quiet mode.
- ``{"event": "eos", "count": items since the previous EOS}``; in quiet mode preceded by
  ``{"event": "stats", "count", "first_t", "last_t", "bytes", "indices": [...]}`` (``bytes``
  = sum of the array sizes; ``checksums`` list added if ``checksum`` is on).
- ``{"event": "connection", "output": "id:ch", "status": "CONNECTING" | "CONNECTED" |
  "DISCONNECTED" | ...}`` from ``registerConnectionTracker``.
"""

import gc
import json
import os
import sys
import threading
import time
import traceback
import zlib

import numpy as np

SCALAR_TYPES = ("INT32", "DOUBLE", "STRING", "UINT64")
_CONST_CACHE = {}


# ---------------------------------------------------------------------------------------
# Payload helpers (shared with the client; numpy only)
# ---------------------------------------------------------------------------------------

def make_array(fill, index, shape, dtype="uint16"):
    """The array an item with this ``index`` carries (``None`` for fill ``none``)."""
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if fill == "none":
        return None
    if fill == "index":
        return np.full(shape, index, dtype)
    if fill == "ramp":
        return (np.arange(int(np.prod(shape)), dtype=np.int64) + index).astype(dtype) \
            .reshape(shape)
    if fill == "random":
        rng = np.random.default_rng(index)
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            return rng.integers(info.min, info.max, shape, dtype, endpoint=True)
        if dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(dtype)
        raise ValueError(f"fill 'random' does not support dtype {dtype}")
    if fill == "const":
        key = (shape, dtype.str)
        if key not in _CONST_CACHE:
            _CONST_CACHE[key] = np.zeros(shape, dtype)
        return _CONST_CACHE[key]
    raise ValueError(f"unknown fill {fill!r}")


def array_checksum(arr):
    """crc32 of the array's C-order bytes (what the input reports as ``checksum``)."""
    return zlib.crc32(np.ascontiguousarray(arr)) & 0xFFFFFFFF


def make_scalars(index, n):
    """``[(path, type name, value)]`` of the ``header.kNN`` scalars of an item."""
    out = []
    for j in range(n):
        tname = SCALAR_TYPES[j % 4]
        if tname == "INT32":
            value = index * 100 + j
        elif tname == "DOUBLE":
            value = index + j / 8.0
        elif tname == "STRING":
            value = f"s{index}_{j}"
        else:
            value = 2**40 + index * 1000 + j
        out.append((f"header.k{j:02d}", tname, value))
    return out


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

class Emitter:
    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, obj):
        line = json.dumps(obj, allow_nan=False, default=_json_default)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def event(self, kind, **fields):
        obj = {"event": kind, "t": time.time()}
        obj.update(fields)
        self(obj)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)


def _error_text(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class Base:
    def __init__(self, kb, emit, opts, default_instance, default_channel):
        self.kb = kb
        self.emit = emit
        self.opts = opts
        self.instance = opts.get("instance", default_instance)
        self.channel_name = opts.get("channel", default_channel)
        self.id = f"{self.instance}:{self.channel_name}"
        kb.Logger.configure(kb.Hash("level", opts.get("log_level", "WARN")))
        self.loop = threading.Thread(target=kb.EventLoop.work, name="karabo-loop",
                                     daemon=True)
        self.loop.start()
        kb.EventLoop.addThread(int(opts.get("threads", 2)))

    def handler(self, where, fn):
        """Wrap a callback so that a Python error becomes an event, never a C++ abort."""
        def wrapped(*args):
            try:
                fn(*args)
            except Exception as exc:
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
                try:
                    self.emit.event("error", where=where, error=_error_text(exc))
                except Exception:
                    pass
        return wrapped

    def stop_loop(self):
        gc.collect()
        time.sleep(0.3)
        self.kb.EventLoop.stop()
        self.loop.join(10)

    def handle(self, req):
        op = req.get("op")
        fn = getattr(self, "op_" + str(op), None)
        if fn is None:
            raise ValueError(f"unknown op {op!r}")
        return fn(req) or {}


class Output(Base):
    def __init__(self, kb, emit, opts):
        super().__init__(kb, emit, opts, "peerSender", "output")
        cfg = kb.Hash("hostname", opts.get("hostname", "127.0.0.1"))
        cfg.setAs("port", int(opts.get("port", 0)), kb.Types.UINT32)
        if "noInputShared" in opts:
            cfg["noInputShared"] = opts["noInputShared"]
        self.out = kb.OutputChannel.create(self.instance, self.channel_name, cfg)
        if opts.get("connections", False):
            self.out.registerShowConnectionsHandler(
                self.handler("connections", self.on_connections))
        self.pending = []            # items written since the last update (keep arrays alive)
        self.selected = {}
        self.offered = []
        info = self.information()
        self.emit.event("ready", mode="output", id=self.id, port=info["port"], info=info,
                        pid=os.getpid())

    def information(self):
        info = self.out.getInformation()
        return {k: info[k] for k in info.getKeys()}

    def on_connections(self, table):
        rows = []
        for row in table:
            rows.append({k: row[k] for k in row.getKeys()})
        self.emit.event("connections", table=rows)

    # -- items --

    def build(self, spec):
        kb = self.kb
        index = int(spec.get("index", 0))
        data = kb.Hash()
        data.setAs("index", index, kb.Types.INT32)
        fill = spec.get("fill", "index")
        arr = make_array(fill, index, spec.get("frames", [4, 8]), spec.get("dtype", "uint16"))
        keep = []
        if arr is not None:
            data["data.image"] = arr
            keep.append(arr)
        image = spec.get("image", False)
        if image:
            image = image if isinstance(image, dict) else {}
            img = make_array(image.get("fill", fill if fill != "none" else "index"), index,
                             image.get("shape", [32, 64]), image.get("dtype", "uint16"))
            encoding = getattr(kb.ImageData, image.get("encoding", "GRAY"))
            data["data.img"] = kb.ImageData(img, encoding=encoding)
            keep.append(img)
        for path, tname, value in make_scalars(index, int(spec.get("scalars", 0))):
            data.setAs(path, value, getattr(kb.Types, tname))
        tid = int(spec.get("tid", index))
        if "sec" in spec:
            epoch = kb.Epochstamp(int(spec["sec"]), int(spec.get("frac", 0)))
        else:
            epoch = kb.Epochstamp()
        meta = kb.ChannelMetaData(spec.get("source", self.id),
                                  kb.Timestamp(epoch, kb.TimeId(tid)))
        return data, meta, keep

    def write_items(self, specs):
        for spec in specs:
            data, meta, keep = self.build(spec)
            self.out.write(data, meta)
            self.pending.append((data, meta, keep))

    def do_update(self, safe=False):
        t0 = time.perf_counter()
        self.out.update(safeNDArray=bool(safe))
        self.pending.clear()
        return time.perf_counter() - t0

    # -- ops --

    def op_ping(self, req):
        return {"pong": True}

    def op_info(self, req):
        return {"info": self.information(), "selected": dict(self.selected),
                "offered": list(self.offered)}

    def op_wait_inputs(self, req):
        copy = list(req.get("copy", []))
        shared = list(req.get("shared", []))
        deadline = time.monotonic() + float(req.get("within", 10))
        while True:
            missing = [i for i in copy if not self.out.hasRegisteredCopyInputChannel(i)]
            missing += [i for i in shared if not self.out.hasRegisteredSharedInputChannel(i)]
            if not missing:
                return {}
            if time.monotonic() > deadline:
                raise TimeoutError(f"inputs not registered: {missing}")
            time.sleep(0.002)

    def op_write(self, req):
        t0 = time.perf_counter()
        items = req.get("items", [])
        self.write_items(items)
        upd = self.do_update(req.get("safe", False)) if req.get("update", True) else 0.0
        return {"elapsed": time.perf_counter() - t0, "update_elapsed": upd,
                "count": len(items)}

    def op_update(self, req):
        return {"elapsed": self.do_update(req.get("safe", False))}

    def op_stream(self, req):
        count = int(req["count"])
        start = int(req.get("start", 0))
        per = max(1, int(req.get("per_update", 1)))
        template = dict(req.get("item", {}))
        t0 = time.perf_counter()
        first_t = time.time()
        for i in range(count):
            spec = dict(template, index=start + i)
            if "tid" in template:
                spec["tid"] = int(template["tid"]) + i
            self.write_items([spec])
            if (i + 1) % per == 0 or i == count - 1:
                self.do_update(req.get("safe", False))
        last_t = time.time()
        if req.get("eos", False):
            self.out.signalEndOfStream()
        return {"elapsed": time.perf_counter() - t0, "count": count, "first_t": first_t,
                "last_t": last_t}

    def op_eos(self, req):
        t0 = time.perf_counter()
        self.out.signalEndOfStream()
        self.pending.clear()
        return {"elapsed": time.perf_counter() - t0}

    def op_register_selector(self, req):
        mode = req.get("mode", "round_robin")
        target = req.get("target", "")
        state = {"n": 0}

        def select(ids):
            ids = sorted(str(i) for i in ids)
            self.offered = ids
            if mode == "round_robin":
                chosen = ids[state["n"] % len(ids)] if ids else ""
                state["n"] += 1
            elif mode == "first":
                chosen = ids[0] if ids else ""
            elif mode == "fixed":
                chosen = target
            elif mode == "drop":
                chosen = ""
            else:
                chosen = ""
            self.selected[chosen] = self.selected.get(chosen, 0) + 1
            return chosen

        if mode not in ("round_robin", "first", "fixed", "drop"):
            raise ValueError(f"unknown selector mode {mode!r}")
        self.out.registerSharedInputSelector(select)
        return {}

    def teardown(self):
        self.pending.clear()
        del self.out
        self.stop_loop()


# ---------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------

class Input(Base):
    def __init__(self, kb, emit, opts):
        super().__init__(kb, emit, opts, "peerReceiver", "input")
        self.outputs = list(opts.get("outputs", ["peerSender:output"]))
        cfg = kb.Hash("connectedOutputChannels", self.outputs,
                      "dataDistribution", opts.get("dataDistribution", "copy"),
                      "onSlowness", opts.get("onSlowness", "wait"))
        cfg.setAs("maxQueueLength", int(opts.get("maxQueueLength", 2)), kb.Types.UINT32)
        cfg.setAs("minData", int(opts.get("minData", 1)), kb.Types.UINT32)
        cfg.setAs("respondToEndOfStream", bool(opts.get("respondToEndOfStream", True)),
                  kb.Types.BOOL)
        cfg.setAs("delayOnInput", int(opts.get("delayOnInput", 0)), kb.Types.INT32)
        self.sleep = float(opts.get("sleep", 0))
        self.quiet = bool(opts.get("quiet", False))
        self.checksum = bool(opts.get("checksum", True))
        self.values = bool(opts.get("values", True))
        self.array_key = opts.get("array_key", "data.image")
        self.image_key = opts.get("image_key", "data.img")
        self.lock = threading.Lock()
        self.total = 0
        self.reset_stats()
        self.params = {}
        self.cin = kb.InputChannel.create(self.instance, self.channel_name, cfg)
        self.cin.registerDataHandler(self.handler("data", self.on_data))
        self.cin.registerEndOfStreamEventHandler(self.handler("eos", self.on_eos))
        self.cin.registerConnectionTracker(self.handler("connection", self.on_connection))
        self.emit.event("ready", mode="input", id=self.id, pid=os.getpid())

    def reset_stats(self):
        self.count = 0
        self.first_t = None
        self.last_t = None
        self.nbytes = 0
        self.indices = []
        self.checksums = []

    # -- handlers (C++ event-loop threads) --

    def on_connection(self, output, status):
        self.emit.event("connection", output=str(output),
                        status=getattr(status, "name", str(status)))

    def on_data(self, data, meta):
        now = time.time()
        with self.lock:
            n = self.total
            self.total += 1
            self.count += 1
            if self.first_t is None:
                self.first_t = now
            self.last_t = now
        index = data["index"] if data.has("index") else None
        arr = data[self.array_key] if data.has(self.array_key) else None
        if isinstance(arr, np.ndarray):
            crc = array_checksum(arr) if self.checksum else None
            with self.lock:
                self.nbytes += arr.nbytes
        else:
            crc = None
        if self.quiet:
            with self.lock:
                self.indices.append(index)
                if self.checksum:
                    self.checksums.append(crc)
        else:
            stamp = {}
            if meta.has("timestamp"):
                for key in ("sec", "frac", "tid"):
                    if meta.hasAttribute("timestamp", key):
                        stamp[key] = int(meta.getAttribute("timestamp", key))
            event = {
                "n": n, "index": index,
                "source": meta["source"] if meta.has("source") else None,
                "tid": stamp.get("tid"), "sec": stamp.get("sec"), "frac": stamp.get("frac"),
                "keys": list(data.getPaths()),
                "shape": list(arr.shape) if isinstance(arr, np.ndarray) else None,
                "dtype": arr.dtype.str if isinstance(arr, np.ndarray) else None,
                "checksum": crc,
            }
            if data.has(self.image_key):
                event["image"] = self.describe_image(data[self.image_key])
            if self.values:
                values, types = {}, {}
                for path in data.getPaths():
                    types[path] = getattr(data.getType(path), "name", str(data.getType(path)))
                    value = data[path]
                    if isinstance(value, (bool, int, float, str)):
                        values[path] = value
                event["values"] = values
                event["types"] = types
            self.emit.event("data", **event)
        if self.sleep > 0:
            time.sleep(self.sleep)

    def describe_image(self, img):
        if not isinstance(img, self.kb.ImageData):
            return {"class": type(img).__name__}
        arr = img.getData()
        enc = img.getEncoding()
        return {
            "shape": list(arr.shape), "dtype": arr.dtype.str,
            "dims": [int(d) for d in img.getDimensions()],
            "encoding": getattr(enc, "name", str(enc)),
            "bitsPerPixel": int(img.getBitsPerPixel()),
            "roiOffsets": [int(d) for d in img.getROIOffsets()],
            "binning": [int(d) for d in img.getBinning()],
            "checksum": array_checksum(arr) if self.checksum else None,
        }

    def on_eos(self, channel):
        with self.lock:
            count = self.count
            stats = {"count": self.count, "first_t": self.first_t, "last_t": self.last_t,
                     "bytes": self.nbytes, "indices": list(self.indices)}
            if self.checksum:
                stats["checksums"] = list(self.checksums)
            self.reset_stats()
        if self.quiet:
            self.emit.event("stats", **stats)
        self.emit.event("eos", count=count)

    # -- ops --

    def op_ping(self, req):
        return {"pong": True}

    def op_connect(self, req):
        kb = self.kb
        output = req.get("output") or self.outputs[0]
        params = kb.Hash("connectionType", "tcp",
                         "hostname", req.get("host", "127.0.0.1"),
                         "outputChannelString", output,
                         "memoryLocation", req.get("memoryLocation", "remote"))
        params.setAs("port", int(req["port"]), kb.Types.UINT32)
        problem = self.cin.connectSync(params)
        if problem:
            raise ConnectionError(f"connectSync to {output}: {problem}")
        self.params[output] = params
        return {"output": output}

    def op_disconnect(self, req):
        output = req.get("output")
        names = [output] if output else list(self.params)
        for name in names:
            params = self.params.pop(name, None)
            if params is None:
                raise KeyError(f"not connected to {name}")
            self.cin.disconnect(params)
        return {"outputs": names}

    def op_status(self, req):
        status = self.cin.getConnectionStatus()
        with self.lock:
            total = self.total
        return {"status": {str(k): getattr(v, "name", str(v)) for k, v in status.items()},
                "count": total}

    def teardown(self):
        for params in list(self.params.values()):
            try:
                self.cin.disconnect(params)
            except Exception:
                traceback.print_exc(file=sys.stderr)
        self.params.clear()
        time.sleep(0.05)
        del self.cin
        self.stop_loop()


# ---------------------------------------------------------------------------------------

def main(argv):
    # Run as a script, this file's directory comes first on sys.path; its client neighbours
    # (karabo.py) would shadow packages of the side environment.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    import karabind as kb

    if len(argv) < 2 or argv[1] not in ("output", "input"):
        sys.stderr.write("usage: pipeline_driver.py output|input [JSON options]\n")
        return 2
    opts = json.loads(argv[2]) if len(argv) > 2 and argv[2].strip() else {}
    emit = Emitter(sys.stdout)
    try:
        peer = (Output if argv[1] == "output" else Input)(kb, emit, opts)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        emit.event("failed", error=_error_text(exc))
        try:
            kb.EventLoop.stop()
        except Exception:
            pass
        return 1
    closing = None
    for line in sys.stdin:
        if not line.strip():
            continue
        req = {}
        try:
            req = json.loads(line)
            if req.get("op") == "close":
                closing = req
                break
            result = peer.handle(req)
            out = {"ok": True, "id": req.get("id"), "op": req.get("op")}
            out.update(result)
            emit(out)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            emit({"ok": False, "id": req.get("id") if isinstance(req, dict) else None,
                  "op": req.get("op") if isinstance(req, dict) else None,
                  "error": _error_text(exc)})
    peer.teardown()
    del peer
    gc.collect()
    if closing is not None:
        emit({"ok": True, "id": closing.get("id"), "op": "close"})
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
