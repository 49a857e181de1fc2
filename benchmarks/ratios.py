"""Print speed ratios from a pytest-benchmark JSON file.

    python benchmarks/ratios.py .benchmarks/latest.json

For every benchmark group, each kbstream/kbhash row is compared with every
peer row of the same operation kind (encode vs save/encodeBinary, decode vs
load/decodeBinary, ...): ratio = peer median / our median, so > 1 means we are
faster.  Rows carry ``extra_info`` ``library`` and ``op``.
"""

import json
import sys
from collections import defaultdict

OURS = ("kbhash", "kbstream")


def kind(op):
    op = op.lower()
    for k in ("encode", "save", "serialize", "send"):
        if k in op:
            return "out"
    for k in ("decode", "load", "deserialize", "recv"):
        if k in op:
            return "in"
    return op


def main(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        groups[b["group"]].append((info.get("library", "?"), info.get("op", b["name"]), b["stats"]["median"], b["name"]))
    for group in sorted(groups):
        rows = groups[group]
        print(f"\n## {group}")
        for lib, op, med, name in sorted(rows, key=lambda r: (kind(r[1]), r[0])):
            print(f"  {lib:16s} {op:18s} median {med * 1e6:12.1f} us   ({name})")
        for lib, op, med, _ in rows:
            if lib not in OURS:
                continue
            for plib, pop, pmed, _ in rows:
                if plib in OURS or plib.startswith("kbhash-") or kind(pop) != kind(op):
                    continue
                print(f"  ratio {lib} {op} vs {plib} {pop}: {pmed / med:8.1f}x")


if __name__ == "__main__":
    main(sys.argv[1])
