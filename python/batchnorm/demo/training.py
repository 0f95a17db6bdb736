"""The demo's networks and how they are trained and measured: model building, the SGD loop, evaluation.

Everything here is shared by the experiments (:mod:`batchnorm.demo.fig1`, ...): the layers are the plain
NumPy ones of :mod:`batchnorm.examples`, with :class:`batchnorm.BatchNorm1d` where a net has BN.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np

import batchnorm
from batchnorm.examples import (
    SGD, Linear, ReLU, Sequential, Sigmoid, SoftmaxCrossEntropy, accuracy, iterate_minibatches,
)

__all__ = ["BATCH_SIZE", "HIDDEN", "BN_LABEL", "make_model", "evaluate", "evaluation_steps", "train",
           "summarize", "Progress"]

BATCH_SIZE = 60                     # the paper's minibatch size
HIDDEN = (100, 100, 100)

# where a net puts BN, and how tables and legends call it
BN_LABEL = {"none": "no BN", "before": "BN before act.", "after": "BN after act."}


def make_model(n_in, n_out, *, activation="sigmoid", bn="none", hidden=HIDDEN, seed=0):
    """A fully connected net ``n_in -> hidden... -> n_out``.

    Parameters
    ----------
    n_in, n_out : int
        Input features and classes.
    activation : {"sigmoid", "relu"}, optional
        The hidden nonlinearity.
    bn : {"none", "before", "after"}, optional
        ``"none"`` (Linear -> act), ``"before"`` (Linear -> BN -> act, the paper's placement) or
        ``"after"`` (Linear -> act -> BN). With ``"before"`` the Linear layers drop their bias, which
        BN would cancel anyway.
    hidden : tuple of int, optional
        Widths of the hidden layers.
    seed : int, optional
        Seed of the initial weights: the same seed gives the same weights whatever ``bn`` is.

    Returns
    -------
    batchnorm.examples.Sequential
    """
    if bn not in BN_LABEL:
        raise ValueError(f"bn must be one of {sorted(BN_LABEL)}, got {bn!r}")
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
    """Test accuracy and loss in eval mode, and the input percentiles of one unit.

    Parameters
    ----------
    model : batchnorm.examples.Sequential
        Put in eval mode for the measurement and back in training mode afterwards.
    loss_fn : batchnorm.examples.SoftmaxCrossEntropy
    x, y : numpy.ndarray
        Test images and labels.

    Returns
    -------
    acc : float
    loss : float
    pct : list of float
        The {15, 50, 85}th percentiles of the input to the first unit of the last hidden nonlinearity
        (the paper's Fig. 1(b, c) quantity).
    """
    model.eval()
    pre, logits = _last_activation_input(model, x)
    acc = accuracy(logits, y)
    loss = loss_fn(logits, y)
    pct = np.percentile(pre[:, 0], [15, 50, 85]).tolist()
    model.train()
    return acc, loss, pct


def evaluation_steps(steps, eval_every):
    """The steps after which :func:`train` measures test accuracy.

    Every ``eval_every`` steps, plus a 5x finer grid over the first ``10 * eval_every`` steps (the BN
    nets get to the target within a few dozen steps; a coarse grid would hide that), plus the last step.

    Returns
    -------
    set of int
    """
    fine = max(1, eval_every // 5)
    at = set(range(eval_every, steps + 1, eval_every)) | set(range(fine, min(steps, 10 * eval_every) + 1, fine))
    at.add(steps)
    return at


def train(model, data, *, lr, steps, eval_every, seed=0, progress=None, batch_size=BATCH_SIZE):
    """Minibatch SGD on ``data = (x_train, y_train, x_test, y_test)``; returns a dict of curves.

    Parameters
    ----------
    model : batchnorm.examples.Sequential
        Trained in place.
    data : tuple of numpy.ndarray
        As returned by :func:`batchnorm.demo.load_data`.
    lr : float
        SGD learning rate.
    steps, eval_every : int
        Training steps, and the spacing of the test evaluations (see :func:`evaluation_steps`).
    seed : int, optional
        The minibatch order is drawn from ``seed + 1``.
    progress : callable, optional
        ``progress(step, test_acc)`` is called after each evaluation.
    batch_size : int, optional
        Samples per SGD step.

    Returns
    -------
    dict
        ``step``, ``test_acc``, ``test_loss``, ``train_loss`` (mean over the steps since the previous
        evaluation) and ``pct`` (see :func:`evaluate`), one entry per evaluation starting at step 0;
        ``seconds``; ``diverged_at``, the step whose training loss stopped being finite (training
        stops there), or None.
    """
    x_tr, y_tr, x_te, y_te = data
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(lr=lr)
    batches = iterate_minibatches(len(x_tr), batch_size, np.random.default_rng(seed + 1))
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


def summarize(curves, target):
    """The numbers a table row and a verdict are made of, read off :func:`train`'s curves.

    Parameters
    ----------
    curves : dict
        As returned by :func:`train`.
    target : float
        Test accuracy whose first evaluation counts as "reached".

    Returns
    -------
    dict
        ``steps_to_target`` (None when never reached), ``final_test_acc``, ``best_test_acc``,
        ``final_train_loss`` (nan when the run diverged), ``final_test_loss``, ``diverged``.
    """
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


class Progress:
    """A tqdm bar per run when tqdm is installed, otherwise one plain line per finished run (stderr).

    Parameters
    ----------
    enabled : bool, optional
        False shows nothing.
    """

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
        """Run ``i`` of ``n``, called ``label``, of ``steps`` training steps, begins."""
        self.label, self.i, self.n, self.last = label, i, n, 0
        self.bar = None
        if self.tqdm is not None:
            self.bar = self.tqdm(total=steps, desc=f"[{i}/{n}] {label}", unit="step", leave=False,
                                 file=sys.stderr, dynamic_ncols=True)

    def update(self, step, acc):
        """The ``progress`` callback of :func:`train`."""
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(test_acc=f"{acc:.3f}", refresh=False)
        self.last = step

    def finish(self, summary, seconds):
        """The run ended with ``summary`` (from :func:`summarize`) after ``seconds``."""
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            status = "diverged" if summary["diverged"] else f"test acc {summary['final_test_acc']:.3f}"
            print(f"[{self.i}/{self.n}] {self.label}: {status} ({seconds:.1f} s)", file=sys.stderr,
                  flush=True)
