"""``kbstream monitor DEVICE:CHANNEL``: a quick look at a Karabo pipeline output.

Joins the Karabo broker as a client instance, finds the output by name
(:meth:`kbstream.broker.BrokerInstance.register_channel_monitor`) and prints one line per
item: train id, source, rate, and every key with its shape and dtype (Karabo type for
scalars)::

    tid 1000042  kbDev:output  9.9 Hz  node.int32 INT32 | node.ndarray float32 (100, 200) | ...

Connection changes and errors go to stderr. Ctrl-C, SIGTERM or ``--ntrains N`` end it with a
summary; ``--connect-timeout S`` gives up (exit status 1) when the output is not connected
within S seconds.

One command, two tools: ``kbstream monitor`` takes a bridge endpoint (:mod:`.monitor`) or a
pipeline output; :func:`route` tells them apart (docs/channel-monitors.md).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import numpy as np

__all__ = ["main", "route", "is_channel_id", "describe", "HELP_NOTE"]

#: Printed before the bridge monitor's help: the command's other form.
HELP_NOTE = ("kbstream monitor ENDPOINT watches a Karabo bridge stream (options below); "
             "kbstream monitor DEVICE:CHANNEL\nprints the items of a Karabo pipeline output "
             "found through the broker (kbstream monitor DEVICE:CHANNEL --help).\n")

#: A Karabo channel name: property keys, letters first (``output``, ``node.output``).
_CHANNEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_DEVICE_RE = re.compile(r"^[A-Za-z0-9_/\-]+$")
#: Options of either tool that take a value (so that the value is not read as the target).
_VALUE_OPTIONS = {"-z", "--server-socket", "--ntrains", "--interval", "--broker", "--topic",
                  "--connect-timeout", "--instance-id"}


def is_channel_id(text: str) -> bool:
    """True for a pipeline output ``DEVICE:CHANNEL`` / ``DEVICE@CHANNEL``, False for a
    bridge endpoint.

    The rule: an argument with ``://`` (``tcp://host:port``, ``ipc://path``), all digits (a
    port) or ``HOST:PORT`` (the part after the last ``:`` is a number) is an endpoint. An
    output is ``DEVICE`` (letters, digits, ``_ / -``) then ``:`` or ``@`` then a channel name
    that starts with a letter or ``_`` (Karabo keys never start with a digit, so no output
    id looks like ``HOST:PORT``).
    """
    if not isinstance(text, str) or "://" in text or text.isdigit():
        return False
    for sep in (":", "@"):
        if sep in text:
            device, _, channel = text.partition(sep)
            return bool(_DEVICE_RE.match(device)) and bool(_CHANNEL_RE.match(channel))
    return False


def _target_index(argv):
    """Index of the positional argument (the target) in ``argv``, or None."""
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--":
            return i + 1 if i + 1 < len(argv) else None
        if arg.startswith("-") and len(arg) > 1:
            skip = arg in _VALUE_OPTIONS
            continue
        return i
    return None


def route(argv):
    """``("channel" | "endpoint", argv)``: which tool ``kbstream monitor ARGS`` runs.

    A ``HOST:PORT`` endpoint is given to the bridge monitor as ``tcp://HOST:PORT``.
    """
    argv = list(argv)
    i = _target_index(argv)
    if i is None:
        return "endpoint", argv
    target = argv[i]
    if is_channel_id(target):
        return "channel", argv
    host, sep, port = target.rpartition(":")
    if sep and host and port.isdigit() and "://" not in target:
        argv[i] = f"tcp://{target}"
    return "endpoint", argv


def describe(data):
    """``["key dtype shape" | "key TYPE", ...]`` for every leaf of an item (a kbhash Hash):
    arrays (NDArray, vectors) show dtype and shape, ImageData ``ImageData dtype shape``,
    other values their Karabo type."""
    parts = []
    for path in data.paths():
        value = data[path]
        if isinstance(value, np.ndarray):
            parts.append(f"{path} {value.dtype} {tuple(value.shape)}")
            continue
        pixels = getattr(value, "pixels", None)
        if isinstance(pixels, np.ndarray):
            parts.append(f"{path} {type(value).__name__} {pixels.dtype} {tuple(pixels.shape)}")
            continue
        try:
            kind = data.get_type(path).name
        except Exception:  # a value the Hash cannot type: show the Python type
            kind = type(value).__name__
        if isinstance(value, (list, tuple)):
            parts.append(f"{path} {kind} ({len(value)},)")
        else:
            parts.append(f"{path} {kind}")
    return parts


class _Printer:
    """Formats and prints the items (the monitor's handler thread)."""

    def __init__(self, out, ntrains):
        self.out = out
        self.ntrains = ntrains
        self.count = 0
        self.first_tid = self.last_tid = None
        self.done = threading.Event()
        self._times = collections.deque(maxlen=20)
        self._lock = threading.Lock()

    def rate(self):
        t = self._times
        if len(t) < 2 or t[-1] <= t[0]:
            return None
        return (len(t) - 1) / (t[-1] - t[0])

    def item(self, data, meta):
        with self._lock:
            if self.done.is_set():
                return
            self._times.append(time.monotonic())
            self.count += 1
            tid = getattr(meta, "tid", None)
            if self.first_tid is None:
                self.first_tid = tid
            self.last_tid = tid
            rate = self.rate()
            source = getattr(meta, "source", "?")
            line = (f"tid {tid}  {source}  "
                    + (f"{rate:.1f} Hz" if rate is not None else "- Hz") + "  "
                    + " | ".join(describe(data)))
            print(line, file=self.out, flush=True)
            if self.ntrains is not None and self.count >= self.ntrains:
                self.done.set()

    def summary(self, name):
        return (f"{name}: {self.count} items, train ids {self.first_tid}..{self.last_tid}")


def _parser():
    p = argparse.ArgumentParser(
        prog="kbstream monitor",
        description="Print one line per item of a Karabo pipeline output found by name "
                    "through the broker (DEVICE:CHANNEL), or watch a bridge stream (ENDPOINT).")
    p.add_argument("channel", help="DEVICE:CHANNEL (or DEVICE@CHANNEL)")
    p.add_argument("--broker", help="amqp://user:password@host:port[/vhost], comma-separated "
                   "list allowed (default: $KARABO_BROKER)")
    p.add_argument("--topic", help="broker topic (default: $KARABO_BROKER_TOPIC, else the "
                   "user name)")
    p.add_argument("--ntrains", type=int, default=None, metavar="N",
                   help="stop after N items")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="S",
                   help="give up (exit status 1) when not connected within S seconds "
                        "(default: keep trying)")
    p.add_argument("--instance-id", help="the broker instance id of this tool "
                   "(default kbstream-monitor-<host>-<pid>)")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    return p


def main(argv=None, out=None):
    """Run ``kbstream monitor DEVICE:CHANNEL``; returns the exit status (0 = ended by
    Ctrl-C / SIGTERM / ``--ntrains``, 1 = not connected in time, 2 = bad arguments or no
    broker)."""
    args = _parser().parse_args(argv)
    # what goes wrong is printed by the tool itself: the loggers speak only with -v
    loggers = [logging.getLogger(n) for n in ("kbstream", "pika")]
    levels = [lg.level for lg in loggers]
    loggers[0].setLevel(logging.INFO if args.verbose else logging.ERROR)
    loggers[1].setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        return _run(args, out)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run(args, out):
    out = sys.stdout if out is None else out
    from ..broker import BrokerInstance
    from ..errors import KbStreamError

    if not is_channel_id(args.channel):
        print(f"kbstream monitor: {args.channel!r} is not DEVICE:CHANNEL", file=sys.stderr)
        return 2
    own_id = args.instance_id or (
        "kbstream-monitor-" + re.sub(r"[^A-Za-z0-9_/\-]", "_", socket.gethostname().split(".")[0])
        + f"-{os.getpid()}")
    printer = _Printer(out, args.ntrains)
    connected = threading.Event()

    def status(st):
        if st.name == "CONNECTED":
            connected.set()
        else:
            connected.clear()
        print(f"kbstream monitor: {args.channel} {st.name.lower()}", file=sys.stderr,
              flush=True)

    try:
        # SIGTERM ends the loop below as Ctrl-C does (the summary still comes last)
        inst = BrokerInstance(own_id, broker=args.broker, topic=args.topic,
                              instance_type="client", heartbeat_interval=120,
                              exit_on_sigterm=False)
        inst.start()
    except KbStreamError as e:
        print(f"kbstream monitor: {e}", file=sys.stderr)
        return 2
    rc = 0
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: printer.done.set())
    try:
        inst.register_channel_monitor(args.channel, data_handler=printer.item,
                                      status_tracker=status)
        mon = inst.channel_monitor(args.channel)
        deadline = (None if args.connect_timeout is None
                    else time.monotonic() + args.connect_timeout)
        reported = None
        while not printer.done.wait(0.2):
            err = mon.last_error
            if err is not None and str(err) != reported:
                reported = str(err)
                print(f"kbstream monitor: waiting for {args.channel}: {err}", file=sys.stderr,
                      flush=True)
            if deadline is not None and not connected.is_set() and printer.count == 0 \
                    and time.monotonic() > deadline:
                print(f"kbstream monitor: {args.channel} not connected within "
                      f"{args.connect_timeout} s"
                      + (f" ({type(err).__name__}: {err})" if err is not None else ""),
                      file=sys.stderr)
                rc = 1
                break
    except KeyboardInterrupt:
        pass
    except KbStreamError as e:
        print(f"kbstream monitor: {e}", file=sys.stderr)
        rc = 2
    finally:
        printer.done.set()  # no line after the summary
        inst.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(printer.summary(args.channel), file=out, flush=True)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
