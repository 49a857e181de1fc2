#!/usr/bin/env bash
# gui-env.sh DIR -- create (or check) the virtualenv of Karabo's Qt GUI for the GUI test.
#
# karabo-gui 3.1.2 (PyQt5) is kept apart from .venv-karabo: its Qt stack is large and its
# pins must not move the packages the other interop tests drive. It needs Python 3.12 too
# (found as in scripts/karabo-env.sh: $KARABO_PY312, else `PYENV_VERSION=3.12.1 pyenv which
# python3.12`, else `python3.12` on PATH).
#
# The GUI runs under Xvfb; PyQt5's xcb platform plugin links the X/GL/font libraries listed
# in APT_PACKAGES. As root with apt-get they are installed when missing (no service is
# started by any of them); otherwise the script says which are missing and goes on, so
# that the test reports it (it fails when CI is set, skips otherwise).
#
# Idempotent: a venv in which karabogui imports and whose libraries are present is left
# as it is. Point the tests at it with KBSTREAM_GUI_PYTHON=DIR/bin/python (DIR defaults
# to <repo>/.venv-gui, which the tests find on their own).
set -euo pipefail

GUI_PACKAGES=("karabo-gui==3.1.2")
CHECK='import karabogui, PyQt5.QtCore, sys; print(sys.version.split()[0], PyQt5.QtCore.QT_VERSION_STR)'
APT_PACKAGES=(xvfb libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0
              libxcb-render-util0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 libxcb-randr0
              libxcb-xfixes0 libgl1 libegl1 libfontconfig1 libdbus-1-3)

log() { printf 'gui-env: %s\n' "$*"; }
die() { printf 'gui-env: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $# -eq 1 && -n "$1" ]] || die "usage: $0 DIR   (e.g. $0 .venv-gui)"
DIR=$1

# 1. System libraries and Xvfb.
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get > /dev/null 2>&1; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
        log "missing system packages (needs root and apt-get): ${missing[*]}" >&2
    fi
else
    log "Xvfb and the Qt xcb libraries are installed"
fi

# 2. Already complete? Then there is nothing more to do.
if [[ -x "$DIR/bin/python" ]] && version=$("$DIR/bin/python" -c "$CHECK" 2>/dev/null); then
    log "$DIR is complete (Python, Qt: $version); nothing to do"
    exit 0
fi

# 3. Python 3.12 and the venv.
source "$(dirname "${BASH_SOURCE[0]}")/python312.sh"   # find_python312

if [[ ! -x "$DIR/bin/python" ]]; then
    PY312=$(find_python312) || die "no working Python 3.12 interpreter found (see scripts/karabo-env.sh)"
    log "creating venv $DIR with $PY312"
    "$PY312" -m venv "$DIR"
fi
log "installing ${GUI_PACKAGES[*]} into $DIR"
"$DIR/bin/python" -m pip install --disable-pip-version-check -q "${GUI_PACKAGES[@]}" \
    || die "pip install into $DIR failed"
version=$("$DIR/bin/python" -c "$CHECK") || die "karabo-gui installed but 'import karabogui' fails in $DIR"
log "done: $DIR (Python, Qt: $version)"
log "use it with: KBSTREAM_GUI_PYTHON=$DIR/bin/python (or keep it at <repo>/.venv-gui)"
