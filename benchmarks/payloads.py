"""Bridge payloads for the benchmarks: JUNGFRAU module trains and a stream of them.

"module" = one JUNGFRAU module train: ``data.adc`` uint16 (16, 512, 1024) (random) + 20
scalar keys; "jf4m" = 8 such sources (134 MB per train).  Used by the pytest fixtures
(conftest.py) and by the end-to-end worker processes (_e2e_worker.py).
"""

import numpy as np


def _module_source(rng):
    d = {"data.adc": rng.integers(0, 16384, (16, 512, 1024), dtype=np.uint16)}
    for i in range(8):
        d[f"header.int{i}"] = i * 1000 + 7
    for i in range(6):
        d[f"header.float{i}"] = i * 0.5 + 0.25
    for i in range(4):
        d[f"header.str{i}"] = f"value-{i}"
    d["data.trainId"] = 10_000_000_000
    d["data.valid"] = True
    return d


def _meta(src, tid=10_000_000_000):
    return {"source": src, "timestamp": 1.7e9, "timestamp.sec": "1700000000",
            "timestamp.frac": "250000000000000000", "timestamp.tid": tid}


def make_train(nsources, seed=0):
    rng = np.random.default_rng(seed)
    srcs = [f"SPB_IRDA_JF4M/DET/JNGFR{i:02d}:daqOutput" for i in range(1, nsources + 1)]
    return {s: _module_source(rng) for s in srcs}, {s: _meta(s) for s in srcs}


def later_train(data, k, all_scalars=False):
    """Train ``k`` after ``data`` (same array objects): the train id and the timestamps
    change, as in every train of a live stream; with ``all_scalars`` every other scalar
    changes too (new random ints, floats, strings and bools each train)."""
    tid = 10_000_000_000 + k
    rng = np.random.default_rng(1000 + k)
    out, meta = {}, {}
    for src, props in data.items():
        p = dict(props)
        if all_scalars:
            for key, v in p.items():
                if isinstance(v, bool):
                    p[key] = bool(rng.integers(2))
                elif isinstance(v, int):
                    p[key] = int(rng.integers(0, 1 << 40))
                elif isinstance(v, float):
                    p[key] = float(rng.random())
                elif isinstance(v, str):
                    p[key] = f"value-{rng.integers(1000):03d}"
        p["data.trainId"] = tid
        out[src] = p
        meta[src] = {"source": src, "timestamp": 1.7e9 + k / 10,
                     "timestamp.sec": str(1_700_000_000 + k // 10),
                     "timestamp.frac": f"{(k % 10) * 10**17:018d}", "timestamp.tid": tid}
    return out, meta
