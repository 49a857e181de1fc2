"""kbstream.Client keeps large receive buffers in the process (glibc's allocator).

Each case runs in its own interpreter: the allocator settings are process-wide.  The
measure is the kernel's count of minor page faults (not time): a frame buffer that is
reused costs none, one that was returned to the kernel costs one fault per page."""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the allocator tuning is for glibc on Linux only",
)

# Receive several 16 MiB JF4M-like frames per "train" over tcp loopback with the given
# client settings, and report the page faults of the last trains.
_SCRIPT = r"""
import json, resource, sys, threading
import numpy as np, zmq
import kbstream
keep = sys.argv[1] == "keep"
ctx = zmq.Context()
srv = ctx.socket(zmq.REP); port = srv.bind_to_random_port("tcp://127.0.0.1")
frames = [np.full((16, 512, 1024), i, np.uint16) for i in range(8)]   # JF4M: 8 x 16 MiB
def serve():
    for _ in range(8):
        srv.recv(); srv.send_multipart(frames, copy=False)
t = threading.Thread(target=serve); t.start()
client = kbstream.Client(f"tcp://127.0.0.1:{port}", keep_buffers=keep)
sock = client._socket
faults = []
for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sock.send(b"next")
    msg = sock.recv_multipart(copy=False)
    assert [len(m) for m in msg] == [16 << 20] * 8
    del msg
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t.join(); client.close(); srv.close(); ctx.term()
print(json.dumps({"faults": faults, "applied": kbstream.keep_large_buffers()}))
"""


def _run(mode, env=None):
    import os
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, **(env or {})))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_buffers_are_not_faulted_in_again():
    kept = _run("keep")
    default = _run("default")
    assert kept["applied"] is True
    # 128 MiB per train = 32768 pages: without the tuning every train faults (some of) its
    # frames in again (thousands of faults, fewer with huge pages); with it, the frames of
    # the previous train are reused.
    steady_kept = sum(kept["faults"][3:])
    steady_default = sum(default["faults"][3:])
    assert steady_default > 1000, default
    assert steady_kept < 500 and steady_kept * 10 < steady_default, (kept, default)


def test_environment_switch_turns_it_off():
    off = _run("keep", env={"KBSTREAM_KEEP_BUFFERS": "0"})
    assert off["applied"] is False
    assert sum(off["faults"][3:]) > 1000, off
