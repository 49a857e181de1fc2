"""karabind's device schema of a C++-style output and input channel (side interpreter).

Run with the Python 3.12 side interpreter (karabind). Builds, with karabind's own schema
elements, a device schema with

* ``output``: ``OUTPUT_CHANNEL`` whose data schema is the one of
  tests/broker/test_device_schema.py (``DATA``): node ``node`` (daqDataType TRAIN) with an
  INT32, a STRING, a UINT64, a VECTOR_INT64 (maxSize 100), an NDArray float32 (100, 200)
  and an ImageData uint16 (400, 500);
* ``input``: ``INPUT_CHANNEL`` with Karabo's defaults;

puts it into ``Hash("schema", <Schema>)``, serializes that with karabind's binary
serializer and prints the bytes as hex on one line. A second line has the output channel's
data schema serialized the same way (``Hash("schema", dataSchema)``).
"""

import sys

import karabind as kb


def data_schema():
    d = kb.Schema()
    kb.NODE_ELEMENT(d).key("node").setDaqDataType(kb.Schema.DaqDataType.TRAIN).commit()
    kb.INT32_ELEMENT(d).key("node.int32").readOnly().commit()
    kb.STRING_ELEMENT(d).key("node.string").readOnly().commit()
    kb.UINT64_ELEMENT(d).key("node.trainId").readOnly().commit()
    kb.VECTOR_INT64_ELEMENT(d).key("node.vecInt64").maxSize(100).readOnly().commit()
    kb.NDARRAY_ELEMENT(d).key("node.ndarray").shape("100,200").dtype(kb.Types.FLOAT).commit()
    kb.IMAGEDATA_ELEMENT(d).key("node.image").setDimensions("400,500") \
        .setType(kb.Types.UINT16).commit()
    return d


def main():
    ser = kb.BinarySerializerHash.create("Bin")
    dev = kb.Schema("KbStreamProbe")
    data = data_schema()
    kb.OUTPUT_CHANNEL(dev).key("output").dataSchema(data).commit()
    kb.INPUT_CHANNEL(dev).key("input").commit()
    sys.stdout.write(bytes(ser.save(kb.Hash("schema", dev))).hex() + "\n")
    sys.stdout.write(bytes(ser.save(kb.Hash("schema", data))).hex() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
