"""Threads: results are bit-identical for every thread count (set with OMP_NUM_THREADS or
set_num_threads), get_num_threads reports the setting, and concurrent calls from Python threads are safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import batchnorm as bn
import helpers

# A build without OpenMP runs serially: every thread setting reads back as 1 (results must still agree).
OPENMP = bn._core._build_info()["openmp"]


def threads(n):
    """What get_num_threads() reports after asking for n threads."""
    return n if OPENMP else 1

SUB = ("import json, batchnorm as bn, helpers\n"
       "n = bn.get_num_threads()\n"
       "print(json.dumps({'n': n, 'h': helpers.thread_workload() if WORK else None}))\n")

# smaller cases for thread counts well above the machine's cores, and odd splits
SMALL_CASES = [
    ((7, 5, 33, 17), "float32", 1, "C"),
    ((3, 10000), "float32", 1, "C"),
    ((10000, 3), "float64", 0, "T"),
    ((5, 9, 31, 3), "float64", -1, "negall"),
    ((2, 3, 4099), "float32", 1, "slice"),
]


def run_sub(work, **env):
    code = f"WORK = {bool(work)}\n" + SUB
    r = subprocess.run([sys.executable, "-c", code], env=helpers.subprocess_env(**env), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"subprocess failed (rc={r.returncode}) with {env}:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def in_process_hashes():
    """Workload hashes for set_num_threads(1), (2), (3) in this process."""
    before = bn.get_num_threads()
    try:
        out = {}
        for n in (1, 2, 3):
            bn.set_num_threads(n)
            assert bn.get_num_threads() == threads(n)
            out[n] = helpers.thread_workload()
        return out
    finally:
        bn.set_num_threads(before)


def test_set_num_threads_bit_identical(in_process_hashes):
    h1 = in_process_hashes[1]
    for n in (2, 3):
        diff = [k for k in h1 if in_process_hashes[n][k] != h1[k]]
        assert not diff, f"set_num_threads({n}) changed the bits of: {diff}"


def test_omp_num_threads_subprocesses_bit_identical(in_process_hashes):
    h1 = in_process_hashes[1]
    for n in (1, 2, 3):
        res = run_sub(True, OMP_NUM_THREADS=n)
        assert res["n"] == threads(n), f"OMP_NUM_THREADS={n} but get_num_threads() == {res['n']}"
        diff = [k for k in h1 if res["h"][k] != h1[k]]
        assert not diff, f"OMP_NUM_THREADS={n} changed the bits of: {diff}"


def test_many_thread_counts_small_cases(restore_threads):
    base = None
    for n in (1, 4, 7, 16, 2):
        bn.set_num_threads(n)
        assert bn.get_num_threads() == threads(n)
        h = helpers.thread_workload(SMALL_CASES, seed=3)
        if base is None:
            base = h
        diff = [k for k in base if h[k] != base[k]]
        assert not diff, f"{n} threads changed the bits of: {diff}"


def test_thread_count_persists_across_calls(restore_threads, rng):
    bn.set_num_threads(3)
    x = rng.standard_normal((8, 4, 16)).astype(np.float32)
    for _ in range(3):
        bn.forward_train(x)
        bn.forward_infer(x, np.zeros(4), np.ones(4))
    assert bn.get_num_threads() == threads(3)
    bn.set_num_threads(1)
    bn.backward(x, x, np.zeros(4, np.float32), np.ones(4, np.float32))
    assert bn.get_num_threads() == 1


def test_default_num_threads_follows_the_machine():
    res = run_sub(False, OMP_NUM_THREADS=None)
    cpus = {os.cpu_count() or 1}
    if hasattr(os, "sched_getaffinity"):
        cpus.add(len(os.sched_getaffinity(0)))
    assert isinstance(res["n"], int) and res["n"] >= 1
    if not OPENMP:
        cpus = {1}
    assert res["n"] in cpus, f"default get_num_threads() == {res['n']}, cpus {cpus}"


def test_default_in_this_process_is_positive():
    n = bn.get_num_threads()
    assert isinstance(n, int) and n >= 1


def _llvm_libomp_loaded():
    """Whether this process runs LLVM's OpenMP runtime (libomp), e.g. in a clang build."""
    try:
        with open("/proc/self/maps") as f:
            return any("libomp" in line for line in f)
    except OSError:
        return False


# LLVM's libomp 14 itself aborts on these values (a C program with only omp_get_max_threads() does too),
# before any batchnorm code runs; GNU libgomp ignores them.
LIBOMP_ABORTS = pytest.mark.skipif(_llvm_libomp_loaded(), reason="LLVM libomp aborts on this OMP_NUM_THREADS")


@pytest.mark.parametrize("value", ["0", pytest.param("abc", marks=LIBOMP_ABORTS),
                                   pytest.param("", marks=LIBOMP_ABORTS), pytest.param("-2", marks=LIBOMP_ABORTS)])
def test_bad_omp_num_threads_does_not_crash(value):
    res = run_sub(False, OMP_NUM_THREADS=value)
    assert res["n"] >= 1


def test_set_num_threads_overrides_omp_env():
    code = ("import json, batchnorm as bn\n"
            "a = bn.get_num_threads(); bn.set_num_threads(1); b = bn.get_num_threads()\n"
            "print(json.dumps([a, b]))\n")
    r = subprocess.run([sys.executable, "-c", code], env=helpers.subprocess_env(OMP_NUM_THREADS=3),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [threads(3), 1]


def test_concurrent_python_threads(restore_threads):
    """Calls from several Python threads at once (sharing the library's own threads) give the bits of
    serial calls."""
    bn.set_num_threads(2)
    cases = [[c] for c in SMALL_CASES] * 3
    serial = [helpers.thread_workload(c, seed=5) for c in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda c: helpers.thread_workload(c, seed=5), cases))
    assert parallel == serial


def test_instruction_sets_bit_identical(in_process_hashes):
    """The AVX-512, AVX2 and baseline (SSE2) kernels (BATCHNORM_SIMD caps the choice) give the same bits:
    the same lanes in the same order, no fused multiply-adds. On a machine without AVX-512 (or AVX2)
    the capped runs repeat the default kernels and the test still compares what it can."""
    default = bn._core._build_info()["simd"]
    h1 = in_process_hashes[1]
    for simd in ("avx2", "baseline"):
        res = run_sub(True, OMP_NUM_THREADS=2, BATCHNORM_SIMD=simd)
        diff = [k for k in h1 if res["h"][k] != h1[k]]
        assert not diff, f"BATCHNORM_SIMD={simd} (default {default}) changed the bits of: {diff}"


# Outputs of 16 MiB and more are written with non-temporal stores in the AVX2 and AVX-512 builds
# (csrc/bn_stream.h) where they sit at the inputs' offset in their 4 KiB pages (bn_nt_wanted): row mode's y
# with every epilogue and the training dx, float32 and float64. `like` makes such arrays (out=, and the
# residual and dy beside x); the plain calls' pooled outputs sit elsewhere and take plain stores. Runs of
# 63 * 63 values start at every alignment, so each has a head, an aligned body and a tail.
STREAMED = (
    "import hashlib, json, numpy as np, batchnorm as bn\n"
    "def like(x, fill=None):\n"
    "    buf = np.empty(x.nbytes + 4096, np.uint8)\n"
    "    off = (x.ctypes.data - buf.ctypes.data) % 4096\n"
    "    a = buf[off:off + x.nbytes].view(x.dtype).reshape(x.shape)\n"
    "    if fill is not None: a[...] = fill\n"
    "    return a\n"
    "def h(*arrays): return hashlib.sha256(b''.join(a.tobytes() for a in arrays)).hexdigest()\n"
    "out = {}\n"
    "for dt, n in ((np.float32, 17), (np.float64, 9)):\n"
    "    rng = np.random.default_rng(11)\n"
    "    shape = (n, 64, 63, 63)\n"
    "    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dt)\n"
    "    r = like(x, rng.standard_normal(shape))\n"
    "    dy = like(x, rng.standard_normal(shape))\n"
    "    g = rng.uniform(0.5, 2, 64).astype(dt); b = rng.standard_normal(64).astype(dt)\n"
    "    rm = rng.standard_normal(64).astype(dt); rv = rng.uniform(0.5, 2, 64).astype(dt)\n"
    "    y = like(x)\n"
    "    for act in (None, 'relu'):\n"
    "        for res in (None, r):\n"
    "            k = f'{dt.__name__}-{act}-{res is not None}'\n"
    "            yp, mean, invstd = bn.forward_train(x, g, b, activation=act, residual=res)\n"
    "            bn.forward_train(x, g, b, activation=act, residual=res, out=y)\n"
    "            out['train-' + k] = h(y, mean, invstd)\n"
    "            out['train-plain-' + k] = h(yp, mean, invstd)\n"
    "            yp = bn.forward_infer(x, rm, rv, g, b, activation=act, residual=res)\n"
    "            bn.forward_infer(x, rm, rv, g, b, activation=act, residual=res, out=y)\n"
    "            out['infer-' + k], out['infer-plain-' + k] = h(y), h(yp)\n"
    "    dxp, dg, db = bn.backward(dy, x, mean, invstd, g)\n"
    "    bn.backward(dy, x, mean, invstd, g, out=y)\n"
    "    out[f'backward-{dt.__name__}'], out[f'backward-plain-{dt.__name__}'] = h(y, dg, db), h(dxp, dg, db)\n"
    "print(json.dumps(out))\n"
)


def test_streamed_outputs_bit_identical_across_instruction_sets_and_threads():
    runs = {}
    for name, env in (("default, 1 thread", {"OMP_NUM_THREADS": 1}), ("default, 2 threads", {"OMP_NUM_THREADS": 2}),
                      ("avx2", {"OMP_NUM_THREADS": 2, "BATCHNORM_SIMD": "avx2"}),
                      ("baseline", {"OMP_NUM_THREADS": 2, "BATCHNORM_SIMD": "baseline"})):
        r = subprocess.run([sys.executable, "-c", STREAMED], env=helpers.subprocess_env(**env), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"{name}: rc={r.returncode}\n{r.stderr[-3000:]}"
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    ref = runs["baseline"]
    assert len(ref) == 36
    assert all(ref[k] == ref[k.replace("-plain", "")] for k in ref if "-plain" in k)  # out= and plain agree
    for name, h in runs.items():
        diff = [k for k in ref if h[k] != ref[k]]
        assert not diff, f"{name} changed the bits of {diff} (against the baseline build's plain stores)"


def test_simd_switch_is_reported():
    names = {}
    for simd in ("avx2", "baseline"):
        code = "import batchnorm as bn; print(bn._core._build_info()['simd'])"
        r = subprocess.run([sys.executable, "-c", code], env=helpers.subprocess_env(BATCHNORM_SIMD=simd),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        names[simd] = r.stdout.strip()
    assert names["baseline"].startswith("baseline")
    assert names["avx2"] in ("avx2", names["baseline"])  # no AVX2 on this CPU: the baseline
    default = bn._core._build_info()["simd"]
    assert default in ("avx512", "avx2") or default.startswith("baseline")
