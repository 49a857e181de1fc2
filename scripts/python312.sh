# Sourced by karabo-env.sh, gui-env.sh and bench.sh: find_python312 prints a working
# Python 3.12 interpreter ($KARABO_PY312, pyenv's 3.12.1, or python3.12 on PATH) or
# returns 1.  Karabo 3.1.2's wheels exist only for Python 3.12.
find_python312() {
    local candidate=""
    if [[ -n "${KARABO_PY312:-}" ]]; then
        candidate=$KARABO_PY312
    elif command -v pyenv >/dev/null 2>&1 &&
         candidate=$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null) &&
         [[ -n "$candidate" ]]; then
        :
    elif command -v python3.12 >/dev/null 2>&1; then
        candidate=$(command -v python3.12)
    else
        return 1
    fi
    # pyenv shims may exist without a working 3.12 behind them: check it really runs.
    "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
        >/dev/null 2>&1 || return 1
    printf '%s\n' "$candidate"
}
