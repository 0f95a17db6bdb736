"""Bad arguments: each raises TypeError/ValueError whose message names the argument, never crashes,
and leaves running statistics and out= exactly as they were."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from helpers import make_data

SHAPE, C = (4, 3, 5), 3
ERR = (TypeError, ValueError)
SENTINEL = 7.0
ONE_VALUE = "Expected more than 1 value per channel when training"


def valid(op, rng):
    """Keyword arguments for a call of ``op`` that succeeds (every optional argument given)."""
    x = make_data(rng, SHAPE, np.float32)
    kw = dict(x=x, gamma=np.linspace(0.5, 1.5, C).astype(np.float32), axis=1,
              out=np.full(SHAPE, SENTINEL, np.float32))
    if op == "train":
        kw.update(beta=np.zeros(C, np.float32), running_mean=np.zeros(C, np.float32),
                  running_var=np.ones(C, np.float32), momentum=0.1, eps=1e-5)
    elif op == "infer":
        kw.update(beta=np.zeros(C, np.float32), running_mean=np.full(C, 0.5, np.float32),
                  running_var=np.full(C, 2.0, np.float32), eps=1e-5)
    else:
        kw.update(dy=make_data(rng, SHAPE, np.float32), mean=np.zeros(C, np.float32),
                  invstd=np.ones(C, np.float32), training=True)
    return kw


def call(op, kw):
    kw = dict(kw)
    if op == "train":
        return bn.forward_train(kw.pop("x"), kw.pop("gamma"), kw.pop("beta"), **kw)
    if op == "infer":
        return bn.forward_infer(kw.pop("x"), kw.pop("running_mean"), kw.pop("running_var"), kw.pop("gamma"),
                                kw.pop("beta"), **kw)
    return bn.backward(kw.pop("dy"), kw.pop("x"), kw.pop("mean"), kw.pop("invstd"), kw.pop("gamma"), **kw)


def readonly(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def set_x(shape, stats_len=None, dtype=np.float32):
    """Replace x (and dy, out, and optionally all per-channel arrays) consistently with a new shape."""
    def mod(kw):
        kw["x"] = np.ones(shape, dtype)
        if "dy" in kw:
            kw["dy"] = np.ones(shape, np.float32)
        kw["out"] = None
        if stats_len is not None:
            for k in ("gamma", "beta", "running_mean", "running_var", "mean", "invstd"):
                if k in kw:
                    kw[k] = np.resize(kw[k], stats_len)
    return mod


def put(**changes):
    def mod(kw):
        for k, v in changes.items():
            kw[k] = v() if callable(v) else v
    return mod


# (ops, id, modification, exception(s), match regex or None)
CASES = [
    # mismatched lengths of per-channel arrays
    ("train infer backward", "gamma-len", put(gamma=np.ones(4, np.float32)), ERR, r"\bgamma\b"),
    ("train infer", "beta-len", put(beta=np.ones(2, np.float32)), ERR, r"\bbeta\b"),
    ("train infer", "running_mean-len", put(running_mean=np.zeros(4, np.float32)), ERR, r"\brunning_mean\b"),
    ("train infer", "running_var-len", put(running_var=np.ones(2, np.float32)), ERR, r"\brunning_var\b"),
    ("train infer", "running_mean-2d", put(running_mean=np.zeros((C, 2), np.float32)), ERR, r"\brunning_mean\b"),
    ("backward", "mean-len", put(mean=np.zeros(4, np.float32)), ERR, r"\bmean\b"),
    ("backward", "invstd-len", put(invstd=np.ones(2, np.float32)), ERR, r"\binvstd\b"),
    ("backward", "invstd-empty", put(invstd=np.ones(0, np.float32)), ERR, r"\binvstd\b"),
    # ndim < 2
    ("train infer backward", "x-1d", set_x((C,)), ERR, r"\bx\b"),
    ("train infer backward", "x-0d", set_x(()), ERR, r"\bx\b"),
    # bad axis
    ("train infer backward", "axis-3", put(axis=3), ERR, r"\baxis\b"),
    ("train infer backward", "axis--4", put(axis=-4), ERR, r"\baxis\b"),
    ("train infer backward", "axis-float", put(axis=1.0), ERR, r"\baxis\b"),
    ("train infer backward", "axis-str", put(axis="1"), ERR, r"\baxis\b"),
    # (an empty batch is accepted, as PyTorch does: tests/test_dropin.py)
    # a single value per channel in training
    ("train", "one-value-2d", set_x((1, C)), ValueError, ONE_VALUE),
    ("train", "one-value-4d", set_x((1, C, 1, 1)), ValueError, ONE_VALUE),
    ("train", "one-value-axis0", lambda kw: (set_x((C, 1))(kw), kw.update(axis=0)), ValueError, ONE_VALUE),
    # eps, momentum
    ("train infer", "eps-negative", put(eps=-1e-5), ERR, r"\beps\b"),
    ("train infer", "eps-nan", put(eps=float("nan")), ERR, r"\beps\b"),
    ("train", "momentum-negative", put(momentum=-0.1), ERR, r"\bmomentum\b"),
    ("train", "momentum-above-1", put(momentum=1.5), ERR, r"\bmomentum\b"),
    ("train", "momentum-nan", put(momentum=float("nan")), ERR, r"\bmomentum\b"),
    ("train", "momentum-inf", put(momentum=float("inf")), ERR, r"\bmomentum\b"),
    # out
    ("train infer backward", "out-shape", put(out=lambda: np.full((4, C, 6), SENTINEL, np.float32)), ERR, r"\bout\b"),
    ("train infer backward", "out-transposed-shape", put(out=lambda: np.full((5, C, 4), SENTINEL, np.float32)),
     ERR, r"\bout\b"),
    ("train infer backward", "out-broadcastable", put(out=lambda: np.full((1, C, 1), SENTINEL, np.float32)),
     ERR, r"\bout\b"),
    ("train infer backward", "out-float64", put(out=lambda: np.full(SHAPE, SENTINEL, np.float64)), ERR, r"\bout\b"),
    ("train infer backward", "out-float16", put(out=lambda: np.full(SHAPE, SENTINEL, np.float16)), ERR, r"\bout\b"),
    ("train infer backward", "out-int", put(out=lambda: np.full(SHAPE, 7, np.int32)), ERR, r"\bout\b"),
    ("train infer backward", "out-readonly", put(out=lambda: readonly(np.full(SHAPE, SENTINEL, np.float32))),
     ERR, r"\bout\b"),
    ("train infer backward", "out-list", put(out=lambda: np.full(SHAPE, SENTINEL).tolist()), ERR, r"\bout\b"),
    ("train", "out-is-int-x", lambda kw: kw.update(x=(kw["x"] * 10).astype(np.int32), out=None) or
     kw.update(out=kw["x"]), ERR, r"\bout\b"),
    # running statistics that cannot be updated in place
    ("train", "running_mean-readonly", put(running_mean=lambda: readonly(np.zeros(C, np.float32))), ERR,
     r"\brunning_mean\b"),
    ("train", "running_var-readonly", put(running_var=lambda: readonly(np.ones(C, np.float32))), ERR,
     r"\brunning_var\b"),
    ("train", "running_mean-int", put(running_mean=lambda: np.zeros(C, np.int64)), ERR, r"\brunning_mean\b"),
    ("train", "running_var-float16", put(running_var=lambda: np.ones(C, np.float16)), ERR, r"\brunning_var\b"),
    ("train", "running_mean-list", put(running_mean=[0.0, 0.0, 0.0]), ERR, r"\brunning_mean\b"),
    # dy
    ("backward", "dy-shape", put(dy=lambda: np.ones((4, C, 6), np.float32)), ERR, r"\bdy\b"),
    ("backward", "dy-transposed", put(dy=lambda: np.ones((5, C, 4), np.float32)), ERR, r"\bdy\b"),
    ("backward", "dy-broadcastable", put(dy=lambda: np.ones((1, C, 5), np.float32)), ERR, r"\bdy\b"),
    ("backward", "dy-2d", put(dy=lambda: np.ones((4, C), np.float32)), ERR, r"\bdy\b"),
    # dtypes that are refused
    ("train infer backward", "x-complex", put(x=lambda: np.ones(SHAPE, np.complex64)), TypeError, None),
    ("train infer backward", "x-complex128", put(x=lambda: np.ones(SHAPE, np.complex128)), TypeError, None),
    ("train infer backward", "x-object", put(x=lambda: np.ones(SHAPE).astype(object)), TypeError, None),
    ("train infer backward", "x-str", put(x=lambda: np.full(SHAPE, "1.5")), TypeError, None),
    ("train infer backward", "x-bytes", put(x=lambda: np.full(SHAPE, b"1")), TypeError, None),
    ("backward", "dy-complex", put(dy=lambda: np.ones(SHAPE, np.complex64)), TypeError, None),
    # garbage: any clean exception
    ("train infer backward", "x-None", put(x=None), ERR, None),
    ("train infer backward", "x-ragged", put(x=lambda: np.array([[1.0, 2.0], [3.0]], dtype=object)), ERR, None),
    ("train infer backward", "gamma-str", put(gamma="abc"), ERR, None),
    ("train infer", "eps-str", put(eps="a"), ERR, None),
    ("train infer", "eps-None", put(eps=None), ERR, None),
    ("train", "momentum-str", put(momentum="a"), ERR, None),
    # complex numbers that are not Python complex (were accepted with the imaginary part dropped)
    ("train infer", "eps-complex64", put(eps=np.complex64(1e-5 + 1j)), TypeError, r"\beps\b"),
    ("train infer", "eps-complex-0d", put(eps=lambda: np.array(1e-5 + 1j)), TypeError, r"\beps\b"),
    ("train", "momentum-complex64", put(momentum=np.complex64(0.1 + 1j)), TypeError, r"\bmomentum\b"),
]

PARAMS = [pytest.param(op, mod, exc, match, id=f"{op}-{name}")
          for ops, name, mod, exc, match in CASES for op in ops.split()]


@pytest.mark.parametrize("op,mod,exc,match", PARAMS)
def test_bad_argument_raises_and_changes_nothing(rng, op, mod, exc, match):
    kw = valid(op, rng)
    call(op, kw)  # the unmodified call works
    kw = valid(op, rng)
    mod(kw)
    if op == "backward" and match == r"\bx\b":  # x and dy change together: either may be named
        match = r"\b(x|dy)\b"
    watched = {k: kw[k] for k in ("running_mean", "running_var", "out", "x", "dy", "gamma", "mean", "invstd")
               if isinstance(kw.get(k), np.ndarray)}
    before = {k: (v.dtype, v.shape, v.tobytes()) for k, v in watched.items()}
    with pytest.raises(exc, match=match):
        call(op, kw)
    for k, v in watched.items():
        assert (v.dtype, v.shape, v.tobytes()) == before[k], f"{k} was modified by a call that raised"


def test_running_stats_untouched_when_only_the_other_is_bad(rng):
    """running_var read-only: running_mean (writable, valid) must not have been updated either."""
    kw = valid("train", rng)
    kw["running_mean"] = rm = np.full(C, 0.25, np.float32)
    kw["running_var"] = readonly(np.ones(C, np.float32))
    with pytest.raises(ERR, match=r"\brunning_var\b"):
        call("train", kw)
    assert np.all(rm == 0.25)
    kw = valid("train", rng)
    kw["running_var"] = rv = np.full(C, 0.25, np.float64)
    kw["running_mean"] = np.zeros(C + 1, np.float64)
    with pytest.raises(ERR, match=r"\brunning_mean\b"):
        call("train", kw)
    assert np.all(rv == 0.25)


def test_keyword_only_arguments(rng):
    x = make_data(rng, SHAPE, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    with pytest.raises(TypeError):
        bn.forward_train(x, None, None, rm, rv)
    assert np.all(rm == 0) and np.all(rv == 1)
    with pytest.raises(TypeError):
        bn.forward_infer(x, rm, rv, None, None, 1e-5)
    with pytest.raises(TypeError):
        bn.backward(x, x, rm, rv, None, True)


def test_momentum_bounds_are_inclusive(rng):
    x = make_data(rng, SHAPE, np.float32)
    for m in (0.0, 1.0, 0, 1):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        bn.forward_train(x, running_mean=rm, running_var=rv, momentum=m)


def test_one_value_per_channel_is_fine_in_inference_and_many_channels_in_training(rng):
    x = np.array([[1.0, 2.0, 3.0]], np.float32)
    bn.forward_infer(x, np.zeros(3, np.float32), np.ones(3, np.float32))
    # two values per channel is enough
    bn.forward_train(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32))
    bn.forward_train(np.ones((1, 3, 2), np.float32))


def test_error_cases_do_not_leak_into_later_calls(rng):
    """After many failures, a normal call gives the same bits as before them."""
    kw = valid("train", rng)
    kw["out"] = None
    first = call("train", dict(kw, running_mean=None, running_var=None))
    for _ in range(3):
        with pytest.raises(ERR):
            call("train", dict(kw, running_mean=None, running_var=None, eps=-1.0))
        with pytest.raises(ERR):
            call("train", dict(kw, x=np.ones((1, C), np.float32), running_mean=None, running_var=None))
    again = call("train", dict(kw, running_mean=None, running_var=None))
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("n", [0, -1, -100])
def test_set_num_threads_rejects_non_positive(restore_threads, n):
    before = bn.get_num_threads()
    with pytest.raises(ERR, match=r"(?i)\bn\b|thread"):
        bn.set_num_threads(n)
    assert bn.get_num_threads() == before
