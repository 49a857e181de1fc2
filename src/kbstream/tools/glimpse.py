"""``kbstream glimpse ENDPOINT|RUN_DIR``: one train's structure, and a picture of it.

The text is laid out as ``karabo-bridge-glimpse`` prints it: the train id, the number of
sources and how long the train took to arrive, then per source (numbered from 1) its name
and train id, its timestamp (local time) with the delay since, and its data and metadata
as ``- [type] key, dtype, shape`` (arrays) or ``- [type] key, value``.  ``-v`` prints
sequences in full, ``-vv`` the arrays' values too.  ``-z`` names the *server's* socket type,
as in the peer's command.

``--png FILE`` also draws the train (:mod:`kbstream.tools.picture`): detector modules
assembled with extra-geom (``--geometry [DETECTOR=]FILE`` to give a geometry file instead
of extra-geom's example geometry), other 2-D/3-D arrays as plain images; ``--frame N``
chooses the frame of arrays with several, ``--bin N`` draws N x N pixels as one.  It
needs ``pip install 'kbstream[plot]'``.

With a run directory (or one ``.h5`` file) instead of an endpoint, the train ``--train N``
(a train id; default: the run's first) is read from the files by kbstream's replay reader
and shown the same way.  Differences from the peer: the time is given in milliseconds
(the peer prints seconds labelled ms); ``-s/--save`` (an HDF5 dump) is not offered.
"""

import argparse
import os
import sys
import time

import numpy as np

from ..errors import ChannelTimeout, KbStreamError
from ._client import connect, train_id

__all__ = ["main", "describe", "read_run_train"]


def _type_name(v):
    return type(v).__name__


def _lines_of(d, verbosity=0, indent=""):
    """``- [type] key, ...`` lines of a dict (sorted), nested dicts as ``+ [dict] key``."""
    lines = []
    for key in sorted(d):
        v = d[key]
        head = f"{indent} - [{_type_name(v)}] {key}"
        if isinstance(v, dict):
            lines.append(f"{indent} + [dict] {key}")
            lines.extend(_lines_of(v, verbosity, indent + "  "))
            continue
        if isinstance(v, np.ndarray):
            line = f"{head}, {v.dtype}, {v.shape}"
            if verbosity >= 2:
                line += f"\n{v}"
        elif isinstance(v, (list, tuple, str, bytes)):
            if isinstance(v, (list, tuple)) and v:
                head = f"{indent} - [{_type_name(v)} of {_type_name(v[0])}] {key}"
            line = f"{head}, {v}"
            if verbosity < 1 and len(line) > 80:
                line = line[:77] + "..."
        else:
            line = f"{head}, {v}"
        lines.append(line)
    return lines


def describe(data, meta, elapsed=None, verbosity=0, received=None, how="REQ-REP"):
    """The printed structure of one train as a list of lines.

    ``elapsed``: seconds the train took to arrive (``how`` says how it came);
    ``received``: the time it arrived (for the delay after each source's timestamp).
    """
    if not data:
        return ["Empty data"]
    tid = train_id(meta)
    lines = [f"Train ID: {tid} " + "-" * 26]
    took = f", {how} took {elapsed * 1e3:.2f} ms" if elapsed is not None else ""
    lines.append(f"Data from {len(data)} sources{took}")
    lines.append("")
    for i, (src, values) in enumerate(sorted(data.items()), start=1):
        m = meta.get(src, {})
        values = {k: v for k, v in values.items() if k != "metadata"}
        lines.append(f"Source {i}: {src!r} @ {m.get('timestamp.tid', 0)}")
        ts = m.get("timestamp")
        if ts is None:
            lines.append("No timestamp")
        else:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
            delay = f" | delay: {(received - ts) * 1e3:.2f} ms" if received is not None else ""
            lines.append(f"timestamp: {when} ({ts}){delay}")
        lines.append("data:")
        lines.extend(_lines_of(values, verbosity))
        if m:
            lines.append("metadata:")
            lines.extend(_lines_of(m))
        lines.append("")
    return lines


def read_run_train(path, train=None):
    """``(data, metadata, train id)`` of train ``train`` (default: the first) of the run
    directory or file ``path``, read by :class:`kbstream.replay.RunReader`.

    Raises :class:`~kbstream.tools.errors.TrainNotFoundError` for a train id the run
    does not have, and the replay errors for missing or unreadable files.
    """
    from ..replay import RunReader, run_files, select_sources
    from .errors import TrainNotFoundError

    with RunReader(run_files(path)) as reader:
        tids = reader.train_ids
        if train is None:
            if not len(tids):
                raise TrainNotFoundError(f"{path}: the run has no trains")
            train = int(tids[0])
        elif not np.isin(train, tids):
            span = (int(tids[0]), int(tids[-1])) if len(tids) else ()
            within = f" (its trains: {span[0]} .. {span[1]}, {len(tids)} trains)" if span else ""
            raise TrainNotFoundError(f"{path}: no train {train} in this run{within}", span)
        item = reader.read_train(int(train), select_sources(reader))
    data = {s: {k: v for k, v in d.items() if k != "metadata"} for s, d in item.data.items()}
    return data, item.metadata, int(train)


def _geometries(specs):
    """``--geometry [DETECTOR=]FILE`` values -> {DETECTOR or None: FILE}."""
    from .picture import DETECTORS

    out = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if sep and name.upper() in DETECTORS:
            out[name.upper()] = path
        else:
            out[None] = spec
    return out


def _parser():
    ap = argparse.ArgumentParser(
        prog="kbstream glimpse",
        description="Print the structure of one Karabo bridge train (of a stream, or of a run "
                    "on disk) and optionally draw it into a PNG.")
    ap.add_argument("endpoint", metavar="ENDPOINT|RUN_DIR",
                    help="ZeroMQ endpoint of the server (e.g. tcp://localhost:4545), or a run "
                         "directory / .h5 file")
    ap.add_argument("-z", "--server-socket", choices=["REP", "PUB", "PUSH"], default="REP",
                    help="socket type of the server (default REP)")
    ap.add_argument("-v", "--verbose", action="count", default=0,
                    help="-v: sequences in full; -vv: array values too")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for a train (default 30)")
    ap.add_argument("--train", type=int, default=None,
                    help="with a run: the train id to show (default: the first)")
    ap.add_argument("--png", metavar="FILE", help="also draw the train into this PNG file")
    ap.add_argument("--geometry", metavar="[DETECTOR=]FILE", action="append",
                    help="a geometry file extra-geom reads (CrystFEL .geom; LPD, DSSC also "
                         "XFEL .h5) for the stream's detector, or for DETECTOR (JUNGFRAU, "
                         "AGIPD, LPD, DSSC); default: extra-geom's example geometry")
    ap.add_argument("--frame", type=int, default=0,
                    help="the frame (pulse / memory cell) drawn of arrays with several "
                         "(default 0)")
    ap.add_argument("--bin", type=int, default=1, metavar="N",
                    help="draw each N x N block of pixels as one (a smaller PNG; default 1)")
    return ap


def main(argv=None, out=None):
    """Print (and with ``--png`` draw) one train; returns the exit status."""
    out = sys.stdout if out is None else out
    ap = _parser()
    args = ap.parse_args(argv)
    from_run = os.path.exists(args.endpoint)
    if args.bin < 1:
        ap.error("--bin must be 1 or more")
    if args.train is not None and not from_run:
        ap.error(f"--train needs a run directory or file; {args.endpoint!r} does not exist")
    try:
        if args.png:
            from .picture import require_plotting

            require_plotting(geometry=True)   # say so before waiting for a train
        if from_run:
            t0 = time.perf_counter()
            data, meta, _tid = read_run_train(args.endpoint, args.train)
            elapsed = time.perf_counter() - t0
            lines = describe(data, meta, elapsed, verbosity=args.verbose, how="reading")
        else:
            with connect(args.endpoint, args.server_socket, timeout=args.timeout) as client:
                t0 = time.perf_counter()
                data, meta = client.next()
                elapsed = time.perf_counter() - t0
                received = time.time()
            how = {"REP": "REQ-REP", "PUB": "SUB", "PUSH": "PULL"}[args.server_socket]
            lines = describe(data, meta, elapsed, verbosity=args.verbose,
                             received=received, how=how)
        print("\n".join(lines), file=out)
        if args.png:
            from .picture import write_picture

            info = write_picture(data, args.png, frame=args.frame,
                                 geometries=_geometries(args.geometry),
                                 title=f"train {train_id(meta)}", bin=args.bin)
            what = ", ".join(f"{p['title']} {p['width']}x{p['height']}" for p in info["panels"])
            print(f"Picture: {args.png} ({info['width']}x{info['height']} px; {what})", file=out)
    except ChannelTimeout as e:
        print(f"kbstream glimpse: {e}", file=sys.stderr)
        return 1
    except KbStreamError as e:
        print(f"kbstream glimpse: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
