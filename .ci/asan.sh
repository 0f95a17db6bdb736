#!/usr/bin/env bash
# CI step after the main test command: the extension built with AddressSanitizer and UBSan (gcc's), and
# the test suite run under it. Any sanitizer report makes the step fail.
#
# The Python interpreter is not built with ASan, so the runtimes are preloaded (LD_PRELOAD) and leak
# detection is off (the interpreter keeps memory until exit by design). UBSan errors are fatal
# (-fno-sanitize-recover=undefined, halt_on_error=1). The whole suite runs, with the test extras (so the
# MPI, notebook and demo tests' subprocesses load the sanitized extension too) but without torch: its
# parity tests are skipped here. About 5 minutes on a 2-core machine, 3.5 of them in pytest.
#
# Usage: bash .ci/asan.sh [pytest arguments]   (default: the whole suite, as the main step runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if ! command -v gcc >/dev/null 2>&1; then
    echo "asan.sh: gcc not found; the sanitizer step needs gcc's libasan and libubsan" >&2
    exit 1
fi
libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
for lib in "$libasan" "$libubsan"; do
    if [ ! -e "$lib" ]; then
        echo "asan.sh: $lib not found (gcc -print-file-name gave a bare name: runtime not installed)" >&2
        exit 1
    fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Build from a copy of the sources: setuptools would otherwise reuse the main step's unsanitized objects
# in build/ (it does not track compiler flags).
mkdir "$work/src"
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='./*.egg-info' -cf - . |
    tar -C "$work/src" -xf -

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
CC=gcc BATCHNORM_CFLAGS="$san -g" BATCHNORM_LDFLAGS="-fsanitize=address,undefined" \
    python -m pip install -q --no-cache-dir "$work/src[test]"

# ASan's reports go to files as well (a test's subprocess may have its output captured, or its failure
# expected): any file there fails the step, whatever pytest says. UBSan (gcc's) ignores log_path: its
# reports go to stderr, which --capture=sys leaves uncaptured, and abort the process that hit them.
reports="$work/reports"
mkdir "$reports"
export LD_PRELOAD="$libasan:$libubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_string_checks=1:log_path=$reports/asan"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYTHONMALLOC=malloc # every Python allocation through malloc, so ASan sees those too

cd "$work/src"
# The installed (sanitized) package must be the one imported, not a stray build.
python - <<'EOF'
import batchnorm, batchnorm._core as core, subprocess, sys
print("asan.sh: testing", core.__file__)
ldd = subprocess.run(["ldd", core.__file__], capture_output=True, text=True).stdout
if "libasan" not in ldd or "libubsan" not in ldd:
    sys.exit("asan.sh: the extension is not linked against libasan and libubsan:\n" + ldd)
EOF

status=0
python -m pytest -q -p no:cacheprovider --capture=sys "$@" || status=$?
if [ -n "$(ls -A "$reports")" ]; then
    for f in "$reports"/*; do
        echo "=== sanitizer report $(basename "$f") ===" >&2
        cat "$f" >&2
    done
    echo "asan.sh: FAILED: sanitizer reports above (pytest exit status $status)" >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then echo "asan.sh: FAILED: pytest exit status $status" >&2; fi
exit "$status"
