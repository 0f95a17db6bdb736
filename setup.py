"""Build of the C extension batchnorm._core, with OpenMP when the compiler has it.

OpenMP is probed by compiling and running a tiny program with the flag for this compiler (the way
astropy's extension-helpers does); when that fails the package is built serially, with a warning.
Set BATCHNORM_NO_OPENMP=1 to force a serial build, BATCHNORM_CFLAGS to add compiler flags and
BATCHNORM_LDFLAGS to add linker flags (e.g. both ``-fsanitize=address,undefined``: see .ci/asan.sh).
On macOS, Apple's clang has no OpenMP runtime of its own: Homebrew's libomp is found under
BATCHNORM_LIBOMP_PREFIX, else ``brew --prefix libomp``'s usual places.

Every compiler is asked for the same floating-point semantics (no contraction of a * b + c into a fused
multiply-add, no fast-math), so GCC, clang and MSVC builds give the same bits (tools/bit_identity.py).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ["csrc/_module.c", "csrc/_args.c", "csrc/_layout.c", "csrc/bn_plan.c", "csrc/bn_drive.c",
           "csrc/bn_merge.c", "csrc/bn_forward.c", "csrc/bn_backward.c", "csrc/bn_avx2.c", "csrc/bn_avx512.c",
           "csrc/bn_dispatch.c", "csrc/bn_masked.c"]
HEADERS = ["csrc/_binding.h", "csrc/batchnorm.h", "csrc/bn_internal.h", "csrc/bn_forward.tmpl.h",
           "csrc/bn_backward.tmpl.h", "csrc/bn_stream.h"]

PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d\n", n > 0 && omp_get_max_threads() > 0);
    return 0;
}
"""


def libomp_prefixes():
    """Where Homebrew's libomp may be (macOS): BATCHNORM_LIBOMP_PREFIX first, then brew's usual places."""
    env = os.environ.get("BATCHNORM_LIBOMP_PREFIX", "")
    places = [env] if env else []
    places += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]  # arm64, x86_64
    return [p for p in places if os.path.isfile(os.path.join(p, "include", "omp.h"))]


def openmp_flags(compiler):
    """(compile_args, link_args) that make OpenMP work with this compiler, or None."""
    if os.environ.get("BATCHNORM_NO_OPENMP", "") not in ("", "0"):
        return None
    ctype = compiler.compiler_type
    if ctype == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = []
        for prefix in libomp_prefixes():
            inc, lib = os.path.join(prefix, "include"), os.path.join(prefix, "lib")
            candidates.append((["-Xpreprocessor", "-fopenmp", "-I" + inc], ["-L" + lib, "-Wl,-rpath," + lib, "-lomp"]))
        candidates += [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    for cflags, lflags in candidates:
        tmp = tempfile.mkdtemp(prefix="bn_omp_")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(PROBE)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
            exe = os.path.join(tmp, "probe")
            compiler.link_executable(objs, exe, extra_postargs=lflags)
            out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip() == "1":
                return cflags, lflags
        except Exception:  # any compile, link or run failure means "not this flag"
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return None


class BuildExt(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        flags = openmp_flags(self.compiler)
        if flags is None:
            warnings.warn("batchnorm: OpenMP not available (or disabled); building the kernels serially")
            print("batchnorm: building WITHOUT OpenMP", file=sys.stderr)
        for ext in self.extensions:
            if ctype == "msvc":
                # /fp:precise without /fp:contract: no fused multiply-adds (MSVC's default since VS 2022;
                # older ones emit none without /arch:AVX2, which is not given).
                ext.extra_compile_args += ["/O2", "/fp:precise"]
            else:
                # No -ffast-math: the kernels rely on IEEE order of operations for exactness and for
                # bit-identical results; no -march=native: the wheel must run on any x86-64.
                # -fno-trapping-math changes no value (we never read the FP exception flags): GCC
                # otherwise keeps a comparison such as the fused ReLU's v < 0 ? 0 : v a branch, which
                # does not vectorize (the ReLU forward ran 12x slower, on mispredictions).
                # -ffp-contract=off: clang (and GCC in GNU mode) would otherwise fuse a * b + c into one
                # FMA in the AVX2/AVX-512 builds, one rounding fewer than the baseline build.
                ext.extra_compile_args += ["-std=c11", "-O3", "-fno-math-errno", "-fno-trapping-math",
                                           "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                           "-Wno-missing-field-initializers",
                                           "-Wno-cast-function-type"]
            if flags is not None:
                ext.extra_compile_args += flags[0]
                ext.extra_link_args += flags[1]
            ext.extra_compile_args += os.environ.get("BATCHNORM_CFLAGS", "").split()
            ext.extra_link_args += os.environ.get("BATCHNORM_LDFLAGS", "").split()
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "batchnorm._core",
            sources=SOURCES,
            depends=HEADERS,
            include_dirs=[np.get_include(), "csrc"],
            # Built against NumPy 2, the extension uses only the C API of NumPy 1.23 (the oldest the
            # package supports), so it imports on any NumPy from 1.23 on.
            define_macros=[("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION")],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
