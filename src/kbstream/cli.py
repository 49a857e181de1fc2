"""The ``kbstream`` command.

Subcommands:

- ``demo``: the main job on an embedded default: a kbhash round trip of a
  JUNGFRAU module, then a generated JUNGFRAU 4M demo run replayed over the
  Karabo bridge protocol into a client in another process, with rates;
- ``make-demo-run DIR``: write a demo run (see ``--help``);
- ``serve-run`` / ``serve-files``: the same as ``karabo-bridge-serve-run`` /
  ``karabo-bridge-serve-files``;
- ``hash-demo``: only the kbhash round trip;
- ``simulate PORT``, ``monitor ENDPOINT``, ``glimpse ENDPOINT``: the stream tools
  (:mod:`kbstream.tools`), drop-ins for karabo-bridge's server-sim, monitor and glimpse.
  ``monitor DEVICE:CHANNEL`` prints the items of a Karabo pipeline output instead
  (:mod:`kbstream.tools.channel_monitor`, which also holds the rule telling the two apart).
- ``bridge``: the same as ``kbstream-bridge`` (the train matcher, ``docs/matcher.md``).
"""

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time

__all__ = ["main"]

log = logging.getLogger("kbstream.cli")


def hash_demo(out=None):
    """Build a JUNGFRAU-module Hash, encode, decode, check; print timings. Returns 0 or 1."""
    out = sys.stdout if out is None else out
    import numpy as np

    import kbhash
    from kbhash import Hash, HashType, Timestamp

    h = Hash()
    h["data.adc"] = np.random.default_rng(1).integers(0, 2**14, (16, 512, 1024), dtype=np.uint16)
    h.set("data.trainId", 1_000_000_000, type=HashType.UINT64)
    for i in range(19):
        h[f"header.k{i:02d}"] = i * 0.5
    h.set_timestamp("data", Timestamp.now(tid=1_000_000_000))
    enc, dec = [], []
    for _ in range(50):  # the median of warm calls, not the first (cold) one
        t0 = time.perf_counter()
        bufs = kbhash.encode(h)
        t1 = time.perf_counter()
        back = kbhash.decode(bufs)
        enc.append(t1 - t0)
        dec.append(time.perf_counter() - t1)
    enc_us, dec_us = 1e6 * sorted(enc)[25], 1e6 * sorted(dec)[25]
    ok = back == h and np.shares_memory(back["data.adc"], h["data.adc"])
    blob = kbhash.encode_bytes(h)
    ok = ok and kbhash.decode(blob) == h
    sizes, _ = kbhash.bufferset_layout(bufs)
    print(f"kbhash ({kbhash.backend}): JUNGFRAU module Hash, {len(blob)} bytes, buffers {sizes}", file=out)
    print(f"  encode {enc_us:.1f} us, decode {dec_us:.1f} us (median of 50, zero-copy), "
          f"round trip {'OK' if ok else 'FAILED'}", file=out)
    return 0 if ok else 1


_CLIENT = r"""
import sys, time
from kbstream import Client
n = int(sys.argv[2]); got = 0; nbytes = 0; first = 0; t0 = t1 = None; tids = []
with Client(sys.argv[1], timeout=60) as c:
    for _ in range(n):
        data, meta = c.next()
        t1 = time.perf_counter()
        size = sum(a.nbytes for src in data.values() for a in src.values() if hasattr(a, "nbytes"))
        if t0 is None:
            t0, first = t1, size
        got += 1
        nbytes += size
        tids.append(next(iter(meta.values()))["timestamp.tid"])
text = f"client: received {got} trains ({nbytes / 1e9:.3f} GB), train ids {tids[0]}..{tids[-1]}"
if got > 1 and t1 > t0:  # the server's summary measures the same interval
    dt = t1 - t0
    text += (f"; from the first train received to the last: {dt:.2f} s, "
             f"{(got - 1) / dt:.1f} trains/s, {(nbytes - first) / dt / 1e9:.2f} GB/s")
print(text)
"""


def demo(argv=None):
    """Main job: hash round trip, then replay a generated JF4M demo run into a client."""
    ap = argparse.ArgumentParser(prog="kbstream demo", description=demo.__doc__)
    ap.add_argument("--dir", help="where to write the demo run (default: a temporary directory)")
    ap.add_argument("--trains", type=int, default=10, help="trains in the demo run (default 10)")
    ap.add_argument("--frame-shape", default="16,512,1024", help="CELLS,SLOW,FAST (default 16,512,1024)")
    ap.add_argument("--modules", type=int, default=8, help="JUNGFRAU modules (default 8: JF4M)")
    args = ap.parse_args(argv)

    if hash_demo() != 0:
        return 1
    from .replay import demo as demo_mod
    from .replay.cli import serve_files_main

    with tempfile.TemporaryDirectory(prefix="kbstream-demo-") as tmp:
        rundir = args.dir or os.path.join(tmp, "r0001")
        shape = tuple(int(x) for x in args.frame_shape.split(","))
        t0 = time.perf_counter()
        progress = demo_mod.progress_display()
        try:  # data.adc only: what the demo replays (make-demo-run writes gain and mask too)
            demo_mod.make_demo_run(rundir, args.trains, frame_shape=shape, modules=args.modules,
                                   gain_mask=False, progress=progress)
        finally:
            progress.close()
        print(f"demo run: {args.trains} trains x {args.modules} JUNGFRAU modules {shape} uint16 "
              f"written to {rundir} in {time.perf_counter() - t0:.1f} s")
        print("rates below: the server's from the first train sent to the last, the "
              "client's from the first train received to the last")
        endpoint = f"ipc://{tmp}/bridge"
        # the client's report is collected and printed after the server's summary, so the
        # two processes' lines never interleave
        client = subprocess.Popen([sys.executable, "-c", _CLIENT, endpoint, str(args.trains)],
                                  stdout=subprocess.PIPE, text=True)
        rc = serve_files_main([rundir, endpoint, "--include", "SPB_IRDA_JF4M/DET/JNGFR*:daqOutput[data.adc]"])
        try:
            client_out, _ = client.communicate(timeout=120)
            client_rc = client.returncode
        except subprocess.TimeoutExpired:
            client.kill()
            client_out, _ = client.communicate()
            client_rc = 1
        sys.stdout.flush()
        print(client_out, end="", flush=True)
        return rc or client_rc


def _serve(which, argv):
    from .replay.cli import serve_files_main, serve_run_main

    return (serve_run_main if which == "serve-run" else serve_files_main)(argv)


def _bridge(argv):
    from .matcher.cli import main as bridge_main

    return bridge_main(argv)


COMMANDS = {
    "demo": ("replay a generated JF4M demo run into a client, with rates (the main job)", demo),
    "hash-demo": ("kbhash round trip of a JUNGFRAU module Hash", lambda argv: hash_demo()),
    "make-demo-run": ("write a JUNGFRAU 4M demo run", None),
    "serve-run": ("karabo-bridge-serve-run", lambda argv: _serve("serve-run", argv)),
    "serve-files": ("karabo-bridge-serve-files", lambda argv: _serve("serve-files", argv)),
    "simulate": ("a bridge server of simulated detector data (karabo-bridge-server-sim)",
                 lambda argv: _tool("simulate", argv)),
    "monitor": ("a live view of a bridge stream (karabo-bridge-monitor), or of a pipeline "
                "output: monitor DEVICE:CHANNEL", lambda argv: _monitor(argv)),
    "glimpse": ("one train's structure, --png a picture (karabo-bridge-glimpse)",
                lambda argv: _tool("glimpse", argv)),
    "bridge": ("kbstream-bridge: match pipeline outputs by train id, serve the trains", _bridge),
}


def _tool(name, argv):
    import importlib

    return importlib.import_module(f"kbstream.tools.{name}").main(argv)


def _monitor(argv):
    from .tools.channel_monitor import HELP_NOTE, route

    kind, argv = route(argv)
    if kind == "endpoint" and {"-h", "--help"} & set(argv):
        print(HELP_NOTE)
    return _tool("channel_monitor" if kind == "channel" else "monitor", argv)


def main(argv=None):
    """``kbstream COMMAND [args]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: kbstream COMMAND [args]\n\ncommands:", file=sys.stderr if argv else sys.stdout)
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:15s} {text}", file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    name, rest = argv[0], argv[1:]
    if name == "make-demo-run":
        from .replay.demo import main as demo_main

        return demo_main(rest)
    return COMMANDS[name][1](rest)


if __name__ == "__main__":
    raise SystemExit(main())
