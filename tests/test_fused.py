"""The fused epilogues: y = relu(bn(x) + residual) in forward_train / forward_infer / normalize, their
backward (mask from y or recomputed from x with beta, d_residual), and the layers' activation= / residual=.

Checked against the unfused composition (our BN, then the add and np.maximum in NumPy, and the backward of
each), against batchnorm.reference, and against torch (batch_norm + add + relu) where it is installed.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from helpers import (F16, F32, F64, TOL, as_layout, assert_close, assert_result_dtype, grad_dtype, make_data,
                     params, result_dtype, snapshot, assert_unchanged, uniform_stats)

SHAPES = [((32, 64, 8, 8), 1), ((64, 512), 1), ((256, 64), 1), ((8, 16, 16, 16), 1), ((5, 3, 7), 1),
          ((6, 9, 9, 12), -1), ((3, 70, 40), 1), ((1000, 3), 1), ((2, 4), 1), ((4, 3, 2, 5, 6), 1)]
DTYPES = [F32, F64]
EPILOGUES = [("relu", False), ("relu", True), (None, True)]


def _residual(rng, x):
    return (rng.standard_normal(x.shape) * 0.7).astype(x.dtype)


def _unfused_forward(x, gamma, beta, residual, activation, axis):
    """Our BN, then the add and the ReLU as a NumPy user writes them (in the result dtype)."""
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis, stats_dtype=np.float64)
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = np.maximum(y, 0)
    return y, mean, invstd


def _unfused_backward(dy, x, mean, invstd, gamma, y, activation, axis):
    g = np.where(y > 0, dy, 0).astype(dy.dtype) if activation == "relu" else dy
    dx, dgamma, dbeta = bn.backward(g, x, mean, invstd, gamma, axis=axis)
    return dx, dgamma, dbeta, g


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,use_residual", EPILOGUES)
def test_forward_train_matches_composition(rng, shape, axis, dtype, activation, use_residual):
    x = make_data(rng, shape, dtype, axis)
    gamma, beta = params(rng, shape[axis], np.float64)
    r = _residual(rng, x) if use_residual else None
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis, activation=activation, residual=r,
                                       stats_dtype=np.float64)
    y0, mean0, invstd0 = _unfused_forward(x, gamma, beta, r, activation, axis)
    assert_result_dtype(y, dtype)
    # the statistics do not see the epilogue
    assert np.array_equal(mean, mean0) and np.array_equal(invstd, invstd0)
    # the fused form rounds once, the composition twice: within the float tolerance of each other and
    # of the float64 reference
    assert_close(y, y0, TOL[dtype], "fused vs composition")
    yr, _, _ = ref.forward_train(x, gamma, beta, axis=axis, activation=activation, residual=r)
    assert_close(y, yr, TOL[dtype], "fused vs reference")
    if activation == "relu":
        assert (y >= 0).all()


@pytest.mark.parametrize("shape,axis", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,use_residual,source",
                         [("relu", False, "y"), ("relu", False, "beta"), ("relu", True, "y"), ("relu", True, "beta"),
                          (None, True, None)])
def test_backward_matches_composition(rng, shape, axis, dtype, activation, use_residual, source):
    x = make_data(rng, shape, dtype, axis)
    gamma, beta = params(rng, shape[axis], np.float64)
    r = _residual(rng, x) if use_residual else None
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis, activation=activation, residual=r,
                                       stats_dtype=np.float64)
    dy = make_data(rng, shape, dtype, axis)
    kw = {}
    if activation == "relu":
        kw = {"y": y} if source == "y" else {"beta": beta}
    if use_residual:
        kw["residual"] = True if (source == "y" or activation is None) else r
    out = bn.backward(dy, x, mean, invstd, gamma, axis=axis, activation=activation, **kw)
    assert len(out) == (4 if use_residual else 3)
    dx0, dgamma0, dbeta0, g0 = _unfused_backward(dy, x, mean, invstd, gamma, y, activation, axis)
    # The masked gradient enters the same kernel arithmetic: the same bits as the composition's.
    np.testing.assert_array_equal(out[0], dx0)
    np.testing.assert_array_equal(out[1], dgamma0)
    np.testing.assert_array_equal(out[2], dbeta0)
    if use_residual:
        assert_result_dtype(out[3], dtype)
        np.testing.assert_array_equal(out[3], g0)
    refd = ref.backward(dy, x, mean, invstd, gamma, axis=axis, activation=activation,
                        **{k: v for k, v in kw.items() if k != "residual"},
                        residual=r if use_residual else None)
    assert_close(out[0], refd[0], TOL[dtype], "dx vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((16, 8, 6, 6), 1), ((64, 24), 1), ((6, 5, 5, 8), -1)])
def test_recomputed_mask_is_the_forwards(rng, dtype, shape, axis):
    """beta= recomputes y > 0 bit for bit, also for values within a rounding of 0 (where a mask from a
    differently rounded computation would disagree)."""
    x = make_data(rng, shape, dtype, axis)
    C = shape[axis]
    gamma, beta = params(rng, C, np.float64)
    y0, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis, stats_dtype=np.float64)
    # a residual that cancels the normalized values up to their last bits: the sum lands within a few
    # ulps of 0 on both sides
    r = (-y0).astype(dtype)
    r.flat[::3] = np.nextafter(r.flat[::3], np.inf)
    r.flat[1::3] = np.nextafter(r.flat[1::3], -np.inf)
    y, _, _ = bn.forward_train(x, gamma, beta, axis=axis, activation="relu", residual=r, stats_dtype=np.float64)
    assert 0 < np.count_nonzero(y > 0) < y.size
    dy = np.ones_like(x)
    *_, d_res = bn.backward(dy, x, mean, invstd, gamma, axis=axis, activation="relu", beta=beta, residual=r)
    np.testing.assert_array_equal(d_res != 0, y > 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_at_zero_get_zero_gradient(dtype):
    # channel values -1, 0, 1: mean 0, so x = 0 normalizes to exactly 0 with beta = 0
    x = np.array([[-1.0, 2.0], [0.0, 4.0], [1.0, 6.0]], dtype)
    y, mean, invstd = bn.forward_train(x, activation="relu", stats_dtype=np.float64)
    assert y[1, 0] == 0 and y[1, 1] == 0
    dy = np.full_like(x, 5.0)
    dx_y, dg_y, db_y = bn.backward(dy, x, mean, invstd, activation="relu", y=y)
    dx_b, dg_b, db_b = bn.backward(dy, x, mean, invstd, activation="relu", beta=np.zeros(2))
    np.testing.assert_array_equal(dx_y, dx_b)
    np.testing.assert_array_equal(db_y, [5.0, 5.0])  # only the one position > 0 per channel
    np.testing.assert_array_equal(db_b, db_y)


def _boundary_data(rng, dtype, layout, mean, invstd, gamma, beta, per_channel):
    """x (N, C) or (N, C, S) whose values crowd each channel's ReLU boundary: the real root of
    (x - mean) * invstd * gamma + beta and its neighbours a few ulps either side, plus zeros, +-inf, NaN,
    the largest values and random ones."""
    C = mean.size
    info = np.finfo(dtype)
    cols = []
    for c in range(C):
        with np.errstate(all="ignore"):
            root = mean[c] - beta[c] / (invstd[c] * gamma[c])
        r = dtype(root) if np.isfinite(root) and abs(root) < info.max else dtype(0)
        near = [r]
        lo = hi = r
        for _ in range(6):
            lo, hi = np.nextafter(lo, dtype(-np.inf)), np.nextafter(hi, dtype(np.inf))
            near += [lo, hi]
        special = [dtype(0), -dtype(0), dtype(np.inf), dtype(-np.inf), dtype(np.nan), info.max, -info.max,
                   info.tiny, -info.tiny, dtype(mean[c]) if abs(mean[c]) < info.max else dtype(1)]
        v = np.array(near + special, dtype)
        v = np.concatenate([v, (rng.standard_normal(per_channel - v.size) * 3 + mean[c]).astype(dtype)])
        cols.append(rng.permutation(v))
    x = np.stack(cols, axis=1)  # (per_channel, C)
    if layout != "col":  # NCHW-like, S positions per (n, c): row mode from S = 32 (float32's float32 form)
        S = 32 if layout == "row" else 8
        x = x.reshape(per_channel // S, S, C).transpose(0, 2, 1).copy()
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["col", "col-s8", "row"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_mask_from_beta_is_the_forwards_at_the_boundary(rng, dtype, layout, training):
    """The backward's mask from beta (found per channel as a range of x, or recomputed) against the
    forward's own y > 0, on values one ulp either side of each channel's boundary, ties at 0, +-inf and
    NaN; gamma of both signs and 0, means near 0 and far from it (float32's folded and centred forms),
    tiny and huge invstd; and statistics that are not finite."""
    C = 12
    mean = np.array([0.0, 1.5, -3.0, 1e5, -2e6, 0.25, 7.0, 1e-3, 3.0, 0.0, 5.0, -1.0])
    invstd = np.array([1.0, 2.0, 0.5, 1e-2, 3e-1, 1e4, 1e-30, 3.0, 1.0, 1.0, 2.0, 1e30])
    gamma = np.array([1.0, -0.5, 2.0, 1.0, -3.0, 0.7, 1.0, 0.0, -1.0, 1.0, 0.0, 1e-3])
    beta = np.array([0.0, 0.3, -1.0, 0.5, 2.0, -0.1, 1e-20, 0.2, 0.0, 1e-40, -0.5, -4.0])
    for stats in ("finite", "inf mean", "nan invstd"):
        m, s = mean.copy(), invstd.copy()
        if stats == "inf mean":
            m[3] = np.inf
        elif stats == "nan invstd":
            s[5] = np.nan
        x = _boundary_data(rng, dtype, layout, mean, invstd, gamma, beta, per_channel=96)
        y = bn.normalize(x, m, s, gamma, beta)
        assert y.dtype == dtype
        dy = make_data(rng, x.shape, dtype)
        dx_b, dg_b, db_b = bn.backward(dy, x, m, s, gamma, training=training, activation="relu", beta=beta)
        dx_y, dg_y, db_y = bn.backward(dy, x, m, s, gamma, training=training, activation="relu",
                                       y=np.maximum(y, 0))
        g = np.where(y > 0, dy, 0).astype(dtype)
        dx0, dg0, db0 = bn.backward(g, x, m, s, gamma, training=training)
        ones = bn.backward(np.ones_like(x), x, m, s, gamma, training=training, activation="relu", beta=beta)[2]
        axes = 0 if layout == "col" else (0, 2)
        np.testing.assert_array_equal(ones, np.count_nonzero(y > 0, axis=axes), err_msg=stats)
        for got, want in ((dx_b, dx0), (db_b, db0), (dx_y, dx0), (db_y, db0)):
            np.testing.assert_array_equal(got, want, err_msg=stats)
        np.testing.assert_array_equal(dg_b, dg0, err_msg=stats)


@pytest.mark.parametrize("layout", ["col", "col-s8", "row"])
@pytest.mark.parametrize("in_place", [False, True], ids=["dx", "dx-is-x"])
@pytest.mark.parametrize("count", [32, 64], ids=["by-value", "as-range"])  # BN_MASK_RANGE_MIN_COUNT 64
def test_mask_from_beta_at_many_roots(rng, layout, in_place, count):
    """float32, 256 channels of random statistics and parameters, x at each channel's float32 root and its
    neighbours: where y is within a rounding of 0 the forward's float32 form (row mode) and float64 form
    (column mode) round to different signs, and the backward's mask (as a range of x, and value by value
    where dx is x and g is not kept) must be its own mode's."""
    C = 256
    mean = rng.standard_normal(C) * 3
    invstd = np.exp(rng.uniform(-2, 2, C))
    gamma = rng.uniform(0.2, 2, C) * rng.choice([-1, 1], C)
    # roots at float32 values: y there is 0 up to the roundings of the folded offset, so the forms' signs
    # differ at some of them
    x0 = (mean + rng.standard_normal(C)).astype(np.float32).astype(np.float64)
    beta = -(x0 - mean) * invstd * gamma
    x = _boundary_data(rng, np.float32, layout, mean, invstd, gamma, beta, per_channel=count)
    y = bn.normalize(x, mean, invstd, gamma, beta)
    dy = make_data(rng, x.shape, np.float32)
    want = bn.backward(np.where(y > 0, dy, 0).astype(np.float32), x, mean, invstd, gamma)
    out = x.copy() if in_place else None
    got = bn.backward(dy, x if out is None else out, mean, invstd, gamma, activation="relu", beta=beta,
                      out=out)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_nan_stays_nan_and_masked_dy_does_not_leak():
    x = np.array([[1.0, 3.0], [2.0, 1.0], [3.0, 2.0], [4.0, 0.0]])
    r = np.zeros_like(x)
    r[0, 0] = np.nan
    y, mean, invstd = bn.forward_train(x, activation="relu", residual=r, stats_dtype=np.float64)
    assert np.isnan(y[0, 0]) and not np.isnan(y[1:]).any()
    dy = np.ones_like(x)
    dy[3, 1] = np.inf  # where y = 0: masked out, not inf * 0
    y2, mean2, invstd2 = bn.forward_train(x, activation="relu", stats_dtype=np.float64)
    assert y2[3, 1] == 0
    dx, dgamma, dbeta = bn.backward(dy, x, mean2, invstd2, activation="relu", y=y2)
    assert np.isfinite(dx).all() and np.isfinite(dgamma).all() and np.isfinite(dbeta).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation,use_residual", EPILOGUES)
def test_forward_infer_and_normalize(rng, dtype, activation, use_residual):
    shape, axis = (6, 5, 4, 3), 1
    x = make_data(rng, shape, dtype, axis)
    rm, rv = uniform_stats(rng, 5)
    gamma, beta = params(rng, 5)
    r = _residual(rng, x) if use_residual else None
    y = bn.forward_infer(x, rm, rv, gamma, beta, eps=1e-3, activation=activation, residual=r)
    y0 = bn.forward_infer(x, rm, rv, gamma, beta, eps=1e-3)
    y0 = (y0 + r if use_residual else y0)
    y0 = np.maximum(y0, 0) if activation else y0
    assert_close(y, y0, TOL[dtype])
    assert_close(y, ref.forward_infer(x, rm, rv, gamma, beta, eps=1e-3, activation=activation, residual=r),
                 TOL[dtype])
    invstd = 1.0 / np.sqrt(rv + 1e-3)
    yn = bn.normalize(x, rm, invstd, gamma, beta, activation=activation, residual=r)
    np.testing.assert_array_equal(yn, y)
    # frozen backward with the recomputed mask: the mask of this very forward
    if activation:
        dy = make_data(rng, shape, dtype, axis)
        kw = {"residual": r} if use_residual else {}
        out = bn.backward(dy, x, rm, invstd, gamma, training=False, activation="relu", beta=beta, **kw)
        g = np.where(y > 0, dy, 0).astype(dtype)
        dx0, dg0, db0 = bn.backward(g, x, rm, invstd, gamma, training=False)
        np.testing.assert_array_equal(out[0], dx0)
        np.testing.assert_array_equal(out[2], db0)


@pytest.mark.parametrize("layout", ["F", "T", "chlast", "step", "negall", "bcast", "unaligned"])
def test_residual_in_any_layout(rng, layout):
    shape = (6, 4, 5, 3)
    x = make_data(rng, shape, F32)
    r = _residual(rng, x)
    rl = as_layout(r, layout)
    if layout == "bcast":
        r = np.array(rl)
    y, mean, invstd = bn.forward_train(x, activation="relu", residual=rl)
    y0, _, _ = bn.forward_train(x, activation="relu", residual=np.ascontiguousarray(r))
    np.testing.assert_array_equal(y, y0)
    dy = make_data(rng, shape, F32)
    a = bn.backward(dy, x, mean.astype(np.float64), invstd.astype(np.float64), activation="relu", beta=np.zeros(4),
                    residual=rl)
    b = bn.backward(dy, x, mean.astype(np.float64), invstd.astype(np.float64), activation="relu", beta=np.zeros(4),
                    residual=np.ascontiguousarray(r))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("x_layout", ["C", "chlast", "F"])
def test_channels_last_and_other_x_layouts(rng, x_layout):
    shape = (8, 6, 5, 5)
    x = as_layout(make_data(rng, shape, F32), x_layout)
    r = _residual(rng, x)
    y, mean, invstd = bn.forward_train(x, activation="relu", residual=r, stats_dtype=np.float64)
    yr, _, _ = ref.forward_train(x, activation="relu", residual=r)
    assert_close(y, yr, TOL[F32])
    dy = make_data(rng, shape, F32)
    dx, dg, db, dres = bn.backward(dy, x, mean, invstd, activation="relu", beta=np.zeros(6), residual=r)
    rd = ref.backward(dy, x, mean, invstd, activation="relu", beta=np.zeros(6), residual=r)
    assert_close(dx, rd[0], TOL[F32])
    np.testing.assert_array_equal(dres, rd[3].astype(np.float32))


def test_in_place_outputs(rng):
    x = make_data(rng, (16, 8, 4, 4), F32)
    r = _residual(rng, x)
    y0, _, _ = bn.forward_train(x, activation="relu", residual=r)
    xr = x.copy()
    y1, _, _ = bn.forward_train(xr, activation="relu", residual=r, out=xr)
    assert y1 is xr
    np.testing.assert_array_equal(y1, y0)
    rr = r.copy()
    y2, _, _ = bn.forward_train(x, activation="relu", residual=rr, out=rr)
    assert y2 is rr
    np.testing.assert_array_equal(y2, y0)
    # dx into dy's memory, with the mask read from y
    y, mean, invstd = bn.forward_train(x, activation="relu", stats_dtype=np.float64)
    dy = make_data(rng, x.shape, F32)
    want = bn.backward(dy, x, mean, invstd, activation="relu", y=y)
    dyc = dy.copy()
    got = bn.backward(dyc, x, mean, invstd, activation="relu", y=y, out=dyc)
    assert got[0] is dyc
    np.testing.assert_array_equal(got[0], want[0])
    # dx written over y itself (what a framework freeing activations early would do)
    yc = y.copy()
    got = bn.backward(dy, x, mean, invstd, activation="relu", y=yc, out=yc)
    np.testing.assert_array_equal(got[0], want[0])
    # a partial overlap with y is detected and handled (written through a scratch array)
    big = np.zeros(x.size + 8, np.float32)
    yv = big[:x.size].reshape(x.shape)
    yv[...] = y
    outv = big[8:].reshape(x.shape)
    got = bn.backward(dy, x, mean, invstd, activation="relu", y=yv, out=outv)
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("dtype", [F16, np.dtype(np.int32)])
def test_other_dtypes(rng, dtype):
    shape = (12, 3, 5)
    x = make_data(rng, shape, dtype)
    r = make_data(rng, shape, dtype)
    y, mean, invstd = bn.forward_train(x, activation="relu", residual=r, stats_dtype=np.float64)
    assert_result_dtype(y, dtype)
    yr, _, _ = ref.forward_train(x, activation="relu", residual=r)
    assert_close(y, yr, TOL[result_dtype(dtype)])
    dy = make_data(rng, shape, result_dtype(dtype))
    dx, dg, db, dres = bn.backward(dy, x, mean, invstd, activation="relu", beta=np.zeros(3), residual=r)
    assert_result_dtype(dx, dtype)
    assert_result_dtype(dres, dtype)
    assert dg.dtype == grad_dtype(dtype)
    np.testing.assert_array_equal(dres != 0, (y > 0) & (dy != 0))


def test_empty_batch():
    x = np.zeros((0, 3, 4), np.float32)
    y, mean, invstd = bn.forward_train(x, activation="relu", residual=np.zeros_like(x))
    assert y.shape == x.shape
    out = bn.backward(x, x, mean, invstd, activation="relu", beta=np.zeros(3), residual=np.zeros_like(x))
    assert len(out) == 4 and out[3].shape == x.shape and not out[1].any()


def test_thread_count_does_not_change_bits(rng, restore_threads):
    if bn.get_num_threads() < 2:
        bn.set_num_threads(2)
    cases = [((64, 32, 16, 16), 1), ((4096, 96), 1), ((16, 12, 12, 64), -1)]
    for shape, axis in cases:
        x = make_data(rng, shape, F32, axis)
        r = _residual(rng, x)
        dy = make_data(rng, shape, F32, axis)
        C = shape[axis]
        gamma, beta = params(rng, C)
        results = []
        for t in (1, 2, 3):
            bn.set_num_threads(t)
            y, m, i = bn.forward_train(x, gamma, beta, axis=axis, activation="relu", residual=r,
                                       stats_dtype=np.float64)
            grads = bn.backward(dy, x, m, i, gamma, axis=axis, activation="relu", beta=beta, residual=r)
            results.append((y,) + tuple(grads))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                np.testing.assert_array_equal(a, b)


# -- errors ------------------------------------------------------------------------------------------


def test_bad_activation():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="activation"):
        bn.forward_train(x, activation="gelu")
    with pytest.raises(TypeError, match="activation"):
        bn.normalize(x, np.zeros(3), np.ones(3), activation=1)
    with pytest.raises(ValueError, match="activation"):
        bn.backward(x, x, np.zeros(3), np.ones(3), activation="tanh", y=x)
    with pytest.raises(ValueError, match="activation"):
        bn.BatchNorm1d(3, activation="sigmoid")
    with pytest.raises(TypeError, match="activation"):
        bn.BatchNorm1d(3, activation=True)


def test_bad_residual_and_mask_arguments():
    x = np.arange(12.0).reshape(4, 3)
    rm, rv = np.zeros(3), np.ones(3)
    before = snapshot(rm, rv)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 4\), expected \(4, 3\)"):
        bn.forward_train(x, running_mean=rm, running_var=rv, residual=np.zeros((3, 4)))
    assert_unchanged(before, snapshot(rm, rv))
    with pytest.raises(TypeError, match="residual"):
        bn.forward_infer(x, rm, rv, residual=np.array(["a"] * 12).reshape(4, 3))
    y, m, i = bn.forward_train(x, activation="relu", stats_dtype=np.float64)
    with pytest.raises(ValueError, match="not both"):
        bn.backward(x, x, m, i, activation="relu", y=y, beta=np.zeros(3))
    with pytest.raises(ValueError, match="needs the forward's output y="):
        bn.backward(x, x, m, i, activation="relu")
    with pytest.raises(ValueError, match="need activation='relu'"):
        bn.backward(x, x, m, i, y=y)
    with pytest.raises(ValueError, match="residual array itself"):
        bn.backward(x, x, m, i, activation="relu", beta=np.zeros(3), residual=True)
    with pytest.raises(ValueError, match=r"y has shape"):
        bn.backward(x, x, m, i, activation="relu", y=y[:2])
    with pytest.raises(ValueError, match=r"beta"):
        bn.backward(x, x, m, i, activation="relu", beta=np.zeros(4))
    # residual=False is no residual
    assert len(bn.backward(x, x, m, i, activation="relu", y=y, residual=False)) == 3


# -- layers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,shape,axis", [(bn.BatchNorm2d, (8, 6, 5, 5), 1), (bn.BatchNorm1d, (64, 24), 1),
                                            (bn.BatchNorm2d, (4, 5, 5, 6), -1)])
@pytest.mark.parametrize("use_residual", [False, True])
def test_layer_relu_residual_train_and_eval(rng, cls, shape, axis, use_residual):
    C = shape[axis]
    fused = cls(C, axis=axis, activation="relu")
    plain = cls(C, axis=axis)
    for layer in (fused, plain):
        layer.weight[...], layer.bias[...] = params(rng, C, np.float32) if layer is fused else (fused.weight,
                                                                                                  fused.bias)
    for mode in (True, False):
        fused.train(mode)
        plain.train(mode)
        x = make_data(rng, shape, F32, axis)
        r = _residual(rng, x) if use_residual else None
        y = fused(x, residual=r)
        y0 = plain(x)
        y0 = np.maximum(y0 + r if use_residual else y0, 0)
        assert_close(y, y0, TOL[F32])
        np.testing.assert_array_equal(fused.running_mean, plain.running_mean)
        dy = make_data(rng, shape, F32, axis)
        out = fused.backward(dy)
        g = np.where(y > 0, dy, 0).astype(np.float32)
        dx0 = plain.backward(g)
        if use_residual:
            dx, dres = out
            np.testing.assert_array_equal(dres, g)
        else:
            dx = out
            assert isinstance(out, np.ndarray)
        np.testing.assert_array_equal(dx, dx0)
        np.testing.assert_array_equal(fused.grad_weight, plain.grad_weight)
        np.testing.assert_array_equal(fused.grad_bias, plain.grad_bias)


def test_layer_residual_without_activation(rng):
    layer = bn.BatchNorm1d(5)
    x = make_data(rng, (10, 5), F32)
    r = _residual(rng, x)
    y = layer(x, residual=r)
    y0 = bn.BatchNorm1d(5)(x) + r
    assert_close(y, y0, TOL[F32])
    dy = make_data(rng, (10, 5), F32)
    dx, dres = layer.backward(dy)
    np.testing.assert_array_equal(dres, dy)
    assert dres is not dy
    # a later forward without a residual: backward returns dx alone again
    layer(x)
    assert isinstance(layer.backward(dy), np.ndarray)


def test_layer_affine_false_and_bias_false(rng):
    for kw in ({"affine": False}, {"bias": False}):
        layer = bn.BatchNorm2d(4, activation="relu", **kw)
        x = make_data(rng, (6, 4, 3, 3), F32)
        y = layer(x)
        dy = make_data(rng, x.shape, F32)
        dx = layer.backward(dy)
        y0, m, i = bn.forward_train(x, layer.weight, None, stats_dtype=np.float64)
        dx0, _, _ = bn.backward(np.where(y0 > 0, dy, 0).astype(np.float32), x, m, i, layer.weight)
        np.testing.assert_array_equal(y, np.maximum(y0, 0))
        np.testing.assert_array_equal(dx, dx0)


def test_layer_failed_call_changes_nothing(rng):
    layer = bn.BatchNorm2d(3, activation="relu")
    x = make_data(rng, (4, 3, 2, 2), F32)
    layer(x)
    state = snapshot(layer.running_mean, layer.running_var, layer.weight, layer.bias)
    count = layer.num_batches_tracked
    with pytest.raises(ValueError, match="residual"):
        layer(x, residual=np.zeros((4, 3, 2, 3), np.float32))
    assert_unchanged(state, snapshot(layer.running_mean, layer.running_var, layer.weight, layer.bias))
    assert layer.num_batches_tracked == count


def test_layer_repr_pickle_state_dict():
    layer = bn.BatchNorm2d(3, activation="relu")
    assert "activation='relu'" in repr(layer)
    assert "activation" not in repr(bn.BatchNorm2d(3))
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.activation == "relu"
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    # a layer pickled before activation existed loads as activation=None
    old = bn.BatchNorm2d(3)
    state = old.__getstate__()
    del state["activation"], state["_cache_epilogue"]
    fresh = bn.BatchNorm2d.__new__(bn.BatchNorm2d)
    fresh.__setstate__(state)
    assert fresh.activation is None


# -- torch -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", [((16, 8, 6, 6), 1), ((64, 32), 1)])
@pytest.mark.parametrize("use_residual", [False, True])
def test_against_torch(rng, shape, axis, use_residual):
    torch = pytest.importorskip("torch")
    C = shape[axis]
    x = make_data(rng, shape, F64, axis)
    r = _residual(rng, x) if use_residual else None
    gamma, beta = params(rng, C)
    dy = make_data(rng, shape, F64, axis)
    tx = torch.tensor(x, requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    tr = torch.tensor(r, requires_grad=True) if use_residual else None
    ty = torch.nn.functional.batch_norm(tx, None, None, tg, tb, training=True, eps=1e-5)
    if use_residual:
        ty = ty + tr
    ty = torch.relu(ty)
    ty.backward(torch.tensor(dy))
    y, m, i = bn.forward_train(x, gamma, beta, activation="relu", residual=r)
    assert_close(y, ty.detach().numpy(), 1e-10)
    out = bn.backward(dy, x, m, i, gamma, activation="relu", beta=beta, **({"residual": r} if use_residual else {}))
    assert_close(out[0], tx.grad.numpy(), 1e-10)
    assert_close(out[1], tg.grad.numpy(), 1e-10)
    assert_close(out[2], tb.grad.numpy(), 1e-10)
    if use_residual:
        assert_close(out[3], tr.grad.numpy(), 1e-12)


# -- with the variants -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((10, 4, 3, 3), 1), ((9, 3, 3, 5), -1), ((14, 6), 1)])
def test_ghost_batches_with_the_epilogue(rng, dtype, shape, axis):
    """Each ghost batch is the fused call on its own rows; the reference agrees."""
    g = 4
    x = make_data(rng, shape, dtype, axis)
    r = _residual(rng, x)
    dy = make_data(rng, shape, dtype, axis)
    gamma, beta = params(rng, shape[axis])
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis, activation="relu", residual=r,
                                       ghost_batch_size=g, stats_dtype=np.float64)
    dx, dgamma, dbeta, dres = bn.backward(dy, x, mean, invstd, gamma, axis=axis, activation="relu", beta=beta,
                                          residual=r, ghost_batch_size=g)
    for k, lo in enumerate(range(0, shape[0], g)):
        sl = slice(lo, lo + g)
        yk, mk, ik = bn.forward_train(x[sl], gamma, beta, axis=axis, activation="relu", residual=r[sl],
                                      stats_dtype=np.float64)
        np.testing.assert_array_equal(y[sl], yk)
        np.testing.assert_array_equal(mean[k], mk)
        out = bn.backward(dy[sl], x[sl], mk, ik, gamma, axis=axis, activation="relu", y=yk, residual=True)
        np.testing.assert_array_equal(dx[sl], out[0])
        np.testing.assert_array_equal(dres[sl], out[3])
    rd = ref.backward(dy, x, mean, invstd, gamma, axis=axis, activation="relu", beta=beta, residual=r,
                      ghost_batch_size=g)
    assert_close(dx, rd[0], TOL[dtype])
    assert_close(dgamma, rd[1], TOL[dtype] * 10)
    np.testing.assert_array_equal(dres, rd[3].astype(dtype))
    yr, _, _ = ref.forward_train(x, gamma, beta, axis=axis, activation="relu", residual=r, ghost_batch_size=g)
    assert_close(y, yr, TOL[dtype])


def test_layer_with_flags_and_ghost_keeps_the_epilogue(rng):
    x = make_data(rng, (12, 5, 4), F32)
    r = _residual(rng, x)
    dy = make_data(rng, x.shape, F32)
    for kw in ({"ghost_batch_size": 4}, {"use_batch_stats": False}, {"update_running_stats": False}):
        fused = bn.BatchNorm1d(5, activation="relu", **kw)
        plain = bn.BatchNorm1d(5, **kw)
        y = fused(x, residual=r)
        y0 = np.maximum(plain(x) + r, 0)
        assert_close(y, y0, TOL[F32])
        dx, dres = fused.backward(dy)
        g = np.where(y > 0, dy, 0).astype(np.float32)
        np.testing.assert_array_equal(dres, g)
        np.testing.assert_array_equal(dx, plain.backward(g))


def test_renorm_layer_with_a_bad_residual_changes_nothing(rng):
    layer = bn.BatchNorm1d(3, renorm=True, activation="relu")
    layer.running_var[:] = 2.0
    x = make_data(rng, (6, 3), F32)
    before = layer.state_dict()
    with pytest.raises(ValueError, match="residual"):
        layer(x, residual=x[:5])
    assert layer.num_batches_tracked == 0
    for k, v in before.items():
        np.testing.assert_array_equal(layer.state_dict()[k], v)


def test_precise_stats_with_a_fused_layer(rng):
    layer = bn.BatchNorm1d(4, activation="relu")
    xs = [make_data(rng, (8, 4), F64) for _ in range(3)]
    with bn.precise_stats(layer):
        for x in xs:
            y = layer(x)
            assert (y >= 0).all()
    allx = np.concatenate(xs)
    assert_close(layer.running_mean, allx.mean(0), 1e-6)
    assert_close(layer.running_var, allx.var(0, ddof=1), 1e-6)
