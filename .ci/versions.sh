#!/usr/bin/env bash
# CI step: the supported Pythons and NumPys (noxfile.py; pyenv's interpreters 3.9-3.13 on these machines).
# A full session takes 6-10 minutes here, a session with a few test files about 4 (its venv, wheel build
# and test extras), so CI runs a stated subset of the ten (README, "Installing"):
#   - the whole suite on the oldest combination, Python 3.9 with NumPy 1.23.0 (the main step runs it on
#     Python 3.11 with the newest NumPy);
#   - Python 3.12 with its oldest NumPy (1.26) and 3.13 with the newest, on the functional API, the
#     phases, the fused epilogues, the errors and the release tests;
#   - not in CI (CI's 90 minutes: the whole .ci/run took about an hour on a loaded 2-core machine with all
#     ten): 3.10 and 3.11 with their oldest NumPy, 3.13 with its oldest, and the newest NumPy on 3.9-3.12
#     (run by hand with `nox`).
# Every session builds its own wheel from an sdist against NumPy 2 first. `nox` runs them all.

set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
took() { echo "versions.sh: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q nox
nox=("$work/venv/bin/nox" --envdir "$work/nox" --no-reuse-existing-virtualenvs)
status=0
"${nox[@]}" -s "tests-3.9(numpy='oldest')" -- tests || status=1
took "Python 3.9, NumPy 1.23.0: the suite"
subset=(tests/test_functional.py tests/test_phases.py tests/test_fused.py tests/test_errors.py tests/test_release.py)
"${nox[@]}" -s "tests-3.12(numpy='oldest')" "tests-3.13(numpy='newest')" -- "${subset[@]}" || status=1
took "two more sessions: ${subset[*]}"
exit "$status"
