"""A kbstream pipeline output that is a Karabo instance, for the train matcher's broker
tests: found by name (``DEVICE:daqOutput``) through the broker of ``KARABO_BROKER`` /
``KARABO_BROKER_TOPIC``.

    python matcher_broker_source.py DEVICE INPUT_ID KEY

Announces itself as DEVICE with the output ``daqOutput``, waits until the input INPUT_ID
(the matcher's) is connected and prints ``READY``; then reads commands from stdin, one a
line: ``T <tid>`` writes one item for train <tid> and prints ``SENT <tid>``; ``Q`` (or the
end of stdin) closes the output and the instance and exits.  Each item: ``data.adc``
uint16 SHAPE filled with ``value(KEY, tid)``, ``data.trainId`` UINT64, ``data.key``.
"""

import sys

import numpy as np

from kbhash import Hash, HashType, Timestamp
from kbstream.broker import BrokerInstance
from kbstream.pipeline import OutputChannel

SHAPE = (16, 256, 64)


def value(key, tid):
    """The value every pixel of source ``key``'s item for train ``tid`` has."""
    return (tid % 1000) * 16 + key


def main():
    device, input_id, key = sys.argv[1], sys.argv[2], int(sys.argv[3])
    out = OutputChannel(f"{device}:daqOutput", hostname="127.0.0.1").start()
    inst = BrokerInstance(device, heartbeat_interval=10)
    inst.add_output_channel("daqOutput", out)
    try:
        inst.start()
        out.wait_for_inputs(copy=[input_id], timeout=120)
        print("READY", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] == "Q":
                break
            tid = int(cmd[1])
            h = Hash()
            h["data.adc"] = np.full(SHAPE, value(key, tid), dtype=np.uint16)
            h.set("data.trainId", tid, type=HashType.UINT64)
            h["data.key"] = key
            out.write(h, Timestamp.now(tid))
            out.update()
            print("SENT", tid, flush=True)
    finally:
        out.close()
        inst.close()


if __name__ == "__main__":
    main()
