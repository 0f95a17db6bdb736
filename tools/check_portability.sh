#!/usr/bin/env bash
# Static portability checks of csrc/ for the platforms this machine cannot build for real:
#   1. aarch64 (Linux): every kernel file compiled to an aarch64 object by clang with OpenMP, the binding
#      files syntax-checked (needs Debian's libc6-dev-arm64-cross; skipped with a message without it).
#   2. MSVC: every kernel file syntax-checked by clang in MSVC mode (--target=x86_64-pc-windows-msvc,
#      -fms-compatibility, _MSC_VER defined) with OpenMP, VLAs an error. No Windows SDK here: stand-in
#      declarations of the few CRT functions the kernels use (tools/msvc_crt_stub). This checks the
#      language the kernels use and the MSVC branches of the preprocessor, not MSVC's own C front end.
#   3. OpenMP constructs: only those of OpenMP 2.0 (MSVC's /openmp), loop variables of `omp for` signed.
#   4. GCC-only extensions (__builtin_*, __attribute__, #pragma GCC, typeof, __int128) only inside the
#      guards listed below.
# Usage: bash tools/check_portability.sh      (exit status 1 on any finding)
set -euo pipefail
cd "$(dirname "$0")/../csrc"
here=$(pwd)
KERNELS="bn_plan.c bn_drive.c bn_merge.c bn_forward.c bn_backward.c bn_avx2.c bn_avx512.c bn_dispatch.c bn_masked.c"
BINDING="_module.c _args.c _layout.c"
fail=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! command -v clang >/dev/null 2>&1; then
    echo "check_portability: clang not found (apt-get install clang libomp-dev)" >&2
    exit 1
fi
clang_inc=$(clang -print-resource-dir)/include # clang's own stddef.h, stdint.h, float.h, omp.h

# --- 1. aarch64 ---
if [ -d /usr/aarch64-linux-gnu/include ]; then
    pyinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
    npinc=$(python3 -c "import numpy; print(numpy.get_include())" 2>/dev/null || true)
    for f in $KERNELS test_kernels.c; do
        clang --target=aarch64-linux-gnu -isystem /usr/aarch64-linux-gnu/include -std=c11 -O2 -fopenmp \
            -ffp-contract=off -Wall -Wextra -Werror -Wno-unused-parameter -c "$f" -o "$work/a64.o" ||
            { echo "check_portability: aarch64 compile of $f failed" >&2; fail=1; }
    done
    if [ -n "$npinc" ]; then
        for f in $BINDING; do
            clang --target=aarch64-linux-gnu -isystem /usr/aarch64-linux-gnu/include -I"$pyinc" -I"$npinc" \
                -DNPY_TARGET_VERSION=NPY_1_23_API_VERSION -std=c11 -fopenmp -Wall -Wextra -Werror \
                -Wno-unused-parameter -Wno-missing-field-initializers -fsyntax-only "$f" ||
                { echo "check_portability: aarch64 syntax check of $f failed" >&2; fail=1; }
        done
    fi
    echo "check_portability: aarch64: kernels compiled, binding syntax-checked"
else
    echo "check_portability: aarch64 SKIPPED (no /usr/aarch64-linux-gnu/include: apt-get install libc6-dev-arm64-cross)"
fi

# --- 2. MSVC mode ---
stub="$work/msvc_crt"
mkdir "$stub"
cat >"$stub/stdlib.h" <<'EOF'
#pragma once
#include <stddef.h>
void *malloc(size_t); void *calloc(size_t, size_t); void *realloc(void *, size_t); void free(void *);
char *getenv(const char *); void abort(void);
EOF
cat >"$stub/string.h" <<'EOF'
#pragma once
#include <stddef.h>
void *memcpy(void *, const void *, size_t); void *memset(void *, int, size_t); int strcmp(const char *, const char *);
EOF
cat >"$stub/math.h" <<'EOF'
#pragma once
double sqrt(double); double fabs(double);
double copysign(double, double); float copysignf(float, float); float fmaf(float, float, float); float fabsf(float);
/* the UCRT defines these as macros over _dclass/_dsign in C, and INFINITY and NAN as below */
int _dclass(double); int _dsign(double);
#define _HUGE_ENUF 1e+300
#define INFINITY ((float)(_HUGE_ENUF * _HUGE_ENUF))
#define NAN ((float)(INFINITY * 0.0F))
#define isfinite(x) (_dclass(x) <= 0)
#define signbit(x) (_dsign(x) != 0)
EOF
for f in $KERNELS; do
    clang --target=x86_64-pc-windows-msvc -fms-compatibility -fms-compatibility-version=19.29 -std=c11 \
        -fopenmp -nostdinc -isystem "$stub" -isystem "$clang_inc" -Wall -Wextra -Werror -Werror=vla \
        -Wno-unused-parameter -fsyntax-only "$f" ||
        { echo "check_portability: MSVC-mode syntax check of $f failed" >&2; fail=1; }
done
echo "check_portability: MSVC mode: kernels syntax-checked (stand-in CRT declarations)"

# --- 3. OpenMP 2.0 only ---
bad=$(grep -nE "(pragma|BN_PRAGMA)[ (]*omp" ./*.c ./*.h |
      grep -vE "omp (parallel|for|barrier|single|critical|atomic|master|flush)\b" || true)
bad+=$(grep -nE "(pragma|BN_PRAGMA)[ (]*omp" ./*.c ./*.h |
       grep -E "\b(simd|collapse|task|taskloop|declare|target|teams|ordered|proc_bind|depend)\b" || true)
if [ -n "$bad" ]; then echo "check_portability: OpenMP constructs beyond 2.0:"; echo "$bad"; fail=1; fi
# the line after each `omp for` is a loop over a signed integer type
loops=$(grep -nA1 -E "omp for" ./*.c ./*.h | grep -E "^\./[^:]+-[0-9]+-\s*for \(" || true)
badloops=$(echo "$loops" | grep -vE "for \((int|ptrdiff_t|long|long long|int64_t) " || true)
if [ -n "$loops" ] && [ -n "$badloops" ]; then echo "check_portability: omp for over a non-signed type:"; echo "$badloops"; fail=1; fi
echo "check_portability: OpenMP: $(grep -cE 'omp for' ./*.c | awk -F: '{s+=$2} END {print s}') omp for loops, signed indices, 2.0 constructs only"

# --- 4. GCC-only extensions, allowed only where guarded ---
# file:pattern pairs allowed (each sits inside #if BN_HAVE_AVX2 / __GNUC__ / __clang__ guards)
allowed="bn_internal.h:__attribute__((always_inline))|bn_dispatch.c:__builtin_cpu_init|bn_dispatch.c:__builtin_cpu_supports|bn_internal.h:__attribute__((noinline))|bn_avx2.c:#pragma GCC target|bn_avx512.c:#pragma GCC target|bn_avx2.c:__attribute__((target|bn_avx512.c:__attribute__((target|bn_internal.h:__attribute__((vector_size|bn_internal.h:__builtin_convertvector"
found=$(grep -nE "__builtin_|__attribute__|#pragma GCC|\btypeof\b|__typeof__|__int128" ./*.c ./*.h | grep -v "^\./test_kernels.c" || true)
while IFS= read -r line; do
    [ -n "$line" ] || continue
    file=${line%%:*}; file=${file#./}
    ok=0
    IFS='|' read -ra pats <<<"$allowed"
    for p in "${pats[@]}"; do
        if [ "${p%%:*}" = "$file" ] && [[ "$line" == *"${p#*:}"* ]]; then ok=1; fi
    done
    case "$line" in *"/*"*__builtin_*"*/"* | *"* "*__builtin*) ok=1 ;; esac # mentions in comments
    if [ "$ok" = 0 ]; then echo "check_portability: unguarded GCC extension: $line"; fail=1; fi
done <<<"$found"
echo "check_portability: GCC-only extensions only in their guarded places"
cd "$here"
if [ "$fail" != 0 ]; then echo "check_portability: FAILED" >&2; fi
exit "$fail"
