#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#
#   bash scripts/test.sh [pytest arguments]
#
# 1. .venv (the project's Python, python3 by default or $PYTHON): kbstream built
#    from this tree with its compiled cores (pip install ".[test]"), plus the test
#    peers from PyPI (karabo-bridge, extra-data).
# 2. .venv-karabo (Python 3.12 through pyenv): Karabo's own karabo.cpp (karabind)
#    and karabo.native, which the interop tests drive as subprocesses.
# 3. RabbitMQ from Debian's packages (scripts/rabbitmq.sh), for the broker tests, which
#    start their own private broker on 127.0.0.1; no system-wide broker is left running.
# 4. The speed guards: a quick pytest-benchmark pass in the Python 3.12 environment
#    .venv-bench next to the real peers (karabind, karabo.native, karabo_bridge, raw pyzmq),
#    ratios checked against benchmarks/guards.json; the JSON stays in .benchmarks/guard.json.
# 5. pytest over tests/, strict, with Python's development mode on.  The command fails
#    if the tests or the speed guards fail.
# Re-running is cheap: existing environments are reused, kbstream is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

step() { printf '\n=== %s\n' "$*"; }

step "main environment (.venv)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip "setuptools>=77" wheel
.venv/bin/python -m pip install -q --disable-pip-version-check ".[test]"
.venv/bin/python -c "import kbhash, kbstream; print('kbhash backend:', kbhash.backend, '| kbstream backend:', kbstream.backend)"

step "Karabo side environment (.venv-karabo)"
bash scripts/karabo-env.sh .venv-karabo
export KBSTREAM_KARABO_PYTHON="$PWD/.venv-karabo/bin/python"

step "Karabo GUI environment (.venv-gui, Xvfb; scripts/gui-env.sh)"
bash scripts/gui-env.sh .venv-gui
export KBSTREAM_GUI_PYTHON="$PWD/.venv-gui/bin/python"

step "RabbitMQ (Debian package)"
bash scripts/rabbitmq.sh

step "speed guards (Python 3.12 with the real peers; scripts/bench.sh --guard)"
guard=0
if [[ "${KBSTREAM_SKIP_GUARDS:-0}" == 1 ]]; then
    echo "skipped: KBSTREAM_SKIP_GUARDS=1 (CI never sets it)"
else
    bash scripts/bench.sh --guard || guard=$?
fi

step "tests"
export PYTHONDEVMODE=1
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [[ $guard -ne 0 ]]; then
    echo "speed guards FAILED (see the table above the tests; benchmarks/README.md)" >&2
    [[ $status -ne 0 ]] || status=$guard
fi
exit $status
