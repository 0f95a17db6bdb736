"""Timing: calibration, the interleaved round robin, the copy bound, and medians of per-round ratios.

Each round runs every implementation of one (case, op, thread count) once, back to back, the starting
one rotating, each as a batch of k calls (k chosen so that a batch lasts >= ~2 ms; k = 1 for large
cases). Ratios (ours / torch, efficiency = limit / ours, ...) are taken within each round and the
report gives their median over rounds: on a shared machine the memory bandwidth drifts by 1.5x between
separate timing loops, much less between neighbouring batches.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

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

# Timing budgets: seconds per (case, op, thread count) for the round robin (without NumPy), the bounds
# on the number of rounds, NumPy's own budget and minimum number of rounds, and the batch length.
PROFILES = {
    "full": dict(budget=2.5, rmin=7, rmax=61, np_budget=1.2, np_min=3, batch=0.002, np_memory=True),
    "quick": dict(budget=0.15, rmin=3, rmax=7, np_budget=0.1, np_min=1, batch=0.001, np_memory=False),
}


def family(name):
    """The runtime a timed entry belongs to: "ours" (ours, ours out=, ours unfused), "torch", "numpy",
    "copy"."""
    return "copy" if name.startswith("copy") else name.split()[0]


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


def round_robin(entries, prof, threads=1):
    """entries: list of (name, fn, k, t_est, is_numpy). Returns {name: [seconds per call or None, ...]},
    one slot per round (None where a NumPy entry had used up its own budget).

    A batch is preceded by an untimed pause, PAUSE_S, and one untimed call, when it starts a run of copy
    batches, or, with more than one thread, when its family differs from the previous batch's."""
    normal = sum(k * t for _, _, k, t, isnp in entries if not isnp)
    R = int(min(prof["rmax"], max(prof["rmin"], prof["budget"] / max(normal, 1e-9))))
    caps = {}
    for name, _, k, t, isnp in entries:
        caps[name] = min(R, max(prof["np_min"], int(prof["np_budget"] / (k * t)))) if isnp else R
    samples = {name: [None] * R for name, *_ in entries}
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
                samples[name][r] = (t1 - t0) / k
    finally:
        if gc_was:
            gc.enable()
    return samples


def present(s):
    return [v for v in s if v is not None]


def summary(s):
    """Median, quartiles, min and count of the present samples of one entry (None if none)."""
    s = present(s)
    if not s:
        return None
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return dict(median=statistics.median(s), min=min(s), p25=q[0], p75=q[2], n=len(s))


def per_round(f, *series):
    """f applied round by round to the entries' samples, where every one of them was timed."""
    return [f(*vals) for vals in zip(*series) if all(v is not None for v in vals)]


def median_or_none(values):
    return statistics.median(values) if values else None


def copy_per_round(samples):
    """The copy time of each round: the fastest of that round's copies (T threads, 1 thread)."""
    names = [n for n in samples if family(n) == "copy"]
    R = len(samples[names[0]]) if names else 0
    out = []
    for r in range(R):
        vals = [samples[n][r] for n in names if samples[n][r] is not None]
        out.append(min(vals) if vals else None)
    return out


class Copier:
    """np.copyto of n bytes between two preallocated arrays, on 1 thread or on T chunks over T threads
    (the calling thread plus a thread pool; the copies release the GIL). It moves 2 * n bytes (read +
    write): the time of one stream of n bytes is half the copy's."""

    def __init__(self, nbytes):
        n = max(1, nbytes // 4)
        self.src = np.ones(n, np.float32)
        self.dst = np.zeros(n, np.float32)
        self.nbytes = self.src.nbytes
        self.pools = {}

    def fn(self, T):
        src, dst = self.src, self.dst
        if T <= 1:
            return lambda: np.copyto(dst, src)
        pool = self.pools.get(T)
        if pool is None:
            pool = self.pools[T] = ThreadPoolExecutor(max_workers=T - 1)
        edges = np.linspace(0, src.size, T + 1).astype(int)
        chunks = [(dst[a:b], src[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        mine, rest = chunks[0], chunks[1:]

        def run():
            futs = [pool.submit(np.copyto, dd, ss) for dd, ss in rest]
            np.copyto(*mine)  # the calling thread does one chunk itself
            for fu in futs:
                fu.result()
        return run

    def entries(self, T):
        """(name, fn) of the copies to time at T threads: T-way, and 1-way too when T > 1."""
        out = [(f"copy x{T}", self.fn(T))]
        if T > 1:
            out.append(("copy x1", self.fn(1)))
        return out

    def close(self):
        for p in self.pools.values():
            p.shutdown()
