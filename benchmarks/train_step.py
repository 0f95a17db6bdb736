#!/usr/bin/env python
"""One SGD step of a small MLP, end to end: batchnorm's layers (fused and not) vs plain NumPy BN vs PyTorch.

    python benchmarks/train_step.py                 # batch 256, 3 hidden layers of 1024, float32
    python benchmarks/train_step.py --quick         # fewer rounds
    python benchmarks/train_step.py --threads 1 2 --batch 256 --width 1024 --depth 3 --json step.json

The network: ``depth`` times (Linear(bias=False) -> BatchNorm1d -> ReLU), then Linear(width, classes),
softmax cross-entropy, and an SGD update of every weight (forward + backward + update = one step), on
one fixed batch of random data. Built four ways, from the same initial weights:

  ours fused     batchnorm.examples Linear + BatchNorm1d(width, activation="relu") (BN and ReLU in one
                 pass; skipped, with a message, where this batchnorm has no fused layers)
  ours unfused   batchnorm.examples Linear + BatchNorm1d + examples.ReLU
  numpy BN       examples Linear + a BN layer written in plain float32 NumPy (below) + examples.ReLU
  torch          torch.nn.Linear + nn.BatchNorm1d + nn.ReLU, nn.CrossEntropyLoss, torch.optim.SGD (eager)

Every thread count T applies to batchnorm (set_num_threads), torch (set_num_threads) and NumPy's BLAS
(threadpoolctl). The matmuls dominate the step, so the report also gives BN+ReLU's share of it: each
model is timed next to the same model without its BN and ReLU layers (the bare Linear stack, NumPy or
torch), and the share is 1 - bare / full. Implementations run back to back within each round (the
start rotating); times and ratios are medians over rounds of per-round values. Before timing, one step
of each from the same weights must give the same loss and the same updated weights.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bnbench.env import available_cpus, bn, cpu_name, get_torch, set_threads  # noqa: E402
from bnbench.timing import calibrate, per_round, round_robin  # noqa: E402

ex = importlib.import_module("batchnorm.examples")  # the same batchnorm bnbench imported

LR = 0.01
# float32 steps from the same weights agree to rounding (~1e-7 relative); a wrong step is off by far more
CHECK_TOL = 1e-4
EPS, MOMENTUM = 1e-5, 0.1

PROFILES = {
    "full": dict(budget=6.0, rmin=9, rmax=41, np_budget=0, np_min=0, batch=0.0),
    "quick": dict(budget=0.5, rmin=3, rmax=5, np_budget=0, np_min=0, batch=0.0),
}


class NumpyBatchNorm1d:
    """Batch normalization over the rows of an (N, C) array in plain NumPy, in the data's dtype: what a
    NumPy user writes without batchnorm (the textbook forward, and the backward in its compact form
    ``dx = gamma * invstd / N * (N * dy - sum(dy) - xhat * sum(dy * xhat))``). The same contract as the
    examples' layers: ``y = layer(x)``, ``dx = layer.backward(dy)``, weight/bias and their gradients."""

    def __init__(self, num_features, eps=EPS, momentum=MOMENTUM, dtype=np.float32):
        self.weight = np.ones(num_features, dtype)
        self.bias = np.zeros(num_features, dtype)
        self.grad_weight = np.zeros_like(self.weight)
        self.grad_bias = np.zeros_like(self.bias)
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)
        self.eps, self.momentum = eps, momentum

    def __call__(self, x):
        n = x.shape[0]
        mean = x.mean(axis=0)
        xc = x - mean
        var = (xc * xc).mean(axis=0)
        invstd = 1.0 / np.sqrt(var + self.eps)
        self._xhat, self._invstd = xc * invstd, invstd
        m = self.momentum
        self.running_mean *= 1 - m
        self.running_mean += m * mean
        self.running_var *= 1 - m
        self.running_var += m * var * (n / (n - 1))
        return self._xhat * self.weight + self.bias

    def backward(self, dy):
        n = dy.shape[0]
        xhat = self._xhat
        np.sum(dy, axis=0, out=self.grad_bias)
        np.sum(dy * xhat, axis=0, out=self.grad_weight)
        return (self.weight * self._invstd / n) * (n * dy - self.grad_bias - xhat * self.grad_weight)

    def __repr__(self):
        return f"NumpyBatchNorm1d({self.weight.size})"


def fused_layers():
    """(available, reason): whether BatchNorm1d takes activation="relu" in this build."""
    try:
        layer = bn.BatchNorm1d(3, activation="relu")
        x = np.array([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.25]], np.float32)
        y = layer(x)
        layer.backward(np.ones_like(y))
    except (TypeError, ValueError) as e:
        return False, f"{type(e).__name__}: {e}"
    return True, 'BatchNorm1d(..., activation="relu")'


def init_weights(n_in, width, depth, classes, seed=0):
    """Initial weights, NumPy layout (in, out): examples.Linear's Glorot-uniform draw, shared by all."""
    rng = np.random.default_rng(seed)
    dims = [n_in] + [width] * depth
    hidden = [ex.Linear(a, b, bias=False, rng=rng).weight for a, b in zip(dims[:-1], dims[1:])]
    head = ex.Linear(width, classes, rng=rng)
    return hidden, (head.weight, head.bias)


def _linear(w, b=None):
    lin = ex.Linear(w.shape[0], w.shape[1], bias=b is not None, dtype=w.dtype)
    lin.weight[...] = w
    if b is not None:
        lin.bias[...] = b
    return lin


def numpy_model(kind, weights):
    """An examples.Sequential: kind "fused", "unfused", "numpy" (BN layer above) or "bare" (no BN/ReLU)."""
    hidden, (hw, hb) = weights
    layers = []
    for w in hidden:
        layers.append(_linear(w))
        C = w.shape[1]
        if kind == "fused":
            layers.append(bn.BatchNorm1d(C, activation="relu"))
        elif kind == "unfused":
            layers += [bn.BatchNorm1d(C), ex.ReLU()]
        elif kind == "numpy":
            layers += [NumpyBatchNorm1d(C), ex.ReLU()]
    layers.append(_linear(hw, hb))
    return ex.Sequential(*layers)


def numpy_step(model, x, labels, lr=LR):
    """One step; returns the callable and a function giving (loss of the last call, first weight)."""
    loss_fn, opt = ex.SoftmaxCrossEntropy(), ex.SGD(lr=lr)
    last = {}

    def step():
        last["loss"] = loss_fn(model(x), labels)
        model.backward(loss_fn.backward())
        opt.step(model.params_and_grads())
    return step, lambda: (last["loss"], model.layers[0].weight)


def torch_model(weights, bare=False):
    torch = get_torch()
    nn = torch.nn
    hidden, (hw, hb) = weights
    layers = []
    for w in hidden:
        lin = nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        layers.append(lin)
        if not bare:
            layers += [nn.BatchNorm1d(w.shape[1], eps=EPS, momentum=MOMENTUM), nn.ReLU()]
    head = nn.Linear(hw.shape[0], hw.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.ascontiguousarray(hw.T)))
        head.bias.copy_(torch.from_numpy(hb))
    layers.append(head)
    return nn.Sequential(*layers).train()


def torch_step(model, x, labels, lr=LR):
    torch = get_torch()
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
    crit = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    last = {}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = crit(model(xt), yt)
        loss.backward()
        opt.step()
        last["loss"] = loss.detach()
    return step, lambda: (float(last["loss"]), model[0].weight.detach().numpy().T)


def build(args, weights, x, labels, *, with_torch, fused):
    """{name: (step, state)}: the full models, then the bare ones (names ending in " bare")."""
    impls = {}
    if fused:
        impls["ours fused"] = numpy_step(numpy_model("fused", weights), x, labels)
    impls["ours unfused"] = numpy_step(numpy_model("unfused", weights), x, labels)
    impls["numpy BN"] = numpy_step(numpy_model("numpy", weights), x, labels)
    if with_torch:
        impls["torch"] = torch_step(torch_model(weights), x, labels)
    impls["numpy bare"] = numpy_step(numpy_model("bare", weights), x, labels)
    if with_torch:
        impls["torch bare"] = torch_step(torch_model(weights, bare=True), x, labels)
    return impls


def first_step_check(impls):
    """One step of each full model from the same weights: (loss, max |weight - ours unfused's weight|
    after the step, scaled by the weight's largest magnitude) per name."""
    out = {}
    for name, (step, state) in impls.items():
        if name.endswith("bare"):
            continue
        step()
        loss, w = state()
        out[name] = (loss, np.array(w, copy=True))
    ref_loss, ref_w = out["ours unfused"]
    scale = float(np.max(np.abs(ref_w)))
    res = {}
    for name, (loss, w) in out.items():
        diff = float(np.max(np.abs(w - ref_w))) / scale
        res[name] = dict(loss=loss, loss_diff=abs(loss - ref_loss), weight_diff_scaled=diff,
                         ok=bool(abs(loss - ref_loss) <= CHECK_TOL * max(1.0, abs(ref_loss))
                                 and diff <= CHECK_TOL))
    return res


class _NullLimits:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def blas_limits(T):
    """threadpoolctl's limit on NumPy's BLAS to T threads (a no-op context when not installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _NullLimits()
    return threadpool_limits(limits=T, user_api="blas")


def run(args, log=lambda s: None):
    ncpu = available_cpus()
    threads = args.threads or sorted({1, ncpu})
    prof = PROFILES["quick" if args.quick else "full"]
    torch = None if args.no_torch else get_torch()
    fused, reason = fused_layers()
    if not fused:
        log(f"fused layers not in this build ({reason}): 'ours fused' skipped")
    try:
        import threadpoolctl  # noqa: F401
        have_tpc = True
    except ImportError:
        have_tpc = False
        log("threadpoolctl not installed: NumPy's BLAS threads are not limited (pip install threadpoolctl)")
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, args.in_features), dtype=np.float32)
    labels = rng.integers(0, args.classes, args.batch)
    weights = init_weights(args.in_features, args.width, args.depth, args.classes, seed=args.seed)
    out = dict(meta=dict(
        batchnorm=getattr(bn, "__version__", "?"), numpy=np.__version__,
        torch=torch.__version__ if torch is not None else None, python=platform.python_version(),
        cpu=cpu_name(), cpus=ncpu, threads=threads, quick=args.quick, fused=fused, fused_reason=reason,
        threadpoolctl=have_tpc, batch=args.batch, in_features=args.in_features, width=args.width,
        depth=args.depth, classes=args.classes, dtype="float32", lr=LR,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None), results=[])
    t_start = time.perf_counter()
    try:
        for T in threads:
            set_threads(T)
            with blas_limits(T):
                impls = build(args, weights, x, labels, with_torch=torch is not None, fused=fused)
                check = first_step_check(impls)
                entries = []
                for name, (step, _) in impls.items():
                    k, t = calibrate(step, 0.0)
                    entries.append((name, step, 1, t, False))
                samples = round_robin(entries, prof, T)
            res = dict(threads=T, check=check, rounds=samples, impls={})
            for name in impls:
                if name.endswith("bare"):
                    continue
                s = samples[name]
                bare = samples["torch bare" if name == "torch" else "numpy bare"]
                med = statistics.median(s)
                r = dict(step_s=med, steps_per_s=1.0 / med,
                         bn_relu_s=statistics.median(per_round(lambda f, b: f - b, s, bare)),
                         bn_relu_share=statistics.median(per_round(lambda f, b: 1.0 - b / f, s, bare)),
                         bare_s=statistics.median(bare))
                if "torch" in samples:
                    # speed-up over torch: torch's step time / this one's, per round
                    r["speedup_vs_torch"] = statistics.median(per_round(lambda a, b: b / a, s, samples["torch"]))
                r["speedup_vs_numpy_bn"] = statistics.median(per_round(lambda a, b: b / a, s, samples["numpy BN"]))
                res["impls"][name] = r
            out["results"].append(res)
            log(f"T={T}: " + ", ".join(f"{n} {1e3 * r['step_s']:.1f} ms" for n, r in res["impls"].items()))
    finally:
        set_threads(ncpu)
    out["meta"]["elapsed_s"] = time.perf_counter() - t_start
    out["meta"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return out


LABELS = {
    "ours fused": 'ours, BatchNorm1d(activation="relu")',
    "ours unfused": "ours, BatchNorm1d + ReLU",
    "numpy BN": "plain NumPy BN + ReLU",
    "torch": "PyTorch eager (nn.BatchNorm1d + nn.ReLU)",
}


def print_report(out, file=sys.stdout):
    p = lambda *a: print(*a, file=file)  # noqa: E731
    m = out["meta"]
    p("")
    p(f"One SGD step (forward + backward + update): {m['depth']} x (Linear {m['width']} -> BN -> ReLU) + "
      f"Linear -> {m['classes']}, batch {m['batch']}, {m['in_features']} inputs, float32")
    p(f"batchnorm {m['batchnorm']}  numpy {m['numpy']}  torch {m['torch'] or 'not installed'}  python "
      f"{m['python']}  on {m['cpu']} ({m['cpus']} CPUs)  threads {m['threads']}"
      f"{'  [--quick]' if m['quick'] else ''}")
    if not m["fused"]:
        p(f"fused layers not in this build ({m['fused_reason']}): 'ours fused' skipped")
    if not m["threadpoolctl"]:
        p("threadpoolctl not installed: NumPy's BLAS ran on its default thread count")
    p("steps/s = 1 / median step time; 'x torch' and 'x NumPy BN' = speed-up (their step time / this "
      "one's, median of per-round ratios); BN+ReLU = full step - the same step without BN and ReLU "
      "(timed in the same rounds), and its share of the step.")
    hdr = (f"  {'':42s} {'T':>2s} {'steps/s':>8s} {'ms/step':>8s} {'x torch':>8s} {'x NumPy BN':>10s} "
           f"{'BN+ReLU ms':>10s} {'share':>6s}")
    p("")
    p(hdr)
    for res in out["results"]:
        for name, r in res["impls"].items():
            xt = f"{r['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in r else "-"
            p(f"  {LABELS[name]:42s} {res['threads']:>2d} {r['steps_per_s']:8.1f} {1e3 * r['step_s']:8.2f} "
              f"{xt:>8s} {r['speedup_vs_numpy_bn']:10.2f} {1e3 * r['bn_relu_s']:10.2f} "
              f"{100 * r['bn_relu_share']:5.0f}%")
        p("")
    p("First step from the same weights (loss; max |weight - ours unfused's| / max |weight| after it):")
    for res in out["results"]:
        p(f"  T={res['threads']}: " + ", ".join(f"{n} {c['loss']:.6f} ({c['weight_diff_scaled']:.1e})"
                                               + ("" if c["ok"] else " MISMATCH")
                                               for n, c in res["check"].items()))
    p(f"\nTotal run time {m['elapsed_s']:.0f}s")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts (default: 1 and all CPUs)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--in-features", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024, help="hidden layer width")
    ap.add_argument("--depth", type=int, default=3, help="number of hidden layers")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even where installed")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    for name in ("batch", "in_features", "width", "depth", "classes"):
        if getattr(args, name) < (2 if name in ("batch", "classes") else 1):
            ap.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if args.threads and any(t < 1 for t in args.threads):
        ap.error("--threads must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    out = run(args, log)
    print_report(out)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
