"""``kbstream glimpse ENDPOINT``: receive one train and print its structure.

As ``karabo-bridge-glimpse`` prints it: the train id, then per source its name, train id
and timestamp, the keys with dtype and shape (arrays) or value (scalars), and the
metadata.  ``-z`` names the *server's* socket type, as in the peer's command.
"""

import argparse
import sys
import time

import numpy as np

from ..errors import ChannelTimeout
from ._client import connect, train_id

__all__ = ["main", "describe"]


def _value(v):
    if isinstance(v, np.ndarray):
        return f"{v.dtype}, shape {v.shape}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(data, meta, elapsed=None):
    """The printed structure of one train as a list of lines."""
    tid = train_id(meta)
    lines = [f"Train ID: {tid} " + "-" * 30]
    took = f", received in {elapsed * 1e3:.2f} ms" if elapsed is not None else ""
    lines.append(f"Data from {len(data)} sources{took}")
    for i, (src, values) in enumerate(sorted(data.items())):
        m = meta.get(src, {})
        lines.append("")
        lines.append(f"Source {i}: {src!r} @ {m.get('timestamp.tid')}")
        if "timestamp" in m:
            lines.append(f"timestamp: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(m['timestamp']))} UTC "
                         f"({m['timestamp']})")
        else:
            lines.append("No timestamp")
        lines.append("data:")
        for key in sorted(values):
            lines.append(f"  - {key}: {_value(values[key])}")
        lines.append("metadata:")
        for key in sorted(m):
            lines.append(f"  - {key}: {_value(m[key])}")
    return lines


def main(argv=None, out=None):
    """Print one train of the stream at ENDPOINT; returns the exit status."""
    out = sys.stdout if out is None else out
    ap = argparse.ArgumentParser(prog="kbstream glimpse",
                                 description="Receive one Karabo bridge train and print its structure.")
    ap.add_argument("endpoint", help="ZeroMQ endpoint of the server, e.g. tcp://localhost:4545")
    ap.add_argument("-z", "--server-socket", choices=["REP", "PUB", "PUSH"], default="REP",
                    help="socket type of the server (default REP)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for a train (default 30)")
    args = ap.parse_args(argv)
    with connect(args.endpoint, args.server_socket, timeout=args.timeout) as client:
        t0 = time.perf_counter()
        try:
            data, meta = client.next()
        except ChannelTimeout as e:
            print(f"kbstream glimpse: {e}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - t0
    print("\n".join(describe(data, meta, elapsed)), file=out)
    return 0
