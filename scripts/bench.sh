#!/usr/bin/env bash
# Run the benchmarks with every peer in one process.
#
#   bash scripts/bench.sh [pytest arguments, e.g. benchmarks/bench_kbhash.py]
#   bash scripts/bench.sh --guard      # the quick guard pass that CI runs
#
# Karabo's own codecs and channels (karabo.cpp, karabo.native) exist for
# Python 3.12 only, so the benchmarks run in .venv-bench, a Python 3.12
# environment with kbstream (built from this tree), karabind, karabo.native,
# karabo-bridge and extra-data.  Results go to .benchmarks/ as JSON; ratios:
#   .venv-bench/bin/python benchmarks/ratios.py .benchmarks/latest.json
#
# --guard measures kbhash (JUNGFRAU 16 MiB, control Hash), the bridge codec and
# end to end (JF4M) and the pipeline (16 MiB copy/wait), each next to its peer in the
# same run, writes .benchmarks/guard.json and checks the ratios against the floors
# of benchmarks/guards.json (benchmarks/README.md says how to read and move them).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv-bench/bin/python ]]; then
    source scripts/python312.sh   # find_python312 (the working directory is the repository)
    PY312=$(find_python312) || { echo "bench: no working Python 3.12 found (\$KARABO_PY312, pyenv 3.12.1 or python3.12)" >&2; exit 1; }
    "$PY312" -m venv .venv-bench
fi
.venv-bench/bin/python -m pip install -q --disable-pip-version-check -U pip "setuptools>=77" wheel
.venv-bench/bin/python -m pip install -q --disable-pip-version-check \
    "karabo.cpp==3.1.2" "karabo.native==3.1.2" ".[test]" psutil
mkdir -p .benchmarks
export KBSTREAM_KARABO_PYTHON=${KBSTREAM_KARABO_PYTHON:-$PWD/.venv-karabo/bin/python}
PYTEST=(.venv-bench/bin/python -m pytest -p no:cacheprovider -o addopts="" -o filterwarnings=)

if [[ "${1:-}" == "--guard" ]]; then
    "${PYTEST[@]}" -q --benchmark-json=.benchmarks/guard.json --benchmark-min-rounds=5 \
        --benchmark-columns=min,median,max,rounds \
        benchmarks/bench_kbhash.py benchmarks/bench_bridge.py benchmarks/bench_pipeline.py \
        -k "(jungfrau-16MiB or control-500 or jf4m or kbstream_to or karabind_to) and not pure and not allchange and not pipeline_header and not 4_shared"
    exec .venv-bench/bin/python benchmarks/guard.py .benchmarks/guard.json
fi

args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(benchmarks)
exec "${PYTEST[@]}" --benchmark-json=.benchmarks/latest.json --benchmark-min-rounds=5 "${args[@]}"
