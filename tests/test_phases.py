"""The phase functions (batch_stats, merge_stats, normalize, backward_reduce, backward_apply,
update_running_stats): each against its twin in batchnorm.reference; bit-identity of the phases composed
on one part with the fused forward_train/backward; splits of a batch along N merged/added back; the
properties of merge_stats; bad arguments; out=, empty and integer inputs; thread-count independence."""

from __future__ import annotations

import re

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from helpers import (F16, F32, F64, TOL, as_layout, assert_close, assert_result_dtype, assert_unchanged,
                     channels, layout_applies, make_data, params, result_dtype, snapshot, uniform_stats)

ERR = (TypeError, ValueError)
EPS64 = np.finfo(np.float64).eps


def _id(shape, axis, *rest):
    s = "x".join(map(str, shape)) + f"-ax{axis}"
    return "-".join([s] + [str(r) for r in rest])


def _bits(a):
    a = np.asarray(a)
    return a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()


def assert_bits(got, want, what=""):
    """Same dtype, shape and bytes (NaNs included)."""
    g, w = np.asarray(got), np.asarray(want)
    assert g.dtype == w.dtype, f"{what}: dtype {g.dtype} != {w.dtype}"
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    if _bits(g) != _bits(w):
        bad = np.flatnonzero(~((g == w) | (np.isnan(g) & np.isnan(w))).ravel())
        first = bad[:3].tolist()
        raise AssertionError(f"{what}: not bit-identical, {bad.size} of {g.size} elements differ, first at flat "
                             f"{first}: got {g.ravel()[first].tolist()}, want {w.ravel()[first].tolist()}")


def flat_channels(x, axis):
    """(M, C) float64 view of x with the channel axis last."""
    x = np.asarray(x)
    m = np.moveaxis(x.astype(np.float64), axis % x.ndim, -1)
    return m.reshape(-1, m.shape[-1])


def readonly(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


# --------------------------------------------------------------------------------------------------
# 1. each phase against its reference twin
# --------------------------------------------------------------------------------------------------

SHAPE_AXES = [
    ((5, 3), 1), ((5, 3), 0), ((6, 17), -1), ((2, 1), 1), ((3, 4, 5), -2), ((3, 4, 5), 0),
    ((8, 4, 40), 1), ((4, 3, 33), -2), ((2, 5, 7, 3), -1), ((2, 5, 7, 3), 2), ((2, 3, 4, 5, 3), 1),
    ((2, 3, 4, 5, 3), -1), ((2, 1, 3, 1, 2), 1), ((3, 2, 4, 2, 5), -3),
]
REF_LAYOUTS = ["C", "F", "T", "chlast", "step", "negall", "slice", "unaligned", "bcast"]
CASES = [pytest.param(s, a, l, id=_id(s, a, l))
         for s, a in SHAPE_AXES for l in REF_LAYOUTS if layout_applies(l, s, a)]
FLOATS = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]

# dtypes other than native float32/float64, on fewer shapes
OTHER_DTYPES = [np.float16, ">f4", ">f8", np.int32, np.uint8, np.int64, np.bool_]
DTYPE_CASES = [pytest.param(s, a, l, d, id=_id(s, a, l, np.dtype(d).str))
               for s, a, l in [((7, 3), 1, "C"), ((4, 5, 3, 2), 1, "step"), ((3, 4, 6), -1, "chlast"),
                               ((4, 3, 40), 1, "negall")]
               for d in OTHER_DTYPES]


def _ref_cases():
    for p in CASES:
        s, a, l = p.values
        for d in (np.float32, np.float64):
            yield pytest.param(s, a, l, d, id=p.id + "-" + np.dtype(d).name)
    yield from DTYPE_CASES


ALL_REF_CASES = list(_ref_cases())


def _data(rng, shape, axis, layout, dtype):
    return as_layout(make_data(rng, shape, dtype, axis), layout, axis)


@pytest.mark.parametrize("shape,axis,layout,dtype", ALL_REF_CASES)
def test_batch_stats_matches_reference(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    x = _data(rng, shape, axis, layout, dtype)
    before = snapshot(x)
    count, mean, m2 = bn.batch_stats(x, axis=axis)
    ecount, emean, em2 = ref.batch_stats(x, axis=axis)
    assert type(count) is int and count == ecount == x.size // C
    tol = TOL[result_dtype(dtype)]
    for name, got, want in (("mean", mean, emean), ("m2", m2, em2)):
        assert isinstance(got, np.ndarray) and got.dtype == F64 and got.shape == (C,), name
        assert_close(got, want, tol, name)
    assert_unchanged(before, [x], ["x"])


@pytest.mark.parametrize("affine", ["none", "gamma", "beta", "both"])
@pytest.mark.parametrize("shape,axis,layout,dtype", ALL_REF_CASES)
def test_normalize_matches_reference(rng, shape, axis, layout, dtype, affine):
    C = channels(shape, axis)
    x = _data(rng, shape, axis, layout, dtype)
    g, b = params(rng, C, np.float32)
    gamma = g if affine in ("gamma", "both") else None
    beta = b if affine in ("beta", "both") else None
    mean = rng.standard_normal(C)
    invstd = rng.uniform(0.5, 2.0, C)
    if affine == "gamma":  # statistics of other dtypes / as lists are accepted too
        mean, invstd = mean.astype(np.float32), invstd.tolist()
    before = snapshot(x, mean, gamma, beta)
    y = bn.normalize(x, mean, invstd, gamma, beta, axis=axis)
    ey = ref.normalize(x, mean, invstd, gamma, beta, axis=axis)
    assert y.shape == shape
    assert_result_dtype(y, dtype, "y")
    assert_close(y, ey, TOL[result_dtype(dtype)], "y")
    assert not np.shares_memory(y, x)
    assert_unchanged(before, [x, mean, gamma, beta], ["x", "mean", "gamma", "beta"])
    # keyword spelling gives the same bits
    yk = bn.normalize(x, mean=mean, invstd=invstd, gamma=gamma, beta=beta, axis=axis)
    assert_bits(yk, y, "keywords")


@pytest.mark.parametrize("shape,axis,layout,dtype", ALL_REF_CASES)
def test_backward_reduce_matches_reference(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    x = _data(rng, shape, axis, layout, dtype)
    dy = _data(rng, shape, axis, "C" if layout == "F" else "F", dtype)  # dy in another layout than x
    mean = rng.standard_normal(C).astype(result_dtype(dtype))
    before = snapshot(x, dy, mean)
    s1, s2 = bn.backward_reduce(dy, x, mean, axis=axis)
    e1, e2 = ref.backward_reduce(dy, x, mean, axis=axis)
    tol = TOL[result_dtype(dtype)]
    for name, got, want in (("sum_dy", s1, e1), ("sum_dy_xmu", s2, e2)):
        assert isinstance(got, np.ndarray) and got.dtype == F64 and got.shape == (C,), name
        assert_close(got, want, tol, name)
    assert_unchanged(before, [x, dy, mean], ["x", "dy", "mean"])


@pytest.mark.parametrize("mult", [1, 3])
@pytest.mark.parametrize("shape,axis,layout,dtype", ALL_REF_CASES)
def test_backward_apply_matches_reference(rng, shape, axis, layout, dtype, mult):
    C = channels(shape, axis)
    x = _data(rng, shape, axis, layout, dtype)
    dy = _data(rng, shape, axis, layout, dtype)
    gamma = params(rng, C, np.float32)[0] if mult == 1 else None
    _, mean, invstd = ref.forward_train(x, axis=axis)
    local = x.size // C
    count = local * mult  # this part's own count, or a part of a bigger batch
    s1 = rng.standard_normal(C) * np.sqrt(count)
    s2 = rng.standard_normal(C) * np.sqrt(count)
    before = snapshot(x, dy, mean, invstd, gamma, s1, s2)
    dx = bn.backward_apply(dy, x, mean, invstd, gamma, s1, s2, count, axis=axis)
    edx = ref.backward_apply(dy, x, mean, invstd, gamma, s1, s2, count, axis=axis)
    assert dx.shape == shape
    assert_result_dtype(dx, dtype, "dx")
    assert_close(dx, edx, TOL[result_dtype(dtype)], "dx")
    assert not np.shares_memory(dx, x) and not np.shares_memory(dx, dy)
    assert_unchanged(before, [x, dy, mean, invstd, gamma, s1, s2], ["x", "dy", "mean", "invstd", "gamma",
                                                                    "s1", "s2"])


MERGE_SHAPES = [(1, 1), (1, 4), (2, 3), (5, 7), (9, 2), (4, 33)]


@pytest.mark.parametrize("counts_kind", ["int64", "uint8", "int16", "float", "list"])
@pytest.mark.parametrize("K,C", MERGE_SHAPES, ids=lambda v: str(v))
def test_merge_stats_matches_reference(rng, K, C, counts_kind):
    counts = rng.integers(0, 200, K)
    if K > 2:
        counts[1] = 0
    means = rng.standard_normal((K, C)) * 3 + 10
    m2s = rng.uniform(0, 50, (K, C)) * counts[:, None]
    c_arg = {"int64": counts.astype(np.int64), "uint8": counts.astype(np.uint8), "int16": counts.astype(np.int16),
             "float": counts.astype(np.float64), "list": [int(c) for c in counts]}[counts_kind]
    before = snapshot(means, m2s)
    count, mean, m2 = bn.merge_stats(c_arg, means, m2s)
    ecount, emean, em2 = ref.merge_stats(counts, means, m2s)
    assert type(count) is int and count == ecount == int(counts.sum())
    for name, got, want in (("mean", mean, emean), ("m2", m2, em2)):
        assert isinstance(got, np.ndarray) and got.dtype == F64 and got.shape == (C,), name
        scale = np.maximum(np.abs(want), 1.0)
        assert np.all(np.abs(got - want) <= 1e-12 * scale), f"{name}: {got} != {want}"
    assert_unchanged(before, [means, m2s], ["means", "m2s"])


def test_merge_stats_accepts_lists_and_other_float_dtypes(rng):
    counts = [3, 5]
    means32 = (rng.standard_normal((2, 4)) + 1).astype(np.float32)
    m2s32 = rng.uniform(0, 10, (2, 4)).astype(np.float32)
    a = bn.merge_stats(counts, means32, m2s32)
    b = bn.merge_stats(np.array(counts), means32.astype(np.float64), m2s32.astype(np.float64))
    c = bn.merge_stats(counts, means32.astype(np.float64).tolist(), m2s32.astype(np.float64).tolist())
    d = bn.merge_stats(counts, np.asfortranarray(means32.astype(">f8")), m2s32.astype(np.float64)[:, ::-1][:, ::-1])
    for other in (b, c, d):
        assert a[0] == other[0]
        assert_bits(a[1], other[1], "mean")
        assert_bits(a[2], other[2], "m2")


RS_CASES = [pytest.param(rdt, lay, id=f"{np.dtype(rdt).str}-{lay}")
            for rdt in (np.float32, np.float64, ">f4", ">f8") for lay in ("C", "strided", "neg")]


def _running(a, lay):
    a = np.asarray(a)
    if lay == "C":
        return a.copy()
    if lay == "strided":
        big = np.full(2 * a.size, np.nan, a.dtype)
        big[::2] = a
        return big[::2]
    return a[::-1].copy()[::-1]


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("rdt,lay", RS_CASES)
def test_update_running_stats_matches_reference(rng, rdt, lay, momentum):
    C = 7
    rm0, rv0 = uniform_stats(rng, C, np.float64)
    mean = rng.standard_normal(C) * 2
    count = 41
    m2 = rng.uniform(0.5, 3.0, C) * (count - 1)
    rm, rv = _running(rm0.astype(rdt), lay), _running(rv0.astype(rdt), lay)
    erm, erv = rm.astype(np.float64), rv.astype(np.float64)
    assert bn.update_running_stats(rm, rv, mean, m2, count, momentum=momentum) is None
    ref.update_running_stats(erm, erv, mean, m2, count, momentum=momentum)
    tol = TOL[result_dtype(rdt)]
    assert rm.dtype == np.dtype(rdt) and rv.dtype == np.dtype(rdt)
    assert_close(rm, erm, tol, "running_mean")
    assert_close(rv, erv, tol, "running_var")
    # the same values as a native, contiguous array of that precision (layout/byte order do not matter)
    nrm, nrv = rm0.astype(np.dtype(rdt).type), rv0.astype(np.dtype(rdt).type)
    bn.update_running_stats(nrm, nrv, mean, m2, count, momentum=momentum)
    assert_bits(rm.astype(nrm.dtype), nrm, "running_mean vs native")
    assert_bits(rv.astype(nrv.dtype), nrv, "running_var vs native")
    if lay == "strided":  # the skipped elements were not written
        assert np.isnan(rm.base[1::2].astype(np.float64)).all() and np.isnan(rv.base[1::2].astype(np.float64)).all()
    if momentum == 0.0:
        assert_bits(nrm, rm0.astype(nrm.dtype), "momentum 0 leaves running_mean")
    if momentum == 1.0:
        assert_bits(nrm, mean.astype(nrm.dtype), "momentum 1 running_mean")
        assert_bits(nrv, (m2 / (count - 1)).astype(nrv.dtype), "momentum 1 running_var")


def test_update_running_stats_none_skips_one(rng):
    C = 4
    rm0, rv0 = uniform_stats(rng, C)
    mean, m2 = rng.standard_normal(C), rng.uniform(1, 5, C)
    rm, rv = rm0.copy(), rv0.copy()
    bn.update_running_stats(rm, None, mean, m2, 9)
    a_rm = rm.copy()
    bn.update_running_stats(None, rv, mean, m2, 9)
    rm2, rv2 = rm0.copy(), rv0.copy()
    bn.update_running_stats(rm2, rv2, mean, m2, 9)
    assert_bits(a_rm, rm2, "running_mean")
    assert_bits(rv, rv2, "running_var")
    bn.update_running_stats(None, None, mean, m2, 9)  # nothing to do, no error


@pytest.mark.parametrize("count", [9, 9.0, np.int64(9), np.int32(9), np.float32(9.0)],
                         ids=["int", "float", "np.int64", "np.int32", "np.float32"])
def test_update_running_stats_count_types(rng, count):
    C = 3
    mean, m2 = rng.standard_normal(C), rng.uniform(1, 5, C)
    rm, rv = np.zeros(C), np.ones(C)
    bn.update_running_stats(rm, rv, mean, m2, count, momentum=0.25)
    erm, erv = np.zeros(C), np.ones(C)
    bn.update_running_stats(erm, erv, mean, m2, 9, momentum=0.25)
    assert_bits(rm, erm, "running_mean")
    assert_bits(rv, erv, "running_var")


# --------------------------------------------------------------------------------------------------
# 2. the phases composed on one part have the fused functions' bits
# --------------------------------------------------------------------------------------------------

BIT_CASES = [
    # row mode (spatial size >= 32)
    ((8, 4, 40), 1, "C"), ((8, 4, 40), 1, "chlast"), ((3, 5, 33, 2), 1, "F"), ((6, 3, 64), -2, "negall"),
    ((300, 8, 70), 1, "C"),  # several row groups per channel
    ((6, 2, 5000), 1, "C"),  # more than one 4096-value segment per row
    # column mode: (N, C), channels-last, short spatial size
    ((37, 5), 1, "C"), ((37, 5), -1, "F"), ((5, 37), 0, "T"), ((6, 5, 7, 9), -1, "C"),
    ((50, 6, 5, 5), 1, "C"), ((4, 6, 5, 7), 1, "chlast"), ((7, 3, 4, 5, 6), 2, "step"),
    ((5000, 3), 1, "C"), ((100000, 3), 1, "C"),  # one and two row groups
    ((300, 2000), 1, "C"),  # two row groups of a wide row
    ((40, 5000), -1, "C"),  # two channel blocks
    ((64, 9, 9, 130), -1, "C"),  # channels-last 4-D, several groups
]
BIT_PARAMS = [pytest.param(s, a, l, d, id=_id(s, a, l, np.dtype(d).name))
              for s, a, l in BIT_CASES for d in (np.float32, np.float64)]
# float16 (computed in float32) on the small cases: the same promises hold
BIT_PARAMS_F16 = [pytest.param(s, a, l, np.float16, id=_id(s, a, l, "float16"))
                  for s, a, l in BIT_CASES if np.prod(s) <= 5000]


@pytest.mark.parametrize("shape,axis,layout,dtype", BIT_PARAMS + BIT_PARAMS_F16)
def test_forward_phases_have_forward_train_bits(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    eps = 1e-3
    x = _data(rng, shape, axis, layout, dtype)
    gamma, beta = params(rng, C, dtype)
    rdt = result_dtype(dtype)

    count, mean, m2 = bn.batch_stats(x, axis=axis)
    assert count == x.size // C
    mc, mmean, mm2 = bn.merge_stats([count], mean[None], m2[None])
    assert mc == count
    assert_bits(mmean, mean, "merge_stats mean (one part)")
    assert_bits(mm2, m2, "merge_stats m2 (one part)")
    invstd = 1 / np.sqrt(m2 / count + eps)

    y, fmean, finvstd = bn.forward_train(x, gamma, beta, eps=eps, axis=axis)
    y64, fmean64, finvstd64 = bn.forward_train(x, gamma, beta, eps=eps, axis=axis, stats_dtype=np.float64)
    assert_bits(y64, y, "y with stats_dtype=float64")
    assert fmean64.dtype == F64 and finvstd64.dtype == F64
    assert_bits(fmean64, mean, "forward_train float64 mean vs batch_stats")
    assert_bits(finvstd64, invstd, "forward_train float64 invstd vs 1/sqrt(m2/count+eps)")
    assert fmean.dtype == rdt and finvstd.dtype == rdt
    assert_bits(fmean, mean.astype(rdt), "forward_train mean (result dtype)")
    assert_bits(finvstd, invstd.astype(rdt), "forward_train invstd (result dtype)")

    yn = bn.normalize(x, mean, invstd, gamma, beta, axis=axis)
    assert_bits(yn, y, "normalize vs forward_train y")
    # merged statistics of the one part give the same bits too
    assert_bits(bn.normalize(x, mmean, 1 / np.sqrt(mm2 / mc + eps), gamma, beta, axis=axis), y, "merged")
    # forward_infer's invstd is 1/sqrt(var + eps): the same y from var = m2/count
    assert_bits(bn.forward_infer(x, mean, m2 / count, gamma, beta, eps=eps, axis=axis), y, "forward_infer")


@pytest.mark.parametrize("C", [1, 7, 33, 4099, 16387])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("vectors", ["float32", "float32 strided", "float64"])
def test_forward_infer_is_normalize_with_invstd_of_the_running_var(rng, C, dtype, vectors):
    """forward_infer makes invstd = 1 / sqrt(running_var + eps) in the kernel (vectorized; any C, so the
    loops' tails too) and converts float32 vectors itself: the bits of normalize given NumPy's invstd."""
    x = (rng.standard_normal((3, C)) * 3 + 1).astype(dtype)
    rm, rv, g, b = rng.standard_normal(C), rng.uniform(0.01, 4, C), rng.uniform(0.5, 2, C), rng.standard_normal(C)
    rv[0] = 0.0  # invstd 1/sqrt(eps)

    def vec(v):
        if vectors == "float64":
            return v
        if vectors == "float32":
            return v.astype(F32)
        return np.repeat(v.astype(F32), 2)[::2]  # every other value of a float32 array: a stride of 8 bytes

    rm, rv, g, b = (vec(v) for v in (rm, rv, g, b))
    eps = 1e-3
    invstd = 1 / np.sqrt(rv.astype(F64) + eps)
    for relu in (None, "relu"):
        want = bn.normalize(x, rm, invstd, g, b, activation=relu)
        assert_bits(bn.forward_infer(x, rm, rv, g, b, eps=eps, activation=relu), want, f"forward_infer {relu}")


@pytest.mark.parametrize("stats", ["result", "float64"])
@pytest.mark.parametrize("shape,axis,layout,dtype", BIT_PARAMS + BIT_PARAMS_F16)
def test_backward_phases_have_backward_bits(rng, shape, axis, layout, dtype, stats):
    C = channels(shape, axis)
    x = _data(rng, shape, axis, layout, dtype)
    dy = _data(rng, shape, axis, layout, dtype)
    gamma, _ = params(rng, C, dtype)
    _, mean, invstd = bn.forward_train(x, axis=axis, stats_dtype=None if stats == "result" else np.float64)
    count = x.size // C

    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, axis=axis)
    s1, s2 = bn.backward_reduce(dy, x, mean, axis=axis)
    dx2 = bn.backward_apply(dy, x, mean, invstd, gamma, s1, s2, count, axis=axis)
    assert_bits(dx2, dx, "backward_apply vs backward dx")
    inv64 = np.asarray(invstd, np.float64)
    if dtype is np.float64:
        assert_bits(inv64 * s2, dgamma, "invstd * sum_dy_xmu vs dgamma")
        assert_bits(s1, dbeta, "sum_dy vs dbeta")
    else:  # the same float64 numbers, rounded to the gradients' dtype (float32 for float16 input)
        gdt = np.float32 if dtype is np.float16 else dtype
        assert_bits((inv64 * s2).astype(gdt), dgamma, "invstd * sum_dy_xmu vs dgamma")
        assert_bits(s1.astype(gdt), dbeta, "sum_dy vs dbeta")
    assert s1.dtype == F64 and s2.dtype == F64
    # gamma=None is gamma=1
    dxn = bn.backward(dy, x, mean, invstd, None, axis=axis)[0]
    assert_bits(bn.backward_apply(dy, x, mean, invstd, None, s1, s2, count, axis=axis), dxn, "gamma None")


@pytest.mark.parametrize("rdt", [np.float32, np.float64], ids=["rs-f32", "rs-f64"])
@pytest.mark.parametrize("shape,axis,layout,dtype", BIT_PARAMS[::3] + BIT_PARAMS[1::6])
def test_update_running_stats_has_forward_train_bits(rng, shape, axis, layout, dtype, rdt):
    C = channels(shape, axis)
    x = _data(rng, shape, axis, layout, dtype)
    rm0, rv0 = uniform_stats(rng, C, rdt)
    for momentum in (0.1, 0.3, 1.0):
        rm1, rv1 = rm0.copy(), rv0.copy()
        bn.forward_train(x, running_mean=rm1, running_var=rv1, momentum=momentum, axis=axis)
        count, mean, m2 = bn.batch_stats(x, axis=axis)
        rm2, rv2 = rm0.copy(), rv0.copy()
        bn.update_running_stats(rm2, rv2, mean, m2, count, momentum=momentum)
        assert_bits(rm2, rm1, f"running_mean momentum={momentum}")
        assert_bits(rv2, rv1, f"running_var momentum={momentum}")


# --------------------------------------------------------------------------------------------------
# 3. a batch split along N: parts merged / added give the whole batch's numbers
# --------------------------------------------------------------------------------------------------

SPLIT_WEIGHTS = [
    [1], [0, 1], [1, 0], [5, 3], [1, 0, 2], [0, 0, 1], [3, 1, 0, 2], [1, 0, 0, 1], [2, 3, 0, 1, 4], [0, 1, 1, 0, 0],
]
SPLIT_SHAPES = [
    # (shape, channel axis, split axis, layout)
    ((37, 4, 40), 1, 0, "C"), ((37, 4, 40), 1, 0, "chlast"), ((200, 6), 1, 0, "C"), ((200, 6), -1, 0, "F"),
    ((23, 5, 6, 7), -1, 0, "C"), ((23, 3, 6, 5), 1, 0, "step"), ((6, 37), 0, 1, "C"),
    ((11, 4, 3, 5, 2), -2, 0, "negall"), ((300, 8, 70), 1, 0, "C"), ((5000, 3), -1, 0, "C"),
]
SPLIT_PARAMS = [pytest.param(s, a, sa, l, w, id=_id(s, a, f"split{sa}", l, "w" + "".join(map(str, w))))
                for s, a, sa, l in SPLIT_SHAPES for w in SPLIT_WEIGHTS]


def split_bounds(n, weights):
    """Cut points for len(weights) parts of sizes roughly proportional to weights (zeros give empty parts)."""
    cum = np.concatenate([[0], np.cumsum(weights)]) / float(sum(weights))
    b = [int(round(n * c)) for c in cum]
    b[-1] = n
    return b


def take(a, axis, lo, hi):
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(lo, hi)
    return a[tuple(idx)]


def merged_stats(x, axis, split_axis, weights):
    b = split_bounds(x.shape[split_axis], weights)
    parts = [bn.batch_stats(take(x, split_axis, b[k], b[k + 1]), axis=axis) for k in range(len(weights))]
    counts = [p[0] for p in parts]
    return counts, bn.merge_stats(counts, np.array([p[1] for p in parts]), np.array([p[2] for p in parts]))


@pytest.mark.parametrize("loc", [0.0, 1e6], ids=["loc0", "loc1e6"])
@pytest.mark.parametrize("shape,axis,split_axis,layout,weights", SPLIT_PARAMS)
def test_split_batch_stats_merge_to_whole(rng, shape, axis, split_axis, layout, weights, loc):
    x = as_layout(loc + make_data(rng, shape, np.float64, axis), layout, axis)
    count, mean, m2 = bn.batch_stats(x, axis=axis)
    counts, (mcount, mmean, mm2) = merged_stats(x, axis, split_axis, weights)
    assert sum(counts) == mcount == count
    flat = flat_channels(x, axis)
    std = np.sqrt(m2 / count)
    assert np.all(np.abs(mmean - mean) <= 1e-13 * (np.abs(mean) + std)), (mmean - mean, mean)
    # m2: 1e-13 relative, plus what the rounding of the parts' means (|mean| * eps each) can move m2 by:
    # m2 depends on a part mean through 2 * n_k * (mean_k - mean), summed <= 2 * sum|x - mean|.
    dev = np.abs(flat - mean).sum(axis=0)
    tol = 1e-13 * m2 + 8 * EPS64 * np.abs(flat).max(axis=0) * dev
    err = np.abs(mm2 - m2)
    assert np.all(err <= tol), f"m2 relative error {err / m2}, allowed {tol / m2}"
    if loc:
        # far below what E[x^2] - E[x]^2 would give (~1e-4 relative here)
        assert np.all(err <= 1e-8 * m2), err / m2
        # and both within that bound of the exact value (long double two-pass on the float64 data)
        fl = flat.astype(np.longdouble)
        exact = ((fl - fl.mean(axis=0)) ** 2).sum(axis=0)
        assert np.all(np.abs(mm2 - exact.astype(np.float64)) <= tol + 1e-15 * m2), "merged m2 vs exact"
        assert np.all(np.abs(m2 - exact.astype(np.float64)) <= tol + 1e-15 * m2), "whole m2 vs exact"


@pytest.mark.parametrize("shape,axis,split_axis,layout,weights", SPLIT_PARAMS)
def test_split_backward_sums_and_dx(rng, shape, axis, split_axis, layout, weights):
    C = channels(shape, axis)
    x = as_layout(make_data(rng, shape, np.float64, axis, loc=3.0), layout, axis)
    dy = as_layout(make_data(rng, shape, np.float64, axis), layout, axis)
    gamma, _ = params(rng, C)
    eps = 1e-5
    count, mean, m2 = bn.batch_stats(x, axis=axis)
    invstd = 1 / np.sqrt(m2 / count + eps)
    s1, s2 = bn.backward_reduce(dy, x, mean, axis=axis)

    b = split_bounds(x.shape[split_axis], weights)
    t1, t2, dxs = np.zeros(C), np.zeros(C), []
    parts = [(take(dy, split_axis, b[k], b[k + 1]), take(x, split_axis, b[k], b[k + 1])) for k in range(len(weights))]
    for pdy, px in parts:
        p1, p2 = bn.backward_reduce(pdy, px, mean, axis=axis)
        t1, t2 = t1 + p1, t2 + p2
    fd, fx = flat_channels(dy, axis), flat_channels(x, axis)
    assert np.all(np.abs(t1 - s1) <= 1e-13 * np.abs(fd).sum(axis=0)), "sum_dy"
    assert np.all(np.abs(t2 - s2) <= 1e-13 * np.abs(fd * (fx - mean)).sum(axis=0)), "sum_dy_xmu"

    for pdy, px in parts:
        dxs.append(bn.backward_apply(pdy, px, mean, invstd, gamma, t1, t2, count, axis=axis))
    dx = np.concatenate(dxs, axis=split_axis)
    whole = bn.backward(dy, x, mean, invstd, gamma, axis=axis)[0]
    assert dx.shape == whole.shape
    assert np.all(np.abs(dx - whole) <= 1e-12 * np.abs(whole).max()), np.abs(dx - whole).max()
    # with the whole batch's own sums, the parts' dx are the whole's dx (to rounding; elementwise formula)
    dx_same = np.concatenate([bn.backward_apply(pdy, px, mean, invstd, gamma, s1, s2, count, axis=axis)
                              for pdy, px in parts], axis=split_axis)
    assert np.all(np.abs(dx_same - whole) <= 1e-14 * np.abs(whole).max())


def test_split_float32_parts(rng):
    """float32 parts: merged statistics of float32 data still match the whole batch's to float64 accuracy."""
    x = make_data(rng, (50, 4, 40), np.float32)
    count, mean, m2 = bn.batch_stats(x)
    _, (mc, mm, mm2) = merged_stats(x, 1, 0, [3, 0, 2, 5])
    assert mc == count
    assert_close(mm, mean, 1e-13, "mean")
    assert np.all(np.abs(mm2 - m2) <= 1e-12 * m2)


# --------------------------------------------------------------------------------------------------
# 4. merge_stats: determinism, order, skipped parts, nothing to merge
# --------------------------------------------------------------------------------------------------


def _parts(rng, K=5, C=6, loc=0.0):
    counts = rng.integers(1, 100, K)
    means = loc + rng.standard_normal((K, C))
    m2s = rng.uniform(0.5, 2, (K, C)) * counts[:, None]
    return counts, means, m2s


def test_merge_stats_same_inputs_same_bits(rng):
    counts, means, m2s = _parts(rng, K=7, C=9, loc=5.0)
    a = bn.merge_stats(counts, means, m2s)
    for _ in range(3):
        b = bn.merge_stats(counts.copy(), means.copy(), m2s.copy())
        assert a[0] == b[0]
        assert_bits(b[1], a[1], "mean")
        assert_bits(b[2], a[2], "m2")


def test_merge_stats_order_matters_only_through_rounding(rng):
    counts, means, m2s = _parts(rng, K=6, C=8, loc=2.0)
    a = bn.merge_stats(counts, means, m2s)
    for perm in (np.arange(6)[::-1], np.array([3, 0, 5, 1, 4, 2])):
        b = bn.merge_stats(counts[perm], means[perm], m2s[perm])
        assert b[0] == a[0]
        assert np.all(np.abs(b[1] - a[1]) <= 1e-14 * np.abs(a[1]).max())
        assert np.all(np.abs(b[2] - a[2]) <= 1e-13 * a[2])
    # in order k = 0..K-1: the result is that of merging the first two, then the third, ...
    acc = bn.merge_stats(counts[:1], means[:1], m2s[:1])
    for k in range(1, 6):
        acc = bn.merge_stats([acc[0], counts[k]], np.stack([acc[1], means[k]]), np.stack([acc[2], m2s[k]]))
    assert acc[0] == a[0]
    assert_bits(acc[1], a[1], "mean merged step by step")
    assert_bits(acc[2], a[2], "m2 merged step by step")


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e300], ids=["nan", "inf", "-inf", "1e300"])
@pytest.mark.parametrize("where", ["first", "middle", "last", "all-but-one"])
def test_merge_stats_skips_count_zero_parts(rng, where, garbage):
    counts, means, m2s = _parts(rng, K=3, C=4, loc=1.0)
    want = bn.merge_stats(counts, means, m2s)
    C = means.shape[1]
    junk_m, junk_m2 = np.full((1, C), garbage), np.full((1, C), garbage)
    if where == "first":
        c2, mm, mm2 = np.r_[0, counts], np.r_[junk_m, means], np.r_[junk_m2, m2s]
    elif where == "middle":
        c2, mm, mm2 = np.r_[counts[:2], 0, 0, counts[2:]], np.r_[means[:2], junk_m, junk_m, means[2:]], \
            np.r_[m2s[:2], junk_m2, junk_m2, m2s[2:]]
    elif where == "last":
        c2, mm, mm2 = np.r_[counts, 0], np.r_[means, junk_m], np.r_[m2s, junk_m2]
    else:
        c2, mm, mm2 = np.array([0, counts[1], 0]), np.r_[junk_m, means[1:2], junk_m], \
            np.r_[junk_m2, m2s[1:2], junk_m2]
        want = (int(counts[1]), means[1], m2s[1])  # a single part keeps its bits
    got = bn.merge_stats(c2, mm, mm2)
    assert got[0] == want[0]
    assert_bits(got[1], np.asarray(want[1], np.float64), "mean")
    assert_bits(got[2], np.asarray(want[2], np.float64), "m2")


@pytest.mark.parametrize("K", [1, 3])
def test_merge_stats_all_counts_zero(K):
    C = 5
    count, mean, m2 = bn.merge_stats(np.zeros(K, np.int64), np.full((K, C), np.nan), np.full((K, C), 7.0))
    assert type(count) is int and count == 0
    assert mean.dtype == F64 and m2.dtype == F64 and mean.shape == (C,) and m2.shape == (C,)
    assert_bits(mean, np.zeros(C), "mean")
    assert_bits(m2, np.zeros(C), "m2")


def test_merge_stats_no_parts():
    for C in (3, 1):
        count, mean, m2 = bn.merge_stats(np.zeros(0, np.int64), np.zeros((0, C)), np.zeros((0, C)))
        assert type(count) is int and count == 0
        assert_bits(mean, np.zeros(C), "mean")
        assert_bits(m2, np.zeros(C), "m2")


def test_merge_stats_of_empty_batch_parts(rng):
    """batch_stats of empty parts gives count 0 and zeros, which merge_stats skips."""
    x = make_data(rng, (9, 3, 4), np.float64)
    parts = [bn.batch_stats(p) for p in (x[:0], x[:4], x[4:4], x[4:], x[9:])]
    assert [p[0] for p in parts] == [0, 16, 0, 20, 0]
    got = bn.merge_stats([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
    want = bn.merge_stats([16, 20], [parts[1][1], parts[3][1]], [parts[1][2], parts[3][2]])
    assert got[0] == want[0] == 36
    assert_bits(got[1], want[1], "mean")
    assert_bits(got[2], want[2], "m2")


def test_merge_stats_single_values_and_large_counts():
    # parts of one value each: m2 = sum of squared deviations of the values
    vals = np.array([[1.0, -2.0], [4.0, 0.0], [7.0, 2.0]])
    count, mean, m2 = bn.merge_stats([1, 1, 1], vals, np.zeros((3, 2)))
    assert count == 3
    assert_close(mean, [4.0, 0.0], 1e-15, "mean")
    assert_close(m2, [18.0, 8.0], 1e-14, "m2")
    # counts beyond 32 bits
    big = 2 ** 40
    count, mean, m2 = bn.merge_stats([big, big], [[0.0], [2.0]], [[big * 1.0], [big * 1.0]])
    assert count == 2 * big and type(count) is int
    assert_close(mean, [1.0], 1e-15, "mean")
    assert_close(m2 / (2.0 * big), [2.0], 1e-14, "m2")


# --------------------------------------------------------------------------------------------------
# 5. bad arguments
# --------------------------------------------------------------------------------------------------

C3 = 3
GOOD_COUNTS = np.array([4, 0, 6])
GOOD_MEANS = np.arange(9.0).reshape(3, C3)
GOOD_M2S = np.ones((3, C3))

MERGE_BAD = [
    ("negative", dict(counts=np.array([4, -1, 6])), ValueError, r"\bcounts\b"),
    ("negative-float", dict(counts=[4.0, -2.0, 6.0]), ValueError, r"\bcounts\b"),
    ("non-integral", dict(counts=np.array([4.0, 1.5, 6.0])), ValueError, r"\bcounts\b"),
    ("nan", dict(counts=np.array([4.0, np.nan, 6.0])), ValueError, r"\bcounts\b"),
    ("inf", dict(counts=np.array([4.0, np.inf, 6.0])), ValueError, r"\bcounts\b"),
    ("2d", dict(counts=np.array([[4, 0, 6]])), ValueError, r"\bcounts\b"),
    ("0d", dict(counts=np.int64(3)), ValueError, r"\bcounts\b"),
    ("str-counts", dict(counts=np.array(["4", "0", "6"])), TypeError, r"\bcounts\b"),
    ("complex-counts", dict(counts=np.array([4, 0, 6], np.complex128)), TypeError, r"\bcounts\b"),
    ("None-counts", dict(counts=None), TypeError, r"\bcounts\b"),
    ("means-rows", dict(means=np.zeros((2, C3))), ValueError, r"\bmeans\b"),
    ("means-1d", dict(means=np.zeros(C3)), ValueError, r"\bmeans\b"),
    ("means-3d", dict(means=np.zeros((3, C3, 1))), ValueError, r"\bmeans\b"),
    ("means-str", dict(means=np.full((3, C3), "1.0")), TypeError, r"\bmeans\b"),
    ("means-None", dict(means=None), TypeError, r"\bmeans\b"),
    ("m2s-cols", dict(m2s=np.ones((3, C3 + 1))), ValueError, r"\bm2s\b"),
    ("m2s-rows", dict(m2s=np.ones((4, C3))), ValueError, r"\bm2s\b"),
    ("m2s-1d", dict(m2s=np.ones(C3)), ValueError, r"\bm2s\b"),
    ("m2s-str", dict(m2s=np.full((3, C3), "x")), TypeError, r"\bm2s\b"),
    ("m2s-complex", dict(m2s=np.ones((3, C3), np.complex64)), TypeError, r"\bm2s\b"),
]


@pytest.mark.parametrize("mod,exc,match", [pytest.param(m, e, r, id=i) for i, m, e, r in MERGE_BAD])
def test_merge_stats_bad_arguments(mod, exc, match):
    kw = dict(counts=GOOD_COUNTS, means=GOOD_MEANS, m2s=GOOD_M2S)
    bn.merge_stats(**kw)  # valid as given
    kw.update(mod)
    with pytest.raises(exc, match=match):
        bn.merge_stats(kw["counts"], kw["means"], kw["m2s"])


SHAPE, C = (4, 3, 5), 3


def _apply_kw(rng):
    x = make_data(rng, SHAPE, np.float32)
    return dict(dy=make_data(rng, SHAPE, np.float32), x=x, mean=np.zeros(C, np.float32),
                invstd=np.ones(C, np.float32), gamma=np.linspace(0.5, 1.5, C).astype(np.float32),
                sum_dy=np.ones(C), sum_dy_xmu=np.ones(C), count=20, axis=1,
                out=np.full(SHAPE, 7.0, np.float32))


def _apply(kw):
    kw = dict(kw)
    return bn.backward_apply(kw.pop("dy"), kw.pop("x"), kw.pop("mean"), kw.pop("invstd"), kw.pop("gamma"),
                             kw.pop("sum_dy"), kw.pop("sum_dy_xmu"), kw.pop("count"), **kw)


APPLY_BAD = [
    ("count-below-x", dict(count=19), ValueError, r"\bcount\b"),
    ("count-0", dict(count=0), ValueError, r"\bcount\b"),
    ("count-negative", dict(count=-20), ValueError, r"\bcount\b"),
    ("count-True", dict(count=True), TypeError, r"\bcount\b"),
    ("count-None", dict(count=None), TypeError, r"\bcount\b"),
    ("count-str", dict(count="30"), TypeError, r"\bcount\b"),
    ("count-2.5", dict(count=2.5), ValueError, r"\bcount\b"),
    ("count-20.5", dict(count=20.5), ValueError, r"\bcount\b"),
    ("count-nan", dict(count=float("nan")), ValueError, r"\bcount\b"),
    ("count-inf", dict(count=float("inf")), ValueError, r"\bcount\b"),
    ("count-complex", dict(count=20 + 0j), TypeError, r"\bcount\b"),
    ("count-huge", dict(count=10 ** 30), ValueError, r"\bcount\b"),
    ("count-array", dict(count=np.array([20, 20])), ERR, r"\bcount\b"),
    ("dy-shape", dict(dy=np.ones((4, C, 6), np.float32)), ValueError, r"\bdy\b"),
    ("mean-len", dict(mean=np.zeros(C + 1)), ValueError, r"\bmean\b"),
    ("invstd-len", dict(invstd=np.ones(C - 1)), ValueError, r"\binvstd\b"),
    ("gamma-len", dict(gamma=np.ones(C + 1)), ValueError, r"\bgamma\b"),
    ("sum_dy-len", dict(sum_dy=np.ones(C + 1)), ValueError, r"\bsum_dy\b"),
    ("sum_dy_xmu-len", dict(sum_dy_xmu=np.ones((C, 1))), ValueError, r"\bsum_dy_xmu\b"),
    ("sum_dy-None", dict(sum_dy=None), TypeError, r"\bsum_dy\b"),
    ("mean-None", dict(mean=None), TypeError, r"\bmean\b"),
    ("x-1d", dict(x=np.ones(C, np.float32), dy=np.ones(C, np.float32), out=None), ValueError, r"\bx\b"),
    ("axis-3", dict(axis=3), ValueError, r"\baxis\b"),
    ("axis--4", dict(axis=-4), ValueError, r"\baxis\b"),
    ("out-shape", dict(out=np.zeros((4, C, 6), np.float32)), ValueError, r"\bout\b"),
    ("out-dtype", dict(out=np.zeros(SHAPE, np.float64)), TypeError, r"\bout\b"),
    ("out-readonly", dict(out=readonly(np.zeros(SHAPE, np.float32))), ValueError, r"\bout\b"),
]


@pytest.mark.parametrize("mod,exc,match", [pytest.param(m, e, r, id=i) for i, m, e, r in APPLY_BAD])
def test_backward_apply_bad_arguments(rng, mod, exc, match):
    kw = _apply_kw(rng)
    _apply(kw)  # valid as given
    kw = _apply_kw(rng)
    kw.update(mod)
    watched = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    before = {k: _bits(v) for k, v in watched.items()}
    with pytest.raises(exc, match=match):
        _apply(kw)
    for k, v in watched.items():
        assert _bits(v) == before[k], f"{k} was modified by a call that raised"


@pytest.mark.parametrize("count", [20, 21, 20.0, np.int64(20), np.uint8(40), np.float64(60.0)],
                         ids=["20", "21", "20.0", "np.int64", "np.uint8", "np.float64"])
def test_backward_apply_count_accepted(rng, count):
    kw = _apply_kw(rng)
    kw["out"] = None
    got = _apply(dict(kw, count=count))
    want = _apply(dict(kw, count=int(count)))
    assert_bits(got, want, "count")
    assert_close(got, ref.backward_apply(kw["dy"], kw["x"], kw["mean"], kw["invstd"], kw["gamma"], kw["sum_dy"],
                                         kw["sum_dy_xmu"], int(count)), TOL[F32], "dx")


def test_count_given_as_0d_array(rng):
    """A 0-d integer array is an integer count; a 0-d float array holding a whole number is either taken
    like np.float64(20.0) is, or refused with a message that names count."""
    kw = _apply_kw(rng)
    kw["out"] = None
    want = _apply(dict(kw, count=20))
    assert_bits(_apply(dict(kw, count=np.array(20))), want, "count=np.array(20)")
    rm, rv = np.zeros(C), np.ones(C)
    bn.update_running_stats(rm, rv, np.ones(C), np.ones(C), 20)
    for count in (np.array(20.0), np.array(20, np.float32)):
        try:
            got = _apply(dict(kw, count=count))
        except ERR as e:
            assert re.search(r"\bcount\b", str(e)), f"backward_apply(count={count!r}): {e!r} does not name count"
        else:
            assert_bits(got, want, f"count={count!r}")
        rm2, rv2 = np.zeros(C), np.ones(C)
        try:
            bn.update_running_stats(rm2, rv2, np.ones(C), np.ones(C), count)
        except ERR as e:
            assert re.search(r"\bcount\b", str(e)), f"update_running_stats(count={count!r}): {e!r} does not name count"
            assert np.all(rm2 == 0) and np.all(rv2 == 1)
        else:
            assert_bits(rm2, rm, "running_mean")
            assert_bits(rv2, rv, "running_var")


def _urs_kw(rng, rdt=np.float32):
    return dict(running_mean=np.full(C, 0.25, rdt), running_var=np.full(C, 2.0, rdt),
                mean=rng.standard_normal(C), m2=rng.uniform(1, 5, C), count=10, momentum=0.1)


def _urs(kw):
    kw = dict(kw)
    return bn.update_running_stats(kw.pop("running_mean"), kw.pop("running_var"), kw.pop("mean"), kw.pop("m2"),
                                   kw.pop("count"), **kw)


URS_BAD = [
    ("count-1", dict(count=1), ValueError, r"\bcount\b"),
    ("count-0", dict(count=0), ValueError, r"\bcount\b"),
    ("count-negative", dict(count=-5), ValueError, r"\bcount\b"),
    ("count-1.0", dict(count=1.0), ValueError, r"\bcount\b"),
    ("count-2.5", dict(count=2.5), ValueError, r"\bcount\b"),
    ("count-True", dict(count=True), TypeError, r"\bcount\b"),
    ("count-None", dict(count=None), TypeError, r"\bcount\b"),
    ("count-str", dict(count="10"), TypeError, r"\bcount\b"),
    ("running_var-readonly", dict(running_var=readonly(np.full(C, 2.0, np.float32))), ValueError,
     r"\brunning_var\b"),
    ("running_mean-readonly", dict(running_mean=readonly(np.full(C, 0.25, np.float32))), ValueError,
     r"\brunning_mean\b"),
    ("running_mean-len", dict(running_mean=np.zeros(C + 1, np.float32)), ValueError, r"\brunning_mean\b"),
    ("running_var-len", dict(running_var=np.ones(C - 1, np.float64)), ValueError, r"\brunning_var\b"),
    ("running_var-2d", dict(running_var=np.ones((C, 1), np.float64)), ValueError, r"\brunning_var\b"),
    ("running_var-int", dict(running_var=np.ones(C, np.int64)), TypeError, r"\brunning_var\b"),
    ("running_mean-f16", dict(running_mean=np.zeros(C, np.float16)), TypeError, r"\brunning_mean\b"),
    ("running_var-list", dict(running_var=[1.0, 1.0, 1.0]), TypeError, r"\brunning_var\b"),
    ("mean-len", dict(mean=np.zeros(C + 1)), ValueError, r"\bmean\b"),
    ("mean-2d", dict(mean=np.zeros((1, C))), ValueError, r"\bmean\b"),
    ("m2-len", dict(m2=np.ones(C - 1)), ValueError, r"\bm2\b"),
    ("m2-None", dict(m2=None), TypeError, r"\bm2\b"),
    ("mean-str", dict(mean=np.full(C, "a")), TypeError, r"\bmean\b"),
    ("momentum-2", dict(momentum=2), ValueError, r"\bmomentum\b"),
    ("momentum-negative", dict(momentum=-0.1), ValueError, r"\bmomentum\b"),
    ("momentum-nan", dict(momentum=float("nan")), ValueError, r"\bmomentum\b"),
    ("momentum-str", dict(momentum="0.1"), TypeError, r"\bmomentum\b"),
]


@pytest.mark.parametrize("mod,exc,match", [pytest.param(m, e, r, id=i) for i, m, e, r in URS_BAD])
def test_update_running_stats_bad_arguments_change_nothing(rng, mod, exc, match):
    kw = _urs_kw(rng)
    _urs(kw)  # valid as given
    kw = _urs_kw(rng)
    kw.update(mod)
    watched = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    before = {k: _bits(v) for k, v in watched.items()}
    with pytest.raises(exc, match=match):
        _urs(kw)
    for k, v in watched.items():
        assert _bits(v) == before[k], f"{k} was modified by a call that raised"


def test_update_running_stats_readonly_var_leaves_mean(rng):
    for rdt in (np.float32, np.float64):
        rm = np.full(C, 0.25, rdt)
        rv = readonly(np.ones(C, rdt))
        with pytest.raises(ValueError, match=r"\brunning_var\b"):
            bn.update_running_stats(rm, rv, np.ones(C), np.ones(C), 10)
        assert np.all(rm == 0.25), "running_mean was updated although the call raised"
        # and the other way round: a bad running_mean leaves running_var alone
        rv2 = np.full(C, 0.5, rdt)
        with pytest.raises(ValueError, match=r"\brunning_mean\b"):
            bn.update_running_stats(np.zeros(C + 2, rdt), rv2, np.ones(C), np.ones(C), 10)
        assert np.all(rv2 == 0.5)
        # bad m2 after good running stats: neither changes
        rm3, rv3 = np.full(C, 0.25, rdt), np.full(C, 0.5, rdt)
        with pytest.raises(ValueError, match=r"\bm2\b"):
            bn.update_running_stats(rm3, rv3, np.ones(C), np.ones(C + 1), 10)
        assert np.all(rm3 == 0.25) and np.all(rv3 == 0.5)


def _norm_kw(rng):
    return dict(x=make_data(rng, SHAPE, np.float32), mean=np.zeros(C), invstd=np.ones(C),
                gamma=np.ones(C, np.float32), beta=np.zeros(C, np.float32), axis=1,
                out=np.full(SHAPE, 7.0, np.float32))


def _norm(kw):
    kw = dict(kw)
    return bn.normalize(kw.pop("x"), kw.pop("mean"), kw.pop("invstd"), kw.pop("gamma"), kw.pop("beta"), **kw)


NORM_BAD = [
    ("mean-len", dict(mean=np.zeros(C + 1)), ValueError, r"\bmean\b"),
    ("mean-empty", dict(mean=np.zeros(0)), ValueError, r"\bmean\b"),
    ("mean-2d", dict(mean=np.zeros((C, 1))), ValueError, r"\bmean\b"),
    ("mean-None", dict(mean=None), TypeError, r"\bmean\b"),
    ("invstd-len", dict(invstd=np.ones(C - 1)), ValueError, r"\binvstd\b"),
    ("invstd-None", dict(invstd=None), TypeError, r"\binvstd\b"),
    ("gamma-len", dict(gamma=np.ones(C + 1)), ValueError, r"\bgamma\b"),
    ("beta-len", dict(beta=np.ones(C - 1)), ValueError, r"\bbeta\b"),
    ("mean-complex", dict(mean=np.zeros(C, np.complex128)), TypeError, r"\bmean\b"),
    ("out-shape", dict(out=np.zeros((4, C, 6), np.float32)), ValueError, r"\bout\b"),
    ("out-broadcastable", dict(out=np.zeros((1, C, 1), np.float32)), ValueError, r"\bout\b"),
    ("out-f64", dict(out=np.zeros(SHAPE, np.float64)), TypeError, r"\bout\b"),
    ("out-f16", dict(out=np.zeros(SHAPE, np.float16)), TypeError, r"\bout\b"),
    ("out-readonly", dict(out=readonly(np.zeros(SHAPE, np.float32))), ValueError, r"\bout\b"),
    ("out-list", dict(out=np.zeros(SHAPE).tolist()), TypeError, r"\bout\b"),
    ("x-1d", dict(x=np.ones(C, np.float32), out=None), ValueError, r"\bx\b"),
    ("x-0d", dict(x=np.float32(1.0), out=None), ValueError, r"\bx\b"),
    ("x-complex", dict(x=np.ones(SHAPE, np.complex64), out=None), TypeError, r"\bx\b"),
    ("axis-3", dict(axis=3), ValueError, r"\baxis\b"),
    ("axis-float", dict(axis=1.0), TypeError, r"\baxis\b"),
]


@pytest.mark.parametrize("mod,exc,match", [pytest.param(m, e, r, id=i) for i, m, e, r in NORM_BAD])
def test_normalize_bad_arguments(rng, mod, exc, match):
    kw = _norm_kw(rng)
    _norm(kw)  # valid as given
    kw = _norm_kw(rng)
    kw.update(mod)
    watched = {k: v for k, v in kw.items() if isinstance(v, np.ndarray)}
    before = {k: _bits(v) for k, v in watched.items()}
    with pytest.raises(exc, match=match):
        _norm(kw)
    for k, v in watched.items():
        assert _bits(v) == before[k], f"{k} was modified by a call that raised"


@pytest.mark.parametrize("x,axis,exc,match", [
    pytest.param(np.ones(5), 1, ValueError, r"\bx\b", id="1d"),
    pytest.param(np.ones(5), 0, ValueError, r"\bx\b", id="1d-axis0"),
    pytest.param(np.float64(2.0), 1, ValueError, r"\bx\b", id="0d"),
    pytest.param(np.ones((4, 3)), 2, ValueError, r"\baxis\b", id="axis-2"),
    pytest.param(np.ones((4, 3)), -3, ValueError, r"\baxis\b", id="axis--3"),
    pytest.param(np.ones((4, 3, 2)), 1.0, TypeError, r"\baxis\b", id="axis-float"),
    pytest.param(np.ones((4, 3, 2)), "1", TypeError, r"\baxis\b", id="axis-str"),
    pytest.param(np.ones((4, 3, 2)), True, TypeError, r"\baxis\b", id="axis-bool"),
    pytest.param(np.ones((4, 3), np.complex128), 1, TypeError, r"\bx\b", id="complex"),
    pytest.param(np.full((4, 3), "1.0"), 1, TypeError, r"\bx\b", id="str"),
    pytest.param(None, 1, TypeError, r"\bx\b", id="None"),
])
def test_batch_stats_bad_arguments(x, axis, exc, match):
    with pytest.raises(exc, match=match):
        bn.batch_stats(x, axis=axis)


def test_batch_stats_axis_is_keyword_only():
    with pytest.raises(TypeError):
        bn.batch_stats(np.ones((4, 3)), 1)


@pytest.mark.parametrize("mod,exc,match", [
    pytest.param(dict(dy=np.ones((4, C, 6))), ValueError, r"\bdy\b", id="dy-shape"),
    pytest.param(dict(dy=np.ones((5, C, 4))), ValueError, r"\bdy\b", id="dy-transposed"),
    pytest.param(dict(dy=np.ones((1, C, 5))), ValueError, r"\bdy\b", id="dy-broadcastable"),
    pytest.param(dict(dy=np.ones((4, C))), ValueError, r"\bdy\b", id="dy-2d"),
    pytest.param(dict(dy=np.ones(SHAPE, np.complex64)), TypeError, r"\bdy\b", id="dy-complex"),
    pytest.param(dict(dy=None), TypeError, r"\bdy\b", id="dy-None"),
    pytest.param(dict(mean=np.zeros(C + 1)), ValueError, r"\bmean\b", id="mean-len"),
    pytest.param(dict(mean=None), TypeError, r"\bmean\b", id="mean-None"),
    pytest.param(dict(x=np.ones(C), dy=np.ones(C)), ValueError, r"\bx\b", id="x-1d"),
    pytest.param(dict(axis=-4), ValueError, r"\baxis\b", id="axis--4"),
])
def test_backward_reduce_bad_arguments(rng, mod, exc, match):
    kw = dict(dy=make_data(rng, SHAPE, np.float64), x=make_data(rng, SHAPE, np.float64), mean=np.zeros(C), axis=1)
    bn.backward_reduce(**kw)
    kw.update(mod)
    with pytest.raises(exc, match=match):
        bn.backward_reduce(kw["dy"], kw["x"], kw["mean"], axis=kw["axis"])


def test_phases_keyword_only_and_missing_arguments(rng):
    x = make_data(rng, SHAPE, np.float64)
    m, s = np.zeros(C), np.ones(C)
    with pytest.raises(TypeError):
        bn.normalize(x, m, s, None, None, 1)  # axis is keyword-only
    with pytest.raises(TypeError):
        bn.backward_reduce(x, x, m, 1)
    with pytest.raises(TypeError):
        bn.backward_apply(x, x, m, s, None, m, s, 20, 1)
    with pytest.raises(TypeError):
        bn.update_running_stats(np.zeros(C), np.ones(C), m, s, 20, 0.1)  # momentum is keyword-only
    with pytest.raises(TypeError):
        bn.backward_apply(x, x, m, s, None, m, s)  # count is required
    with pytest.raises(TypeError):
        bn.merge_stats([1], [[0.0]])


# --------------------------------------------------------------------------------------------------
# 6. out=, in place, empty inputs, integer inputs
# --------------------------------------------------------------------------------------------------

OUT_CASES = [pytest.param(s, a, l, d, id=_id(s, a, l, np.dtype(d).name))
             for s, a, l in [((4, 3, 5), 1, "C"), ((4, 3, 40), 1, "chlast"), ((6, 5, 7), -1, "C"),
                             ((6, 5, 7), -1, "step"), ((3, 4, 5, 6), 2, "negall"), ((9, 4), 0, "F")]
             for d in (np.float16, np.float32, np.float64)]


@pytest.mark.parametrize("shape,axis,layout,dtype", OUT_CASES)
def test_normalize_out_and_in_place(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    a = make_data(rng, shape, dtype, axis)
    gamma, beta = params(rng, C, np.float32)
    mean, invstd = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    want = bn.normalize(as_layout(a, layout, axis), mean, invstd, gamma, beta, axis=axis)

    xi = as_layout(a, layout, axis)
    got = bn.normalize(xi, mean, invstd, gamma, beta, axis=axis, out=xi)
    assert got is xi, "normalize(out=x) must return out"
    assert_bits(xi, want, "out=x")

    for out_layout in ("C", "F", "slice", "unaligned"):
        o = as_layout(np.zeros(shape, want.dtype), out_layout, axis)
        got = bn.normalize(as_layout(a, layout, axis), mean, invstd, gamma, beta, axis=axis, out=o)
        assert got is o
        assert_bits(o, want, f"out in layout {out_layout}")


def test_normalize_out_x_with_statistics_that_are_views_of_x(rng):
    """Per-channel vectors that are views of the array written in place must be read before being overwritten."""
    a = make_data(rng, (6, 4), np.float64)
    want = bn.normalize(a.copy(), a[0].copy(), np.abs(a[1]).copy() + 0.5, a[2].copy(), a[3].copy())
    x = a.copy()
    got = bn.normalize(x, x[0], np.abs(x[1]) + 0.5, x[2], x[3], out=x)
    assert got is x
    assert_bits(x, want, "stats viewing out")


@pytest.mark.parametrize("shape,axis,layout,dtype", OUT_CASES)
def test_backward_apply_out_dy_and_x(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    a, d = make_data(rng, shape, dtype, axis), make_data(rng, shape, dtype, axis)
    gamma = params(rng, C, np.float32)[0]
    mean, invstd = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    s1, s2 = rng.standard_normal(C), rng.standard_normal(C)
    count = 3 * (a.size // C)
    x, dy = as_layout(a, layout, axis), as_layout(d, layout, axis)
    want = bn.backward_apply(dy, x, mean, invstd, gamma, s1, s2, count, axis=axis)
    assert_close(want, ref.backward_apply(dy, x, mean, invstd, gamma, s1, s2, count, axis=axis),
                 TOL[result_dtype(dtype)], "dx")

    dyi = as_layout(d, layout, axis)
    got = bn.backward_apply(dyi, x, mean, invstd, gamma, s1, s2, count, axis=axis, out=dyi)
    assert got is dyi
    assert_bits(dyi, want, "out=dy")
    xi = as_layout(a, layout, axis)
    got = bn.backward_apply(dy, xi, mean, invstd, gamma, s1, s2, count, axis=axis, out=xi)
    assert got is xi
    assert_bits(xi, want, "out=x")
    # dy in another layout than x, written in place
    dyf = as_layout(d, "chlast" if layout != "chlast" else "C", axis)
    got = bn.backward_apply(dyf, x, mean, invstd, gamma, s1, s2, count, axis=axis, out=dyf)
    assert got is dyf
    assert_bits(dyf, want, "out=dy of another layout")
    o = as_layout(np.zeros(shape, want.dtype), "slice", axis)
    bn.backward_apply(dy, x, mean, invstd, gamma, s1, s2, count, axis=axis, out=o)
    assert_bits(o, want, "out strided")


def test_backward_apply_out_dy_with_sums_that_are_views_of_dy(rng):
    a, d = make_data(rng, (6, 4), np.float64), make_data(rng, (6, 4), np.float64)
    mean, invstd = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    want = bn.backward_apply(d.copy(), a, mean, invstd, d[2].copy(), d[0].copy(), d[1].copy(), 30)
    dy = d.copy()
    got = bn.backward_apply(dy, a, mean, invstd, dy[2], dy[0], dy[1], 30, out=dy)
    assert got is dy
    assert_bits(dy, want, "sums viewing out")


def test_out_partially_overlapping_the_input(rng):
    """out a shifted or transposed view of x's memory: the result is as if x had been read first."""
    mean, invstd = np.array([0.5, -1.0, 0.0, 2.0]), np.array([2.0, 0.5, 1.0, 3.0])
    for make in (lambda b: (b[:5], b[1:]), lambda b: (b[1:], b[:5])):
        big = make_data(rng, (6, 4), np.float64)
        x, o = make(big)
        want = bn.normalize(x.copy(), mean, invstd)
        assert bn.normalize(x, mean, invstd, out=o) is o
        assert_bits(o, want, "normalize, shifted out")
        big = make_data(rng, (6, 4), np.float64)
        dyb = make_data(rng, (6, 4), np.float64)
        x, o = make(big)
        dy = dyb[:5]
        want = bn.backward_apply(dy, x.copy(), mean, invstd, None, mean, invstd, 40)
        assert bn.backward_apply(dy, x, mean, invstd, None, mean, invstd, 40, out=o) is o
        assert_bits(o, want, "backward_apply, shifted out")
    a = make_data(rng, (4, 4), np.float64)
    want = bn.normalize(a.copy(), mean, invstd)
    assert_bits(bn.normalize(a, mean, invstd, out=a.T), want, "normalize, out=x.T")


@pytest.mark.parametrize("x_dtype,dy_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                              (np.float32, np.float16), (np.float64, np.int32),
                                              (np.float16, np.float32), (np.int32, np.float64),
                                              (np.float32, ">f8")], ids=lambda d: np.dtype(d).str)
def test_dy_of_another_dtype(rng, x_dtype, dy_dtype):
    shape, C = (5, 4, 3), 4
    x = make_data(rng, shape, x_dtype)
    dy = make_data(rng, shape, dy_dtype)
    mean, invstd = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    tol = TOL[result_dtype(x_dtype)]
    s = bn.backward_reduce(dy, x, mean)
    e = ref.backward_reduce(dy, x, mean)
    assert_close(s[0], e[0], tol, "sum_dy")
    assert_close(s[1], e[1], tol, "sum_dy_xmu")
    dx = bn.backward_apply(dy, x, mean, invstd, None, s[0], s[1], 15)
    assert_result_dtype(dx, x_dtype, "dx")
    assert_close(dx, ref.backward_apply(dy, x, mean, invstd, None, s[0], s[1], 15), tol, "dx")


EMPTY = [pytest.param(s, a, id=_id(s, a)) for s, a in
         [((0, 3), 1), ((0, 3), -1), ((0, 3, 5), 1), ((4, 3, 0), 1), ((0, 2, 3, 4), -1), ((2, 0, 4), 2),
          ((3, 0), 0), ((0, 3, 40), 1)]]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, ">f4"],
                         ids=lambda d: np.dtype(d).str)
@pytest.mark.parametrize("shape,axis", EMPTY)
def test_empty_inputs(shape, axis, dtype):
    C = channels(shape, axis)
    x = np.zeros(shape, dtype)
    dy = np.ones(shape, dtype)
    count, mean, m2 = bn.batch_stats(x, axis=axis)
    assert type(count) is int and count == 0
    assert_bits(mean, np.zeros(C), "mean")
    assert_bits(m2, np.zeros(C), "m2")
    mean, invstd = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)

    y = bn.normalize(x, mean, invstd, axis=axis)
    assert y.shape == shape
    assert_result_dtype(y, dtype, "normalize")
    o = np.zeros(shape, result_dtype(dtype))
    assert bn.normalize(x, mean, invstd, np.ones(C), np.zeros(C), axis=axis, out=o) is o

    s1, s2 = bn.backward_reduce(dy, x, mean, axis=axis)
    assert_bits(s1, np.zeros(C), "sum_dy")
    assert_bits(s2, np.zeros(C), "sum_dy_xmu")

    for count in (1, 7):
        dx = bn.backward_apply(dy, x, mean, invstd, None, np.ones(C), np.ones(C), count, axis=axis)
        assert dx.shape == shape
        assert_result_dtype(dx, dtype, "backward_apply")
    with pytest.raises(ValueError, match=r"\bcount\b"):
        bn.backward_apply(dy, x, mean, invstd, None, np.ones(C), np.ones(C), 0, axis=axis)


def test_fused_functions_accept_empty_input_like_the_phases():
    x = np.zeros((0, 3, 5), np.float32)
    y, mean, invstd = bn.forward_train(x)
    assert y.shape == x.shape and not mean.any() and not invstd.any()
    dx, dgamma, dbeta = bn.backward(x, x, np.zeros(3), np.ones(3))
    assert dx.shape == x.shape and not dgamma.any() and not dbeta.any()


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint16, np.int64, np.bool_], ids=lambda d: np.dtype(d).name)
def test_integer_inputs_give_float64(rng, dtype):
    shape, axis = (5, 3, 4), 1
    C = 3
    x = make_data(rng, shape, dtype, axis)
    dy = make_data(rng, shape, dtype, axis)
    count, mean, m2 = bn.batch_stats(x, axis=axis)
    assert mean.dtype == F64 and m2.dtype == F64
    assert_close(mean, ref.batch_stats(x)[1], 1e-12, "mean")
    # identical to batch_stats of the same values as float64
    c64, mean64, m264 = bn.batch_stats(x.astype(np.float64), axis=axis)
    assert count == c64
    assert_bits(mean, mean64, "mean vs float64 input")
    assert_bits(m2, m264, "m2 vs float64 input")
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    y = bn.normalize(x, mean, invstd, axis=axis)
    assert y.dtype == F64
    assert_bits(y, bn.forward_train(x)[0], "normalize vs forward_train")
    for sd in (None, np.float64):
        _, fm, fi = bn.forward_train(x, stats_dtype=sd)
        assert_bits(fm, mean, "forward_train mean of integer input")
        assert_bits(fi, invstd, "forward_train invstd of integer input")
    s1, s2 = bn.backward_reduce(dy, x, mean, axis=axis)
    assert s1.dtype == F64 and s2.dtype == F64
    dx = bn.backward_apply(dy, x, mean, invstd, None, s1, s2, count, axis=axis)
    assert dx.dtype == F64
    assert_bits(dx, bn.backward(dy, x, mean, invstd)[0], "backward_apply vs backward")
    assert_close(dx, ref.backward_apply(dy, x, mean, invstd, None, s1, s2, count), 1e-10, "dx")
    o = np.empty(shape, np.float64)
    assert bn.normalize(x, mean, invstd, out=o) is o
    with pytest.raises(ERR, match=r"\bout\b"):
        bn.normalize(x, mean, invstd, out=np.empty(shape, np.float32))
    with pytest.raises(ERR, match=r"\bout\b"):
        bn.normalize(x, mean, invstd, out=x)  # an integer x cannot hold the float64 result


def test_half_input_phases(rng):
    x = (300 + rng.standard_normal((64, 2, 3)) * 0.3).astype(np.float16)
    count, mean, m2 = bn.batch_stats(x)
    _, emean, em2 = ref.batch_stats(x)
    assert_close(mean, emean, 1e-12, "mean of float16 data (exact in float32)")
    assert np.all(np.abs(m2 - em2) <= 1e-6 * em2), "m2 of float16 data"
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    y = bn.normalize(x, mean, invstd)
    assert y.dtype == F16
    assert_bits(y, bn.forward_train(x)[0], "float16 normalize vs forward_train")
    _, fm, fi = bn.forward_train(x, stats_dtype=np.float64)
    assert_bits(fm, mean, "float64 mean of float16 input")
    assert_bits(fi, invstd, "float64 invstd of float16 input")
    _, fm, fi = bn.forward_train(x)
    assert_bits(fm, mean.astype(F16), "float16 mean")
    assert_bits(fi, invstd.astype(F16), "float16 invstd")


# --------------------------------------------------------------------------------------------------
# 7. thread-count independence
# --------------------------------------------------------------------------------------------------

THREAD_CASES = [
    pytest.param((16, 8, 40, 40), 1, np.float32, id="row-16x8x40x40-f32"),
    pytest.param((100000, 3), 1, np.float64, id="col-100000x3-f64"),
    pytest.param((8, 16, 16, 200), -1, np.float32, id="chlast-8x16x16x200-f32"),
    pytest.param((60, 5, 700), 1, np.float64, id="row-60x5x700-f64"),
]


def _all_phases(x, dy, axis, gamma, beta, rm, rv):
    out = []
    count, mean, m2 = bn.batch_stats(x, axis=axis)
    out += [mean, m2]
    b = split_bounds(x.shape[0], [2, 0, 3])
    parts = [bn.batch_stats(x[b[k]:b[k + 1]], axis=axis) for k in range(3)]
    mc, mm, mm2 = bn.merge_stats([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
    out += [mm, mm2, np.array([count, mc])]
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    out.append(bn.normalize(x, mean, invstd, gamma, beta, axis=axis))
    s1, s2 = bn.backward_reduce(dy, x, mean, axis=axis)
    out += [s1, s2]
    out.append(bn.backward_apply(dy, x, mean, invstd, gamma, s1, s2, 2 * count, axis=axis))
    rm, rv = rm.copy(), rv.copy()
    bn.update_running_stats(rm, rv, mean, m2, count, momentum=0.2)
    out += [rm, rv]
    return out


@pytest.mark.parametrize("shape,axis,dtype", THREAD_CASES)
def test_phases_bit_identical_for_1_and_2_threads(rng, shape, axis, dtype):
    C = channels(shape, axis)
    x = make_data(rng, shape, dtype, axis)
    dy = make_data(rng, shape, dtype, axis)
    gamma, beta = params(rng, C, dtype)
    rm, rv = uniform_stats(rng, C, np.float32)
    before = bn.get_num_threads()
    try:
        bn.set_num_threads(1)
        one = _all_phases(x, dy, axis, gamma, beta, rm, rv)
        bn.set_num_threads(2)
        two = _all_phases(x, dy, axis, gamma, beta, rm, rv)
    finally:
        bn.set_num_threads(before)
    assert bn.get_num_threads() == before
    names = ["mean", "m2", "merged mean", "merged m2", "counts", "normalize", "sum_dy", "sum_dy_xmu",
             "backward_apply", "running_mean", "running_var"]
    for name, a, b in zip(names, one, two):
        assert_bits(b, a, f"{name}: 2 threads vs 1")


# Column mode's vector loops (8 positions a step, rows in sweeps of 2 or 4, and the backward's dx for two
# rows half an item apart where the coefficients are wide) against the one-row, one-position loops: a
# column's results do not depend on its neighbours or on the rows beside it. Widths around 8 and 682 and
# 1024 put positions in the vector body and the scalar tail, row counts leave sweeps part-filled.
@pytest.mark.parametrize("N", [1, 2, 3, 5, 9, 34, 70])
@pytest.mark.parametrize("C", [7, 9, 203, 683, 1027])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_column_mode_columns_and_rows_alone_have_the_bits_of_the_whole(rng, N, C, dtype):
    x = (rng.standard_normal((N, C)) * 3 + 2).astype(dtype)
    dy = rng.standard_normal((N, C)).astype(dtype)
    gamma = rng.random(C) + 0.5
    count, mean, m2 = bn.batch_stats(x)
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    s1, s2 = bn.backward_reduce(dy, x, mean)
    dx = bn.backward_apply(dy, x, mean, invstd, gamma, s1, s2, N)
    dxb, dg, db = bn.backward(dy, x, mean, invstd, gamma)
    # the ReLU backward, its mask from y and from x (beta), g kept in dx between the two passes
    beta = rng.uniform(-1, 1, C)
    y = bn.normalize(x, mean, invstd, gamma, beta, activation="relu")
    masked = [("y=", dict(y=y), lambda col: dict(y=y[:, col])),
              ("beta=", dict(beta=beta), lambda col: dict(beta=beta[col]))]
    relu_grads = {kind: bn.backward(dy, x, mean, invstd, gamma, activation="relu", **kw) for kind, kw, _ in masked}
    assert_bits(relu_grads["beta="][0], relu_grads["y="][0], "backward(relu): dx, mask from beta vs from y")
    for c in sorted({0, 1, C // 2, C - 8, C - 1}):
        col = slice(c, c + 1)
        _, m_c, m2_c = bn.batch_stats(x[:, col])
        assert_bits(m_c, mean[col], f"mean of column {c}")
        assert_bits(m2_c, m2[col], f"m2 of column {c}")
        a_c, b_c = bn.backward_reduce(dy[:, col], x[:, col], mean[col])
        assert_bits(a_c, s1[col], f"sum_dy of column {c}")
        assert_bits(b_c, s2[col], f"sum_dy_xmu of column {c}")
        ab = (dy[:, col], x[:, col], mean[col], invstd[col], gamma[col])
        assert_bits(bn.backward_apply(*ab, s1[col], s2[col], N), dx[:, col], f"dx of column {c}")
        dx_c, dg_c, db_c = bn.backward(*ab)
        assert_bits(dx_c, dxb[:, col], f"backward's dx of column {c}")
        assert_bits(dg_c, dg[col], f"dgamma of column {c}")
        assert_bits(db_c, db[col], f"dbeta of column {c}")
        for kind, kw, kw_c in masked:
            for name, a, b in zip(("dx", "dgamma", "dbeta"), bn.backward(*ab, activation="relu", **kw_c(col)),
                                  relu_grads[kind]):
                assert_bits(a, b[:, col] if name == "dx" else b[col], f"backward(relu, {kind})'s {name} of column {c}")
    for i in range(N):
        row = slice(i, i + 1)
        got = bn.backward_apply(dy[row], x[row], mean, invstd, gamma, s1, s2, N)
        assert_bits(got, dx[row], f"dx of row {i}")
    assert_bits(dxb, dx, "backward vs backward_apply")


@pytest.mark.parametrize("N", [1, 2, 3, 9])
@pytest.mark.parametrize("C", [9, 1027, 2051])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_column_mode_normalize_columns_and_rows_alone_have_the_bits_of_the_whole(rng, N, C, dtype, activation,
                                                                                  with_residual):
    """The forward's vector loops (8 positions a step; two rows half an item apart for wide items) against
    the one-position, one-row loops, with y of exactly +-0 (beta 0, x at the mean), NaN and inf in x."""
    x = (rng.standard_normal((N, C)) * 3 + 2).astype(dtype)
    mean = x.mean(0, dtype=np.float64)
    invstd = 1 / (x.std(0, dtype=np.float64) + 0.5)
    gamma = rng.uniform(-1.5, 1.5, C)
    beta = rng.uniform(-1, 1, C)
    beta[::3] = 0.0
    x[0, ::3] = mean[::3].astype(dtype)  # y of +-0 or a tiny value of either sign where the mean rounds
    x[-1, 1::5] = np.nan
    x[-1, 2::7] = np.inf
    mean[4::11], beta[4::11], x[0, 4::11] = 0.0, -0.0, -0.0  # y = -0.0 * alpha + -0.0: -0.0, which ReLU keeps
    r = rng.standard_normal((N, C)).astype(dtype) if with_residual else None
    if with_residual:
        r[0, 4::11] = -0.0  # keeps the -0.0 below: -0.0 + -0.0

    def kw(part=np.s_[:, :]):
        return dict(activation=activation, residual=None if r is None else r[part])

    y = bn.normalize(x, mean, invstd, gamma, beta, **kw())
    y_inf = bn.forward_infer(x, mean, (1 / invstd) ** 2 - 1e-5, gamma, beta, **kw())
    for c in sorted({0, 1, 2, 3, C // 2, C - 8, C - 1}):
        col = slice(c, c + 1)
        assert_bits(bn.normalize(x[:, col], mean[col], invstd[col], gamma[col], beta[col], **kw(np.s_[:, col])),
                    y[:, col], f"y of column {c}")
        assert_bits(bn.forward_infer(x[:, col], mean[col], (1 / invstd[col]) ** 2 - 1e-5, gamma[col], beta[col],
                                     **kw(np.s_[:, col])), y_inf[:, col], f"forward_infer's y of column {c}")
    for i in range(N):
        row = slice(i, i + 1)
        assert_bits(bn.normalize(x[row], mean, invstd, gamma, beta, **kw(np.s_[row])), y[row], f"y of row {i}")
    assert_close(y, ref.normalize(x, mean, invstd, gamma, beta, **kw()), TOL[dtype], "y against the reference")
    assert np.signbit(y[0, 4::11][gamma[4::11] > 0]).all()
    if activation:
        assert not np.any(y < 0) and np.isnan(y[np.isnan(x)]).all()


# --------------------------------------------------------------------------------------------------
# regressions found by fuzzing the binding
# --------------------------------------------------------------------------------------------------


def test_merge_stats_refuses_a_total_count_beyond_exact_integers():
    with pytest.raises(ValueError, match=r"\bcounts\b"):
        bn.merge_stats([9e15] * 3, np.zeros((3, 1)), np.zeros((3, 1)))


@pytest.mark.filterwarnings("error")
def test_narrowing_casts_do_not_warn_after_writing_out():
    """float16 results and narrowed statistics overflow to inf silently (IEEE), so warnings-as-errors
    cannot raise half-way through a call that already wrote out."""
    x16 = np.array([[0, 0], [1e3, 1e3]], np.float16)
    o16 = np.zeros_like(x16)
    y = bn.normalize(x16, [0.0, 0.0], [100.0, 100.0], out=o16)
    assert y is o16 and np.isinf(o16[1]).all()
    x = np.array([[1e5, 1.0], [2e5, 2.0]], np.float32)
    out = np.empty_like(x)
    y, mean, invstd = bn.forward_train(x, out=out, stats_dtype=np.float16)
    assert y is out and mean.dtype == np.float16 and np.isinf(mean[0])
    # float64 -> float32 (invstd 1e45 of a constant channel with eps 1e-90) takes the C conversion
    _, _, invstd = bn.forward_train(np.ones((2, 2), np.float32), eps=1e-90)
    assert invstd.dtype == np.float32 and np.isinf(invstd).all()


@pytest.mark.parametrize("axis", [np.array([1]), np.array(1.0), np.array([[1]]), 1.0, "1"])
def test_axis_that_is_not_an_integer_is_named(axis):
    with pytest.raises(TypeError, match=r"\baxis\b"):
        bn.batch_stats(np.ones((3, 2)), axis=axis)


def test_axis_as_0d_integer_array_works():
    assert bn.batch_stats(np.ones((3, 2)), axis=np.array(-1))[1].shape == (2,)


def test_update_running_stats_reads_statistics_that_alias_the_running_ones():
    mean, m2 = np.array([1.0, 2.0]), np.array([3.0, 4.0])
    want_m, want_v = np.zeros(2), np.ones(2)
    bn.update_running_stats(want_m, want_v, mean.copy(), m2.copy(), 4, momentum=0.5)
    rm, rv = m2.copy(), np.ones(2)  # running_mean is the very array passed as m2
    bn.update_running_stats(rm, rv, mean, rm, 4, momentum=0.5)
    np.testing.assert_array_equal(rv, (1 - 0.5) * 1 + 0.5 * m2 / 3)
    np.testing.assert_array_equal(rm, 0.5 * m2 + 0.5 * mean)


@pytest.mark.parametrize("count, exc", [(-3, r"more than 1"), (2 ** 70, r"out of range"), (1e16, r"out of range"),
                                        (2.5, r"whole number")])
def test_update_running_stats_count_messages(count, exc):
    with pytest.raises(ValueError, match=exc):
        bn.update_running_stats(np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), count)


@pytest.mark.parametrize("training", [None, "no", 1, np.array([True])])
def test_backward_training_must_be_a_bool(training):
    x = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(TypeError, match=r"\btraining\b"):
        bn.backward(x, x, np.zeros(3), np.ones(3), training=training)


def test_backward_training_accepts_numpy_bool():
    x = np.random.default_rng(0).normal(size=(4, 3))
    a = bn.backward(x, x, np.zeros(3), np.ones(3), training=np.False_)[0]
    np.testing.assert_array_equal(a, bn.backward(x, x, np.zeros(3), np.ones(3), training=False)[0])


@pytest.mark.parametrize("name", ["eps", "momentum"])
def test_out_of_range_floats_are_value_errors(name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        bn.forward_train(np.ones((3, 2)), **{name: 10 ** 400})
