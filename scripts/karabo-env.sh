#!/usr/bin/env bash
# karabo-env.sh DIR -- create (or check) the side virtualenv for Karabo's own packages.
#
# karabo.cpp (module karabind) and karabo.native 3.1.2 ship wheels for Python >= 3.12
# only, while kbstream's test suite runs under the project's interpreter. The interop
# tests therefore drive them as subprocesses of a separate Python 3.12 virtualenv
# (tests/peers/karabo_driver.py, run with DIR/bin/python).
#
# The script is idempotent: when DIR already holds a venv in which karabind,
# karabo.native and numpy import, it only reports that and exits.
#
# Interpreter lookup: $KARABO_PY312 if set, else `PYENV_VERSION=3.12.1 pyenv which
# python3.12`, else `python3.12` on PATH.
#
# Point the tests at the result with KBSTREAM_KARABO_PYTHON=DIR/bin/python (DIR
# defaults to <repo>/.venv-karabo, which the tests find on their own).
set -euo pipefail

KARABO_PACKAGES=("karabo.cpp==3.1.2" "karabo.native==3.1.2" "numpy")
# the middle layer, karabind's bound API and the DAQ stand-in (tests/broker/test_mdl_*.py)
KARABO_PACKAGES+=("karabo-karathon==3.1.2" "karabo-bound==3.1.2" "karabo-hdf5writer==3.0.1")
# the middle-layer test devices (entry points karabo.middlelayer_device), from this tree
KARABO_PACKAGES+=("$(cd "$(dirname "$0")/.." && pwd)/tests/peers/mdl")
CHECK='import karabind, karabo.native, numpy, sys; print(sys.version.split()[0])'
CHECK+='; import karabo.middlelayer, karabo.bound, karabo_hdf5writer, kbpeers_mdl'

log() { printf 'karabo-env: %s\n' "$*"; }
die() { printf 'karabo-env: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || die "usage: $0 DIR   (e.g. $0 .venv-karabo)"
DIR=$1

# 1. Already complete? Then there is nothing to do.
if [[ -x "$DIR/bin/python" ]]; then
    if version=$("$DIR/bin/python" -c "$CHECK" 2>/dev/null); then
        log "$DIR is complete (Python $version; karabind, karabo.native, numpy import); nothing to do"
        exit 0
    fi
    log "$DIR exists but the Karabo packages do not import; completing it"
fi

# 2. Find a Python 3.12 interpreter.
source "$(dirname "${BASH_SOURCE[0]}")/python312.sh"   # find_python312

if [[ ! -x "$DIR/bin/python" ]]; then
    PY312=$(find_python312) || die "no working Python 3.12 interpreter found.
  Tried: \$KARABO_PY312, 'PYENV_VERSION=3.12.1 pyenv which python3.12', 'python3.12' on PATH.
  Install one (e.g. 'pyenv install 3.12.1') or set KARABO_PY312=/path/to/python3.12."
    log "creating venv $DIR with $PY312"
    "$PY312" -m venv "$DIR"
else
    log "reusing venv $DIR"
fi

# 3. Install the packages.
log "installing ${KARABO_PACKAGES[*]} into $DIR"
"$DIR/bin/python" -m pip install --disable-pip-version-check -q "${KARABO_PACKAGES[@]}" \
    || die "pip install into $DIR failed"

# 4. Verify.
version=$("$DIR/bin/python" -c "$CHECK") \
    || die "packages installed but 'import karabind, karabo.native' fails in $DIR"
installed=$("$DIR/bin/python" -m pip list --disable-pip-version-check 2>/dev/null |
            grep -Ei '^(karabo|numpy)' | tr -s ' ' | paste -sd, -)
log "done: $DIR (Python $version) with $installed"
log "use it with: KBSTREAM_KARABO_PYTHON=$DIR/bin/python (or keep it at <repo>/.venv-karabo)"
