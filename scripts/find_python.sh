#!/bin/sh
# The Python `make setup` builds the venv with: a CPython 3.12 or 3.13 on PATH or under pyenv, else
# python3. CPython before 3.11.10 can hang a DataLoader worker as it forks in a multi-process run
# (gh-112275; docs/known-problems.md#worker-hangs-at-fork). `make PYTHON=...` overrides this.
for version in 3.12 3.13; do
    for python in "$(command -v "python$version")" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/"python$version"; do
        # A pyenv shim for a version that is not selected is on PATH but fails: try each one.
        if [ -x "$python" ] && "$python" -c "import venv" >/dev/null 2>&1; then
            echo "$python"
            exit 0
        fi
    done
done
echo python3
