#!/usr/bin/env python
"""Benchmark of batchnorm's C kernels against the pure-NumPy reference, PyTorch (CPU) and the memory
bandwidth limit.

    python benchmarks/bench.py                  # full run (a few minutes on 2 cores)
    python benchmarks/bench.py --quick          # < 1 minute: fewer repeats, same cases
    python benchmarks/bench.py --json out.json  # also write every number for tools (see plot.py)

What is timed (all in one process, interleaved):
  * ours         batchnorm.forward_train / forward_infer / backward, the plain call as users write it
                 (output allocation included);
  * ours out=    the same call writing into a preallocated ``out=`` array;
  * torch        torch.native_batch_norm / aten.native_batch_norm_backward on the same memory
                 (channels_last tensors for the NHWC cases), when torch is installed;
  * numpy        batchnorm.reference (plain NumPy, float64 inside, single-threaded): timed once per case
                 and op, at the first thread count, with few repeats;
  * copy         a copy of x.nbytes bytes between two preallocated arrays, multi-threaded: T chunks over
                 a thread pool (the copies release the GIL), with np.copyto (memcpy) and with
                 np.positive(src, out=dst) (a SIMD loop); the limit uses the fastest median of these
                 and of the same copies on one thread. A run of copy batches starts after a 20 ms
                 pause, so that OpenMP's spinning idle workers (left by ours or torch) are asleep.
                 It gives the copy bandwidth 2 * x.nbytes / t_copy, and the bandwidth limit of an op is
                 the least traffic it must move over that bandwidth: forward (train and infer) reads x and
                 writes y: 2 * x.nbytes; backward reads x and dy and writes dx: 3 * x.nbytes.
                 So limit = t_copy for the forwards and 1.5 * t_copy for backward.

Each repeat runs every implementation once, round-robin (the starting one rotating), each as a batch of
k back-to-back calls (k chosen so that a batch lasts >= ~2 ms, k = 1 for large cases); the reported time
per call is the median over repeats of batch_time / k. With more than one thread, a batch that follows
one of another family (ours, torch, numpy, copy) starts after a 20 ms pause and one untimed call, so
that the other OpenMP runtime's spinning idle workers are asleep and do not compete for the cores.
Every function is warmed up before timing, and garbage collection is off while timing. Before timing a
case, ours is checked once against torch and against the NumPy reference on every op (max abs
difference).

Memory: the peak extra bytes one call of ours allocates beyond what it returns, with tracemalloc (NumPy
array data is traced by tracemalloc; the kernels' C-level scratch, allocated with malloc, is not), and the
process's resident-memory high-water mark during one call, in a fresh subprocess per case (which sees
every allocation, C scratch included), both net of the returned outputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _import_batchnorm():
    """Import batchnorm: the one Python finds (installed, or PYTHONPATH=python), else the source tree's,
    retrying for a while there: its extension may be being rebuilt right now. (Putting the source tree
    first would shadow an installed package with a tree that has no built extension.)"""
    try:
        import batchnorm
        return batchnorm
    except ImportError:
        for name in [m for m in sys.modules if m == "batchnorm" or m.startswith("batchnorm.")]:
            del sys.modules[name]
    src = os.path.join(REPO, "python")
    if os.path.isdir(os.path.join(src, "batchnorm")) and src not in sys.path:
        sys.path.insert(0, src)
    last = None
    for _ in range(30):
        try:
            import batchnorm
            return batchnorm
        except ImportError as e:  # pragma: no cover - only while the .so is being replaced
            last = e
            for name in [m for m in sys.modules if m == "batchnorm" or m.startswith("batchnorm.")]:
                del sys.modules[name]
            time.sleep(1.0)
    raise last


bn = _import_batchnorm()

try:
    import torch
except ImportError:  # torch is optional
    torch = None

OPS = ("train", "infer", "backward")
OP_TRAFFIC = {"train": 2, "infer": 2, "backward": 3}  # bytes moved, in units of x.nbytes
MOMENTUM, EPS = 0.1, 1e-5


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple  # the shape of OUR array (NHWC cases: (N, H, W, C))
    dtype: str
    layout: str   # "NCHW", "NHWC" or "NC"

    @property
    def axis(self):
        return -1 if self.layout == "NHWC" else 1

    @property
    def C(self):
        return self.shape[self.axis]


CASES = [
    Case("64x256x28x28 f32 NCHW", (64, 256, 28, 28), "float32", "NCHW"),
    Case("64x256x28x28 f32 NHWC", (64, 28, 28, 256), "float32", "NHWC"),
    Case("8192x1024 f32", (8192, 1024), "float32", "NC"),
    Case("32x256x28x28 f64 NCHW", (32, 256, 28, 28), "float64", "NCHW"),
    Case("32x64x8x8 f32 NCHW (in cache)", (32, 64, 8, 8), "float32", "NCHW"),
    Case("64x512 f32 (in cache)", (64, 512), "float32", "NC"),
]

# Timing budgets: seconds per (case, op, thread count) for the round robin (without NumPy), the bounds
# on the number of repeats, and NumPy's own budget and minimum number of repeats.
PROFILES = {
    "full": dict(budget=2.5, rmin=7, rmax=61, np_budget=1.2, np_min=3, batch=0.002, np_memory=True),
    "quick": dict(budget=0.15, rmin=3, rmax=7, np_budget=0.1, np_min=1, batch=0.001, np_memory=False),
}


# ----------------------------------------------------------------------------------------------------
# data and the callables to time


def make_data(case, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.dtype(case.dtype)
    C = case.C
    # standard_normal(dtype=) fills the array directly (no float64 temporary), plus a per-channel offset
    x = rng.standard_normal(case.shape, dtype=dt)
    dy = rng.standard_normal(case.shape, dtype=dt)
    bshape = [1] * len(case.shape)
    bshape[case.axis] = C
    x += rng.uniform(-1.0, 1.0, C).astype(dt).reshape(bshape)
    p = dict(
        x=x,
        dy=dy,
        # gamma/beta/running stats in the data's dtype (float32 for the float32 cases; torch refuses
        # mixed dtypes on CPU, so the float64 case has float64 parameters)
        gamma=rng.uniform(0.5, 1.5, C).astype(dt),
        beta=rng.uniform(-0.5, 0.5, C).astype(dt),
        rmean=rng.uniform(-1.0, 1.0, C).astype(dt),
        rvar=rng.uniform(0.5, 2.0, C).astype(dt),
    )
    return p


def to_torch(case, a):
    """A torch view of one of our arrays: NHWC arrays become NCHW tensors in channels_last format."""
    t = torch.from_numpy(a)
    if case.layout == "NHWC":
        t = t.permute(0, 3, 1, 2)
        # already channels_last-contiguous: this returns t itself, no copy
        t = t.contiguous(memory_format=torch.channels_last)
        assert t.data_ptr() == torch.from_numpy(a).data_ptr()
    return t


def from_torch(case, t):
    """Back to our layout, as a NumPy array (for comparisons)."""
    if case.layout == "NHWC":
        t = t.permute(0, 2, 3, 1)
    return t.detach().numpy()


class Impls:
    """The callables for one case: fresh running statistics per implementation."""

    def __init__(self, case, d):
        self.case, self.d = case, d
        ax = case.axis
        x, dy, g, b = d["x"], d["dy"], d["gamma"], d["beta"]
        self.out = np.empty_like(x)
        self.run_ours = {"rm": d["rmean"].copy(), "rv": d["rvar"].copy()}
        self.run_np = {"rm": d["rmean"].copy(), "rv": d["rvar"].copy()}
        # statistics for backward, from each implementation's own training forward
        _, self.mean, self.invstd = bn.forward_train(x, g, b, axis=ax)
        _, self.np_mean, self.np_invstd = bn.reference.forward_train(x, g, b, axis=ax)
        if torch is not None:
            self.xt, self.dyt = to_torch(case, x), to_torch(case, dy)
            self.gt, self.bt = torch.from_numpy(g), torch.from_numpy(b)
            self.rmt, self.rvt = torch.from_numpy(d["rmean"].copy()), torch.from_numpy(d["rvar"].copy())
            self.rm_inf_t, self.rv_inf_t = torch.from_numpy(d["rmean"]), torch.from_numpy(d["rvar"])
            _, self.smean_t, self.sinvstd_t = torch.native_batch_norm(
                self.xt, self.gt, self.bt, None, None, True, MOMENTUM, EPS)

    def ours(self, op, out=False):
        d, ax, o = self.d, self.case.axis, (self.out if out else None)
        x, dy, g, b = d["x"], d["dy"], d["gamma"], d["beta"]
        rm, rv = self.run_ours["rm"], self.run_ours["rv"]
        if op == "train":
            return lambda: bn.forward_train(x, g, b, running_mean=rm, running_var=rv, momentum=MOMENTUM,
                                            eps=EPS, axis=ax, out=o)
        if op == "infer":
            rmi, rvi = d["rmean"], d["rvar"]
            return lambda: bn.forward_infer(x, rmi, rvi, g, b, eps=EPS, axis=ax, out=o)
        mean, invstd = self.mean, self.invstd
        return lambda: bn.backward(dy, x, mean, invstd, g, training=True, axis=ax, out=o)

    def numpy(self, op):
        d, ax, ref = self.d, self.case.axis, bn.reference
        x, dy, g, b = d["x"], d["dy"], d["gamma"], d["beta"]
        rm, rv = self.run_np["rm"], self.run_np["rv"]
        if op == "train":
            return lambda: ref.forward_train(x, g, b, running_mean=rm, running_var=rv, momentum=MOMENTUM,
                                             eps=EPS, axis=ax)
        if op == "infer":
            rmi, rvi = d["rmean"], d["rvar"]
            return lambda: ref.forward_infer(x, rmi, rvi, g, b, eps=EPS, axis=ax)
        mean, invstd = self.np_mean, self.np_invstd
        return lambda: ref.backward(dy, x, mean, invstd, g, training=True, axis=ax)

    def torch(self, op):
        xt, dyt, gt, bt = self.xt, self.dyt, self.gt, self.bt
        nbn = torch.native_batch_norm
        if op == "train":
            rmt, rvt = self.rmt, self.rvt
            return lambda: nbn(xt, gt, bt, rmt, rvt, True, MOMENTUM, EPS)
        if op == "infer":
            rmi, rvi = self.rm_inf_t, self.rv_inf_t
            return lambda: nbn(xt, gt, bt, rmi, rvi, False, MOMENTUM, EPS)
        bwd = torch.ops.aten.native_batch_norm_backward
        sm, si, mask = self.smean_t, self.sinvstd_t, [True, True, True]
        rmt, rvt = self.rmt, self.rvt  # unused by torch when train=True
        return lambda: bwd(dyt, xt, gt, rmt, rvt, sm, si, True, EPS, mask)


class Copier:
    """Copies of n bytes between two preallocated arrays, on 1 thread or on T chunks over T threads
    (the calling thread plus a thread pool; both copy functions release the GIL). Two copy loops:
    np.copyto (memcpy) and np.positive(src, out=dst) (a SIMD ufunc loop); the limit uses the fastest."""

    METHODS = {"copyto": lambda d, s: np.copyto(d, s), "ufunc": lambda d, s: np.positive(s, out=d)}

    def __init__(self, nbytes):
        n = max(1, nbytes // 4)
        self.src = np.ones(n, np.float32)
        self.dst = np.zeros(n, np.float32)
        self.nbytes = self.src.nbytes
        self.pools = {}

    def fn(self, method, T):
        f = self.METHODS[method]
        src, dst = self.src, self.dst
        if T <= 1:
            return lambda: f(dst, src)
        pool = self.pools.get(T)
        if pool is None:
            pool = self.pools[T] = ThreadPoolExecutor(max_workers=T - 1)
        edges = np.linspace(0, src.size, T + 1).astype(int)
        chunks = [(dst[a:b], src[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        mine, rest = chunks[0], chunks[1:]

        def run():
            futs = [pool.submit(f, dd, ss) for dd, ss in rest]
            f(*mine)  # the calling thread does one chunk itself
            for fu in futs:
                fu.result()
        return run

    def close(self):
        for p in self.pools.values():
            p.shutdown()


# ----------------------------------------------------------------------------------------------------
# timing


def set_threads(T):
    bn.set_num_threads(T)
    if torch is not None:
        torch.set_num_threads(T)
    # batchnorm and torch share the OpenMP runtime here, so either call sets both; make sure (a build
    # without OpenMP runs on one thread whatever is asked)
    want = T if bn._core._build_info()["openmp"] else 1
    assert bn.get_num_threads() == want, (bn.get_num_threads(), want)


def calibrate(fn, batch_s):
    """Warm fn up; return (k, t): k calls per timed batch, t a first estimate of one call's time."""
    t0 = time.perf_counter()
    fn()                        # warm-up (first touch, thread pool start, caches)
    first = time.perf_counter() - t0
    ests = []
    spent = first
    while len(ests) < 3 and (not ests or (spent < 0.3 and ests[-1] < 0.05)):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        ests.append(dt)
        spent += dt
    t = min(ests)
    k = max(1, int(math.ceil(batch_s / max(t, 1e-7))))
    return k, t


# libgomp's idle worker threads spin for a while (several ms on this kind of CPU) after a parallel region
# before they sleep. ours and torch each bring their own OpenMP runtime, so a batch of one right after a
# batch of the other (or a copy on Python threads after either) competes with the other's spinning
# workers for the cores and looks slower than it is: on a 16-core machine our (64, 256, 28, 28)
# training forward measured 8.7 ms in the interleaved run against 1.1 ms for the kernel alone. So a
# batch whose family (ours, torch, numpy, copy) differs from the previous batch's starts after an
# untimed pause, at every thread count above 1, and a run of copy batches always does. One untimed call
# follows the pause: without it, the first batch after a pause (whichever family) ran up to 7x slower,
# its workers asleep and the core idle.
PAUSE_S = 0.02


def family(name):
    return "copy" if name.startswith("copy") else name.split()[0]


def round_robin(entries, prof, threads=1):
    """entries: list of (name, fn, k, t_est, is_numpy). Returns {name: [seconds per call, ...]}.

    A batch is preceded by an untimed pause, PAUSE_S, and one untimed call, when it starts a run of copy
    batches, or, with more than one thread, when its family differs from the previous batch's."""
    normal = sum(k * t for _, _, k, t, isnp in entries if not isnp)
    R = int(min(prof["rmax"], max(prof["rmin"], prof["budget"] / max(normal, 1e-9))))
    caps = {}
    for name, _, k, t, isnp in entries:
        caps[name] = min(R, max(prof["np_min"], int(prof["np_budget"] / (k * t)))) if isnp else R
    samples = {e[0]: [] for e in entries}
    n = len(entries)
    pc = time.perf_counter
    gc_was = gc.isenabled()
    gc.disable()
    prev = None
    try:
        for r in range(R):
            for j in range(n):
                name, fn, k, _, _ = entries[(r + j) % n]
                if r >= caps[name]:
                    continue
                fam = family(name)
                if fam != prev and (fam == "copy" or (threads > 1 and prev is not None)):
                    time.sleep(PAUSE_S)
                    fn()  # untimed: wakes this runtime's workers and the core after the pause
                prev = fam
                t0 = pc()
                for _ in range(k):
                    fn()
                t1 = pc()
                samples[name].append((t1 - t0) / k)
    finally:
        if gc_was:
            gc.enable()
    return samples


def summary(s):
    if not s:
        return None
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return dict(median=statistics.median(s), min=min(s), p25=q[0], p75=q[2], n=len(s))


# ----------------------------------------------------------------------------------------------------
# correctness check and memory


def maxdiff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def scaled(a, b):
    b64 = np.asarray(b, np.float64)
    return maxdiff(a, b) / max(float(np.max(np.abs(b64))), 1e-300)


def check_case(case, d):
    """Run every op once on fresh running statistics; compare ours with torch and with the reference."""
    ax = case.axis
    x, dy, g, b = d["x"], d["dy"], d["gamma"], d["beta"]
    ref = bn.reference
    res = {}
    rm, rv = d["rmean"].copy(), d["rvar"].copy()
    y, mean, invstd = bn.forward_train(x, g, b, running_mean=rm, running_var=rv, momentum=MOMENTUM,
                                       eps=EPS, axis=ax)
    ours = {"train": [y, mean, invstd, rm, rv]}
    ours["infer"] = [bn.forward_infer(x, d["rmean"], d["rvar"], g, b, eps=EPS, axis=ax)]
    ours["backward"] = list(bn.backward(dy, x, mean, invstd, g, training=True, axis=ax))

    rm2, rv2 = d["rmean"].copy(), d["rvar"].copy()
    yr, mr, ir = ref.forward_train(x, g, b, running_mean=rm2, running_var=rv2, momentum=MOMENTUM,
                                   eps=EPS, axis=ax)
    refs = {"train": [yr, mr, ir, rm2, rv2],
            "infer": [ref.forward_infer(x, d["rmean"], d["rvar"], g, b, eps=EPS, axis=ax)],
            # the same statistics as ours, so that only the backward kernels are compared
            "backward": list(ref.backward(dy, x, mean, invstd, g, training=True, axis=ax))}
    tors = None
    if torch is not None:
        xt, dyt = to_torch(case, x), to_torch(case, dy)
        gt, bt = torch.from_numpy(g), torch.from_numpy(b)
        rmt, rvt = torch.from_numpy(d["rmean"].copy()), torch.from_numpy(d["rvar"].copy())
        yt, mt, it = torch.native_batch_norm(xt, gt, bt, rmt, rvt, True, MOMENTUM, EPS)
        fmt_ok = (case.layout != "NHWC") or yt.is_contiguous(memory_format=torch.channels_last)
        yit = torch.native_batch_norm(xt, gt, bt, torch.from_numpy(d["rmean"]),
                                      torch.from_numpy(d["rvar"]), False, MOMENTUM, EPS)[0]
        dxt, dgt, dbt = torch.ops.aten.native_batch_norm_backward(
            dyt, xt, gt, rmt, rvt, torch.from_numpy(mean), torch.from_numpy(invstd), True, EPS,
            [True, True, True])
        tors = {"train": [from_torch(case, yt), mt.numpy(), it.numpy(), rmt.numpy(), rvt.numpy()],
                "infer": [from_torch(case, yit)],
                "backward": [from_torch(case, dxt), dgt.numpy(), dbt.numpy()]}
    tol = 1e-3 if case.dtype == "float32" else 1e-9
    for op in OPS:
        r = {"vs_numpy_maxabs": max(maxdiff(a, e) for a, e in zip(ours[op], refs[op])),
             "vs_numpy_scaled": max(scaled(a, e) for a, e in zip(ours[op], refs[op]))}
        if tors is not None:
            r["vs_torch_maxabs"] = max(maxdiff(a, e) for a, e in zip(ours[op], tors[op]))
            r["vs_torch_scaled"] = max(scaled(a, e) for a, e in zip(ours[op], tors[op]))
            r["torch_channels_last_out"] = bool(fmt_ok)
        r["tolerance_scaled"] = tol
        r["ok"] = r["vs_numpy_scaled"] <= tol and r.get("vs_torch_scaled", 0.0) <= tol
        res[op] = r
    return res


def traced_extra(fn):
    """(peak extra bytes during fn() beyond what it returns, bytes returned), as seen by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return max(0, peak - cur), max(0, cur - base)


_RSS_CHILD = r"""
import json, os, resource, sys, time
p = json.loads(sys.argv[1])
sys.path.insert(0, p["path"])
import numpy as np
for _ in range(30):
    try:
        import batchnorm as bn
        break
    except ImportError:
        time.sleep(1.0)
bn.set_num_threads(p["threads"])
dt = np.dtype(p["dtype"]); shape = tuple(p["shape"]); ax = p["axis"]; C = shape[ax]; op = p["op"]
rng = np.random.default_rng(0)
x = rng.standard_normal(shape, dtype=dt); dy = rng.standard_normal(shape, dtype=dt)
g = np.ones(C, dt); b = np.zeros(C, dt); rm = np.zeros(C, dt); rv = np.ones(C, dt)
mean = x.mean(axis=tuple(i for i in range(x.ndim) if i != ax % x.ndim)).astype(dt)
invstd = np.ones(C, dt)
def call():
    if op == "train":
        return bn.forward_train(x, g, b, running_mean=rm, running_var=rv, axis=ax)
    if op == "infer":
        return (bn.forward_infer(x, rm, rv, g, b, axis=ax),)
    return bn.backward(dy, x, mean, invstd, g, training=True, axis=ax)
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
r = call(); del r                      # warm-up: OpenMP threads, malloc arenas, code pages
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                   # reset the high-water mark (VmHWM) to the current RSS
    exact = True
except OSError:
    exact = False
rss0 = status("VmRSS"); hwm0 = status("VmHWM")
r = call()
hwm1 = status("VmHWM")
if not exact:
    hwm1 = max(hwm1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
out = sum(a.nbytes for a in r)
print(json.dumps(dict(rss0=rss0, hwm0=hwm0, hwm1=hwm1, out=out, exact=exact or hwm1 > hwm0)))
"""


def rss_extra(case, op, T):
    """Peak RSS growth during one call of ours beyond its outputs, in a fresh process; None on failure."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(bn.__file__)))
    arg = json.dumps(dict(path=pkg_parent, threads=T, dtype=case.dtype, shape=list(case.shape),
                          axis=case.axis, op=op))
    try:
        cp = subprocess.run([sys.executable, "-c", _RSS_CHILD, arg], capture_output=True, text=True,
                            timeout=120)
        r = json.loads(cp.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - optional measurement
        return None
    # an output may reuse memory freed by the warm-up call (small cases): clamp at 0
    return dict(extra=max(0, r["hwm1"] - r["rss0"] - r["out"]), growth=r["hwm1"] - r["rss0"],
                returned=r["out"], exact=r["exact"])


# ----------------------------------------------------------------------------------------------------
# the run


def bench_case(case, threads, prof, want_rss, log):
    d = make_data(case)
    nbytes = d["x"].nbytes
    res = dict(case=case.name, shape=list(case.shape), dtype=case.dtype, layout=case.layout,
               axis=case.axis, x_bytes=nbytes, rows=[], memory={})
    res["check"] = check_case(case, d)  # also warms up the NumPy reference on this data
    impls = Impls(case, d)
    copier = Copier(nbytes)
    numpy_time = {}
    for ti, T in enumerate(threads):
        set_threads(T)
        per_op = {}
        copies = {}  # copy samples pooled over the three ops: one bandwidth limit per (case, T)
        for op in OPS:
            fns = [("ours", impls.ours(op), False), ("ours out=", impls.ours(op, out=True), False)]
            if torch is not None:
                fns.append(("torch", impls.torch(op), False))
            if ti == 0:
                fns.append(("numpy", impls.numpy(op), True))
            for method in Copier.METHODS:
                fns.append((f"copy {method} x{T}", copier.fn(method, T), False))
                if T > 1:
                    fns.append((f"copy {method} x1", copier.fn(method, 1), False))
            entries = []
            for name, fn, isnp in fns:
                k, t = calibrate(fn, prof["batch"])
                entries.append((name, fn, k, t, isnp))
            samples = round_robin(entries, prof, T)
            for name, s in samples.items():
                if name.startswith("copy"):
                    copies.setdefault(name, []).extend(s)
            st = {name: summary(s) for name, s in samples.items() if not name.startswith("copy")}
            if "numpy" in st:
                numpy_time[op] = st["numpy"]
            per_op[op] = (st, entries)
        copy_st = {name: summary(s) for name, s in copies.items()}
        copy_name = min(copy_st, key=lambda n: copy_st[n]["median"])
        copy_s = copy_st[copy_name]["median"]
        bw = 2 * copier.nbytes / copy_s
        for op in OPS:
            st, entries = per_op[op]
            limit = OP_TRAFFIC[op] * nbytes / bw
            t_np = numpy_time.get(op, {}).get("median")
            for variant, name in (("plain", "ours"), ("out=", "ours out=")):
                ours_s = st[name]["median"]
                t_torch = st["torch"]["median"] if "torch" in st and variant == "plain" else None
                row = dict(op=op, variant=variant, threads=T, ours_s=ours_s,
                           ours_p25=st[name]["p25"], ours_p75=st[name]["p75"], ours_n=st[name]["n"],
                           torch_s=t_torch, numpy_s=t_np if variant == "plain" else None,
                           numpy_threads=1, copy_s=copy_s, copy_bw_Bps=bw, copy_method=copy_name,
                           bytes_moved=OP_TRAFFIC[op] * nbytes, limit_s=limit,
                           efficiency=limit / ours_s)
                row["ours_over_torch"] = ours_s / t_torch if t_torch else None
                row["ours_over_numpy"] = ours_s / row["numpy_s"] if row["numpy_s"] else None
                keep = {"ours", "torch", "numpy"} if variant == "plain" else {"ours out="}
                row["stats"] = {n: v for n, v in st.items() if n in keep}
                row["stats"].update(copy_st)
                row["calls_per_batch"] = {e[0]: e[2] for e in entries}
                res["rows"].append(row)
            log(f"  {case.name:32s} {op:8s} T={T}  ours {fmt_t(st['ours']['median'])}"
                f"  torch {fmt_t(st['torch']['median']) if 'torch' in st else '-'}"
                f"  limit {fmt_t(limit)}  (R={st['ours']['n']}, k={entries[0][2]})")
    copier.close()
    # memory, once per op, at the largest thread count
    Tm = threads[-1]
    set_threads(Tm)
    for op in OPS:
        ext, ret = traced_extra(impls.ours(op))
        ext_out, _ = traced_extra(impls.ours(op, out=True))
        m = dict(tracemalloc_extra=ext, tracemalloc_extra_out=ext_out, returned=ret, threads=Tm)
        if prof["np_memory"]:
            m["numpy_ref_tracemalloc_extra"] = traced_extra(impls.numpy(op))[0]
        if want_rss:
            m["rss"] = rss_extra(case, op, Tm)
        res["memory"][op] = m
    return res


def fmt_t(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1.0:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def fmt_r(r, nd=2):
    return "-" if r is None else f"{r:.{nd}f}"


def fmt_b(n):
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f}{unit}" if unit == "B" else f"{sign}{n:.1f}{unit}"
        n /= 1024


def print_report(out, file=sys.stdout):
    p = lambda *a: print(*a, file=file)  # noqa: E731
    m = out["meta"]
    p("")
    p(f"batchnorm {m['batchnorm']}  numpy {m['numpy']}  torch {m['torch'] or 'not installed'}  "
      f"python {m['python']}  on {m['cpu']} ({m['cpus']} CPUs)  threads {m['threads']}"
      f"{'  [--quick]' if m['quick'] else ''}")
    p("Times are medians per call. ours/torch, ours/numpy = time ratios (below 1: ours faster). "
      "limit = least traffic (fwd: 2*x.nbytes, bwd: 3*x.nbytes) / copy bandwidth (2*x.nbytes / t_copy, "
      "t_copy = fastest copy of x.nbytes on T threads or 1). eff = limit / ours. numpy = plain-NumPy "
      "reference, single-threaded, timed once (at 1 thread) and repeated on every row. spread = "
      "(p75 - p25) / median of ours. 'out=' rows: ours writing into a preallocated array.")
    hdr = (f"{'case':32s} {'op':8s} {'call':5s} {'T':>2s} {'ours':>9s} {'torch':>9s} {'numpy':>9s} "
           f"{'limit':>9s} {'copyGB/s':>8s} {'ours/torch':>10s} {'ours/numpy':>10s} {'eff':>5s} "
           f"{'spread':>6s}")
    p("")
    p(hdr)
    p("-" * len(hdr))
    for c in out["cases"]:
        for r in c["rows"]:
            spread = (r["ours_p75"] - r["ours_p25"]) / r["ours_s"]
            p(f"{c['case']:32s} {r['op']:8s} {r['variant']:5s} {r['threads']:>2d} {fmt_t(r['ours_s']):>9s} "
              f"{fmt_t(r['torch_s']):>9s} {fmt_t(r['numpy_s']):>9s} {fmt_t(r['limit_s']):>9s} "
              f"{r['copy_bw_Bps'] / 1e9:8.1f} {fmt_r(r['ours_over_torch']):>10s} "
              f"{fmt_r(r['ours_over_numpy'], 3):>10s} {r['efficiency']:5.2f} {spread * 100:5.0f}%")
        p("")
    p("Correctness (once per case, ours vs torch and vs the NumPy reference; max abs diff over all "
      "outputs of the op, incl. running stats for train):")
    for c in out["cases"]:
        for op in OPS:
            k = c["check"][op]
            vt = f"{k['vs_torch_maxabs']:.3g}" if "vs_torch_maxabs" in k else "-"
            p(f"  {c['case']:32s} {op:8s} vs torch {vt:>10s}   vs numpy {k['vs_numpy_maxabs']:10.3g}   "
              f"{'ok' if k['ok'] else 'MISMATCH'}")
    p("")
    p("Peak extra memory of one call of ours, beyond its returned outputs, as bytes and as a fraction of "
      "x.nbytes.\n  tracemalloc sees NumPy-level allocations only (array data); the kernels' C scratch "
      "(malloc) is not traced.\n  RSS = growth of the process's resident high-water mark during the call "
      "(fresh subprocess, warm-up call first), net of the outputs; it sees everything, page-granular, so "
      "it is noise for small cases.\n  'numpy ref' = the same tracemalloc measure for the NumPy reference, "
      "for scale.")
    p(f"  {'case':32s} {'op':8s} {'tracemalloc':>18s} {'out= call':>10s} {'RSS':>20s} {'numpy ref':>18s}")
    for c in out["cases"]:
        xb = c["x_bytes"]
        for op in OPS:
            mm = c["memory"][op]
            rss = mm.get("rss")
            rs = "-"
            if rss:
                rs = ("" if rss["exact"] else "<=") + f"{fmt_b(rss['extra'])} ({rss['extra'] / xb:.2f}x)"
            tm = f"{fmt_b(mm['tracemalloc_extra'])} ({mm['tracemalloc_extra'] / xb:.2f}x)"
            npx = mm.get("numpy_ref_tracemalloc_extra")
            nps = "-" if npx is None else f"{fmt_b(npx)} ({npx / xb:.1f}x)"
            p(f"  {c['case']:32s} {op:8s} {tm:>18s} {fmt_b(mm['tracemalloc_extra_out']):>10s} {rs:>20s} "
              f"{nps:>18s}")
    notes = findings(out)
    p("")
    p("Findings:" if notes else "Findings: none (ours faster than torch everywhere, efficiency >= 0.85, "
      "checks ok)")
    for n in notes:
        p("  - " + n)
    la0, la1 = m.get("loadavg"), m.get("loadavg_end")
    if la0 and max(la0[0], la1[0] if la1 else 0) > 0.5:
        p(f"  - other processes were running (1-min load average {la0[0]:.2f} at start, "
          f"{la1[0]:.2f} at end): multi-threaded timings suffer most; rerun on an idle machine")
    p(f"\nTotal run time {out['meta']['elapsed_s']:.0f}s")


def findings(out):
    """Short notes: mismatches, rows slower than torch, efficiencies < 0.85, noisy rows."""
    notes = []
    for c in out["cases"]:
        for op in OPS:
            k = c["check"][op]
            if not k["ok"]:
                notes.append(f"MISMATCH {c['case']} {op}: vs torch {k.get('vs_torch_scaled')}, "
                             f"vs numpy {k['vs_numpy_scaled']} (scaled; tolerance {k['tolerance_scaled']})")
    groups = [("slower than torch (ours/torch)", lambda r: r["ours_over_torch"] is not None
               and r["ours_over_torch"] > 1.0, lambda r: f"{r['ours_over_torch']:.2f}"),
              ("efficiency < 0.85", lambda r: r["efficiency"] < 0.85, lambda r: f"{r['efficiency']:.2f}"),
              ("noisy, spread > 20% (rerun?)", lambda r: (r["ours_p75"] - r["ours_p25"]) / r["ours_s"] > 0.2,
               lambda r: f"{(r['ours_p75'] - r['ours_p25']) / r['ours_s'] * 100:.0f}%")]
    for title, pred, val in groups:
        lines = []
        for c in out["cases"]:
            items = [f"{r['op']}{'(out=)' if r['variant'] == 'out=' else ''} T={r['threads']}: {val(r)}"
                     for r in c["rows"] if pred(r)]
            if items:
                lines.append(f"    {c['case']}: " + ", ".join(items))
        if lines:
            notes.append(title + ":\n" + "\n".join(lines))
    return notes


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: finishes in under a minute")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    ap.add_argument("--threads", type=int, nargs="+",
                    help="thread counts (default: 1 and all available CPUs)")
    ap.add_argument("--cases", nargs="+", metavar="SUBSTR", help="only cases whose name contains one")
    ap.add_argument("--rss", dest="rss", action="store_true", default=None,
                    help="measure RSS growth in a subprocess per case and op (default: on, off with --quick)")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the RSS subprocesses")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or sorted({1, ncpu})
    cases = [c for c in CASES if not args.cases or any(s in c.name for s in args.cases)]
    prof = PROFILES["quick" if args.quick else "full"]
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    want_rss = (not args.quick) if args.rss is None else args.rss
    t_start = time.perf_counter()
    out = dict(meta=dict(
        batchnorm=getattr(bn, "__version__", "?"), numpy=np.__version__,
        torch=torch.__version__ if torch is not None else None, python=platform.python_version(),
        cpu=cpu_name(), cpus=ncpu, threads=threads, quick=args.quick, profile=prof,
        date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
        traffic_units_of_x_bytes=OP_TRAFFIC,
        memory_note="tracemalloc: NumPy-level allocations only (C scratch via malloc is not traced); "
                    "rss: resident high-water mark growth in a fresh subprocess, net of outputs",
    ), cases=[])
    try:
        for case in cases:
            log(f"{case.name}: shape {case.shape} {case.dtype} {case.layout}")
            out["cases"].append(bench_case(case, threads, prof, want_rss, log))
    finally:
        set_threads(ncpu)
    out["meta"]["elapsed_s"] = time.perf_counter() - t_start
    out["meta"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out["findings"] = findings(out)
    print_report(out)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
