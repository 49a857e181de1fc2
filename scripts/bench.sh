#!/usr/bin/env bash
# Run the benchmarks with every peer in one process.
#
#   bash scripts/bench.sh [pytest arguments, e.g. benchmarks/bench_kbhash.py]
#
# Karabo's own codecs and channels (karabo.cpp, karabo.native) exist for
# Python 3.12 only, so the benchmarks run in .venv-bench, a Python 3.12
# environment with kbstream (built from this tree), karabind, karabo.native,
# karabo-bridge and extra-data.  Results go to .benchmarks/ as JSON; ratios:
#   .venv-bench/bin/python benchmarks/ratios.py .benchmarks/latest.json
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv-bench/bin/python ]]; then
    PY312=${KARABO_PY312:-$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || command -v python3.12)}
    [[ -n "$PY312" ]] || { echo "bench: no Python 3.12 found (pyenv 3.12.1 or python3.12)" >&2; exit 1; }
    "$PY312" -m venv .venv-bench
fi
.venv-bench/bin/python -m pip install -q --disable-pip-version-check -U pip "setuptools>=77" wheel
.venv-bench/bin/python -m pip install -q --disable-pip-version-check \
    "karabo.cpp==3.1.2" "karabo.native==3.1.2" ".[test]" psutil
mkdir -p .benchmarks
args=("$@")
[[ ${#args[@]} -gt 0 ]] || args=(benchmarks)
exec .venv-bench/bin/python -m pytest -p no:cacheprovider -o addopts="" -o filterwarnings= \
    --benchmark-json=.benchmarks/latest.json --benchmark-min-rounds=5 "${args[@]}"
