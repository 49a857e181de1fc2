"""karabo-hdf5writer (the DAQ stand-in) records a kbstream output (issue 13).

A real ``karabo-middlelayerserver`` runs karabo-hdf5writer 3.0.1's ``Hdf5Writer`` with a
kbstream output as its data source. The writer needs a time server: a kbstream broker
instance (``kbTime``) broadcasts ``signalTimeTick`` (train id, seconds, attoseconds,
period in microseconds), which the server follows through ``timeServerId``. The writer's
own cycle is driven as an operator does: configure, monitor, record, monitor (end of run).
Then extra_data opens the run it wrote and reads back the NDArray values kbstream sent,
one train per item.
"""

import threading
import time

import numpy as np
import pytest

from kbhash import Hash, HashType, Timestamp
from kbstream.broker import Typed

from broker_stack import wait_until
from mdl_stack import mdl_server, probe  # noqa: F401  (fixtures)

pytestmark = pytest.mark.karabo

#: Train period the time server announces (microseconds): 10 Hz, as at the facility.
PERIOD_US = 100_000


class TimeServer:
    """``signalTimeTick(trainId, sec, frac, period)`` every ``interval`` seconds, train ids
    counted from ``first_tid`` at start in steps of the period."""

    def __init__(self, instance, first_tid=1_000_000, interval=0.5):
        self.inst = instance
        self.first_tid = first_tid
        self.interval = interval
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current_tid(self, now=None):
        """The train id of the time ``now`` (default: this moment), as the ticks count."""
        now = time.time() if now is None else now
        return self.first_tid + int((now - self.t0) * 1e6 // PERIOD_US)

    def tick(self):
        now = time.time()
        tid = self.current_tid(now)
        sec = int(now)
        frac = int(round((now - sec) * 1e18))
        u64 = HashType.UINT64
        self.inst.emit("signalTimeTick", Typed(tid, u64), Typed(sec, u64), Typed(frac, u64),
                       Typed(PERIOD_US, u64))

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # the broker connection may go at the end of the test
                pass

    def start(self):
        self.tick()
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)


def item(i):
    h = Hash()
    h.set("node.int32", i, type=HashType.INT32)
    h.set("node.ndarray", (np.arange(20, dtype=np.float32).reshape(4, 5) * 10 + i))
    return h


def config(probe, device, key):
    conf, _ = probe.request(device, "slotGetConfiguration", timeout=30)
    return conf[key]


def state_is(probe, device, *states):
    return lambda: config(probe, device, "state") in states


def test_hdf5writer_records_kbstream_ndarray_and_extra_data_reads_it(broker_env, mdl_server,
                                                                     probe, tmp_path):
    h5py = pytest.importorskip("h5py")
    extra_data = pytest.importorskip("extra_data")
    from kbstream.broker import BrokerInstance
    from kbstream.pipeline import DataSchema, OutputChannel

    schema = DataSchema({"node.int32": HashType.INT32, "node.ndarray": ("float32", (4, 5))})
    out = OutputChannel("kbPeer:output", hostname="127.0.0.1", schema=schema).start()
    peer = BrokerInstance("kbPeer", heartbeat_interval=10)
    clock_inst = BrokerInstance("kbTime", heartbeat_interval=10)
    clock = TimeServer(clock_inst)
    runs = tmp_path / "runs"
    try:
        peer.add_output_channel("output", out)
        peer.start()
        clock_inst.start()
        clock.start()
        mdl_server({"hdfWriter": {
            "classId": "Hdf5Writer", "outputDir": str(runs), "maximumWaitForData": 0,
            "connectionTimeout": 30,
            "dataSources": [{"deviceId": "kbPeer", "properties": ["output"],
                             "failOnError": True}]}},
            ["Hdf5Writer"], extra=["timeServerId=kbTime"])
        w = "hdfWriter"

        probe.request(w, "configure", timeout=60)
        wait_until(state_is(probe, w, "IGNORING", "ERROR"), 60, interval=0.5,
                   what="Hdf5Writer configured")
        assert config(probe, w, "state") == "IGNORING", config(probe, w, "status")
        assert config(probe, w, "numOutputChannels") == 1

        probe.request(w, "monitor", timeout=60)
        wait_until(state_is(probe, w, "MONITORING", "ERROR"), 60, interval=0.5,
                   what="Hdf5Writer monitoring")
        assert config(probe, w, "state") == "MONITORING", config(probe, w, "status")
        (input_id,) = wait_until(lambda: inputs(out), 60, interval=0.2,
                                 what="the writer's input connected")

        probe.request(w, "record", timeout=60)
        wait_until(state_is(probe, w, "ACQUIRING", "ERROR"), 60, interval=0.5,
                   what="Hdf5Writer acquiring")
        assert config(probe, w, "state") == "ACQUIRING", config(probe, w, "status")

        # each item in a train of its own: after an item went out, wait until the clock
        # is two trains further before the next (its timestamp then falls in a later
        # train however slow the machine is)
        n = 5

        def next_train_after(tid):
            wait_until(lambda: clock.current_tid() >= tid + 2, 60, interval=0.01,
                       what=f"train {tid + 2}")

        for i in range(1, n + 1):
            _send(out, input_id, item(i))
            next_train_after(clock.current_tid())

        probe.request(w, "monitor", timeout=60)  # ends the run at the current train
        wait_until(state_is(probe, w, "MONITORING", "ERROR"), 60, interval=0.5,
                   what="Hdf5Writer back to monitoring")
        (path,) = (runs / "r0001").glob("*.h5")

        # the file is closed once the writer handled a train after the end of the run:
        # keep the stream going (items -1, -2, ... after the run) until it can be opened
        k = 0

        def closed():
            nonlocal k
            k += 1
            _send(out, input_id, item(-k))
            try:
                with h5py.File(path, "r") as f:
                    return len(f["INDEX/trainId"]) >= n
            except (OSError, KeyError):  # still open for writing (HDF5 file lock)
                return False

        wait_until(closed, 60, interval=0.3, what="the run file closed")
        assert config(probe, w, "state") == "MONITORING", config(probe, w, "status")
    finally:
        clock.stop()
        out.close()
        clock_inst.stop()
        peer.stop()

    run = extra_data.RunDirectory(str(runs / "r0001"))
    assert "kbPeer:output" in run.instrument_sources
    # only the NDArray of the declared schema gets a dataset (karabo-hdf5writer 3.0.1)
    assert run.keys_for_source("kbPeer:output") == {"data.node.ndarray"}
    data = run["kbPeer:output", "data.node.ndarray"]
    tids = list(data.train_ids)
    assert len(tids) >= n and tids == sorted(set(tids))  # one train per item, in order
    arrays = data.ndarray()
    assert arrays.shape == (len(tids), 4, 5)
    # karabo-hdf5writer 3.0.1 creates an NDArray dataset with one zero-filled row ahead of
    # the data and types it after the schema's `type` attribute object (int32), for any
    # sender (docs/gui.md, "DAQ stand-in"): the items follow that row, values unchanged
    assert not arrays[0].any()
    for i in range(1, n):
        np.testing.assert_array_equal(arrays[i], item(i)["node.ndarray"])
    with h5py.File(path, "r") as f:
        raw = f["INSTRUMENT/kbPeer:output/data/node/ndarray"][1:n + 1]
    np.testing.assert_array_equal(raw, np.stack([item(i)["node.ndarray"]
                                                 for i in range(1, n + 1)]))


def inputs(out):
    """Ids of the inputs connected to ``out``."""
    return [k for k in out.stats() if k != "__shared__"]


def _send(out, input_id, data, tries=400):
    """Write one item until it went to ``input_id`` (a proxy input asks ``drop``)."""
    for _ in range(tries):
        before = out.stats()[input_id]["sent"]
        out.write(data, Timestamp.now())
        out.update(timeout=10)
        if out.stats()[input_id]["sent"] > before:
            return
        time.sleep(0.02)
    pytest.fail(f"item never sent to {input_id}: {out.stats()}")
