"""Per-call time of every op on small float32 tensors: this build, an optional other build of
batchnorm._core (A/B), and PyTorch, interleaved in rounds in one process.

    python benchmarks/small_ab.py                        # this build vs torch, T=1
    python benchmarks/small_ab.py --base old_core.so -t 2  # A/B against a copy of an older _core .so

On a shared machine the speed drifts between separate timing loops, so each round times every
contender back to back (a few hundred calls each) and the report gives the median per-call time over
rounds and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import statistics
import time

import numpy as np

import batchnorm._core as new_core

SHAPES = [(32, 64, 8, 8), (64, 512), (256, 64), (8, 16, 16, 16)]
OPS = ["fwd", "infer", "bwd", "fwd_relu", "fwd_add_relu", "infer_relu", "infer_add_relu", "bwd_relu_y",
       "bwd_relu_beta", "bwd_add_relu_y", "bwd_add_relu_beta"]


def load_core(path):
    """Load another build of the extension module from `path` under a private name."""
    loader = importlib.machinery.ExtensionFileLoader("bn_base._core", path)
    spec = importlib.util.spec_from_file_location("bn_base._core", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def ours(core, op, d):
    x, g, b, rm, rv, dy, r, mean, invstd, y, y_relu, y_add_relu = (
        d["x"], d["g"], d["b"], d["rm"], d["rv"], d["dy"], d["r"], d["mean"], d["invstd"], d["y"], d["yr"],
        d["yar"])
    return {
        "fwd": lambda: core.forward_train(x, g, b),
        "infer": lambda: core.forward_infer(x, rm, rv, g, b),
        "bwd": lambda: core.backward(dy, x, mean, invstd, g),
        "fwd_relu": lambda: core.forward_train(x, g, b, activation="relu"),
        "fwd_add_relu": lambda: core.forward_train(x, g, b, activation="relu", residual=r),
        "infer_relu": lambda: core.forward_infer(x, rm, rv, g, b, activation="relu"),
        "infer_add_relu": lambda: core.forward_infer(x, rm, rv, g, b, activation="relu", residual=r),
        "bwd_relu_y": lambda: core.backward(dy, x, mean, invstd, g, activation="relu", y=y_relu),
        "bwd_relu_beta": lambda: core.backward(dy, x, mean, invstd, g, activation="relu", beta=b),
        "bwd_add_relu_y": lambda: core.backward(dy, x, mean, invstd, g, activation="relu", residual=r,
                                                y=y_add_relu),
        "bwd_add_relu_beta": lambda: core.backward(dy, x, mean, invstd, g, activation="relu", residual=r, beta=b),
    }[op]


def theirs(torch, op, t):
    x, g, b, rm, rv, dy, r, sm, si, yr, yar = (t["x"], t["g"], t["b"], t["rm"], t["rv"], t["dy"], t["r"],
                                               t["sm"], t["si"], t["yr"], t["yar"])
    nbn = torch.native_batch_norm
    nbwd = torch.ops.aten.native_batch_norm_backward
    tb = torch.ops.aten.threshold_backward
    mask = [True, True, True]

    def fwd_add_relu(rm_=None, rv_=None, training=True):
        y = nbn(x, g, b, rm_, rv_, training, 0.1, 1e-5)[0]
        return y.add_(r).relu_()

    def bwd_add_relu():
        gr = tb(dy, yar, 0)
        return nbwd(gr, x, g, None, None, sm, si, True, 1e-5, mask), gr

    return {
        "fwd": lambda: nbn(x, g, b, None, None, True, 0.1, 1e-5),
        "infer": lambda: nbn(x, g, b, rm, rv, False, 0.1, 1e-5),
        "bwd": lambda: nbwd(dy, x, g, None, None, sm, si, True, 1e-5, mask),
        "fwd_relu": lambda: nbn(x, g, b, None, None, True, 0.1, 1e-5)[0].relu_(),
        "fwd_add_relu": lambda: fwd_add_relu(),
        "infer_relu": lambda: nbn(x, g, b, rm, rv, False, 0.1, 1e-5)[0].relu_(),
        "infer_add_relu": lambda: fwd_add_relu(rm, rv, False),
        "bwd_relu_y": lambda: nbwd(tb(dy, yr, 0), x, g, None, None, sm, si, True, 1e-5, mask),
        "bwd_relu_beta": lambda: nbwd(tb(dy, yr, 0), x, g, None, None, sm, si, True, 1e-5, mask),
        "bwd_add_relu_y": bwd_add_relu,
        "bwd_add_relu_beta": bwd_add_relu,  # torch keeps y; the same composition
    }[op]


def per_call(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", help="path of another build of batchnorm._core to compare (A/B)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-r", "--rounds", type=int, default=15)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--shapes", default=None, help="e.g. '32x64x8x8,64x512'")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ops = args.ops.split(",")
    torch = None
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
    new_core.set_num_threads(args.threads)
    cores = {"new": new_core}
    if args.base:
        cores["base"] = load_core(args.base)
        cores["base"].set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads={args.threads} rounds={args.rounds} simd={new_core._build_info().get('simd', '?')}")
    hdr = "shape            op              " + "".join(f"{k:>9}" for k in cores) + (
        "    torch" if torch else "") + ("  new/base" if args.base else "") + ("  new/torch" if torch else "")
    print(hdr)
    for shape in shapes:
        C = shape[1]
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
        d = dict(x=x, g=rng.uniform(0.5, 1.5, C), b=rng.uniform(-0.5, 0.5, C), rm=rng.standard_normal(C) * 0.1,
                 rv=rng.uniform(0.5, 2, C), dy=rng.standard_normal(shape).astype(np.float32),
                 r=rng.standard_normal(shape).astype(np.float32))
        y, mean, invstd = new_core.forward_train(x, d["g"], d["b"], stats_dtype=np.float64)
        d.update(y=y, mean=mean, invstd=invstd, yr=new_core.forward_train(x, d["g"], d["b"], activation="relu")[0],
                 yar=new_core.forward_train(x, d["g"], d["b"], activation="relu", residual=d["r"])[0])
        if torch:
            f = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
            t = dict(x=f(x), g=f(d["g"]), b=f(d["b"]), rm=f(d["rm"]), rv=f(d["rv"]), dy=f(d["dy"]), r=f(d["r"]),
                     yr=f(d["yr"]), yar=f(d["yar"]))
            _, t["sm"], t["si"] = torch.native_batch_norm(t["x"], t["g"], t["b"], None, None, True, 0.1, 1e-5)
        for op in ops:
            fns = {k: ours(c, op, d) for k, c in cores.items()}
            if torch:
                fns["torch"] = theirs(torch, op, t)
            # calls per round: about 20 ms of the slowest contender
            for fn in fns.values():
                fn()
            est = max(per_call(fn, 20) for fn in fns.values())
            calls = max(20, int(20000 / max(est, 1.0)))
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k].append(per_call(fn, calls))
            med = {k: statistics.median(v) for k, v in times.items()}
            line = f"{str(shape):16} {op:15}" + "".join(f"{med[k]:9.2f}" for k in fns)
            if args.base:
                line += f"  {statistics.median(a / b for a, b in zip(times['new'], times['base'])):8.3f}"
            if torch:
                line += f"  {statistics.median(a / b for a, b in zip(times['new'], times['torch'])):9.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
