"""Accuracy: float32 within 1e-5 and float64 within 1e-10 (relative to max(1, max|ref|)) of a float64
reference, also for data whose mean is 1e5 times its std; float64 data with mean 1e8 and std 1 (float32:
1e5) gets its mean and variance to 1e-13 in every layout; long channels; NaN stays in its channel; one
marked test with 2**25 values per channel."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
import helpers
from helpers import TOL, as_layout, assert_close, channels, make_data, params

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def exact_stats(x, axis):
    """Per-channel mean and biased variance with correctly rounded sums (math.fsum): an oracle more
    accurate than a float64 running sum, for data with a large mean."""
    C = channels(x.shape, axis)
    flat = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, C)
    M = flat.shape[0]
    mean = np.array([math.fsum(flat[:, c].tolist()) / M for c in range(C)])
    var = np.array([math.fsum(((flat[:, c] - mean[c]) ** 2).tolist()) / M for c in range(C)])
    return mean, var


def exact_forward(x, gamma, beta, axis, eps=1e-5):
    mean, var = exact_stats(x, axis)
    invstd = 1 / np.sqrt(var + eps)
    shp = [1] * x.ndim
    shp[axis % x.ndim] = -1
    r = lambda v: np.reshape(v, shp)  # noqa: E731
    y = (np.asarray(x, np.float64) - r(mean)) * r(invstd) * r(gamma) + r(beta)
    return y, mean, invstd, var


# --------------------------------------------------------------------------------------------------
# mean = 1e5 * std
# --------------------------------------------------------------------------------------------------

LARGE_MEAN_F32 = [
    pytest.param((64, 3, 8, 8), 1, 1.0, "C", id="64x3x8x8-std1"),
    pytest.param((20000, 3), 1, 1e3, "C", id="20000x3-std1e3"),
    pytest.param((2, 5, 4000), 1, 1.0, "slice", id="2x5x4000-slice"),
    pytest.param((8, 6, 6, 16), -1, 10.0, "C", id="8x6x6x16-chlast"),
]


def _large_mean_data(rng, shape, axis, std, dtype):
    return make_data(rng, shape, dtype, axis, loc=1e5 * std, scale=std)


@pytest.mark.parametrize("shape,axis,std,layout", LARGE_MEAN_F32)
def test_float32_large_mean_forward_train(rng, shape, axis, std, layout):
    x = as_layout(_large_mean_data(rng, shape, axis, std, np.float32), layout, axis)
    C = channels(shape, axis)
    gamma, beta = params(rng, C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    erm, erv = np.zeros(C), np.ones(C)
    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, momentum=1.0, axis=axis)
    ey, emean, einvstd = ref.forward_train(x, gamma, beta, running_mean=erm, running_var=erv, momentum=1.0,
                                           axis=axis)
    assert_close(y, ey, TOL[F32], "y")
    assert_close(mean, emean, TOL[F32], "mean")
    assert_close(invstd, einvstd, TOL[F32], "invstd")
    assert_close(rm, erm, TOL[F32], "running_mean")
    assert_close(rv, erv, TOL[F32], "running_var")


@pytest.mark.parametrize("shape,axis,std,layout", LARGE_MEAN_F32)
def test_float32_large_mean_forward_infer(rng, shape, axis, std, layout):
    """Running stats near the data (as after training): y = (x - rm) * s must not be computed as a
    float32 x * s + t, which cancels catastrophically."""
    x = as_layout(_large_mean_data(rng, shape, axis, std, np.float32), layout, axis)
    C = channels(shape, axis)
    gamma, beta = params(rng, C, np.float32)
    _, m, s = ref.forward_train(x, axis=axis)
    rm = m.astype(np.float32)
    rv = (1 / s**2 - 1e-5).astype(np.float32)
    y = bn.forward_infer(x, rm, rv, gamma, beta, axis=axis)
    assert_close(y, ref.forward_infer(x, rm, rv, gamma, beta, axis=axis), TOL[F32], "y")


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("shape,axis,std,layout", LARGE_MEAN_F32)
def test_float32_large_mean_backward(rng, shape, axis, std, layout, training):
    x = as_layout(_large_mean_data(rng, shape, axis, std, np.float32), layout, axis)
    dy = make_data(rng, shape, np.float32, axis)
    C = channels(shape, axis)
    gamma, _ = params(rng, C, np.float32)
    _, m, s = ref.forward_train(x, axis=axis)
    mean, invstd = m.astype(np.float32), s.astype(np.float32)
    got = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
    want = ref.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(g, w, TOL[F32], name)


def _within_ulps(got, want, ulps, what):
    """|got - want| <= ulps float32 ulps of want, elementwise, ulps measured at max(|want|, 1/4): a value
    near 0 is held to the spread's scale, not to its own tiny ulp, which the float64 statistics of data
    with mean 1e6 std do not resolve either (the mean itself is only known to ~1e-10)."""
    want = np.asarray(want, np.float64)
    unit = np.spacing(np.maximum(np.abs(want), 0.25).astype(np.float32)).astype(np.float64)
    err = np.abs(np.asarray(got, np.float64) - want) / unit
    assert err.max() <= ulps, f"{what}: {err.max():.2f} float32 ulps from the float64 result"


# The float32 kernels fold the mean into the offset (y = x * alpha + (beta - mean * alpha), in double)
# where |mean| * invstd <= 2^16, and centre the other channels. Both must be as exact as centring in
# float64: within about one float32 ulp of the float64 result for the same inputs, in row mode (NCHW) and
# column mode ((N, C), channels-last); at ratio 5e4 the channels' |mean| * invstd spans 2.5e4 to 1e5, so
# folded and centred channels share work items.
FOLD_CASES = [pytest.param((32, 4, 9, 9), 1, id="nchw"), pytest.param((3000, 5), 1, id="nc"),
              pytest.param((6, 7, 7, 12), -1, id="chlast")]


@pytest.mark.parametrize("ratio", [0.0, 1e3, 5e4, 1e6])
@pytest.mark.parametrize("shape,axis", FOLD_CASES)
def test_float32_within_an_ulp_of_float64(rng, shape, axis, ratio):
    C = channels(shape, axis)
    x = make_data(rng, shape, np.float32, axis, loc=ratio, scale=1.0)
    dy = make_data(rng, shape, np.float32, axis)
    gamma, beta = params(rng, C, np.float32)
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis)
    x64 = x.astype(np.float64)
    _within_ulps(y, exact_forward(x, gamma.astype(np.float64), beta.astype(np.float64), axis)[0], 1.5,
                 "train y")
    rm, rv = mean, (1 / invstd.astype(np.float64) ** 2 - 1e-5).astype(np.float32)
    _within_ulps(bn.forward_infer(x, rm, rv, gamma, beta, axis=axis),
                 ref.forward_infer(x64, rm, rv, gamma, beta, axis=axis), 1.5, "infer y")
    got = bn.backward(dy, x, mean, invstd, gamma, axis=axis)
    want = ref.backward(dy.astype(np.float64), x64, mean, invstd, gamma, axis=axis)
    _within_ulps(got[0], want[0], 1.5, "dx")


# The float32 fold cancels where |mean| * invstd is huge: a constant channel at 1e12 (invstd = 1/sqrt(eps))
# gave y = 0.125 for beta = 0.123456 (4e5 ulps), one at 1.7e9 (a timestamp) 1440 ulps off, and a channel
# at 1.7e9 with one value a float32 ulp (128) above the rest (|mean| * invstd = 3.4e9) was 350 ulps off
# in y and 26 to 60 in dx. Such channels are normalized centred, (x - mean) * alpha + beta, forward and
# backward; the others keep the fold.
def _huge_mean_case(kind, layout, rng):
    if kind == "1e12-constant":
        flat = np.full((8 * 64, 2), 1e12, np.float32)
    elif kind == "1.7e9-constant":
        flat = np.full((8 * 64, 2), 1.7e9, np.float32)
    else:  # "1.7e9-one-step": std 0.5, |mean| * invstd = 3.4e9
        flat = np.full((65536, 2), 1.7e9, np.float32)
        flat[12300, :] += np.float32(128)  # row 192, position 12: kept by every layout below
    M = flat.shape[0]
    if layout == "NC":
        return flat, 1
    if layout == "NCL40":  # row mode
        return np.ascontiguousarray(flat.reshape(M // 64, 64, 2).transpose(0, 2, 1)[:, :, :40]), 1
    return flat.reshape(M // 64, 8, 8, 2), -1  # NHWC, column mode


@pytest.mark.parametrize("layout", ["NC", "NCL40", "NHWC"])
@pytest.mark.parametrize("kind", ["1e12-constant", "1.7e9-constant", "1.7e9-one-step"])
def test_float32_huge_mean_to_spread_keeps_beta(rng, kind, layout):
    x, axis = _huge_mean_case(kind, layout, rng)
    x64 = x.astype(np.float64)
    gamma, beta = np.array([1.5, 0.5], np.float32), np.array([0.123456, -0.3], np.float32)
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis)
    ey, emean, einvstd, evar = exact_forward(x, gamma.astype(np.float64), beta.astype(np.float64), axis)
    _within_ulps(y, ey, 1.0, "train y")
    if kind.endswith("constant"):
        assert np.all(np.moveaxis(y, axis, -1).reshape(-1, 2) == beta), "a constant channel's y is beta"
    rm, rv = emean.astype(np.float32), evar.astype(np.float32)
    _within_ulps(bn.forward_infer(x, rm, rv, gamma, beta, axis=axis),
                 ref.forward_infer(x64, rm, rv, gamma, beta, axis=axis), 1.0, "infer y")
    # dy along xhat: the centred term of dx is as large as it gets next to k1 * dy
    xhat = exact_forward(x, np.ones(2), np.zeros(2), axis)[0]
    dy = (xhat + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    for training in (True, False):
        got = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        want = ref.backward(dy.astype(np.float64), x64, mean, invstd, gamma, training=training, axis=axis)
        _within_ulps(got[0], want[0], 1.0, f"dx training={training}")
    sdy, sdyxm = bn.backward_reduce(dy, x, mean, axis=axis)
    dx = bn.backward_apply(dy, x, mean, invstd, gamma, sdy, sdyxm, x.size // 2, axis=axis)
    _within_ulps(dx, ref.backward(dy.astype(np.float64), x64, mean, invstd, gamma, axis=axis)[0], 1.0,
                 "backward_apply dx")


# float32 in row mode (S >= 32 positions per (n, c)) is normalized in float32 where the channel allows it:
# y = fmaf(x, ah, bh) + fmaf(x, al, bl) from float32 pairs of alpha and offset (csrc/bn_internal.h,
# bn_f32_arith). It is held to about one float32 ulp of the float64 result (the README's figure), exact
# where the numbers are, and to the float64 form's infinities, NaN and signed zeros.
ROW_F32 = [pytest.param((8, 4, 32), id="8x4x32"), pytest.param((4, 3, 9, 13), id="4x3x9x13"),
           pytest.param((2, 2, 1000), id="2x2x1000")]


@pytest.mark.parametrize("shape", ROW_F32)
@pytest.mark.parametrize("activation,use_residual", [(None, False), ("relu", False), ("relu", True)])
def test_float32_row_mode_within_about_an_ulp(rng, shape, activation, use_residual):
    x = make_data(rng, shape, np.float32, 1, loc=3.0, scale=2.0)
    C = shape[1]
    gamma, beta = params(rng, C, np.float32)
    r = make_data(rng, shape, np.float32, 1) if use_residual else None
    y, mean, invstd = bn.forward_train(x, gamma, beta, activation=activation, residual=r)
    ey = exact_forward(x, gamma.astype(np.float64), beta.astype(np.float64), 1)[0]
    rm, rv = mean, (1 / invstd.astype(np.float64) ** 2 - 1e-5).astype(np.float32)
    ei = ref.forward_infer(x.astype(np.float64), rm, rv, gamma, beta, axis=1)
    y_inf = bn.forward_infer(x, rm, rv, gamma, beta, activation=activation, residual=r)
    if use_residual:
        # BN's y within about an ulp; the residual added in float32 after it, as NumPy's y + r after the
        # unfused call does: the same bits as that composition
        for got, plain in ((y, bn.forward_train(x, gamma, beta)[0]), (y_inf, bn.forward_infer(x, rm, rv, gamma, beta))):
            np.testing.assert_array_equal(got, np.maximum(plain + r, 0))
        y, y_inf = bn.forward_train(x, gamma, beta)[0], bn.forward_infer(x, rm, rv, gamma, beta)
    elif activation:
        ey, ei = np.maximum(ey, 0), np.maximum(ei, 0)
    _within_ulps(y, ey, 1.05, "train y")
    _within_ulps(y_inf, ei, 1.05, "infer y")


def test_float32_row_mode_exact_values_stay_exact():
    x = (np.arange(4 * 2 * 40, dtype=np.float32).reshape(4, 2, 40) - 100) * np.float32(0.25)
    ones, zeros = np.ones(2), np.zeros(2)
    np.testing.assert_array_equal(bn.normalize(x, zeros, ones), x)
    np.testing.assert_array_equal(bn.normalize(x, zeros, ones, 2 * ones, -0.5 * ones), 2 * x - 0.5)
    np.testing.assert_array_equal(bn.normalize(x, [1.0, -2.0], [4.0, 0.5]),
                                  (x - np.array([1.0, -2.0], np.float32)[:, None]) * np.array([4, 0.5], np.float32)[:, None])
    # x at the mean: y is beta exactly
    xm = np.full((3, 2, 64), 12345.678, np.float32)
    xm[:, 1] = -0.001
    mean = xm[0, :, 0].astype(np.float64)
    np.testing.assert_array_equal(bn.normalize(xm, mean, [3.0, 0.7], beta=[0.123456, -2.5]),
                                  np.broadcast_to(np.array([0.123456, -2.5], np.float32)[:, None], xm.shape))


@pytest.mark.parametrize("invstd", [1.0, 1.1], ids=["alpha-a-float32", "alpha-not"])
def test_float32_row_mode_inf_nan_and_signed_zeros(invstd):
    """An infinite x gives an infinite y also where alpha is a float32 (the second FMA's al is 0 there:
    inf * 0 would be NaN), NaN stays NaN, and zeros keep the signs of the float64 form that column mode
    (channels-last) computes."""
    x = np.zeros((2, 4, 40), np.float32)
    x[0, :, :5] = [np.inf, -np.inf, np.nan, -0.0, 0.0]
    # offsets beta - mean * alpha: -0.0, +0.0, +0.0 and (mean -0.0, alpha < 0) -0.0
    args = ([0.0, 0.0, 0.0, -0.0], [invstd] * 4, [1.0, -2.0, 1.0, -2.0], [-0.0, -0.0, 0.0, -0.0])
    y = bn.normalize(x, *args)
    np.testing.assert_array_equal(y[0, 0, :3], [np.inf, -np.inf, np.nan])
    np.testing.assert_array_equal(y[0, 1, :3], [-np.inf, np.inf, np.nan])
    assert np.signbit(y[0, 0, 3]) and not np.signbit(y[0, 0, 4]), y[0, 0, 3:5]  # -0 * a + -0, +0 * a + -0
    y_col = np.moveaxis(bn.normalize(np.ascontiguousarray(np.moveaxis(x, 1, -1)), *args, axis=-1), -1, 1)
    np.testing.assert_array_equal(np.signbit(y), np.signbit(y_col))
    np.testing.assert_array_equal(y, y_col)


@pytest.mark.parametrize("shape,axis", [pytest.param((16, 3, 8, 8), 1, id="16x3x8x8"),
                                        pytest.param((512, 5), 1, id="512x5"),
                                        pytest.param((4, 8, 8, 6), -1, id="4x8x8x6-chlast"),
                                        pytest.param((64, 3, 8, 8), 1, id="64x3x8x8")])
def test_float64_large_mean_ratio_1e5(rng, shape, axis):
    x = make_data(rng, shape, np.float64, axis, loc=1e5)
    C = channels(shape, axis)
    gamma, beta = params(rng, C)
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis)
    ey, emean, einvstd, _ = exact_forward(x, gamma, beta, axis)
    assert_close(y, ey, TOL[F64], "y")
    assert_close(mean, emean, TOL[F64], "mean")
    assert_close(invstd, einvstd, TOL[F64], "invstd")


@pytest.mark.parametrize("shape,axis,layout", [pytest.param((64, 3, 8, 8), 1, "C", id="64x3x8x8"),
                                               pytest.param((20000, 4), 1, "C", id="20000x4"),
                                               pytest.param((2, 3, 5000), 1, "negall", id="2x3x5000-negall"),
                                               pytest.param((8, 5, 5, 32), -1, "C", id="8x5x5x32-chlast")])
def test_float64_mean_1e8_std_1_variance(rng, shape, axis, layout):
    x = as_layout(make_data(rng, shape, np.float64, axis, loc=1e8), layout, axis)
    C = channels(shape, axis)
    M = x.size // C
    eps = 1e-5
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, momentum=1.0, axis=axis)
    _, evar = exact_stats(x, axis)
    var = 1 / invstd.astype(np.float64) ** 2 - eps
    np.testing.assert_allclose(var, evar, rtol=1e-6, err_msg="variance from invstd")
    np.testing.assert_allclose(rv, evar * M / (M - 1), rtol=1e-6, err_msg="running_var (unbiased)")
    ey = exact_forward(x, np.ones(C), np.zeros(C), axis)[0]
    assert_close(y, ey, 1e-6, "y")


# Every layout at a mean far above the spread: float64 at 1e8 std, float32 at 1e5 std. The kernels
# accumulate each channel relative to one of its own values (its first), so the partial means merged
# again and again (column mode: every 32 rows, every position, every row group) are of the size of the
# spread and m2 keeps float64's precision, ~1e-16 relative; centring on the partial means themselves
# gave 2e-9 (float64, column mode), 3e-10 (row mode with several row groups) and 6e-13 (float32).
LARGE_MEAN_LAYOUTS = [
    pytest.param((20000, 3), 1, id="NC"),
    pytest.param((3000, 40), 1, id="NC-wide-groups"),
    pytest.param((3000, 4, 7), 1, id="NCL-L7"),
    pytest.param((300, 3, 40), 1, id="NCL-L40"),
    pytest.param((64, 3, 8, 8), 1, id="NCHW"),
    pytest.param((2, 3, 130, 130), 1, id="NCHW-long"),
    pytest.param((16, 8, 8, 5), -1, id="NHWC"),
    pytest.param((40, 8, 8, 48), -1, id="NHWC-groups"),
    # 16 MiB and more, rows under 1024 positions: column mode's first pass goes one row at a time
    pytest.param((16411, 257), 1, id="NC-streamed"),
    pytest.param((8200, 129, 4), 1, id="NCL-streamed"),
]


@pytest.mark.parametrize("dtype,loc", [pytest.param(np.float64, 1e8, id="f64-1e8"),
                                       pytest.param(np.float32, 1e5, id="f32-1e5")])
@pytest.mark.parametrize("shape,axis", LARGE_MEAN_LAYOUTS)
def test_large_mean_statistics_exact_in_every_layout(rng, shape, axis, dtype, loc):
    x = make_data(rng, shape, dtype, axis, loc=loc)
    C = channels(shape, axis)
    M = x.size // C
    emean, evar = exact_stats(x, axis)
    count, mean, m2 = bn.batch_stats(x, axis=axis)
    assert count == M
    np.testing.assert_allclose(mean, emean, rtol=1e-15, atol=0, err_msg="batch_stats mean")
    np.testing.assert_allclose(m2, evar * M, rtol=1e-13, atol=0, err_msg="batch_stats m2")
    eps = 1e-5
    _, tmean, invstd = bn.forward_train(x, axis=axis, eps=eps, stats_dtype=np.float64)
    assert np.array_equal(tmean, mean), "forward_train's mean differs from batch_stats'"
    np.testing.assert_allclose(1 / invstd**2 - eps, evar, rtol=1e-13, atol=0, err_msg="variance from invstd")


# Column mode reads a row group's later chunks of rows once, centred on the running mean of the rows
# before them (its first 32 rows take two passes). Its m2 cancels by each chunk's squared distance from
# that running mean: rows that drift (sorted, trending, a chunk far from the rest) are the hard case. The
# error stays a few float64 ulps of m2, as the two passes' did.
def _drifting_rows(kind, rng, n, k):
    x = rng.standard_normal((n, k))
    if kind == "sorted":
        x = np.sort(x * 3 + 7, axis=0)
    elif kind == "trend":
        x += np.arange(n)[:, None] * 1e3
    elif kind == "first-chunk-apart":
        x[:32] += 1e6
    elif kind == "late-chunk-apart":
        x[-40:-8] += 1e6
    elif kind == "chunk-steps":  # each chunk of 32 rows its own offset, 1e4 times the spread
        x += np.repeat(rng.standard_normal((n // 32 + 1, k)) * 1e4, 32, axis=0)[:n]
    elif kind == "mean-1e8-after-zeros":  # a first chunk of zeros, then mean 1e8 std 1
        x[32:] += 1e8
        x[:32] = 0
    return x


@pytest.mark.parametrize("kind", ["sorted", "trend", "first-chunk-apart", "late-chunk-apart", "chunk-steps",
                                  "mean-1e8-after-zeros"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape,axis", [pytest.param((3000, 40), 1, id="NC"),
                                        pytest.param((1001, 3, 4), 1, id="NCL-L4"),
                                        pytest.param((700, 2, 2, 24), -1, id="NHWC"),
                                        pytest.param((300, 2048), 1, id="NC-wide"),
                                        pytest.param((20000, 8), 1, id="NC-long-groups")])
def test_column_mode_chunks_of_drifting_rows(rng, restore_threads, kind, dtype, shape, axis):
    n = shape[0]
    x = _drifting_rows(kind, rng, n, int(np.prod(shape[1:]))).reshape(shape).astype(dtype)
    C = channels(shape, axis)
    M = x.size // C
    emean, evar = exact_stats(x, axis)
    got = []
    for threads in (1, 2):
        bn.set_num_threads(threads)
        got.append(bn.batch_stats(x, axis=axis))
    (count, mean, m2), other = got
    assert count == M
    assert np.array_equal(mean, other[1]) and np.array_equal(m2, other[2]), "1 and 2 threads differ"
    # measured: the mean within 7.5 float64 ulps of the largest |x|, m2 within 7.6e-15 relative (the two
    # passes: 8.2e-15; centred on the first chunk's mean throughout: 1.6e-13)
    np.testing.assert_allclose(mean, emean, rtol=0, atol=16 * 2.0**-52 * np.abs(x).max(), err_msg="mean")
    np.testing.assert_allclose(m2, evar * M, rtol=2.5e-14, atol=0, err_msg="m2")
    _, tmean, invstd = bn.forward_train(x, axis=axis, stats_dtype=np.float64)
    assert np.array_equal(tmean, mean), "forward_train's mean differs from batch_stats'"


def test_column_mode_squares_that_overflow_keep_the_two_pass_results():
    """A later chunk 1e160 from the running mean: its squared deviations overflow, and so does the true
    m2 (np.var is inf). The chunk is then reduced in two passes, as before: m2 inf, the mean finite."""
    x = np.ones((200, 3))
    x[100:, 1] = 1e160 * (1 + np.arange(100) / 1000)
    x[150:, 2] = -1e160
    count, mean, m2 = bn.batch_stats(x)
    with np.errstate(over="ignore"):
        assert np.array_equal(m2 == np.inf, np.var(x, axis=0) == np.inf)
    np.testing.assert_allclose(mean, np.mean(x, axis=0), rtol=1e-14)
    assert m2[0] == 0 and np.isinf(m2[1]) and np.isinf(m2[2])


# 16 MiB and more with rows under 1024 positions: chunks of k rows read as one virtual row of >= 1024
# positions (k = 64, 4 and 61 here; 1028 positions leave a vector tail), or, for rows of 256 to 512
# bytes, two passes throughout.
STREAMED_NARROW = [pytest.param((262144, 16), np.float32, id="262144x16-f32-virtual"),
                   pytest.param((16411, 257), np.float32, id="16411x257-f32-virtual"),
                   pytest.param((131072, 17), np.float64, id="131072x17-f64-virtual"),
                   pytest.param((65600, 32), np.float64, id="65600x32-f64-two-pass")]


@pytest.mark.parametrize("kind", ["trend", "first-chunk-apart", "late-chunk-apart"])
@pytest.mark.parametrize("shape,dtype", STREAMED_NARROW)
def test_column_mode_streamed_narrow_rows(rng, restore_threads, kind, shape, dtype):
    x = _drifting_rows(kind, rng, *shape).astype(dtype)
    emean, evar = exact_stats(x, 1)
    got = []
    for threads in (1, 2):
        bn.set_num_threads(threads)
        got.append(bn.batch_stats(x))
    (count, mean, m2), other = got
    assert count == shape[0]
    assert np.array_equal(mean, other[1]) and np.array_equal(m2, other[2]), "1 and 2 threads differ"
    np.testing.assert_allclose(mean, emean, rtol=0, atol=16 * 2.0**-52 * np.abs(x).max(), err_msg="mean")
    np.testing.assert_allclose(m2, evar * shape[0], rtol=2.5e-14, atol=0, err_msg="m2")


@pytest.mark.parametrize("shape,dtype", STREAMED_NARROW)
def test_column_mode_streamed_narrow_rows_non_finite(rng, shape, dtype):
    """inf, NaN and squares that overflow, in chunks after the first: np.mean's and np.var's kinds of
    result in their channels, and the other channels' bits as without them."""
    n, C = shape
    clean = rng.standard_normal(shape).astype(dtype)
    x = clean.copy()
    x[n // 2, 1] = np.inf
    x[n // 3, 2] = np.nan
    x[n - 3, 3] = -np.inf
    x[n // 4, 3] = np.inf
    if dtype == np.float64:
        x[n // 2:, 4] = 1e160  # (x - running mean)^2 overflows; so does np.var
    _, mean, m2 = bn.batch_stats(x)
    assert mean[1] == np.inf and np.isnan(m2[1])
    assert np.isnan(mean[2]) and np.isnan(m2[2])
    assert np.isnan(mean[3]) and np.isnan(m2[3])
    if dtype == np.float64:
        assert np.isfinite(mean[4]) and m2[4] == np.inf
        np.testing.assert_allclose(mean[4], np.mean(x[:, 4]), rtol=1e-14)
    keep = np.arange(C) >= (5 if dtype == np.float64 else 4)
    _, mean0, m20 = bn.batch_stats(clean)
    assert np.array_equal(mean[keep], mean0[keep]) and np.array_equal(m2[keep], m20[keep])


# --------------------------------------------------------------------------------------------------
# long channels, extreme magnitudes, constant channels
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,dtype,axis", [pytest.param((20000, 37), np.float32, 1, id="20000x37-f32"),
                                              pytest.param((3, 2, 100000), np.float64, 1, id="3x2x100000-f64"),
                                              pytest.param((3, 2, 100000), np.float32, 1, id="3x2x100000-f32"),
                                              pytest.param((37, 20000), np.float32, 0, id="37x20000-ax0"),
                                              # 16 MiB and more: column mode's sums one row at a time
                                              pytest.param((16411, 257), np.float32, 1, id="16411x257-f32"),
                                              pytest.param((8200, 257), np.float64, 1, id="8200x257-f64"),
                                              pytest.param((5600, 95, 8), np.float32, 1, id="5600x95x8-f32")])
def test_long_channels_all_ops(rng, shape, dtype, axis):
    x = make_data(rng, shape, dtype, axis, loc=3.0)
    dy = make_data(rng, shape, dtype, axis, loc=0.5)
    C = channels(shape, axis)
    gamma, beta = params(rng, C, dtype)
    tol = TOL[np.dtype(dtype)]
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis)
    ey, emean, einvstd = ref.forward_train(x, gamma, beta, axis=axis)
    assert_close(y, ey, tol, "y")
    assert_close(mean, emean, tol, "mean")
    assert_close(invstd, einvstd, tol, "invstd")
    for training in (True, False):
        got = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        want = ref.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
            assert_close(g, w, tol, f"{name} training={training}")


def test_float32_huge_magnitudes_do_not_overflow(rng):
    """Squares of 1e18 overflow float32 sums; the result must still match the float64 reference."""
    x = (make_data(rng, (50, 3, 20), np.float64) * 1e18).astype(np.float32)
    dy = make_data(rng, (50, 3, 20), np.float32)
    y, mean, invstd = bn.forward_train(x)
    ey, emean, einvstd = ref.forward_train(x)
    assert_close(y, ey, TOL[F32], "y")
    np.testing.assert_allclose(invstd, einvstd, rtol=1e-5, err_msg="invstd")
    np.testing.assert_allclose(mean, emean, rtol=1e-5, atol=1e-5 * 1e18, err_msg="mean")
    got = bn.backward(dy, x, mean, invstd)
    want = ref.backward(dy, x, mean, invstd)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(g, w, TOL[F32], name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channel(rng, dtype):
    x = make_data(rng, (6, 3, 4), dtype)
    x[:, 1, :] = dtype(12345.678)
    beta = np.array([0.0, 0.75, 0.0], dtype)
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    y, mean, invstd = bn.forward_train(x, None, beta, running_mean=rm, running_var=rv, momentum=1.0)
    tol = TOL[np.dtype(dtype)]
    assert_close(mean[1], x[0, 1, 0], tol)
    assert_close(invstd[1], 1 / np.sqrt(1e-5), tol)
    # a rounding error of a few ulp of 12345.678 in the mean is amplified by invstd = 316
    assert_close(y[:, 1, :], np.full((6, 4), 0.75), max(tol, 1e-8))
    assert_close(rv[1], 0.0, tol)
    assert np.all(np.isfinite(y))


# --------------------------------------------------------------------------------------------------
# NaN stays in its channel
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,nan_channel", [
    pytest.param((6, 4, 5), 1, 1, id="6x4x5"),
    pytest.param((16, 8, 32, 32), 1, 5, id="16x8x32x32"),
    pytest.param((16, 32, 32, 8), -1, 3, id="16x32x32x8-chlast"),
    pytest.param((5000, 7), 1, 0, id="5000x7"),
])
def test_nan_stays_in_its_channel(rng, restore_threads, shape, axis, nan_channel, dtype):
    bn.set_num_threads(2)
    C = channels(shape, axis)
    x = make_data(rng, shape, dtype, axis)
    idx = [s // 2 for s in shape]
    idx[axis % len(shape)] = nan_channel
    x[tuple(idx)] = np.nan
    dy = make_data(rng, shape, dtype, axis)
    gamma, beta = params(rng, C, dtype)
    others = np.arange(C) != nan_channel
    tol = TOL[np.dtype(dtype)]

    def chan(a, c):
        return np.take(a, np.flatnonzero(c), axis=axis % len(shape))

    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    erm, erv = np.zeros(C), np.ones(C)
    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
    ey, emean, einvstd = ref.forward_train(x, gamma, beta, running_mean=erm, running_var=erv, axis=axis)
    assert np.isnan(mean[nan_channel]) and np.isnan(rm[nan_channel]) and np.isnan(rv[nan_channel])
    assert np.all(np.isnan(chan(y, ~others)))
    assert np.all(np.isfinite(chan(y, others))) and np.all(np.isfinite(mean[others]))
    assert np.all(np.isfinite(invstd[others])) and np.all(np.isfinite(rm[others])) and np.all(np.isfinite(rv[others]))
    assert_close(chan(y, others), chan(ey, others), tol, "y, other channels")
    assert_close(mean[others], emean[others], tol)
    assert_close(invstd[others], einvstd[others], tol)
    assert_close(rv[others], erv[others], tol)

    # inference: the NaN stays in its element
    rm2, rv2 = np.zeros(C, dtype), np.ones(C, dtype)
    yi = bn.forward_infer(x, rm2, rv2, gamma, beta, axis=axis)
    assert np.array_equal(np.isnan(yi), np.isnan(x))

    # backward
    for training in (True, False):
        dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        edx, edgamma, edbeta = ref.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        assert np.all(np.isfinite(chan(dx, others))), f"NaN leaked into other channels (training={training})"
        assert np.all(np.isfinite(dgamma[others])) and np.all(np.isfinite(dbeta))
        assert_close(chan(dx, others), chan(edx, others), tol, "dx, other channels")
        assert_close(dgamma[others], edgamma[others], tol)
        assert_close(dbeta, edbeta, tol)


# --------------------------------------------------------------------------------------------------
# +-inf: the mean is +-inf (NaN for both signs), as np.mean's, however the channel is cut into chunks
# --------------------------------------------------------------------------------------------------

INF_SHAPES = [
    pytest.param((6, 4, 5), 1, id="6x4x5"),                     # column mode, one chunk
    pytest.param((5000, 7), 1, id="5000x7"),                    # column mode, 157 chunks of 32 rows
    pytest.param((64, 32, 32, 8), -1, id="64x32x32x8-chlast"),  # column mode, several row groups
    pytest.param((16, 8, 32, 32), 1, id="16x8x32x32"),          # row mode, 16 row groups
    pytest.param((3, 2, 70000), 1, id="3x2x70000"),             # row mode, rows cut into segments
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", INF_SHAPES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("signs", ["+inf", "-inf", "both"])
def test_inf_gives_an_infinite_mean(rng, restore_threads, shape, axis, where, signs, dtype):
    """A merge of partial means computes mean_b - mean_a: inf - inf is NaN, so a channel holding +inf
    came out NaN (np.mean: inf) unless the inf sat in the last chunk merged. Its variance is NaN
    (np.var: inf - inf), so are invstd and y; the other channels keep their bits."""
    nd = len(shape)
    ax = axis % nd
    C = shape[ax]
    ch = C // 2
    clean = make_data(rng, shape, dtype, axis)
    x = clean.copy()
    chan = np.moveaxis(x, ax, -1)[..., ch]  # a view of channel ch
    flat_index = {"first": 0, "middle": chan.size // 2 + 3, "last": chan.size - 1}[where]
    spot = np.unravel_index(flat_index, chan.shape)
    other = np.unravel_index(chan.size - 1 - flat_index // 2, chan.shape)
    chan[spot] = -np.inf if signs == "-inf" else np.inf
    if signs == "both":
        chan[other] = -np.inf
    with np.errstate(invalid="ignore"):
        want_mean = np.mean(chan.astype(np.float64))
    assert np.isnan(want_mean) if signs == "both" else want_mean == chan[spot]
    others = np.arange(C) != ch

    def channel(a, keep):
        return np.take(a, np.flatnonzero(keep), axis=ax)

    results = []
    for threads in (1, 2):
        bn.set_num_threads(threads)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, axis=axis, stats_dtype=np.float64)
        count, bmean, m2 = bn.batch_stats(x, axis=axis)
        if np.isnan(want_mean):
            assert np.isnan(mean[ch]) and np.isnan(bmean[ch]) and np.isnan(rm[ch])
        else:
            assert mean[ch] == want_mean and bmean[ch] == want_mean and rm[ch] == want_mean
        assert np.isnan(m2[ch]) and np.isnan(invstd[ch]) and np.isnan(rv[ch]), "np.var is NaN"
        assert np.all(np.isnan(channel(y, ~others))), "np's y is NaN throughout the channel"
        results.append((y, mean, invstd, bmean, m2))
    for a, b in zip(*results):
        assert np.array_equal(a, b, equal_nan=True), "1 and 2 threads differ"
    # cut into two parts along the first axis, merged: the same (merge_stats and its reference)
    cut = shape[0] // 2
    parts = [bn.batch_stats(p, axis=axis) for p in (x[:cut], x[cut:])]
    counts, means, m2s = (np.array([p[i] for p in parts]) for i in range(3))
    for merged in (bn.merge_stats(counts, means, m2s), ref.merge_stats(counts, means, m2s)):
        assert np.array_equal(merged[1][ch], want_mean, equal_nan=True) and np.isnan(merged[2][ch])
        assert np.all(np.isfinite(merged[1][others])) and np.all(np.isfinite(merged[2][others]))
    # the other channels: as without the inf, bit for bit
    y0, mean0, invstd0 = bn.forward_train(clean, axis=axis, stats_dtype=np.float64)
    y, mean, invstd = results[0][:3]
    assert np.array_equal(channel(y, others), channel(y0, others))
    assert np.array_equal(mean[others], mean0[others]) and np.array_equal(invstd[others], invstd0[others])


# --------------------------------------------------------------------------------------------------
# 2**25 values per channel: counters and sums that a float32 accumulator cannot hold
# --------------------------------------------------------------------------------------------------


@pytest.mark.large
def test_more_than_2_pow_24_values_per_channel():
    L = 2**23 + 1
    shape = (4, 1, L)
    M = 4 * L  # 2**25 + 4, a multiple of 4
    x = np.tile(np.arange(4, dtype=np.float32), M // 4).reshape(shape)  # 0,1,2,3,...: mean 1.5, var 1.25
    rm, rv = np.zeros(1, np.float32), np.ones(1, np.float32)
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, momentum=1.0)
    s = 1 / math.sqrt(1.25 + 1e-5)
    assert_close(mean, [1.5], 1e-5, "mean")
    assert_close(invstd, [s], 1e-5, "invstd")
    assert_close(rm, [1.5], 1e-5, "running_mean")
    assert_close(rv, [1.25 * M / (M - 1)], 1e-5, "running_var")
    want = (np.arange(4) - 1.5) * s
    err = np.abs(y.reshape(-1, 4) - want.astype(np.float32)).max()
    assert err <= 1e-5 * 2, f"y off by {err}"
    y = bn.forward_infer(x, rm, rv, out=y)
    err = np.abs(y.reshape(-1, 4) - want.astype(np.float32)).max()
    assert err <= 1e-5 * 2, f"forward_infer y off by {err}"
    del y
    dy = np.broadcast_to(np.float32(1.0), shape)  # zero strides everywhere
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd)
    assert_close(dbeta, [float(M)], 1e-5, "dbeta")
    assert abs(float(dgamma[0])) <= 1e-5 * M ** 0.5, f"dgamma = {dgamma[0]}"
    assert float(np.abs(dx).max()) <= 1e-5, "dx should be 0 for constant dy"


# --------------------------------------------------------------------------------------------------
# the sweep in this process and in subprocesses: one thread, and the implementation's baseline
# (non-AVX2) kernels via its BATCHNORM_SIMD switch (if the switch is unknown, that run simply
# repeats the default kernels)
# --------------------------------------------------------------------------------------------------


def test_accuracy_sweep_in_process():
    failures = helpers.accuracy_sweep()
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize("env", [{"BATCHNORM_SIMD": "baseline"}, {"BATCHNORM_SIMD": "baseline", "OMP_NUM_THREADS": "1"},
                                 {"OMP_NUM_THREADS": "1"}],
                         ids=["baseline-simd", "baseline-simd-1thread", "1thread"])
def test_accuracy_sweep_in_subprocess(env):
    code = "import json, helpers\nprint(json.dumps(helpers.accuracy_sweep()))\n"
    r = subprocess.run([sys.executable, "-c", code], env=helpers.subprocess_env(**env), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    failures = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures[:20])


# --------------------------------------------------------------------------------------------------
# a layer's forward + backward at mean = 1e5 std: its own statistics must not pass through float32
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,shape,kw", [pytest.param(bn.BatchNorm2d, (32, 6, 7, 7), {}, id="2d"),
                                            pytest.param(bn.BatchNorm1d, (3000, 5), {}, id="1d"),
                                            pytest.param(bn.BatchNorm2d, (8, 7, 7, 6), {"axis": -1}, id="2d-chlast")])
def test_layer_float32_large_mean_backward(rng, layer, shape, kw):
    axis = kw.get("axis", 1)
    C = shape[axis]
    x = make_data(rng, shape, np.float32, axis, loc=1e5, scale=1.0)
    dy = make_data(rng, shape, np.float32, axis)
    m = layer(C, **kw)
    m.weight[:] = np.linspace(0.5, 2.0, C)
    y = m(x)
    dx = m.backward(dy)
    w = m.weight.astype(np.float64)
    ey, emean, einvstd, _ = exact_forward(x, w, m.bias.astype(np.float64), axis)
    want = ref.backward(dy.astype(np.float64), x.astype(np.float64), emean, einvstd, w, axis=axis)
    assert_close(y, ey, TOL[F32], "y")
    assert_close(dx, want[0], TOL[F32], "dx")
    assert_close(m.grad_weight, want[1], TOL[F32], "grad_weight")
    assert_close(m.grad_bias, want[2], TOL[F32], "grad_bias")


@pytest.mark.parametrize("stats_dtype", [np.float64, "float64", np.dtype("f8")])
def test_forward_train_stats_dtype_matches_forward_train(rng, stats_dtype):
    x = make_data(rng, (16, 4, 5), np.float32, 1, loc=1e4)
    y, mean, invstd = bn.forward_train(x)
    y64, mean64, invstd64 = bn.forward_train(x, stats_dtype=stats_dtype)
    assert mean64.dtype == invstd64.dtype == np.float64 and mean.dtype == np.float32
    assert np.array_equal(y, y64)
    assert np.array_equal(mean, mean64.astype(np.float32)) and np.array_equal(invstd, invstd64.astype(np.float32))
