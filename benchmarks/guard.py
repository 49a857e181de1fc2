"""Check speed ratios in a pytest-benchmark JSON file against floors (used by CI).

    python benchmarks/guard.py RESULT.json [--guards benchmarks/guards.json]

Each guard of ``guards.json`` names a benchmark group, the kbstream row and the peer row
(``[library, op]``; op ``null`` = any) and a metric: ``time`` compares medians (peer time /
kbstream time), ``rate`` compares ``extra_info["items_per_s"]`` (kbstream rate / peer
rate); above 1 means kbstream is faster.  Prints one line per guard and exits 1 when a
ratio is below its floor or a row is missing (the benchmark did not run), else 0.
"""

import argparse
import json
import sys
from pathlib import Path


def _row(rows, library, op):
    for b in rows:
        info = b.get("extra_info", {})
        if info.get("library") == library and (op is None or info.get("op") == op):
            return b
    return None


def check(result, guards):
    """``[(guard, ratio or None, ok)]`` for every guard."""
    by_group = {}
    for b in result["benchmarks"]:
        by_group.setdefault(b["group"], []).append(b)
    out = []
    for g in guards:
        rows = by_group.get(g["group"], [])
        ours, peer = _row(rows, *g["ours"]), _row(rows, *g["peer"])
        ratio = None
        if ours is not None and peer is not None:
            if g["metric"] == "time":
                ratio = peer["stats"]["median"] / ours["stats"]["median"]
            else:
                ratio = ours["extra_info"]["items_per_s"] / peer["extra_info"]["items_per_s"]
        out.append((g, ratio, ratio is not None and ratio >= g["floor"]))
    return out


def main(argv=None):
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="pytest-benchmark JSON (--benchmark-json)")
    ap.add_argument("--guards", default=str(here / "guards.json"))
    args = ap.parse_args(argv)
    with open(args.result) as f:
        result = json.load(f)
    with open(args.guards) as f:
        guards = json.load(f)["guards"]
    failed = 0
    print(f"{'guard':76s} {'ratio':>9s} {'floor':>7s} {'today':>7s}")
    for g, ratio, ok in check(result, guards):
        shown = "missing" if ratio is None else f"{ratio:8.2f}x"
        mark = "ok" if ok else "FAIL"
        print(f"{g['name']:76s} {shown:>9s} {g['floor']:>6}x {g['today']:>6}x  {mark}")
        failed += not ok
    print(f"speed guards: {len(guards) - failed} of {len(guards)} at or above their floors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
