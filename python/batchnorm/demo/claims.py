"""How the demo's experiments decide and phrase the verdict of a claim, from the measured numbers only.

An experiment's ``verdicts(results)`` returns one ``(claim, held, explanation)`` per claim, with ``held``
True, False or None (the numbers decide nothing); the helpers below are the shared vocabulary: when a run
counts as faster, when two accuracies differ clearly, and how a run is described in words. They read the
run dicts an experiment makes: the numbers of :func:`batchnorm.demo.training.summarize`, with the
run's ``curves``.
"""

from __future__ import annotations

import math

__all__ = ["CHANCE", "VERDICT", "reach", "describe", "steps_cell", "fmt", "images", "clear_accuracy_difference",
           "format_verdict_list"]

CHANCE = 0.2   # final test accuracy below this (10 classes) = the net did not learn at all

VERDICT = {True: "HELD", False: "DID NOT HOLD", None: "NO CLEAR DIFFERENCE"}


def reach(r):
    """Sort key: steps to target, with 'never' (or diverged, or a missing run) last, as ``inf``."""
    return math.inf if r is None or r["diverged"] or r["steps_to_target"] is None else r["steps_to_target"]


def describe(r, total, final=False):
    """'N steps', 'not within N steps' or 'diverged at step N', optionally with the final test accuracy
    (always given when the target was not reached)."""
    if r["diverged"]:
        return f"diverged at step {r['curves']['diverged_at']}"
    txt = (f"{r['steps_to_target']} steps" if r["steps_to_target"] is not None
           else f"not within {total} steps")
    if final or r["steps_to_target"] is None:
        txt += f" (final {r['final_test_acc']:.3f}"
        txt += ", chance level)" if r["final_test_acc"] < CHANCE else ")"
    return txt


def steps_cell(r, total):
    """A table cell for the steps to the target: the number, '> total' or 'diverged'."""
    if r["diverged"]:
        return "diverged"
    return str(r["steps_to_target"]) if r["steps_to_target"] is not None else f"> {total}"


def fmt(v, spec):
    """``format(v, spec)``, or 'n/a' for None, nan and inf."""
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def images(a, b, n):
    """Difference of two accuracies on n test images, in images."""
    return int(round((a - b) * n))


def clear_accuracy_difference(a, b, n):
    """Whether test accuracies ``a`` and ``b`` on ``n`` images are more than two binomial standard
    errors apart (about 6 of 450 images near 98%); p is kept off 0 and 1 so that two perfect scores
    are not 'clearly' different by a rounding."""
    p = min(max((a + b) / 2, 1.0 / n), 1 - 1.0 / n)
    return abs(b - a) > 2 * math.sqrt(p * (1 - p) / n)


def format_verdict_list(items):
    """``(claim, held, explanation)`` items as a Markdown list: the verdict, the claim, what was measured."""
    return "\n".join(f"- {VERDICT[held]}: {claim}.\n  Measured: {why}." for claim, held, why in items)
