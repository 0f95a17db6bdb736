#!/usr/bin/env bash
# CI step: the other builds of the package, each with the test suite, and bit-identity across compilers.
#   1. clang + libomp (Debian's clang, libomp-dev; installed here when missing): the kernels' C test
#      (make -C csrc test, without sanitizers), the package built with CC=clang, its show_config checked
#      (OpenMP and AVX-512/AVX2 as in the GCC build), the suite run against it.
#   2. bit-identity: a GCC build and the clang build run tools/bit_identity.py (every call, dtype, layout,
#      SIMD path and thread count), the clang build's outputs compared bit for bit with GCC's.
#   3. a build without OpenMP (BATCHNORM_NO_OPENMP=1): the suite against it.
#   4. tools/check_portability.sh: aarch64 and MSVC-mode compiles, OpenMP 2.0, guarded GCC extensions.
# Each build is made from its own copy of the sources (setuptools would reuse objects another compiler
# made in build/). No torch here: the PyTorch parity tests run in the main step.
#
# Usage: bash .ci/compilers.sh [pytest arguments for steps 1 and 3]   (default: the whole suite)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
t0=$SECONDS
took() { echo "compilers.sh: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }
export DEBIAN_FRONTEND=noninteractive

if ! command -v clang >/dev/null 2>&1 || ! [ -e "$(clang -print-resource-dir)/include/omp.h" ] ||
    ! [ -d /usr/aarch64-linux-gnu/include ]; then
    # root on the CI machine; apt-get update only when the lists are too old to find the packages
    pkgs="clang libomp-dev libc6-dev-arm64-cross"
    timeout 600 apt-get install -y -q $pkgs </dev/null >/dev/null ||
        { timeout 300 apt-get update -q </dev/null >/dev/null && timeout 600 apt-get install -y -q $pkgs </dev/null >/dev/null; }
fi
clang --version | head -1
took "clang + libomp install check"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
copy() { # a fresh copy of the sources (no build/, venvs or in-place extension) in $1
    mkdir -p "$1"
    tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./.nox --exclude=./build --exclude='./*.egg-info' \
        --exclude='*.so' -cf - . | tar -C "$1" -xf -
}
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "numpy>=2" setuptools wheel
status=0

# --- 1. clang ---
copy "$work/clang-c"
make -s -C "$work/clang-c/csrc" CC=clang CFLAGS="-std=c11 -O2 -g -ffp-contract=off -Wall -Wextra -Wshadow -fopenmp" test
took "C test with clang (make -C csrc test)"
copy "$work/clang"
CC=clang python -m pip install -q --no-build-isolation "$work/clang[test]"
python - <<'EOF'
import batchnorm, batchnorm._core as core, subprocess, sys
info = core._build_info()
print("compilers.sh: clang build:", info)
gcc_simd = None
if not info["compiler"].startswith("clang"):
    sys.exit("compilers.sh: the build is not clang's")
if not info["openmp"]:
    sys.exit("compilers.sh: the clang build has no OpenMP")
cpu = open("/proc/cpuinfo").read()
want = "avx512" if (" avx512f" in cpu and " avx512vl" in cpu) else "avx2" if " avx2" in cpu else None
if want and info["simd"] != want:
    sys.exit(f"compilers.sh: the clang build runs {info['simd']!r} on a CPU with {want}")
batchnorm.show_config()
EOF
took "clang build"
(cd "$work" && python -m pytest -q -p no:cacheprovider "${@:-$work/clang/tests}") || status=1
took "suite against the clang build"

# --- 2. bit-identity, GCC against clang ---
copy "$work/gcc"
(cd "$work/gcc" && CC=gcc python setup.py -q build_ext --inplace >/dev/null 2>&1) ||
    { echo "compilers.sh: GCC build failed" >&2; exit 1; }
(cd "$work" && PYTHONPATH="$work/gcc/python" python "$root/tools/bit_identity.py" write "$work/gcc.npz") || status=1
(cd "$work" && python "$root/tools/bit_identity.py" compare "$work/gcc.npz") || status=1
took "bit-identity GCC vs clang"

# --- 3. no OpenMP ---
copy "$work/serial"
BATCHNORM_NO_OPENMP=1 python -m pip install -q --no-build-isolation --force-reinstall --no-deps "$work/serial"
python -c "import batchnorm._core as c, sys; i = c._build_info(); print('compilers.sh: serial build:', i); sys.exit(i['openmp'])"
(cd "$work" && python -m pytest -q -p no:cacheprovider "${@:-$work/serial/tests}") || status=1
took "suite against the build without OpenMP"

# --- 4. static portability checks ---
bash "$root/tools/check_portability.sh" || status=1
took "portability checks"
exit "$status"
