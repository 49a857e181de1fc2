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
# 4. pytest over tests/, strict, with Python's development mode on.
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

step "RabbitMQ (Debian package)"
bash scripts/rabbitmq.sh

step "tests"
export PYTHONDEVMODE=1
exec .venv/bin/python -m pytest "$@"
