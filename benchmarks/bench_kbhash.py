"""kbhash codec speed, side by side with Karabo's own codecs in the same run.

Peers: karabind (``BinarySerializerHash`` save/load, C++) and karabo.native
(``encodeBinary``/``decodeBinary``, pure Python).  Both need Python 3.12, so this
file runs in the benchmark environment made by ``scripts/bench.sh``; where a
peer is missing its rows are skipped with a loud reason and only kbhash is
measured.

Every peer works on the same archive bytes: the Hash is built with kbhash,
encoded, and each peer gets its own native object by loading those bytes.
Each benchmark checks its result (``extra_info['correct']``).

Groups (``benchmark.group``): ``jungfrau-<size>`` for a detector-module Hash
(uint16 (N, 512, 1024) + 20 scalars; N = 1, 16, 64 -> 1, 16, 64 MiB) and
``control-500`` for 500 scalar/vector/string keys nested 3 deep with
attributes.  ``python benchmarks/ratios.py <json>`` prints the ratios.
"""

import numpy as np
import pytest

import kbhash
from kbhash import Hash, HashType, _pure

try:
    import karabind
except ImportError:  # pragma: no cover - depends on the environment
    karabind = None
try:
    from karabo import native as karabo_native
except ImportError:  # pragma: no cover
    karabo_native = None

NO_KARABIND = "!!! karabind (karabo.cpp) NOT INSTALLED: run benchmarks with scripts/bench.sh !!!"
NO_NATIVE = "!!! karabo.native NOT INSTALLED: run benchmarks with scripts/bench.sh !!!"


def jungfrau_hash(frames):
    rng = np.random.default_rng(0)
    h = Hash()
    h["data.adc"] = rng.integers(0, 2**14, size=(frames, 512, 1024), dtype=np.uint16)
    for i in range(20):
        if i % 4 == 0:
            h.set(f"header.k{i:02d}", i, type=HashType.UINT64)
        elif i % 4 == 1:
            h[f"header.k{i:02d}"] = i * 0.25
        elif i % 4 == 2:
            h[f"header.k{i:02d}"] = f"value-{i}"
        else:
            h[f"header.k{i:02d}"] = i
    h.set_timestamp("data", kbhash.Timestamp(1700000000, 0, 1000000000))
    return h


def control_hash():
    """500 leaves under 3 levels of nesting, with attributes on every leaf."""
    h = Hash()
    n = 0
    for a in range(5):
        for b in range(10):
            for c in range(10):
                path = f"dev{a}.group{b}.p{c}"
                kind = n % 5
                if kind == 0:
                    h[path] = n * 0.5
                elif kind == 1:
                    h[path] = n
                elif kind == 2:
                    h[path] = f"state-{n}"
                elif kind == 3:
                    h[path] = [n, n + 1, n + 2]
                else:
                    h[path] = n % 2 == 0
                h.set_attribute(path, "unit", "mm")
                h.set_timestamp(path, kbhash.Timestamp(1700000000, n, 1000 + n))
                n += 1
    return h


PAYLOADS = {
    "jungfrau-1MiB": lambda: jungfrau_hash(1),
    "jungfrau-16MiB": lambda: jungfrau_hash(16),
    "jungfrau-64MiB": lambda: jungfrau_hash(64),
    "control-500": control_hash,
}


@pytest.fixture(scope="module", params=list(PAYLOADS))
def payload(request):
    h = PAYLOADS[request.param]()
    data = kbhash.encode_bytes(h)
    return request.param, h, data


def _info(benchmark, group, library, op, nbytes, correct):
    benchmark.extra_info.update(library=library, op=op, bytes=nbytes, correct=bool(correct))
    assert correct


# ------------------------------------------------------------------ encode


def test_encode_kbhash(benchmark, payload):
    group, h, data = payload
    benchmark.group = group
    bufs = benchmark(kbhash.encode, h)
    _info(benchmark, group, "kbhash", "encode", len(data), b"".join(bytes(b) for b in bufs) == data)


def test_encode_bytes_kbhash(benchmark, payload):
    group, h, data = payload
    benchmark.group = group
    out = benchmark(kbhash.encode_bytes, h)
    _info(benchmark, group, "kbhash", "encode_bytes", len(data), out == data)


def test_encode_kbhash_pure(benchmark, payload):
    group, h, data = payload
    benchmark.group = group
    bufs = benchmark(_pure.encode, h)
    _info(benchmark, group, "kbhash-pure", "encode", len(data), b"".join(bytes(b) for b in bufs) == data)


def test_encode_karabind(benchmark, payload):
    if karabind is None:
        pytest.skip(NO_KARABIND)
    group, h, data = payload
    benchmark.group = group
    ser = karabind.BinarySerializerHash.create("Bin")
    kh = ser.load(data)
    out = benchmark(ser.save, kh)
    _info(benchmark, group, "karabind", "save", len(data), out == data)


def test_encode_karabo_native(benchmark, payload):
    if karabo_native is None:
        pytest.skip(NO_NATIVE)
    group, h, data = payload
    benchmark.group = group
    nh = karabo_native.decodeBinary(data)
    out = benchmark(karabo_native.encodeBinary, nh)
    _info(benchmark, group, "karabo.native", "encodeBinary", len(data), out == data)


# ------------------------------------------------------------------ decode


def test_decode_kbhash(benchmark, payload):
    group, h, data = payload
    benchmark.group = group
    out = benchmark(kbhash.decode, data)
    _info(benchmark, group, "kbhash", "decode", len(data), out == h)


def test_decode_kbhash_buffers(benchmark, payload):
    group, h, data = payload
    benchmark.group = group
    bufs = kbhash.encode(h)
    out = benchmark(kbhash.decode, bufs)
    _info(benchmark, group, "kbhash", "decode-buffers", len(data), out == h)


def test_decode_kbhash_pure(benchmark, payload):
    group, h, data = payload
    benchmark.group = group
    out = benchmark(_pure.decode, data)
    _info(benchmark, group, "kbhash-pure", "decode", len(data), out == h)


def test_decode_karabind(benchmark, payload):
    if karabind is None:
        pytest.skip(NO_KARABIND)
    group, h, data = payload
    benchmark.group = group
    ser = karabind.BinarySerializerHash.create("Bin")
    out = benchmark(ser.load, data)
    _info(benchmark, group, "karabind", "load", len(data), ser.save(out) == data)


def test_decode_karabo_native(benchmark, payload):
    if karabo_native is None:
        pytest.skip(NO_NATIVE)
    group, h, data = payload
    benchmark.group = group
    out = benchmark(karabo_native.decodeBinary, data)
    _info(benchmark, group, "karabo.native", "decodeBinary", len(data), karabo_native.encodeBinary(out) == data)


# ------------------------------------------------ typed building (HashTemplate)
#
# A pipeline data header as kbstream.pipeline.wire builds it for every message:
# per item its metadata (source + timestamp attributes) and its BufferSet layout,
# then the header.  Three ways, same bytes: "private" writes the Hash's internal
# dicts directly (how the wire layer did it before kbhash had a public way),
# "template" uses HashTemplate.build (what the wire layer does now), "from_typed"
# uses Hash.from_typed (the general entry-by-entry builder).  Groups
# ``pipeline-header-<items>``; ops ``build`` (the Hash only) and ``build+encode``
# (plus kbhash.encode_bytes of the header, as the wire layer does).

_U32, _U64 = int(HashType.UINT32), int(HashType.UINT64)
_VI32, _VU32, _VHASH = int(HashType.VECTOR_INT32), int(HashType.VECTOR_UINT32), int(HashType.VECTOR_HASH)
_TS_TYPES = {"sec": _U64, "frac": _U64, "tid": _U64}
_META = kbhash.HashTemplate([("source", None),
                             ("timestamp", None, [("sec", _U64), ("frac", _U64), ("tid", _U64)])])
_LAYOUT = kbhash.HashTemplate([("sizes", _VU32), ("types", _VI32)])
_HEADER = kbhash.HashTemplate([("sourceInfo", _VHASH), ("_bufferSetLayout_", _VHASH), ("nData", _U32),
                               ("byteSizes", _VU32)])


def _header_items(n):
    ts = kbhash.Timestamp(1700000000, 250_000_000_000_000_000, 10_000_000_000)
    return [(f"SPB_IRDA_JF4M/DET/JNGFR{i:02d}:daqOutput", ts, [1180, 16 * 512 * 1024 * 2, 236]) for i in range(n)]


def header_private(items):
    source_info, layouts, byte_sizes = [], [], []
    for source, ts, sizes in items:
        meta = Hash()
        meta._v["source"] = source
        meta._v["timestamp"] = True
        meta._a["timestamp"] = {"sec": ts.sec, "frac": ts.frac, "tid": ts.tid}
        meta._at["timestamp"] = {"sec": int(HashType.UINT64), "frac": int(HashType.UINT64), "tid": int(HashType.UINT64)}
        source_info.append(meta)
        lay = Hash()
        lay._v["sizes"] = sizes
        lay._t["sizes"] = int(HashType.VECTOR_UINT32)
        lay._v["types"] = [i % 2 for i in range(len(sizes))]
        lay._t["types"] = int(HashType.VECTOR_INT32)
        layouts.append(lay)
        byte_sizes.append(sum(sizes))
    header = Hash()
    header._v["sourceInfo"] = source_info
    header._t["sourceInfo"] = int(HashType.VECTOR_HASH)
    header._v["_bufferSetLayout_"] = layouts
    header._t["_bufferSetLayout_"] = int(HashType.VECTOR_HASH)
    header._v["nData"] = len(items)
    header._t["nData"] = int(HashType.UINT32)
    header._v["byteSizes"] = byte_sizes
    header._t["byteSizes"] = int(HashType.VECTOR_UINT32)
    return header


def header_template(items):
    source_info, layouts, byte_sizes = [], [], []
    for source, ts, sizes in items:
        source_info.append(_META.build({"source": source, "timestamp": True},
                                       {"timestamp": {"sec": ts.sec, "frac": ts.frac, "tid": ts.tid}}))
        layouts.append(_LAYOUT.build({"sizes": sizes, "types": [i % 2 for i in range(len(sizes))]}))
        byte_sizes.append(sum(sizes))
    return _HEADER.build({"sourceInfo": source_info, "_bufferSetLayout_": layouts, "nData": len(items),
                          "byteSizes": byte_sizes})


def header_from_typed(items):
    source_info, layouts, byte_sizes = [], [], []
    for source, ts, sizes in items:
        source_info.append(Hash.from_typed((
            ("source", source, None),
            ("timestamp", True, None, {"sec": ts.sec, "frac": ts.frac, "tid": ts.tid}, _TS_TYPES),
        )))
        layouts.append(Hash.from_typed((
            ("sizes", sizes, _VU32),
            ("types", [i % 2 for i in range(len(sizes))], _VI32),
        )))
        byte_sizes.append(sum(sizes))
    return Hash.from_typed((
        ("sourceInfo", source_info, _VHASH),
        ("_bufferSetLayout_", layouts, _VHASH),
        ("nData", len(items), _U32),
        ("byteSizes", byte_sizes, _VU32),
    ))


HEADER_WAYS = {"private": header_private, "template": header_template, "from_typed": header_from_typed}


@pytest.mark.parametrize("way", list(HEADER_WAYS))
@pytest.mark.parametrize("nitems", [1, 16])
@pytest.mark.parametrize("op", ["build", "build+encode"])
def test_pipeline_header(benchmark, way, nitems, op):
    items = _header_items(nitems)
    build = HEADER_WAYS[way]
    reference = kbhash.encode_bytes(header_private(items))
    benchmark.group = f"pipeline-header-{nitems}"
    if op == "build":
        out = kbhash.encode_bytes(benchmark(build, items))
    else:
        out = benchmark(lambda: kbhash.encode_bytes(build(items)))
    _info(benchmark, benchmark.group, f"kbhash-{way}", op, len(reference), out == reference)
