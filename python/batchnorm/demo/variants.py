"""The demo's second experiment, ``variants``: what Batch Renormalization, Ghost BN and precise statistics buy.

Run it with ``python -m batchnorm.demo variants`` (``--quick`` for a few seconds). It trains the ReLU net of
:mod:`batchnorm.demo.training` (three fully connected hidden layers of 100 units, BN before the
activation) on the digits (:mod:`batchnorm.demo.data`) in two groups of runs, each group compared within
itself only (same steps, same learning rate, same samples per step):

- **small batches**, 4 samples per SGD step: no BN, plain BN (statistics of the 4 samples) and Batch
  Renormalization (``renorm=True``, Ioffe 2017), whose ``rmax``/``dmax`` start at 1 and 0 (plain BN) and
  are ramped up linearly as the paper does (see :func:`renorm_schedule`);
- **a larger batch of 32** per step: no BN, plain BN over the 32 samples, and Ghost BN
  (``ghost_batch_size=4``, Hoffer et al. 2017): the same 32 samples per step and the same gradient step,
  but normalized in 8 ghost batches of 4. This isolates what normalizing over 4 instead of 32 does to a
  large-batch run; the small-batch group shows what a 4-sample step does.

Test accuracy is measured in eval mode (running statistics) on the held-out split during training. At the
end every BN net is evaluated twice: with its running statistics, the exponential moving average (EMA) of
training, and with **precise statistics** (:func:`batchnorm.precise_stats`, Wu & Johnson 2021) recomputed
with the final weights in one pass over the training set, in consecutive batches of the size the net
normalized over during training (4, or 32 for plain BN on 32). Every arm runs for several seeds (initial
weights and minibatch order; the same seed gives every arm the same initial weights and the same
minibatch order within its group); the tables give the mean and spread, and each verdict compares two
arms seed by seed (a paired t-test, see :func:`paired_difference`).

As an experiment of :mod:`batchnorm.demo.cli` it provides ``NAME``, ``HELP``, ``DESCRIPTION``,
``DEFAULT_OUT``, :func:`add_arguments`, :func:`run`, :func:`report` and :func:`plot`.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np

import batchnorm

from . import plots
from .claims import clear_accuracy_difference, fmt, format_verdict_list
from .data import load_data
from .training import Progress, make_model, summarize, train

__all__ = ["NAME", "HELP", "DESCRIPTION", "DEFAULT_OUT", "ACTIVATION", "GROUPS", "ARMS", "RMAX", "DMAX",
           "RAMP", "FULL", "QUICK", "renorm_schedule", "build_model", "train_arm", "precise_copy",
           "stats_gap", "run_variants", "paired_difference", "verdicts", "format_tables", "format_verdicts",
           "plot", "add_arguments", "run", "report"]

NAME = "variants"
HELP = "small batches: BN vs Batch Renorm vs Ghost BN vs no BN; EMA vs precise statistics at evaluation"
DESCRIPTION = ("Measure on scikit-learn's digits what Batch Renormalization and Ghost BN buy with small "
               "(4-sample) normalization batches, against plain BN and no BN, and what exact population "
               "statistics (batchnorm.precise_stats) buy at evaluation against the running averages; "
               "several seeds, a table, verdicts and a figure.")
DEFAULT_OUT = "batchnorm_variants.png"

ACTIVATION = "relu"

#: The two groups of runs: samples per SGD step and learning rate. Arms are compared within a group only.
GROUPS = {
    "small": {"batch_size": 4, "lr": 0.05, "title": "4 samples per step"},
    "large": {"batch_size": 32, "lr": 0.1, "title": "32 samples per step"},
}

#: The arms: ``key``, ``group``, ``label``, whether the net has BN, the options of its BN layers, the
#: samples each BN normalizes over (None without BN), and whether rmax/dmax follow :func:`renorm_schedule`.
ARMS = (
    {"key": "small_none", "group": "small", "label": "no BN", "bn": "none", "options": {},
     "normalized_over": None, "ramp": False},
    {"key": "small_bn", "group": "small", "label": "BN", "bn": "before", "options": {},
     "normalized_over": 4, "ramp": False},
    {"key": "small_renorm", "group": "small", "label": "Batch Renorm", "bn": "before",
     "options": {"renorm": True}, "normalized_over": 4, "ramp": True},
    {"key": "large_none", "group": "large", "label": "no BN", "bn": "none", "options": {},
     "normalized_over": None, "ramp": False},
    {"key": "large_bn", "group": "large", "label": "BN", "bn": "before", "options": {},
     "normalized_over": 32, "ramp": False},
    {"key": "large_ghost", "group": "large", "label": "Ghost BN (4)", "bn": "before",
     "options": {"ghost_batch_size": 4}, "normalized_over": 4, "ramp": False},
)

RMAX, DMAX = 3.0, 5.0    # the values the ramp ends at (the layers' defaults, the paper's values)
# The ramp, as fractions of the run: rmax = 1 and dmax = 0 (plain BN) until `start`, while the running
# statistics become meaningful; then linear, reaching RMAX at `rmax_full` and DMAX at `dmax_full`. The
# paper holds them for its first 5k steps and reaches rmax = 3 at 40k steps and dmax = 5 at 25k; we keep
# that shape on a run of a few thousand steps.
RAMP = {"start": 0.05, "rmax_full": 0.25, "dmax_full": 0.15}

FULL = {"steps": 4000, "eval_every": 100, "seeds": 5}
QUICK = {"steps": 300, "eval_every": 50, "seeds": 2}


# ---------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------

def renorm_schedule(step, steps):
    """``(rmax, dmax)`` for training step ``step`` (from 1) of a run of ``steps``: see :data:`RAMP`."""
    frac = step / steps

    def ramp(full):
        return min(max((frac - RAMP["start"]) / (full - RAMP["start"]), 0.0), 1.0)

    return 1.0 + (RMAX - 1.0) * ramp(RAMP["rmax_full"]), DMAX * ramp(RAMP["dmax_full"])


def _arm(key):
    for arm in ARMS:
        if arm["key"] == key:
            return arm
    raise ValueError(f"no arm {key!r}; the arms are {[a['key'] for a in ARMS]}")


def _bn_layers(model):
    return [layer for layer in model.layers if isinstance(layer, batchnorm.BatchNorm)]


def build_model(arm, n_in, n_out, seed):
    """The net of an arm (a dict of :data:`ARMS`, or its key): the same initial weights for every arm
    with the same seed; with a ramp, its BN layers start at ``rmax=1, dmax=0``."""
    arm = _arm(arm) if isinstance(arm, str) else arm
    options = dict(arm["options"])
    if arm["ramp"]:
        options.update(zip(("rmax", "dmax"), renorm_schedule(0, 1)))
    return make_model(n_in, n_out, activation=ACTIVATION, bn=arm["bn"], seed=seed, bn_options=options)


def train_arm(model, arm, data, *, steps, eval_every, seed, progress=None):
    """Train ``model`` (from :func:`build_model`) as ``arm`` says: its group's batch size and learning rate,
    minibatch order from ``seed``, rmax/dmax following :func:`renorm_schedule` when the arm ramps.
    Returns :func:`batchnorm.demo.training.train`'s curves."""
    arm = _arm(arm) if isinstance(arm, str) else arm
    group = GROUPS[arm["group"]]
    before_step = None
    if arm["ramp"]:
        layers = _bn_layers(model)

        def before_step(step):
            rmax, dmax = renorm_schedule(step, steps)
            for layer in layers:
                layer.rmax, layer.dmax = rmax, dmax

    return train(model, data, lr=group["lr"], steps=steps, eval_every=eval_every, seed=seed,
                 progress=progress, batch_size=group["batch_size"], before_step=before_step)


def precise_copy(model, x_train, batch_size):
    """A copy of ``model`` whose BN layers' running statistics are the exact statistics of one pass over
    ``x_train`` in consecutive batches of ``batch_size`` (the last one may be smaller), computed with
    :func:`batchnorm.precise_stats`; ``model`` is left as it was. The copy is in eval mode."""
    precise = copy.deepcopy(model)
    with batchnorm.precise_stats(precise):
        for start in range(0, len(x_train), batch_size):
            precise(x_train[start:start + batch_size])
    return precise.eval()


def stats_gap(ema_model, precise_model):
    """How far the running (EMA) statistics are from the precise ones, per BN layer: the mean over channels
    of ``|mean_ema - mean_precise| / sqrt(var_precise)`` and of ``|log(var_ema / var_precise)|``."""
    gaps = []
    for e, p in zip(_bn_layers(ema_model), _bn_layers(precise_model)):
        pm, pv = p.running_mean.astype(np.float64), p.running_var.astype(np.float64)
        em, ev = e.running_mean.astype(np.float64), e.running_var.astype(np.float64)
        gaps.append({"mean": float(np.mean(np.abs(em - pm) / np.sqrt(pv + e.eps))),
                     "log_var": float(np.mean(np.abs(np.log((ev + e.eps) / (pv + e.eps)))))})
    return gaps


def _accuracy(model, x, y):
    from batchnorm.examples import accuracy

    model.eval()
    acc = accuracy(model(x), y)
    model.train()
    return acc


def _summary(values):
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0 or not np.isfinite(a).all():
        return {"mean": float("nan"), "sd": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def run_variants(*, quick=False, steps=None, eval_every=None, seeds=None, seed=0, progress=True):
    """Train every arm of :data:`ARMS` for every seed, and evaluate with EMA and with precise statistics.

    Parameters
    ----------
    quick : bool, optional
        ``QUICK`` settings instead of ``FULL``.
    steps, eval_every, seeds : int, optional
        Override the steps per run, the evaluation spacing and the number of seeds.
    seed : int, optional
        The split is drawn from ``seed``; the runs use seeds ``seed, seed + 1, ...``.
    progress : bool, optional
        Progress bars (tqdm) or lines on stderr.

    Returns
    -------
    dict
        JSON-able: ``settings`` (with ``seeds``, the list of run seeds), ``arms`` (each a dict of :data:`ARMS` with its group's ``batch_size``
        and ``lr``, its ``runs``, one per seed, and ``summary``: mean, sd, min and max over the seeds of
        ``ema_acc``, ``precise_acc`` and ``final_train_loss``) and ``seconds``.
    """
    cfg = dict(QUICK if quick else FULL)
    for name, value in (("steps", steps), ("eval_every", eval_every), ("seeds", seeds)):
        if value is not None:
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
            cfg[name] = int(value)
    data = load_data(seed)
    x_tr, y_tr, x_te, y_te = data
    n_in, n_out = x_tr.shape[1], int(y_tr.max()) + 1
    run_seeds = [seed + i for i in range(cfg["seeds"])]
    bar = Progress(progress)
    total, i = len(ARMS) * len(run_seeds), 0
    arms = []
    t0 = time.perf_counter()
    for arm in ARMS:
        group = GROUPS[arm["group"]]
        runs = []
        for s in run_seeds:
            i += 1
            model = build_model(arm, n_in, n_out, s)
            bar.start(i, total, f"{group['title']}, {arm['label']}, seed {s}", cfg["steps"])
            curves = train_arm(model, arm, data, steps=cfg["steps"], eval_every=cfg["eval_every"], seed=s,
                               progress=bar.update)
            summary = summarize(curves, 1.0)
            bar.finish(summary, curves["seconds"])
            run = {"seed": s, "ema_acc": summary["final_test_acc"], "precise_acc": None, "stats_gap": None,
                   "final_train_loss": summary["final_train_loss"], "diverged": summary["diverged"],
                   "seconds": curves["seconds"], "curves": curves}
            if arm["bn"] != "none" and not summary["diverged"]:
                precise = precise_copy(model, x_tr, arm["normalized_over"])
                run["precise_acc"] = _accuracy(precise, x_te, y_te)
                run["stats_gap"] = stats_gap(model, precise)
                if arm["ramp"]:
                    run["final_rmax_dmax"] = [_bn_layers(model)[0].rmax, _bn_layers(model)[0].dmax]
            runs.append(run)
        summary = {k: _summary([r[k] for r in runs if r[k] is not None])
                   for k in ("ema_acc", "precise_acc", "final_train_loss")}
        summary["seconds"] = float(np.mean([r["seconds"] for r in runs]))
        arms.append({**copy.deepcopy(arm), "batch_size": group["batch_size"], "lr": group["lr"],
                     "runs": runs, "summary": summary})
    return {
        "settings": {"quick": quick, "steps": cfg["steps"], "eval_every": cfg["eval_every"], "seed": seed,
                     "seeds": run_seeds, "activation": ACTIVATION, "hidden": [100, 100, 100],
                     "n_train": len(x_tr), "n_test": len(x_te), "groups": copy.deepcopy(GROUPS),
                     "rmax": RMAX, "dmax": DMAX, "ramp": dict(RAMP)},
        "arms": arms,
        "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------------------------
# comparisons, tables and verdicts
# ---------------------------------------------------------------------------------------------

def paired_difference(a, b, n_test):
    """Compare accuracies ``a`` and ``b`` measured seed by seed (the same seeds, in the same order).

    The difference ``a - b`` counts as clear when its mean over the seeds is more than ``t * se`` away
    from 0, ``se`` the standard error of the per-seed differences and ``t`` the two-sided 5% quantile of
    Student's t with ``len(a) - 1`` degrees of freedom (a paired t-test); with a single seed, when the two
    accuracies are more than two binomial standard errors of ``n_test`` test images apart.

    Returns
    -------
    mean : float
        Mean of ``a - b`` over the seeds.
    se : float
        Its standard error (nan with one seed).
    held : bool or None
        True: ``a`` is clearly higher; False: clearly lower; None: no clear difference.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), None
    mean = float(d.mean())
    if d.size == 1:
        se = float("nan")
        clear = clear_accuracy_difference(float(a[0]), float(b[0]), n_test)
    else:
        from scipy.stats import t as student_t   # scipy comes with scikit-learn, which the demo needs

        se = float(d.std(ddof=1) / math.sqrt(d.size))
        clear = abs(mean) > 0 if se == 0 else abs(mean) > student_t.ppf(0.975, d.size - 1) * se
    return mean, se, (mean > 0) if clear else None


def _find(results, key):
    for arm in results["arms"]:
        if arm["key"] == key:
            return arm
    return None


def _accs(arm, which):
    return [r[which] for r in arm["runs"]]


def _pm(summary, spec=".3f"):
    if not math.isfinite(summary["mean"]):
        return "n/a"
    return f"{summary['mean']:{spec}} ± {summary['sd']:{spec}}"


def _images(mean, n_test):
    return "n/a" if not math.isfinite(mean) else f"{mean * n_test:+.1f}"


def format_tables(results):
    """The summary table (one row per arm: mean ± sd over the seeds) and the per-seed table, as Markdown."""
    s = results["settings"]
    n_test = s["n_test"]
    lines = [f"**Test accuracy after {s['steps']} steps, mean ± sd over {len(s['seeds'])} seed(s)**", "",
             "| samples per step | normalized over | variant | lr | test acc, EMA stats | "
             "test acc, precise stats | precise - EMA (images) | final train loss | time per run |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for arm in results["arms"]:
        sm = arm["summary"]
        diff = float("nan")
        if arm["bn"] != "none" and all(r["precise_acc"] is not None for r in arm["runs"]):
            diff = float(np.mean(np.subtract(_accs(arm, "precise_acc"), _accs(arm, "ema_acc"))))
        lines.append(
            f"| {arm['batch_size']} | {arm['normalized_over'] or '-'} | {arm['label']} | {arm['lr']:g} "
            f"| {_pm(sm['ema_acc'])} | {_pm(sm['precise_acc'])} | {_images(diff, n_test)} "
            f"| {fmt(sm['final_train_loss']['mean'], '.4f')} | {sm['seconds']:.1f} s |")
    per_seed = ["**Per seed: test accuracy with EMA / precise statistics**", "",
                "| samples per step | variant | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " |",
                "|---:|---|" + "---:|" * len(s["seeds"])]
    for arm in results["arms"]:
        cells = []
        for r in arm["runs"]:
            cell = "diverged" if r["diverged"] else f"{r['ema_acc']:.3f}"
            if r["precise_acc"] is not None:
                cell += f" / {r['precise_acc']:.3f}"
            cells.append(cell)
        per_seed.append(f"| {arm['batch_size']} | {arm['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(per_seed)


def _compare(results, key_a, which_a, key_b, which_b):
    """``(mean, se, held, text)`` for arm a's ``which_a`` accuracy against arm b's ``which_b``."""
    a, b = _find(results, key_a), _find(results, key_b)
    n_test = results["settings"]["n_test"]
    if a is None or b is None:
        return float("nan"), float("nan"), None, "not run"
    va, vb = _accs(a, which_a), _accs(b, which_b)
    if any(v is None for v in va + vb):
        return float("nan"), float("nan"), None, "a run diverged: no comparison"
    mean, se, held = paired_difference(va, vb, n_test)
    se_txt = "" if not math.isfinite(se) else f" ± {se * n_test:.1f}"
    text = (f"{np.mean(va):.3f} vs {np.mean(vb):.3f}, {mean * n_test:+.1f}{se_txt} of {n_test} test images "
            f"(mean ± se of the paired per-seed differences over {len(va)} seed(s))")
    return mean, se, held, text


def verdicts(results):
    """One ``(claim, held, explanation)`` per claim, decided from the measured numbers only.

    Each claim compares two arms seed by seed with :func:`paired_difference`: ``held`` is True when the
    claimed arm is clearly more accurate, False when it is clearly less accurate, None when the difference
    is not clear.

    Parameters
    ----------
    results : dict
        As returned by :func:`run_variants` (only ``settings`` and the runs' accuracies are read).

    Returns
    -------
    list of tuple
    """
    out = []
    claims = [
        ("1. with 4 samples per step, BN ends more accurate than no BN (EMA statistics at evaluation)",
         "small_bn", "ema_acc", "small_none", "ema_acc"),
        ("2. with 4 samples per step, Batch Renorm ends more accurate than plain BN (EMA statistics at "
         "evaluation, as the paper evaluates)", "small_renorm", "ema_acc", "small_bn", "ema_acc"),
        ("3. with 32 samples per step, Ghost BN (8 ghost batches of 4) ends more accurate than BN over all 32 "
         "(same samples, same steps)", "large_ghost", "ema_acc", "large_bn", "ema_acc"),
    ]
    for claim, ka, wa, kb, wb in claims:
        _, _, held, text = _compare(results, ka, wa, kb, wb)
        out.append((claim, held, text))
    for n, key in zip("abcd", ("small_bn", "small_renorm", "large_bn", "large_ghost")):
        arm = _find(results, key)
        if arm is None:
            continue
        _, _, held, text = _compare(results, key, "precise_acc", key, "ema_acc")
        out.append((f"4{n}. {GROUPS[arm['group']]['title']}, {arm['label']}: precise statistics evaluate more "
                    "accurately than the EMA running statistics", held, "precise vs EMA: " + text))
    return out


def format_verdicts(results):
    """:func:`verdicts` as a Markdown list: the verdict, the claim and what was measured."""
    return format_verdict_list(verdicts(results))


# ---------------------------------------------------------------------------------------------
# the figure
# ---------------------------------------------------------------------------------------------

_COLORS = {"no BN": "tab:gray", "BN": "tab:blue", "Batch Renorm": "tab:red", "Ghost BN (4)": "tab:green"}
ACC_YMIN = 0.8


def _mean_curve(arm, name):
    """Steps and the mean, min and max over the seeds of one curve (runs that stopped early left out)."""
    runs = [r for r in arm["runs"] if not r["diverged"]]
    if not runs:
        return None
    steps = runs[0]["curves"]["step"]
    values = np.array([r["curves"][name] for r in runs], dtype=np.float64)
    return np.asarray(steps), values.mean(0), values.min(0), values.max(0)


def plot(results, path):
    """Save the figure of :func:`run_variants`'s results to ``path`` (PNG): test accuracy curves of both
    groups, EMA vs precise accuracy per arm, and the training loss.

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
    (ax_small, ax_large), (ax_bars, ax_loss) = axes
    for arm in results["arms"]:
        color = _COLORS[arm["label"]]
        ax = ax_small if arm["group"] == "small" else ax_large
        acc = _mean_curve(arm, "test_acc")
        if acc is not None:
            steps, mean, lo, hi = (v[1:] for v in acc)      # skip step 0 (log x)
            label = arm["label"]
            if mean[-1] < ACC_YMIN:
                label += f" (off scale: {mean[-1]:.2f})"
            ax.plot(steps, mean, color=color, lw=1.3, label=label)
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2)
        loss = _mean_curve(arm, "train_loss")
        if loss is not None:
            ax_loss.plot(loss[0][1:], loss[1][1:], color=color, lw=1.2,
                         ls="-" if arm["group"] == "small" else "--",
                         label=f"{arm['batch_size']}/step, {arm['label']}")
    for frac, what in ((s["ramp"]["start"], "ramp starts"), (s["ramp"]["rmax_full"], "rmax = 3")):
        ax_small.axvline(frac * s["steps"], color="tab:red", lw=0.7, ls=":")
        ax_small.text(frac * s["steps"], ACC_YMIN + 0.005, f" {what}", color="tab:red", fontsize=7,
                      rotation=90, va="bottom")
    for ax, key in ((ax_small, "small"), (ax_large, "large")):
        g = s["groups"][key]
        ax.set_title(f"({'a' if key == 'small' else 'b'}) {g['title']}, lr {g['lr']:g}: test accuracy\n"
                     "(EMA statistics), mean over the seeds, band = min-max", fontsize=9)
        ax.set_ylim(ACC_YMIN, 1.0)
        ax.set_xscale("log")
    ax_loss.set_title("(d) training loss, mean over the seeds\n(solid: 4 samples per step, dashed: 32)",
                      fontsize=9)
    ax_loss.set_xscale("log")
    ax_loss.set_yscale("log")
    # (c) the final accuracies, EMA vs precise statistics, one dot per seed
    bn_arms = results["arms"]
    x = np.arange(len(bn_arms))
    for j, (which, offset, hatch) in enumerate((("ema_acc", -0.2, ""), ("precise_acc", 0.2, "//"))):
        for k, arm in enumerate(bn_arms):
            vals = [r[which] for r in arm["runs"] if r[which] is not None]
            if not vals:
                continue
            color = _COLORS[arm["label"]]
            ax_bars.bar(x[k] + offset, np.mean(vals), width=0.38, color=color, alpha=0.45, hatch=hatch,
                        edgecolor=color, label=("EMA statistics" if which == "ema_acc" else
                                                "precise statistics") if k == 1 else None)
            ax_bars.plot([x[k] + offset] * len(vals), vals, "k.", ms=3)
    ax_bars.set_xticks(x)
    ax_bars.set_xticklabels([f"{a['label']}\n{a['batch_size']}/step" for a in bn_arms], fontsize=7)
    lows = [r[w] for a in bn_arms for r in a["runs"] for w in ("ema_acc", "precise_acc") if r[w] is not None]
    ax_bars.set_ylim(max(0.0, min(lows) - 0.02) if lows else 0.0, 1.0)
    ax_bars.set_title("(c) final test accuracy, mean (bars) and seeds (dots):\n"
                      "EMA (plain) vs precise (hatched) statistics", fontsize=9)
    for ax in axes.flat:
        if ax is not ax_bars:
            ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"batchnorm {batchnorm.__version__}: digits ({s['n_train']} train / {s['n_test']} test), "
                 f"ReLU 3x100, SGD, {s['steps']} steps, seeds {s['seeds'][0]}-{s['seeds'][-1]}", fontsize=11)
    fig.tight_layout()
    return plots.save(fig, path)


# ---------------------------------------------------------------------------------------------
# the experiment's side of the command line (batchnorm.demo.cli)
# ---------------------------------------------------------------------------------------------

def add_arguments(parser):
    """Add this experiment's own options to its ``argparse`` parser (the shared ones come from the CLI)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"shorter run ({QUICK['steps']} steps, {QUICK['seeds']} seeds instead of "
                             f"{FULL['steps']} steps, {FULL['seeds']} seeds)")
    parser.add_argument("--steps", type=int, help="training steps per run (overrides --quick)")
    parser.add_argument("--eval-every", type=int, help="evaluate on the test split every N steps")
    parser.add_argument("--seeds", type=int, metavar="N",
                        help="runs per arm, with seeds SEED, SEED+1, ... (overrides --quick)")


def run(args):
    """Run the experiment with the parsed options ``args``; returns :func:`run_variants`'s results."""
    return run_variants(quick=args.quick, steps=args.steps, eval_every=args.eval_every, seeds=args.seeds,
                        seed=args.seed, progress=not args.no_progress)


def report(results):
    """What the command line prints after the runs: the setting, the tables and the verdicts."""
    s = results["settings"]
    r = s["ramp"]
    return "\n".join([
        f"\nData: sklearn digits, {s['n_train']} train / {s['n_test']} held-out test images; ReLU 3x100, "
        f"BN before the activation; SGD, {s['steps']} steps per run, seeds {', '.join(map(str, s['seeds']))}; "
        f"test accuracy in eval mode. Batch Renorm: rmax = 1, dmax = 0 until {r['start']:.0%} of the steps, "
        f"then linear to rmax = {s['rmax']:g} at {r['rmax_full']:.0%} and dmax = {s['dmax']:g} at "
        f"{r['dmax_full']:.0%}. Precise statistics: one pass over the training set in batches of the size "
        f"each net normalized over. Total {results['seconds']:.1f} s.\n",
        format_tables(results),
        "\nWhat the variants buy on this data (each claim: two arms compared seed by seed, a difference is "
        "clear at 5% in a paired t-test):\n",
        format_verdicts(results),
    ])
