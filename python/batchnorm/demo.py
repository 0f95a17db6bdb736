"""Batch normalization in practice: Ioffe & Szegedy (2015), Figure 1, redone on scikit-learn's digits.

Run it with::

    python -m batchnorm.demo            # full run, about a minute or two on 2 cores
    python -m batchnorm.demo --quick    # shorter run, well under 20 s
    python -m batchnorm.demo --out curves.png --json results.json
    python -m batchnorm demo --quick    # the same, through the package's command line

It trains small fully connected networks in plain NumPy (the layers are in :mod:`batchnorm.examples`)
on the 8x8 digits of :func:`sklearn.datasets.load_digits` (ships with scikit-learn, nothing is
downloaded), with a fixed seed and a stratified held-out test split, and checks three claims of the
paper:

1. **faster convergence** -- a net of three fully connected hidden layers of 100 sigmoid units
   reaches a given test accuracy in fewer steps with BN than without;
2. **higher learning rates** -- with BN a 10x larger learning rate (0.01 -> 0.1) and higher ones
   (0.5, 1.0) still train, where the plain net trains slower or diverges (the ReLU nets below
   are run at 0.1, 0.5 and 1.0 as well);
3. **where to put BN** -- the paper normalizes ``Wu`` *before* the nonlinearity; with ReLU units we
   compare BN before and after the activation side by side.

Each network is trained with plain minibatch SGD (batch 60, as in the paper) and the same seed:
same initial weights, same minibatch order. Test accuracy is measured every few steps on the
held-out split, with BN layers in eval mode (running statistics). The script prints a table per
experiment, a verdict per claim computed from those numbers, and saves a PNG of the training
curves (if matplotlib is installed).

Needs scikit-learn (for the data); matplotlib (the figure), tqdm (progress bars) and threadpoolctl
(to keep NumPy's BLAS on one thread for these tiny matrix products) are optional:
``pip install "batchnorm[demo]"`` installs them all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

import batchnorm
from batchnorm.examples import (
    SGD, Linear, ReLU, Sequential, Sigmoid, SoftmaxCrossEntropy, accuracy, iterate_minibatches,
)

__all__ = ["main", "run_demo", "make_model", "load_data", "train", "format_tables", "verdicts"]

BATCH_SIZE = 60
HIDDEN = (100, 100, 100)
TARGET = 0.95                       # "steps to target" = first evaluation with test accuracy >= this
SIGMOID_LRS = (0.01, 0.1, 0.5, 1.0)
RELU_LRS = (0.1, 0.5, 1.0)
BASE_LR = 0.01                      # the "10x larger" claim compares BN at 0.1 with no BN at 0.01

FULL = {"steps": 10000, "eval_every": 50}
QUICK = {"steps": 1000, "eval_every": 25}

_BN_LABEL = {"none": "no BN", "before": "BN before act.", "after": "BN after act."}


# ---------------------------------------------------------------------------------------------
# data, model, training
# ---------------------------------------------------------------------------------------------

def load_data(seed=0, test_size=0.25):
    """Digits scaled to [0, 1], float32, stratified split: ``(x_train, y_train, x_test, y_test)``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "batchnorm.demo needs scikit-learn for its data set (sklearn.datasets.load_digits); "
            "install it with:  pip install scikit-learn") from exc
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def make_model(n_in, n_out, *, activation="sigmoid", bn="none", hidden=HIDDEN, seed=0):
    """A fully connected net ``n_in -> hidden... -> n_out``.

    ``bn`` is ``"none"`` (Linear -> act), ``"before"`` (Linear -> BN -> act, the paper's placement)
    or ``"after"`` (Linear -> act -> BN). With ``"before"`` the Linear layers drop their bias, which
    BN would cancel anyway. The same seed gives the same initial weights whatever ``bn`` is.
    """
    if bn not in _BN_LABEL:
        raise ValueError(f"bn must be one of {sorted(_BN_LABEL)}, got {bn!r}")
    act = {"sigmoid": Sigmoid, "relu": ReLU}[activation]
    rng = np.random.default_rng(seed)
    layers, width = [], n_in
    for h in hidden:
        layers.append(Linear(width, h, bias=(bn != "before"), rng=rng))
        if bn == "before":
            layers += [batchnorm.BatchNorm1d(h), act()]
        elif bn == "after":
            layers += [act(), batchnorm.BatchNorm1d(h)]
        else:
            layers.append(act())
        width = h
    layers.append(Linear(width, n_out, rng=rng))
    return Sequential(*layers)


def _last_activation_input(model, x):
    """Forward ``x`` (eval mode) and return the input of the last activation layer, with the logits."""
    last = max(i for i, layer in enumerate(model.layers) if isinstance(layer, (Sigmoid, ReLU)))
    captured = None
    for i, layer in enumerate(model.layers):
        if i == last:
            captured = x
        x = layer(x)
    return captured, x


def evaluate(model, loss_fn, x, y):
    """Test accuracy and loss in eval mode, and the {15, 50, 85}th percentiles of the input to the
    first unit of the last hidden nonlinearity (the paper's Fig. 1(b, c) quantity)."""
    model.eval()
    pre, logits = _last_activation_input(model, x)
    acc = accuracy(logits, y)
    loss = loss_fn(logits, y)
    pct = np.percentile(pre[:, 0], [15, 50, 85]).tolist()
    model.train()
    return acc, loss, pct


def evaluation_steps(steps, eval_every):
    """Every ``eval_every`` steps, plus a 5x finer grid over the first ``10 * eval_every`` steps
    (the BN nets get to the target within a few dozen steps; a coarse grid would hide that)."""
    fine = max(1, eval_every // 5)
    at = set(range(eval_every, steps + 1, eval_every)) | set(range(fine, min(steps, 10 * eval_every) + 1, fine))
    at.add(steps)
    return at


def train(model, data, *, lr, steps, eval_every, seed=0, progress=None):
    """Minibatch SGD on ``data = (x_train, y_train, x_test, y_test)``; returns a dict of curves.

    Stops early, with ``curves["diverged_at"]`` set, when the training loss stops being finite.
    Test accuracy is measured at :func:`evaluation_steps`; ``progress(step, test_acc)`` is called
    after each evaluation.
    """
    x_tr, y_tr, x_te, y_te = data
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(lr=lr)
    batches = iterate_minibatches(len(x_tr), BATCH_SIZE, np.random.default_rng(seed + 1))
    acc, test_loss, pct = evaluate(model, loss_fn, x_te, y_te)
    curves = {"step": [0], "test_acc": [acc], "test_loss": [test_loss], "train_loss": [float("nan")],
              "pct": [pct]}
    window, diverged_at = [], None
    eval_at = evaluation_steps(steps, eval_every)
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):          # a diverging net overflows; we detect it below
        for step in range(1, steps + 1):
            idx = next(batches)
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])     # forward
            if not math.isfinite(loss):
                diverged_at = step
                break
            model.backward(loss_fn.backward())               # backward: fills the grad_* arrays
            opt.step(model.params_and_grads())               # SGD update, in place
            window.append(loss)
            if step in eval_at:
                acc, test_loss, pct = evaluate(model, loss_fn, x_te, y_te)
                curves["step"].append(step)
                curves["test_acc"].append(acc)
                curves["test_loss"].append(test_loss)
                curves["train_loss"].append(float(np.mean(window)))
                curves["pct"].append(pct)
                window = []
                if progress is not None:
                    progress(step, acc)
    curves["seconds"] = time.perf_counter() - t0
    curves["diverged_at"] = diverged_at
    return curves


def _summarize(curves, target=TARGET):
    accs = curves["test_acc"]
    reached = [s for s, a in zip(curves["step"], accs) if a >= target]
    final_train = next((v for v in reversed(curves["train_loss"]) if math.isfinite(v)), float("nan"))
    return {
        "steps_to_target": reached[0] if reached else None,
        "final_test_acc": accs[-1],
        "best_test_acc": max(accs),
        "final_train_loss": final_train if curves["diverged_at"] is None else float("nan"),
        "final_test_loss": curves["test_loss"][-1],
        "diverged": curves["diverged_at"] is not None,
    }


# ---------------------------------------------------------------------------------------------
# the experiments
# ---------------------------------------------------------------------------------------------

def experiment_plan():
    """The runs: ``(experiment, activation, bn, lr)``."""
    plan = []
    for lr in SIGMOID_LRS:
        for bn in ("none", "before"):
            plan.append(("sigmoid", "sigmoid", bn, lr))
    for lr in RELU_LRS:
        for bn in ("none", "before", "after"):
            plan.append(("relu", "relu", bn, lr))
    return plan


class _Progress:
    """tqdm bar per run when tqdm is installed, otherwise one plain line per finished run."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self.tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass

    def start(self, i, n, label, steps):
        self.label, self.i, self.n, self.last = label, i, n, 0
        self.bar = None
        if self.tqdm is not None:
            self.bar = self.tqdm(total=steps, desc=f"[{i}/{n}] {label}", unit="step", leave=False,
                                 file=sys.stderr, dynamic_ncols=True)

    def update(self, step, acc):
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(test_acc=f"{acc:.3f}", refresh=False)
        self.last = step

    def finish(self, summary, seconds):
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            status = "diverged" if summary["diverged"] else f"test acc {summary['final_test_acc']:.3f}"
            print(f"[{self.i}/{self.n}] {self.label}: {status} ({seconds:.1f} s)", file=sys.stderr,
                  flush=True)


def run_demo(*, quick=False, steps=None, eval_every=None, seed=0, progress=True):
    """Train every run of :func:`experiment_plan`; returns a JSON-able dict of settings and results."""
    cfg = dict(QUICK if quick else FULL)
    if steps is not None:
        cfg["steps"] = int(steps)
    if eval_every is not None:
        cfg["eval_every"] = int(eval_every)
    data = load_data(seed)
    n_in, n_out = data[0].shape[1], int(data[1].max()) + 1
    plan = experiment_plan()
    bar = _Progress(progress)
    runs = []
    t0 = time.perf_counter()
    for i, (exp, act, bn, lr) in enumerate(plan, 1):
        label = f"{act} 3x100, {_BN_LABEL[bn]}, lr={lr:g}"
        model = make_model(n_in, n_out, activation=act, bn=bn, seed=seed)
        bar.start(i, len(plan), label, cfg["steps"])
        curves = train(model, data, lr=lr, steps=cfg["steps"], eval_every=cfg["eval_every"], seed=seed,
                       progress=bar.update)
        summary = _summarize(curves)
        bar.finish(summary, curves["seconds"])
        runs.append({"experiment": exp, "activation": act, "bn": bn, "lr": lr, "label": label,
                     **summary, "seconds": curves["seconds"], "curves": curves})
    return {
        "settings": {"quick": quick, "seed": seed, "batch_size": BATCH_SIZE, "hidden": list(HIDDEN),
                     "target": TARGET, "n_train": len(data[0]), "n_test": len(data[2]), **cfg},
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------

def _find(results, act, bn, lr):
    for r in results["runs"]:
        if r["activation"] == act and r["bn"] == bn and r["lr"] == lr:
            return r
    return None


def _steps(r, total):
    if r["diverged"]:
        return "diverged"
    return str(r["steps_to_target"]) if r["steps_to_target"] is not None else f"> {total}"


def _fmt(v, spec):
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def format_tables(results):
    """The per-experiment tables, as Markdown (readable in a terminal too)."""
    s = results["settings"]
    head = (f"| network | BN | lr | steps to {s['target']:.0%} test acc | final test acc "
            f"| final train loss | time |\n|---|---|---:|---:|---:|---:|---:|")
    out = []
    titles = {"sigmoid": "Sigmoid net, with vs without BN (claims 1 and 2)",
              "relu": "ReLU net, BN before vs after the activation (claim 3)"}
    for exp in ("sigmoid", "relu"):
        rows = [r for r in results["runs"] if r["experiment"] == exp]
        if not rows:
            continue
        lines = [f"**{titles[exp]}**", "", head]
        for r in rows:
            lines.append(
                f"| {r['activation']} 3x100 | {_BN_LABEL[r['bn']]} | {r['lr']:g} | {_steps(r, s['steps'])} "
                f"| {_fmt(r['final_test_acc'], '.3f')} | {_fmt(r['final_train_loss'], '.4f')} "
                f"| {r['seconds']:.1f} s |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _reach(r):
    """Sort key: steps to target, with 'never' (or diverged) last."""
    return math.inf if r is None or r["diverged"] or r["steps_to_target"] is None else r["steps_to_target"]


CHANCE = 0.2   # final test accuracy below this (10 classes) = the net did not learn at all


def _desc(r, total, final=False):
    """'N steps', 'not within N steps' or 'diverged', optionally with the final test accuracy."""
    if r["diverged"]:
        return f"diverged at step {r['curves']['diverged_at']}"
    txt = (f"{r['steps_to_target']} steps" if r["steps_to_target"] is not None
           else f"not within {total} steps")
    if final or r["steps_to_target"] is None:
        txt += f" (final {r['final_test_acc']:.3f}"
        txt += ", chance level)" if r["final_test_acc"] < CHANCE else ")"
    return txt


def _images(a, b, n):
    """Difference of two accuracies on n test images, in images."""
    return int(round((a - b) * n))


def verdicts(results):
    """One ``(claim, held, explanation)`` per claim, decided from the measured numbers only.

    ``held`` is True or False, or None when the numbers decide nothing (claim 1: no net reached the
    target; claim 3: no clear difference).
    """
    s = results["settings"]
    total, target = s["steps"], s["target"]
    out = []

    # 1. faster convergence: at every learning rate, BN reaches the target in fewer steps. A learning
    #    rate where neither net reaches it decides nothing.
    parts, decided = [], []
    for lr in SIGMOID_LRS:
        p, b = _find(results, "sigmoid", "none", lr), _find(results, "sigmoid", "before", lr)
        if p is None or b is None:
            continue
        txt = f"lr={lr:g}: BN {_desc(b, total)} vs no BN {_desc(p, total)}"
        if math.isinf(_reach(b)) and math.isinf(_reach(p)):
            txt += " (neither reached it: undecided)"
        else:
            decided.append(_reach(b) < _reach(p))
        parts.append(txt)
    held = all(decided) if decided else None
    out.append(("1. sigmoid net with BN reaches "
                f"{target:.0%} test accuracy in fewer steps (at every lr)", held, "; ".join(parts)))

    # 2. higher learning rates: at 10x the base lr and more, the BN net still trains (reaches the target,
    #    no divergence), faster than the plain net at the base lr and faster than the plain net at the
    #    same lr (which is slower, never gets there, or diverges).
    base = _find(results, "sigmoid", "none", BASE_LR)
    parts, held = [], base is not None
    if base is not None:
        parts.append(f"no BN at lr={BASE_LR:g}: {_desc(base, total, True)}")
    for lr in SIGMOID_LRS:
        p, b = _find(results, "sigmoid", "none", lr), _find(results, "sigmoid", "before", lr)
        if lr <= BASE_LR or p is None or b is None or base is None:
            continue
        ok = (not b["diverged"] and b["steps_to_target"] is not None
              and _reach(b) < _reach(base) and _reach(b) < _reach(p))
        held &= ok
        parts.append(f"lr={lr:g}: BN {_desc(b, total, True)} vs no BN {_desc(p, total, True)}")
    relu = []
    for lr in RELU_LRS:
        p, b = _find(results, "relu", "none", lr), _find(results, "relu", "before", lr)
        if p is not None and b is not None:
            relu.append(f"lr={lr:g}: BN {_desc(b, total, True)} vs no BN {_desc(p, total, True)}")
    if relu:
        parts.append("ReLU net (not part of the verdict): " + "; ".join(relu))
    diverged = [r["label"] for r in results["runs"] if r["diverged"]]
    parts.append(("diverged (non-finite loss): " + ", ".join(diverged)) if diverged
                 else "no run diverged to a non-finite loss")
    out.append((f"2. sigmoid net with BN still trains at lr {10 * BASE_LR:g} (10x {BASE_LR:g}) and higher, "
                f"faster than without BN at {BASE_LR:g} and than without BN at the same lr",
                held, "; ".join(parts)))

    # 3. BN before vs after the activation (ReLU net): a three-way verdict. A difference counts only when
    #    it is clear: final test accuracies more than two binomial standard errors apart (about 6 of 450
    #    images near 98%), or steps to the target more than 2x apart.
    parts, votes = [], []
    n_test = s["n_test"]
    for lr in RELU_LRS:
        b, a = _find(results, "relu", "before", lr), _find(results, "relu", "after", lr)
        if a is None or b is None:
            continue
        pa, pb = a["final_test_acc"], b["final_test_acc"]
        p = min(max((pa + pb) / 2, 1.0 / n_test), 1 - 1.0 / n_test)
        clear_acc = abs(pb - pa) > 2 * math.sqrt(p * (1 - p) / n_test)
        rb, ra = _reach(b), _reach(a)
        if clear_acc:
            votes.append("before" if pb > pa else "after")
        if rb * 2 < ra:
            votes.append("before")
        elif ra * 2 < rb:
            votes.append("after")
        diff = _images(pb, pa, n_test)
        parts.append(f"lr={lr:g}: before {_desc(b, total, True)} vs after {_desc(a, total, True)}, "
                     f"{diff:+d} of {n_test} test images for 'before'")
    if not votes:
        held = None
    else:
        held = all(v == "before" for v in votes) or (False if all(v == "after" for v in votes) else None)
    out.append(("3. ReLU net: BN before the activation (the paper's placement) does better than BN after it",
                held, "; ".join(parts)))
    return out


_VERDICT = {True: "HELD", False: "DID NOT HOLD", None: "NO CLEAR DIFFERENCE"}


def format_verdicts(results):
    return "\n".join(f"- {_VERDICT[held]}: {claim}.\n  Measured: {why}."
                     for claim, held, why in verdicts(results))


PCT_LR = 0.1   # learning rate of the runs whose sigmoid-input percentiles are plotted
RELU_YMIN = 0.85


def plot(results, path):
    """Save the training curves to ``path`` (PNG); returns the path, or None without matplotlib."""
    try:
        import matplotlib
        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = results["settings"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=80)
    (ax_acc, ax_pct), (ax_loss, ax_relu) = axes
    palette = ("tab:gray", "tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown")
    sig_color = dict(zip(SIGMOID_LRS, palette))
    relu_color = dict(zip(RELU_LRS, palette[1:]))
    for r in results["runs"]:
        c = r["curves"]
        steps, acc, loss = c["step"][1:], c["test_acc"][1:], c["train_loss"][1:]   # skip step 0 (log x)
        if r["experiment"] == "sigmoid":
            style = dict(color=sig_color[r["lr"]], ls="-" if r["bn"] == "before" else "--", lw=1.3)
            lab = f"{'BN' if r['bn'] == 'before' else 'no BN'}, lr={r['lr']:g}"
            ax_acc.plot(steps, acc, label=lab, **style)
            ax_loss.plot(steps, loss, label=lab, **style)
        else:
            ls = {"before": "-", "after": ":", "none": "--"}[r["bn"]]
            lab = f"{_BN_LABEL[r['bn']]}, lr={r['lr']:g}"
            if r["final_test_acc"] < RELU_YMIN:
                lab += f" (off scale: {r['final_test_acc']:.2f})"
            ax_relu.plot(steps, acc, ls=ls, color=relu_color[r["lr"]], lw=1.3, label=lab)
    ax_acc.set_title("(a) sigmoid 3x100: test accuracy (solid: BN, dashed: no BN)", fontsize=10)
    ax_acc.set_ylim(0, 1.0)
    ax_acc.axhline(s["target"], color="k", lw=0.5)
    ax_loss.set_title("(c) sigmoid 3x100: training loss", fontsize=10)
    ax_loss.set_yscale("log")
    ax_relu.set_title("(d) ReLU 3x100: BN before (solid) / after (dotted) act., no BN (dashed)",
                      fontsize=10)
    ax_relu.set_ylim(RELU_YMIN, 1.0)
    ax_relu.axhline(s["target"], color="k", lw=0.5)
    for ax in (ax_acc, ax_loss, ax_relu):
        ax.set_xscale("log")
    # The paper's Fig. 1(b, c): the input to one sigmoid of the last hidden layer over training.
    for bn, col in (("none", "tab:gray"), ("before", "tab:green")):
        r = _find(results, "sigmoid", bn, PCT_LR)
        if r is None:
            continue
        pct = np.asarray(r["curves"]["pct"])
        steps = r["curves"]["step"]
        ax_pct.fill_between(steps, pct[:, 0], pct[:, 2], color=col, alpha=0.25)
        ax_pct.plot(steps, pct[:, 1], color=col, lw=1.3,
                    label=f"{'BN' if bn == 'before' else 'no BN'}: median, band = 15th-85th pct.")
    ax_pct.set_title(f"(b) input to a last-layer sigmoid (test set), lr={PCT_LR:g}; "
                     "cf. paper Fig. 1(b, c)", fontsize=10)
    for ax in axes.flat:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 if ax is ax_pct else 2)
    fig.suptitle(f"batchnorm {batchnorm.__version__}: digits ({s['n_train']} train / {s['n_test']} test), "
                 f"SGD, batch {s['batch_size']}, {s['steps']} steps, seed {s['seed']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    _shrink_png(path)
    return path


def _shrink_png(path):
    """Re-save a PNG with a 256-colour palette (about 3x smaller, same look); best effort."""
    if not str(path).lower().endswith(".png"):
        return
    try:
        from PIL import Image  # matplotlib depends on Pillow
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    except Exception:  # noqa: BLE001 - the full-colour PNG is fine too
        pass


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(
        prog="python -m batchnorm.demo",
        description="Reproduce the claims of Ioffe & Szegedy (2015), Fig. 1, on scikit-learn's digits "
                    "with batchnorm's layers in a plain NumPy training loop.")
    p.add_argument("--quick", action="store_true",
                   help=f"shorter run ({QUICK['steps']} steps per network instead of {FULL['steps']})")
    p.add_argument("--out", default="batchnorm_demo.png", metavar="PNG",
                   help="where to save the training curves (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="do not save a figure")
    p.add_argument("--json", metavar="PATH", help="also write all settings, results and curves as JSON")
    p.add_argument("--steps", type=int, help="training steps per network (overrides --quick)")
    p.add_argument("--eval-every", type=int, help="evaluate on the test split every N steps")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init and batches (default 0)")
    p.add_argument("--threads", type=int, help="batchnorm.set_num_threads(N) before training")
    p.add_argument("--blas-threads", type=int, default=1, metavar="N",
                   help="threads for NumPy's matrix products, through threadpoolctl when installed "
                        "(default 1: these matrices are tiny; 0 leaves the BLAS default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    return p


def _limit_blas_threads(n):
    """A context that limits the BLAS (NumPy matmul) thread pool to n threads, and a description.

    The demo's matrices are tiny (60 x 100 x 100): a multi-threaded BLAS only adds synchronization,
    and on a busy machine its spinning threads can make a run many times slower. batchnorm's own
    threads are not affected (its kernels run these small batches on one thread anyway).
    """
    if not n:
        return contextlib.nullcontext(), "BLAS default"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext(), "BLAS default (install threadpoolctl to limit it)"
    return threadpool_limits(limits=n, user_api="blas"), f"{n} BLAS thread(s)"


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.threads is not None:
        batchnorm.set_num_threads(args.threads)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("batchnorm.demo needs scikit-learn for its data set (load_digits): "
              "pip install scikit-learn", file=sys.stderr)
        return 2
    limit, blas = _limit_blas_threads(args.blas_threads)
    print(f"batchnorm {batchnorm.__version__} (numpy {np.__version__}), "
          f"{batchnorm.get_num_threads()} batchnorm thread(s), {blas}")
    with limit:
        results = run_demo(quick=args.quick, steps=args.steps, eval_every=args.eval_every, seed=args.seed,
                           progress=not args.no_progress)
    s = results["settings"]
    print(f"\nData: sklearn digits, {s['n_train']} train / {s['n_test']} held-out test images; "
          f"SGD, batch {s['batch_size']}, {s['steps']} steps per network, test accuracy every "
          f"{s['eval_every']} steps (BN in eval mode), seed {s['seed']}. "
          f"Total {results['seconds']:.1f} s.\n")
    print(format_tables(results))
    print("\nClaims of Ioffe & Szegedy (2015), Fig. 1, on this data:\n")
    print(format_verdicts(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, allow_nan=True)
        print(f"\nResults written to {os.path.abspath(args.json)}")
    if not args.no_plot:
        path = plot(results, args.out)
        if path is None:
            print("\nmatplotlib is not installed: no figure (pip install matplotlib)")
        else:
            print(f"\nTraining curves saved to {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
