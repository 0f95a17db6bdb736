"""Per-call time of the phases and the fused calls on tensors of any size, outputs preallocated (out=):
this build against another build of batchnorm._core (A/B), with a copy of x as the memory yardstick, in
one process.

    python benchmarks/phase_ab.py --base old_core.so                                  # column mode, float32
    python benchmarks/phase_ab.py --base old_core.so --shapes 32x28x28x256 --dtype float64 -t 2
    python benchmarks/phase_ab.py --base old_core.so --shapes 32x64x56x56 --axis 1     # NCHW

The channel axis is the last one (column mode: (N, C) and channels-last), or --axis (1: NCHW, row
mode). Each round times every
contender back to back (best of a few calls each, so a call starts with the previous call's data in
whatever cache it fits); the report gives the median per-call time over rounds, the median of the
per-round ratios new/base, and whether the two builds wrote the same bits. "copy" is np.copyto of x into
a preallocated array: one read and one write stream, for scale (training forward: 3 streams, backward: 5,
backward_reduce: 2, backward_apply: 3).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import batchnorm._core as new_core
from small_ab import load_core

SHAPES = [(32768, 256), (8192, 1024), (2048, 4096), (64, 28, 28, 256)]
OPS = ["copy", "stats", "train", "infer", "reduce", "apply", "bwd", "bwd_relu_beta", "bwd_relu_y",
       "train_add_relu", "infer_add_relu"]


def make_data(shape, dtype, seed=0, axis=-1):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    d = dict(x=x, dy=rng.standard_normal(shape).astype(dtype), y=np.empty_like(x), ax=axis % x.ndim,
             g=rng.uniform(0.5, 1.5, C), b=rng.uniform(-0.5, 0.5, C), count=x.size // C)
    _, d["mean"], m2 = new_core.batch_stats(x, axis=d["ax"])
    d["invstd"] = 1 / np.sqrt(m2 / d["count"] + 1e-5)
    d["sum_dy"], d["sum_dy_xmu"] = new_core.backward_reduce(d["dy"], x, d["mean"], axis=d["ax"])
    d["y_relu"] = new_core.forward_train(x, d["g"], d["b"], axis=d["ax"], activation="relu")[0]
    return d


def call(core, op, d):
    """The op as a callable on `core`; it returns what the op computes (y and dx in d["y"])."""
    x, dy, y, ax, g, b, mean, invstd = (d[k] for k in ("x", "dy", "y", "ax", "g", "b", "mean", "invstd"))
    if op == "copy":
        return lambda: np.copyto(y, x)
    return {
        "stats": lambda: core.batch_stats(x, axis=ax),
        "train": lambda: core.forward_train(x, g, b, axis=ax, out=y),
        "infer": lambda: core.forward_infer(x, mean, invstd, g, b, axis=ax, out=y),
        "reduce": lambda: core.backward_reduce(dy, x, mean, axis=ax),
        "apply": lambda: core.backward_apply(dy, x, mean, invstd, g, d["sum_dy"], d["sum_dy_xmu"], d["count"],
                                             axis=ax, out=y),
        "bwd": lambda: core.backward(dy, x, mean, invstd, g, axis=ax, out=y),
        "bwd_relu_beta": lambda: core.backward(dy, x, mean, invstd, g, axis=ax, out=y, activation="relu", beta=b),
        "train_add_relu": lambda: core.forward_train(x, g, b, axis=ax, out=y, activation="relu", residual=dy),
        "infer_add_relu": lambda: core.forward_infer(x, mean, invstd, g, b, axis=ax, out=y, activation="relu",
                                                     residual=dy),
        "bwd_relu_y": lambda: core.backward(dy, x, mean, invstd, g, axis=ax, out=y, activation="relu",
                                            y=d["y_relu"]),
    }[op]


def result_bits(fn, d):
    """What fn computes, as bytes: its returned arrays and the output array it wrote."""
    d["y"].fill(np.nan)
    res = fn()
    res = res if isinstance(res, tuple) else (res,)
    return [np.asarray(a).tobytes() for a in res if a is not None and not np.isscalar(a)] + [d["y"].tobytes()]


def best_of(fn, calls):
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="path of another build of batchnorm._core to compare (A/B)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-r", "--rounds", type=int, default=9)
    ap.add_argument("-n", "--calls", type=int, default=5, help="calls per contender per round (best taken)")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--shapes", default=None, help="e.g. '8192x1024,64x28x28x256' (channels last by default)")
    ap.add_argument("--axis", type=int, default=-1, help="the channel axis (1: NCHW); default -1, channels last")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        ap.error(f"unknown ops {unknown}; known: {OPS}")
    cores = {"new": new_core}
    if args.base:
        cores["base"] = load_core(args.base)
    for core in cores.values():
        core.set_num_threads(args.threads)
    print(f"threads={args.threads} rounds={args.rounds} dtype={args.dtype} "
          f"simd={new_core._build_info().get('simd', '?')}")
    print(f"{'shape':18} {'op':14}" + "".join(f"{k + ' ms':>10}" for k in cores)
          + ("  new/base  bits" if args.base else ""))
    for shape in shapes:
        d = make_data(shape, np.dtype(args.dtype), axis=args.axis)
        for op in ops:
            fns = {k: call(c, op, d) for k, c in (cores.items() if op != "copy" else [("new", None)])}
            same = ""
            if "base" in fns:
                same = "same" if result_bits(fns["new"], d) == result_bits(fns["base"], d) else "DIFFER"
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k].append(best_of(fn, args.calls))
            line = f"{'x'.join(map(str, shape)):18} {op:14}" + "".join(
                f"{statistics.median(times[k]):10.3f}" if k in times else f"{'':10}" for k in cores)
            if "base" in fns:
                line += f"  {statistics.median(a / b for a, b in zip(times['new'], times['base'])):8.3f}  {same}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
