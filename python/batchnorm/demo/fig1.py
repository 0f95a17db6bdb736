"""The demo's first experiment, ``fig1``: Ioffe & Szegedy (2015), Figure 1, redone on scikit-learn's digits.

Run it with ``python -m batchnorm.demo`` (it is the default experiment) or ``python -m batchnorm.demo
fig1``. It trains small fully connected networks on the digits (:mod:`batchnorm.demo.data`), with a fixed
seed and a stratified held-out test split, and checks three claims of the paper:

1. **faster convergence** -- a net of three fully connected hidden layers of 100 sigmoid units
   reaches a given test accuracy in fewer steps with BN than without;
2. **higher learning rates** -- with BN a 10x larger learning rate (0.01 -> 0.1) and higher ones
   (0.5, 1.0) still train, where the plain net trains slower or diverges (the ReLU nets below
   are run at 0.1, 0.5 and 1.0 as well);
3. **where to put BN** -- the paper normalizes ``Wu`` *before* the nonlinearity; with ReLU units we
   compare BN before and after the activation side by side.

Each network is trained with plain minibatch SGD (batch 60, as in the paper) and the same seed:
same initial weights, same minibatch order (:mod:`batchnorm.demo.training`). Test accuracy is measured
every few steps on the held-out split, with BN layers in eval mode (running statistics). The experiment
prints a table per part, a verdict per claim computed from those numbers (:mod:`batchnorm.demo.claims`),
and saves a PNG of the training curves (if matplotlib is installed).

As an experiment of :mod:`batchnorm.demo.cli` it provides ``NAME``, ``HELP``, ``DESCRIPTION``,
``DEFAULT_OUT``, :func:`add_arguments`, :func:`run`, :func:`report` and :func:`plot`.
"""

from __future__ import annotations

import math
import time

import numpy as np

import batchnorm

from . import plots
from .claims import (
    clear_accuracy_difference, describe, fmt, format_verdict_list, images, reach, steps_cell,
)
from .data import load_data
from .training import BATCH_SIZE, BN_LABEL, HIDDEN, Progress, make_model, summarize, train

__all__ = ["NAME", "HELP", "DESCRIPTION", "DEFAULT_OUT", "TARGET", "SIGMOID_LRS", "RELU_LRS", "BASE_LR",
           "FULL", "QUICK", "PCT_LR", "RELU_YMIN", "experiment_plan", "run_demo", "format_tables", "verdicts",
           "format_verdicts", "plot", "add_arguments", "run", "report"]

NAME = "fig1"
HELP = "Ioffe & Szegedy (2015), Fig. 1: sigmoid and ReLU nets with and without BN"
DESCRIPTION = ("Reproduce the claims of Ioffe & Szegedy (2015), Fig. 1, on scikit-learn's digits "
               "with batchnorm's layers in a plain NumPy training loop.")
DEFAULT_OUT = "batchnorm_demo.png"

TARGET = 0.95                       # "steps to target" = first evaluation with test accuracy >= this
SIGMOID_LRS = (0.01, 0.1, 0.5, 1.0)
RELU_LRS = (0.1, 0.5, 1.0)
BASE_LR = 0.01                      # the "10x larger" claim compares BN at 0.1 with no BN at 0.01

FULL = {"steps": 10000, "eval_every": 50}
QUICK = {"steps": 1000, "eval_every": 25}

PCT_LR = 0.1   # learning rate of the runs whose sigmoid-input percentiles are plotted
RELU_YMIN = 0.85


# ---------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------

def experiment_plan():
    """The runs: ``(experiment, activation, bn, lr)``, where experiment is "sigmoid" or "relu"."""
    plan = []
    for lr in SIGMOID_LRS:
        for bn in ("none", "before"):
            plan.append(("sigmoid", "sigmoid", bn, lr))
    for lr in RELU_LRS:
        for bn in ("none", "before", "after"):
            plan.append(("relu", "relu", bn, lr))
    return plan


def run_demo(*, quick=False, steps=None, eval_every=None, seed=0, progress=True):
    """Train every run of :func:`experiment_plan`.

    Parameters
    ----------
    quick : bool, optional
        ``QUICK`` steps instead of ``FULL``.
    steps, eval_every : int, optional
        Override the steps per network and the evaluation spacing.
    seed : int, optional
        Seed of the split, the initial weights and the minibatch order.
    progress : bool, optional
        Progress bars (tqdm) or lines on stderr.

    Returns
    -------
    dict
        JSON-able: ``settings``, ``runs`` (one dict per run: its plan entry, label, the numbers of
        :func:`batchnorm.demo.training.summarize`, ``seconds`` and ``curves``) and ``seconds``.
    """
    cfg = dict(QUICK if quick else FULL)
    if steps is not None:
        cfg["steps"] = int(steps)
    if eval_every is not None:
        cfg["eval_every"] = int(eval_every)
    data = load_data(seed)
    n_in, n_out = data[0].shape[1], int(data[1].max()) + 1
    plan = experiment_plan()
    bar = Progress(progress)
    runs = []
    t0 = time.perf_counter()
    for i, (exp, act, bn, lr) in enumerate(plan, 1):
        label = f"{act} 3x100, {BN_LABEL[bn]}, lr={lr:g}"
        model = make_model(n_in, n_out, activation=act, bn=bn, seed=seed)
        bar.start(i, len(plan), label, cfg["steps"])
        curves = train(model, data, lr=lr, steps=cfg["steps"], eval_every=cfg["eval_every"], seed=seed,
                       progress=bar.update)
        summary = summarize(curves, TARGET)
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
# tables and verdicts
# ---------------------------------------------------------------------------------------------

def _find(results, act, bn, lr):
    for r in results["runs"]:
        if r["activation"] == act and r["bn"] == bn and r["lr"] == lr:
            return r
    return None


def format_tables(results):
    """The per-experiment tables of :func:`run_demo`'s results, as Markdown (readable in a terminal too)."""
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
                f"| {r['activation']} 3x100 | {BN_LABEL[r['bn']]} | {r['lr']:g} | {steps_cell(r, s['steps'])} "
                f"| {fmt(r['final_test_acc'], '.3f')} | {fmt(r['final_train_loss'], '.4f')} "
                f"| {r['seconds']:.1f} s |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def verdicts(results):
    """One ``(claim, held, explanation)`` per claim, decided from the measured numbers only.

    Parameters
    ----------
    results : dict
        As returned by :func:`run_demo` (only ``settings`` and the runs' summaries are read).

    Returns
    -------
    list of tuple
        ``held`` is True or False, or None when the numbers decide nothing (claim 1: no net reached
        the target; claim 3: no clear difference).
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
        txt = f"lr={lr:g}: BN {describe(b, total)} vs no BN {describe(p, total)}"
        if math.isinf(reach(b)) and math.isinf(reach(p)):
            txt += " (neither reached it: undecided)"
        else:
            decided.append(reach(b) < reach(p))
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
        parts.append(f"no BN at lr={BASE_LR:g}: {describe(base, total, True)}")
    for lr in SIGMOID_LRS:
        p, b = _find(results, "sigmoid", "none", lr), _find(results, "sigmoid", "before", lr)
        if lr <= BASE_LR or p is None or b is None or base is None:
            continue
        ok = (not b["diverged"] and b["steps_to_target"] is not None
              and reach(b) < reach(base) and reach(b) < reach(p))
        held &= ok
        parts.append(f"lr={lr:g}: BN {describe(b, total, True)} vs no BN {describe(p, total, True)}")
    relu = []
    for lr in RELU_LRS:
        p, b = _find(results, "relu", "none", lr), _find(results, "relu", "before", lr)
        if p is not None and b is not None:
            relu.append(f"lr={lr:g}: BN {describe(b, total, True)} vs no BN {describe(p, total, True)}")
    if relu:
        parts.append("ReLU net (not part of the verdict): " + "; ".join(relu))
    diverged = [r["label"] for r in results["runs"] if r["diverged"]]
    parts.append(("diverged (non-finite loss): " + ", ".join(diverged)) if diverged
                 else "no run diverged to a non-finite loss")
    out.append((f"2. sigmoid net with BN still trains at lr {10 * BASE_LR:g} (10x {BASE_LR:g}) and higher, "
                f"faster than without BN at {BASE_LR:g} and than without BN at the same lr",
                held, "; ".join(parts)))

    # 3. BN before vs after the activation (ReLU net): a three-way verdict. A difference counts only when
    #    it is clear: final test accuracies more than two binomial standard errors apart, or steps to the
    #    target more than 2x apart.
    parts, votes = [], []
    n_test = s["n_test"]
    for lr in RELU_LRS:
        b, a = _find(results, "relu", "before", lr), _find(results, "relu", "after", lr)
        if a is None or b is None:
            continue
        pa, pb = a["final_test_acc"], b["final_test_acc"]
        rb, ra = reach(b), reach(a)
        if clear_accuracy_difference(pa, pb, n_test):
            votes.append("before" if pb > pa else "after")
        if rb * 2 < ra:
            votes.append("before")
        elif ra * 2 < rb:
            votes.append("after")
        diff = images(pb, pa, n_test)
        parts.append(f"lr={lr:g}: before {describe(b, total, True)} vs after {describe(a, total, True)}, "
                     f"{diff:+d} of {n_test} test images for 'before'")
    if not votes:
        held = None
    else:
        held = all(v == "before" for v in votes) or (False if all(v == "after" for v in votes) else None)
    out.append(("3. ReLU net: BN before the activation (the paper's placement) does better than BN after it",
                held, "; ".join(parts)))
    return out


def format_verdicts(results):
    """:func:`verdicts` as a Markdown list: the verdict, the claim and what was measured."""
    return format_verdict_list(verdicts(results))


# ---------------------------------------------------------------------------------------------
# the figure
# ---------------------------------------------------------------------------------------------

def plot(results, path):
    """Save the training curves of :func:`run_demo`'s results to ``path`` (PNG).

    Returns
    -------
    str or None
        ``path``, or None when matplotlib is not installed.
    """
    plt = plots.pyplot()
    if plt is None:
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
            lab = f"{BN_LABEL[r['bn']]}, lr={r['lr']:g}"
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
    return plots.save(fig, path)


# ---------------------------------------------------------------------------------------------
# the experiment's side of the command line (batchnorm.demo.cli)
# ---------------------------------------------------------------------------------------------

def add_arguments(parser):
    """Add this experiment's own options to its ``argparse`` parser (the shared ones come from the CLI)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"shorter run ({QUICK['steps']} steps per network instead of {FULL['steps']})")
    parser.add_argument("--steps", type=int, help="training steps per network (overrides --quick)")
    parser.add_argument("--eval-every", type=int, help="evaluate on the test split every N steps")


def run(args):
    """Run the experiment with the parsed options ``args``; returns :func:`run_demo`'s results."""
    return run_demo(quick=args.quick, steps=args.steps, eval_every=args.eval_every, seed=args.seed,
                    progress=not args.no_progress)


def report(results):
    """What the command line prints after the runs: the setting, the tables and the verdicts."""
    s = results["settings"]
    return "\n".join([
        f"\nData: sklearn digits, {s['n_train']} train / {s['n_test']} held-out test images; "
        f"SGD, batch {s['batch_size']}, {s['steps']} steps per network, test accuracy every "
        f"{s['eval_every']} steps (BN in eval mode), seed {s['seed']}. "
        f"Total {results['seconds']:.1f} s.\n",
        format_tables(results),
        "\nClaims of Ioffe & Szegedy (2015), Fig. 1, on this data:\n",
        format_verdicts(results),
    ])
