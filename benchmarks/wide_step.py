"""Wide layers (many channels, few rows): time and minor page faults per step of this build, and
optionally of another build of batchnorm._core, in one process.

    python benchmarks/wide_step.py                         # this build
    python benchmarks/wide_step.py --base old_core.so      # and another build, interleaved

A step is what a training loop calls for one fused BN+ReLU layer: forward_train with running statistics
and activation="relu" (float64 statistics, as the layers keep them), backward with the mask from beta,
then forward_infer. The page faults are the process's minor faults (getrusage) over the timed steps:
fresh memory touched for the first time, which a per-call allocation that the C library hands back to
the system at every free costs again at every call. Times are medians over rounds; the builds alternate
within each round.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

import batchnorm._core as new_core
from small_ab import load_core

SHAPES = [(2, 4096), (2, 16384), (16, 16384), (64, 4096)]


def make_step(core, shape, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    g = rng.uniform(0.5, 2, C).astype(np.float32)
    b = rng.uniform(-1, 1, C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

    def step():
        y, mean, invstd = core.forward_train(x, g, b, running_mean=rm, running_var=rv, activation="relu",
                                             stats_dtype=np.float64)
        core.backward(dy, x, mean, invstd, g, activation="relu", beta=b)
        core.forward_infer(x, rm, rv, g, b)
    return step


def measure(step, n):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for _ in range(n):
        step()
    t = time.perf_counter() - t
    return t / n, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="path of another build of batchnorm._core (A/B)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-r", "--rounds", type=int, default=7)
    ap.add_argument("-n", "--steps", type=int, default=100, help="steps per round")
    ap.add_argument("--shapes", help="e.g. '2x4096,64x4096' (default: %s)" %
                    ",".join("x".join(map(str, s)) for s in SHAPES))
    args = ap.parse_args()
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes
              else SHAPES)
    cores = [("new", new_core)] + ([("base", load_core(args.base))] if args.base else [])
    for _, core in cores:
        core.set_num_threads(args.threads)
    print(f"threads={args.threads} rounds={args.rounds} steps/round={args.steps}")
    print(f"{'shape':14s} " + " ".join(f"{name + ' us':>10s} {name + ' faults':>12s}" for name, _ in cores)
          + ("  new/base" if args.base else ""))
    for shape in shapes:
        steps = {name: make_step(core, shape) for name, core in cores}
        for s in steps.values():
            for _ in range(10):
                s()
        res = {name: [] for name, _ in cores}
        for _ in range(args.rounds):
            for name, _ in cores:
                res[name].append(measure(steps[name], args.steps))
        med = {name: (statistics.median(t for t, _ in r), statistics.median(f for _, f in r))
               for name, r in res.items()}
        line = f"{str(shape):14s} " + " ".join(f"{med[n][0] * 1e6:10.1f} {med[n][1]:12.1f}" for n, _ in cores)
        if args.base:
            line += f"  {med['new'][0] / med['base'][0]:8.3f}"
        print(line)


if __name__ == "__main__":
    main()
