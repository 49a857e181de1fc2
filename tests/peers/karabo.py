"""Client for Karabo's own Hash codecs, run in the Python 3.12 side environment.

``karabo.cpp`` (module ``karabind``) and ``karabo.native`` 3.1.2 need Python >= 3.12, while
the test suite runs under the project's interpreter. :class:`KaraboPeer` therefore starts
``karabo_driver.py`` (next to this file) with the side interpreter and talks to it with one
JSON object per line; see the driver's docstring for the protocol, the typed *content*
format and what each implementation cannot do.

Usage from tests (``tests/`` is the import root)::

    from peers.karabo import KaraboPeer, karabo_python

    with KaraboPeer() as peer:
        blob = peer.kb_save([{"key": "a", "type": "INT32", "attrs": [], "value": 1}])
        content = peer.nat_load(blob)

The side interpreter is ``$KBSTREAM_KARABO_PYTHON`` or ``<repo>/.venv-karabo/bin/python``;
create the latter with ``scripts/karabo-env.sh .venv-karabo``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().with_name("karabo_driver.py")
ENV_VAR = "KBSTREAM_KARABO_PYTHON"
SETUP_HINT = (
    f"create it with `scripts/karabo-env.sh {REPO / '.venv-karabo'}` "
    f"(or point {ENV_VAR} at a Python 3.12 with karabo.cpp==3.1.2 and karabo.native==3.1.2)"
)

__all__ = ["KaraboPeer", "PeerError", "PeerTimeout", "PeerDied", "karabo_python", "in_ci", "peer_missing",
           "require_karabo_python"]


def karabo_python() -> str | None:
    """Path of the side interpreter, or None when there is none.

    ``$KBSTREAM_KARABO_PYTHON`` wins when set (even if it does not exist, so that a wrong
    setting fails loudly when the peer starts); else ``<repo>/.venv-karabo/bin/python`` if it
    exists.
    """
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return explicit
    default = REPO / ".venv-karabo" / "bin" / "python"
    return str(default) if default.exists() else None


def in_ci() -> bool:
    """True when the CI variable is set: there a missing peer is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def peer_missing(what: str):
    """Fail (under CI) or skip loudly because a real peer is not available."""
    import pytest

    if in_ci():
        pytest.fail(f"CI is set but {what}; {SETUP_HINT}", pytrace=False)
    pytest.skip(f"!!! KARABO INTEROP TESTS NOT RUN: {what}; {SETUP_HINT} !!!")


def require_karabo_python() -> str:
    """The side interpreter's path, or fail/skip as :func:`peer_missing` does."""
    python = karabo_python()
    if python is None:
        peer_missing("no Karabo side interpreter was found "
                     "(KBSTREAM_KARABO_PYTHON unset, <repo>/.venv-karabo absent)")
    return python


class PeerError(Exception):
    """The driver answered with an error (the message is the driver's ``error`` text)."""


class PeerTimeout(PeerError):
    """The driver did not answer within the timeout; the peer is closed afterwards."""


class PeerDied(PeerError):
    """The driver process ended or wrote something that is not a reply."""


_EOF = object()


class KaraboPeer:
    """A running ``karabo_driver.py`` subprocess.

    Requests are strictly sequential (one outstanding at a time); the object is not meant to
    be shared between threads. ``stderr`` of the driver goes to ``log_path`` (a temporary
    file unless given, removed after a clean exit) and its tail is included in
    :class:`PeerDied` messages.
    """

    def __init__(self, python: str | None = None, *, timeout: float = 60.0,
                 log_path: str | os.PathLike | None = None):
        python = python or karabo_python()
        if not python:
            raise FileNotFoundError(f"no Karabo side interpreter: {SETUP_HINT}")
        if not Path(python).exists():
            raise FileNotFoundError(f"Karabo side interpreter {python} does not exist: "
                                    f"{SETUP_HINT}")
        self.python = python
        self.timeout = timeout
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="karabo-driver-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen(
            [python, "-u", str(DRIVER)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, encoding="utf-8", bufsize=1,
        )
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_lines, name="karabo-peer-reader",
                                        daemon=True)
        self._reader.start()
        self._closed = False

    # ---- plumbing ---------------------------------------------------------------------

    def _read_lines(self):
        try:
            for line in self._proc.stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self._lines.put(_EOF)

    def _log_tail(self, n: int = 20) -> str:
        try:    # the driver writes straight to the file: nothing is buffered here
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def request(self, op: str, timeout: float | None = None, **fields) -> dict:
        """Send one request and return the driver's reply object (``ok`` true).

        Raises :class:`PeerError` for an error reply, :class:`PeerTimeout` after ``timeout``
        seconds (default: the peer's), :class:`PeerDied` if the driver is gone.
        """
        if self._closed:
            raise PeerDied("Karabo peer is closed")
        timeout = self.timeout if timeout is None else timeout
        line = json.dumps(dict(op=op, **fields), allow_nan=False)
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            self.close()
            raise PeerDied(f"cannot write to the Karabo driver ({exc}); driver log "
                           f"{self.log_path}:\n{self._log_tail()}") from None
        try:
            answer = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close(kill=True)
            raise PeerTimeout(f"Karabo driver gave no answer to {op!r} within {timeout} s "
                              f"(driver log {self.log_path})") from None
        if answer is _EOF:
            code = self._proc.poll()
            self.close()
            raise PeerDied(f"Karabo driver exited (code {code}) during {op!r}; driver log "
                           f"{self.log_path}:\n{self._log_tail()}")
        try:
            reply = json.loads(answer)
        except ValueError:
            self.close()
            raise PeerDied(f"Karabo driver wrote a non-JSON line: {answer!r}") from None
        if not reply.get("ok"):
            raise PeerError(reply.get("error", f"malformed reply {reply!r}"))
        return reply

    # ---- API --------------------------------------------------------------------------

    def ping(self) -> bool:
        return bool(self.request("ping")["pong"])

    def versions(self) -> dict:
        reply = self.request("versions")
        reply.pop("ok")
        return reply

    def kb_save(self, content: list) -> bytes:
        """Archive that karabind's ``BinarySerializerHash("Bin").save`` makes of content."""
        return bytes.fromhex(self.request("kb_save", content=content)["hex"])

    def kb_load(self, data: bytes) -> list:
        """Typed content of the Hash that karabind loads from ``data``."""
        return self.request("kb_load", hex=bytes(data).hex())["content"]

    def kb_save_array(self, dtype: str, values: list, shape: list) -> bytes:
        """karabind's archive of ``Hash("x", numpy.array(values, dtype).reshape(shape))``."""
        return bytes.fromhex(self.request("kb_save_array", dtype=dtype, values=values, shape=shape)["hex"])

    def nat_save(self, content: list) -> bytes:
        """Archive that ``karabo.native.encodeBinary`` makes of content."""
        return bytes.fromhex(self.request("nat_save", content=content)["hex"])

    def nat_load(self, data: bytes) -> list:
        """Typed content of the Hash that ``karabo.native.decodeBinary`` returns."""
        return self.request("nat_load", hex=bytes(data).hex())["content"]

    def close(self, timeout: float = 10.0, *, kill: bool = False) -> None:
        """End the driver: closing its stdin ends it; it is killed after ``timeout``
        seconds, or at once with ``kill=True`` (used after a timeout)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if kill:
            self._proc.kill()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(2.0)
        if not self._reader.is_alive():     # never close a pipe another thread reads
            self._proc.stdout.close()
        self._log.close()
        if self._own_log and not kill and self._proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)   # clean exit: the log is not needed

    def __enter__(self) -> KaraboPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()
