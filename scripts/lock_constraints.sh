#!/usr/bin/env bash
# Write constraints.txt: the exact versions of every package in the venv the test suite passed in.
# `make install`, `make test` and .ci/run install with `-c constraints.txt`, so a new release of peft,
# transformers or bitsandbytes cannot turn main red overnight; `make test-latest` tries the newest ones.
# torch is left out (the Makefile's TORCH picks the CPU or a CUDA build), and so are the packages built or
# installed from outside PyPI's resolver (afina itself, llama-cpp-python: scripts/install_llama_cpp.sh pins it).
# Usage: scripts/lock_constraints.sh [.venv/bin/python]   (after a green `make test`)
set -euo pipefail
PYTHON=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
{
  echo "# Versions the test suite passed with (scripts/lock_constraints.sh wrote this on $(date -u +%Y-%m-%d),"
  echo "# Python $("$PYTHON" -c 'import platform; print(platform.python_version())')). Used as pip -c by the Makefile and CI."
  "$PYTHON" -m pip freeze --exclude-editable 2>/dev/null \
    | grep -v -i -E '^(torch|triton|nvidia-[a-z0-9-]+|llama[-_]cpp[-_]python|afina)( |=|@)' \
    | grep -v ' @ ' \
    | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned"
