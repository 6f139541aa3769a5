#!/bin/sh
# Prints the interpreter the virtualenv is made with: the newest CPython, 3.11 or newer, that
# this machine has, on PATH or installed by pyenv but not made its default. 3.13 runs the
# services' hot path cheaper than 3.11 (docs/architecture.md, "Runtime"); any of them works.
pyenv_pythons() {  # minor version, e.g. 13: pyenv's installs of 3.13, newest first
    root=${PYENV_ROOT:-$HOME/.pyenv}
    ls -d "$root"/versions/3."$1".*/bin/python3 2>/dev/null | sort -rV
}
for candidate in python3.13 $(pyenv_pythons 13) python3.12 $(pyenv_pythons 12) python3; do
    # A pyenv shim of a version that is installed but not selected fails here: skipped.
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "$candidate"
        exit 0
    fi
done
echo python3
