"""The command lines ``karabo-bridge-serve-run`` and ``karabo-bridge-serve-files``.

Every option of extra_data's commands keeps its meaning (``docs/wire/karabo-bridge-protocol.md``,
sections 11.1 and 11.2), and what is sent equals what extra_data's commands send, field
by field, except for the deliberate differences of ``docs/replay-differences.md``, each
of which an option turns back: ``--no-file-timestamps``, ``--split-at-first-bracket``,
``--append-xtdf-only``, or all three at once ``--like-extra-data``.  Additions:
``--exclude``, ``--rate``, ``--repeat``/``--loop`` (train ids keep increasing),
``--trains START:STOP:STEP``, ``--protocol-version``, ``--prefetch``, a progress bar on
stderr, and a final summary that also counts what was skipped or left out, and why.
The options become a call of :func:`kbstream.replay.serve.serve_data`.
"""

import argparse
import logging
import sys

from .errors import (BindError, NoMatchError, PatternError, ReplayError, RunFileError,
                     RunNotFoundError)
from .reader import RunReader
from .runs import files_for_run, run_files
from .select import select_sources
from .serve import SOCKET_TYPES, serve_data

__all__ = ["serve_run_main", "serve_files_main", "parse_train_slice"]


def parse_train_slice(text):
    """``START:STOP:STEP`` (positions in the selected trains, Python slice rules)."""
    parts = text.split(":")
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(f"expected START:STOP:STEP, not {text!r}")
    try:
        vals = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers in START:STOP:STEP, not {text!r}") from None
    if len(vals) == 1:
        v = vals[0]
        return slice(v, None if v == -1 else v + 1) if v is not None else slice(None)
    if len(vals) == 3 and vals[2] == 0:
        raise argparse.ArgumentTypeError("STEP must not be 0")
    return slice(*vals)


def _common_options(ap):
    ap.add_argument("--include", action="append", metavar="PATTERN",
                    help="select sources (and keys): 'SRCGLOB' or 'SRCGLOB[KEYGLOB]'; repeatable")
    ap.add_argument("--exclude", action="append", metavar="PATTERN", default=[],
                    help="remove sources (or keys with [KEYGLOB]); repeatable")
    ap.add_argument("--append-detector-modules", action="store_true",
                    help="combine AGIPD, LPD, DSSC or JUNGFRAU module sources into one source")
    ap.add_argument("--append-xtdf-only", action="store_true",
                    help="with --append-detector-modules, combine AGIPD, LPD and DSSC only, "
                         "as extra_data (JUNGFRAU modules stay separate sources)")
    ap.add_argument("--dummy-timestamps", action="store_true",
                    help="create timestamps when the files have none (INDEX/timestamp)")
    ap.add_argument("--no-file-timestamps", action="store_true",
                    help="do not send INDEX/timestamp from the files (as extra_data)")
    ap.add_argument("--split-at-first-bracket", action="store_true",
                    help="split --include/--exclude patterns at their first '[' as extra_data "
                         "does (no character classes in the source glob)")
    ap.add_argument("--like-extra-data", action="store_true",
                    help="send exactly what extra_data's command sends: --no-file-timestamps "
                         "--split-at-first-bracket --append-xtdf-only")
    ap.add_argument("--use-infiniband", action="store_true",
                    help="bind on the ib0 interface when a TCP port number is given")
    ap.add_argument("-z", "--socket-type", choices=SOCKET_TYPES, default="REP",
                    help="ZeroMQ socket type (default REP)")
    ap.add_argument("--rate", type=float, default=None, metavar="HZ",
                    help="send at most HZ trains per second (the facility runs at 10)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="send the trains N times; train ids keep increasing")
    ap.add_argument("--loop", action="store_true", help="repeat forever")
    ap.add_argument("--trains", type=parse_train_slice, default=None, metavar="START:STOP:STEP",
                    help="send only these positions of the selected trains")
    ap.add_argument("--protocol-version", choices=["1.0", "2.2"], default="2.2")
    ap.add_argument("--prefetch", type=int, default=4, metavar="N",
                    help="trains read ahead of the sender (default 4)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--no-mmap", action="store_true",
                    help="no effect: files are always read into reused buffers, never mapped "
                         "(kept for old command lines)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _list_sources(reader, out):
    print("Available sources:", file=out)
    for s in sorted(reader.all_sources):
        print(f"  {s}", file=out)


def _run(args, reader, selection, endpoint, require, out, err):
    stats = serve_data(
        reader, selection, endpoint, sock=args.socket_type, require=require,
        trains=args.trains, repeat=args.repeat, loop=args.loop, rate=args.rate,
        protocol_version=args.protocol_version, dummy_timestamps=args.dummy_timestamps,
        timestamps=not args.no_file_timestamps,
        append_detector_modules=args.append_detector_modules,
        append_xtdf_only=args.append_xtdf_only, prefetch=args.prefetch,
        progress=not args.no_progress, out=out, err=err, use_infiniband=args.use_infiniband)
    print(stats.summary(), file=out)
    return 0


def _main(prog, argv, out, err):
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog=prog, description=(
        "Replay a European XFEL run over the Karabo bridge protocol."))
    if prog == "karabo-bridge-serve-run":
        ap.add_argument("proposal", help="proposal number, e.g. 700000 or p700000")
        ap.add_argument("run", help="run number, e.g. 12 or r0012")
        ap.add_argument("--port", default="0",
                        help="TCP port or ZeroMQ endpoint (default 0: a random port)")
        ap.add_argument("--allow-partial", action="store_true",
                        help="also send trains where some selected data is missing")
        ap.add_argument("--data", default="all",
                        help="raw, proc or all (raw + proc, proc preferred; default)")
    else:
        ap.add_argument("path", help="run directory or single HDF5 file")
        ap.add_argument("port", help="TCP port or ZeroMQ endpoint")
        ap.add_argument("--source", default=None, metavar="GLOB", help="source glob (default *)")
        ap.add_argument("--key", default=None, metavar="GLOB", help="key glob (default *)")
        ap.add_argument("--require-all", action="store_true",
                        help="only send trains where all selected data is present")
    _common_options(ap)
    args = ap.parse_args(argv)
    if args.like_extra_data:
        args.no_file_timestamps = args.split_at_first_bracket = args.append_xtdf_only = True
    if args.verbose:
        logging.getLogger("kbstream").setLevel(logging.DEBUG)
    if args.prefetch < 1:
        ap.error("--prefetch must be at least 1")
    try:
        if prog == "karabo-bridge-serve-run":
            files, override = files_for_run(args.proposal, args.run, data=args.data)
            require = "any" if args.allow_partial else "all"
        else:
            files, override = run_files(args.path), []
            require = "all" if args.require_all else None
        reader = RunReader(files, override=override, skip_bad_files=True)
    except (RunNotFoundError, RunFileError) as e:
        print(f"{prog}: error: {e}", file=err)
        return 2
    with reader:
        for path, e in reader.bad_files:
            print(f"{prog}: warning: skipped unreadable file {path}: {e}", file=err)
        if prog == "karabo-bridge-serve-run" and not args.include:
            _list_sources(reader, out)
            print("Please select at least one source with --include", file=err)
            return 1
        try:
            selection = select_sources(reader, args.include, args.exclude,
                                       getattr(args, "source", None), getattr(args, "key", None),
                                       first_bracket=args.split_at_first_bracket)
            return _run(args, reader, selection, args.port, require, out, err)
        except (PatternError, NoMatchError) as e:
            print(f"{prog}: error: {e}", file=err)
            return 2
        except (ReplayError, BindError) as e:
            print(f"{prog}: error: {e}", file=err)
            return 1
        except KeyboardInterrupt:
            print("\nStopped.", file=out)
            return 130
        except ImportError as e:
            print(f"{prog}: error: {e}", file=err)
            return 1


def serve_run_main(argv=None, out=None, err=None):
    """``karabo-bridge-serve-run PROPOSAL RUN --include ...``; returns the exit status."""
    return _main("karabo-bridge-serve-run", argv, out or sys.stdout, err or sys.stderr)


def serve_files_main(argv=None, out=None, err=None):
    """``karabo-bridge-serve-files PATH PORT``; returns the exit status."""
    return _main("karabo-bridge-serve-files", argv, out or sys.stdout, err or sys.stderr)


main = serve_run_main

if __name__ == "__main__":
    raise SystemExit(serve_run_main())
