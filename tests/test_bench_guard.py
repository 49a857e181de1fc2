"""The CI speed guard (benchmarks/guard.py) passes today's figures and fails a slowdown."""

import json
import subprocess
import sys
from pathlib import Path

GUARD = Path(__file__).resolve().parents[1] / "benchmarks" / "guard.py"
GUARDS = json.loads((GUARD.parent / "guards.json").read_text())["guards"]


def _result(slow=None, factor=1.0):
    """A benchmark JSON where every guard sits at its 'today' ratio; the kbstream rows of
    groups named in ``slow`` are ``factor`` times slower."""
    rows = []
    for g in GUARDS:
        k = factor if slow and g["group"] in slow else 1.0
        if g["metric"] == "time":
            ours, peer = {"median": 1.0 * k}, {"median": g["today"]}
            oi, pi = {}, {}
        else:
            ours, peer = {"median": 1.0}, {"median": 1.0}
            oi, pi = {"items_per_s": g["today"] / k}, {"items_per_s": 1.0}
        rows.append({"group": g["group"], "stats": ours,
                     "extra_info": {"library": g["ours"][0], "op": g["ours"][1], **oi}})
        rows.append({"group": g["group"], "stats": peer,
                     "extra_info": {"library": g["peer"][0], "op": g["peer"][1], **pi}})
    return {"benchmarks": rows}


def _run(tmp_path, result):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    return subprocess.run([sys.executable, str(GUARD), str(path)], capture_output=True,
                          text=True)


def test_todays_figures_pass(tmp_path):
    out = _run(tmp_path, _result())
    assert out.returncode == 0, out.stdout
    assert f"speed guards: {len(GUARDS)} of {len(GUARDS)} at or above their floors" in out.stdout


def test_every_floor_is_well_below_today():
    for g in GUARDS:
        assert 0 < g["floor"] <= 0.6 * g["today"], g["name"]


def test_a_codec_three_times_slower_fails(tmp_path):
    out = _run(tmp_path, _result(slow={"codec-jf4m-2.2-ser", "control-500"}, factor=3.0))
    assert out.returncode == 1
    failed = [line for line in out.stdout.splitlines() if line.endswith("FAIL")]
    assert any("bridge serialize JF4M 2.2" in line for line in failed)
    assert any("control Hash vs karabind" in line for line in failed)


def test_a_missing_benchmark_fails(tmp_path):
    result = _result()
    result["benchmarks"] = [b for b in result["benchmarks"] if b["group"] != "e2e-jf4m-REP"]
    out = _run(tmp_path, result)
    assert out.returncode == 1 and "missing" in out.stdout
