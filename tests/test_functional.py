"""The functional API (forward_train, forward_infer, backward) against the float64 NumPy reference:
shapes 2-D..5-D, every channel axis, many memory layouts, dtypes, affine variants, out=, running
statistics, and a finite-difference check of the gradients."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from helpers import (F16, F32, F64, LAYOUTS, TOL, as_layout, assert_close, assert_result_dtype,
                     assert_unchanged, channels, layout_applies, make_data, numeric_grad, params,
                     grad_dtype, result_dtype, snapshot, tol_for, uniform_stats)

SHAPE_AXES = [
    ((2, 1), 1), ((2, 1), -1), ((5, 3), 1), ((5, 3), 0), ((6, 17), -1),
    ((3, 4, 5), 1), ((3, 4, 5), -1), ((3, 4, 5), 0), ((3, 4, 5), -2),
    ((2, 17, 7, 5), 1), ((4, 3, 1, 1), 1), ((2, 3, 7, 5), -1), ((2, 3, 7, 5), 2), ((2, 3, 7, 5), 0),
    ((2, 3, 4, 5, 3), 1), ((2, 3, 4, 5, 3), 3), ((2, 3, 4, 5, 3), -1), ((2, 1, 3, 1, 2), 1),
]


def _id(shape, axis, layout=None):
    s = "x".join(map(str, shape)) + f"-ax{axis}"
    return s if layout is None else f"{s}-{layout}"


CASES = [pytest.param(s, a, l, id=_id(s, a, l))
         for s, a in SHAPE_AXES for l in LAYOUTS if layout_applies(l, s, a)]
SHAPE_CASES = [pytest.param(s, a, id=_id(s, a)) for s, a in SHAPE_AXES]
SOME_SHAPES = [pytest.param(s, a, id=_id(s, a)) for s, a in
               [((2, 1), 1), ((5, 3), 0), ((3, 4, 5), -1), ((2, 17, 7, 5), 1), ((2, 3, 7, 5), 2),
                ((2, 3, 4, 5, 3), -1)]]
FLOATS = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


def _batch_stats(x, axis, dtype):
    """Reference batch mean/invstd of x, in x's result dtype (what forward_train hands to backward)."""
    _, mean, invstd = ref.forward_train(x, axis=axis)
    dt = result_dtype(dtype)
    return mean.astype(dt), invstd.astype(dt)


def check_backward_against_reference(dy, x, mean, invstd, gamma, axis, dtype, tol):
    """backward, training and frozen, against the reference: values and result dtypes."""
    for training in (True, False):
        got = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        want = ref.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
            if name == "dx":
                assert_result_dtype(g, dtype, name)
            else:  # float32 for float16 input
                assert g.dtype == grad_dtype(dtype), (name, g.dtype)
            assert_close(g, w, tol, f"{name} training={training}")


# --------------------------------------------------------------------------------------------------
# main sweep: shape x axis x layout x {f32, f64}
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis,layout", CASES)
def test_forward_train_matches_reference(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    x = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
    gamma, beta = params(rng, C, dtype)
    rm, rv = uniform_stats(rng, C, dtype)
    erm, erv = rm.astype(np.float64), rv.astype(np.float64)
    before = snapshot(x, gamma, beta)

    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.3,
                                       axis=axis)
    ey, emean, einvstd = ref.forward_train(x, gamma, beta, running_mean=erm, running_var=erv,
                                           momentum=0.3, axis=axis)
    tol = TOL[result_dtype(dtype)]
    for name, got, want, shp in (("y", y, ey, shape), ("mean", mean, emean, (C,)),
                                 ("invstd", invstd, einvstd, (C,))):
        assert_result_dtype(got, dtype, name)
        assert got.shape == shp, name
        assert_close(got, want, tol, name)
    assert rm.dtype == dtype and rv.dtype == dtype
    assert_close(rm, erm, tol, "running_mean")
    assert_close(rv, erv, tol, "running_var")
    assert not np.shares_memory(y, x)
    assert_unchanged(before, [x, gamma, beta], ["x", "gamma", "beta"])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis,layout", CASES)
def test_forward_infer_matches_reference(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    x = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
    gamma, beta = params(rng, C, dtype)
    rm, rv = uniform_stats(rng, C, dtype)
    before = snapshot(x, rm, rv, gamma, beta)

    y = bn.forward_infer(x, rm, rv, gamma, beta, axis=axis)
    ey = ref.forward_infer(x, rm, rv, gamma, beta, axis=axis)
    assert_result_dtype(y, dtype, "y")
    assert_close(y, ey, TOL[result_dtype(dtype)], "y")
    assert not np.shares_memory(y, x)
    assert_unchanged(before, [x, rm, rv, gamma, beta], ["x", "running_mean", "running_var", "gamma", "beta"])


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis,layout", CASES)
def test_backward_matches_reference(rng, shape, axis, layout, dtype, training):
    C = channels(shape, axis)
    x = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
    dy = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
    gamma, _ = params(rng, C, dtype)
    if training:
        mean, invstd = _batch_stats(x, axis, dtype)
    else:
        mean = rng.standard_normal(C).astype(dtype)
        invstd = rng.uniform(0.5, 2.0, C).astype(dtype)
    before = snapshot(dy, x, mean, invstd, gamma)

    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
    edx, edgamma, edbeta = ref.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
    tol = TOL[result_dtype(dtype)]
    for name, got, want, shp in (("dx", dx, edx, shape), ("dgamma", dgamma, edgamma, (C,)),
                                 ("dbeta", dbeta, edbeta, (C,))):
        assert_result_dtype(got, dtype, name)
        assert got.shape == shp, name
        assert_close(got, want, tol, name)
    assert not np.shares_memory(dx, x) and not np.shares_memory(dx, dy)
    assert_unchanged(before, [dy, x, mean, invstd, gamma], ["dy", "x", "mean", "invstd", "gamma"])


# --------------------------------------------------------------------------------------------------
# affine variants: no gamma/beta, gamma only, beta without gamma
# --------------------------------------------------------------------------------------------------

AFFINE = ["none", "gamma", "beta", "both"]


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape,axis", SOME_SHAPES)
def test_affine_variants_all_ops(rng, shape, axis, dtype, affine):
    C = channels(shape, axis)
    x = as_layout(make_data(rng, shape, dtype, axis), "chlast", axis)
    dy = make_data(rng, shape, dtype, axis)
    g, b = params(rng, C, dtype)
    gamma = g if affine in ("gamma", "both") else None
    beta = b if affine in ("beta", "both") else None
    rm, rv = uniform_stats(rng, C, dtype)
    tol = TOL[result_dtype(dtype)]

    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis)
    ey, emean, einvstd = ref.forward_train(x, gamma, beta, axis=axis)
    assert_close(y, ey, tol, "forward_train y")
    assert_close(mean, emean, tol, "mean")
    assert_close(invstd, einvstd, tol, "invstd")

    yi = bn.forward_infer(x, rm, rv, gamma, beta, axis=axis)
    assert_close(yi, ref.forward_infer(x, rm, rv, gamma, beta, axis=axis), tol, "forward_infer y")

    # keyword spelling of the optional parameters
    yk = bn.forward_infer(x, rm, rv, gamma=gamma, beta=beta, axis=axis)
    assert np.array_equal(yk, yi)

    check_backward_against_reference(dy, x, mean, invstd, gamma, axis, dtype, tol)


def test_beta_without_gamma_is_shift_only(rng):
    x = make_data(rng, (6, 4, 3), np.float64)
    beta = np.array([1.0, -2.0, 3.5, 0.25])
    y0, _, _ = bn.forward_train(x)
    y1, _, _ = bn.forward_train(x, None, beta)
    assert_close(y1 - y0, np.broadcast_to(beta[None, :, None], x.shape), 1e-12, "shift")
    rm, rv = uniform_stats(rng, 4)
    z0 = bn.forward_infer(x, rm, rv)
    z1 = bn.forward_infer(x, rm, rv, None, beta)
    assert_close(z1 - z0, np.broadcast_to(beta[None, :, None], x.shape), 1e-12, "shift infer")


def test_gamma_none_equals_ones(rng):
    x = make_data(rng, (5, 3, 4), np.float32)
    dy = make_data(rng, (5, 3, 4), np.float32)
    ones = np.ones(3, np.float32)
    a = bn.forward_train(x)
    b = bn.forward_train(x, ones, np.zeros(3, np.float32))
    for u, v in zip(a, b):
        assert_close(u, v, 1e-6)
    ga = bn.backward(dy, x, a[1], a[2])
    gb = bn.backward(dy, x, a[1], a[2], ones)
    for u, v in zip(ga, gb):
        assert_close(u, v, 1e-6)


# --------------------------------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------------------------------

INPLACE_LAYOUTS = [l for l in LAYOUTS if l != "bcast"]
INPLACE_CASES = [pytest.param(s, a, l, np.float32, id=_id(s, a, l) + "-f32")
                 for s, a in SHAPE_AXES for l in INPLACE_LAYOUTS]
INPLACE_CASES += [pytest.param(s, a, l, d, id=_id(s, a, l) + f"-{np.dtype(d).name}")
                  for s, a in [((2, 1), 1), ((3, 4, 5), -1), ((2, 17, 7, 5), 1), ((2, 3, 4, 5, 3), 3)]
                  for l in ("C", "chlast", "negall", "step") for d in (np.float16, np.float64)]


def _bits(a):
    a = np.asarray(a)
    return a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("shape,axis,layout,dtype", INPLACE_CASES)
def test_inplace_out_is_bit_identical(rng, shape, axis, layout, dtype):
    C = channels(shape, axis)
    a = make_data(rng, shape, dtype, axis)
    d = make_data(rng, shape, dtype, axis)
    gamma, beta = params(rng, C, dtype)
    rm0, rv0 = uniform_stats(rng, C, np.float32)

    # forward_train
    x = as_layout(a, layout, axis)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
    xi = as_layout(a, layout, axis)
    rmi, rvi = rm0.copy(), rv0.copy()
    yi, meani, invstdi = bn.forward_train(xi, gamma, beta, running_mean=rmi, running_var=rvi, axis=axis,
                                          out=xi)
    assert yi is xi, "forward_train(out=x) must return out"
    for u, v in ((y, yi), (mean, meani), (invstd, invstdi), (rm, rmi), (rv, rvi)):
        assert _bits(u) == _bits(v)

    # forward_infer
    x = as_layout(a, layout, axis)
    y = bn.forward_infer(x, rm0, rv0, gamma, beta, axis=axis)
    xi = as_layout(a, layout, axis)
    yi = bn.forward_infer(xi, rm0, rv0, gamma, beta, axis=axis, out=xi)
    assert yi is xi, "forward_infer(out=x) must return out"
    assert _bits(y) == _bits(yi)

    # backward, in place over dy and over x
    for training in (True, False):
        x = as_layout(a, layout, axis)
        dy = as_layout(d, layout, axis)
        ref_out = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        dyi = as_layout(d, layout, axis)
        got = bn.backward(dyi, x, mean, invstd, gamma, training=training, axis=axis, out=dyi)
        assert got[0] is dyi, "backward(out=dy) must return out as dx"
        for u, v in zip(ref_out, got):
            assert _bits(u) == _bits(v), f"backward out=dy training={training}"
        xi = as_layout(a, layout, axis)
        got = bn.backward(dy, xi, mean, invstd, gamma, training=training, axis=axis, out=xi)
        assert got[0] is xi, "backward(out=x) must return out as dx"
        for u, v in zip(ref_out, got):
            assert _bits(u) == _bits(v), f"backward out=x training={training}"


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


OUT_LAYOUTS = ["C", "F", "T", "chlast", "chfirst", "step", "negC", "negall", "slice", "unaligned"]


@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("x_layout", ["C", "chlast"])
@pytest.mark.parametrize("shape,axis", [pytest.param((4, 3, 5, 2), 1, id="4x3x5x2-ax1"),
                                        pytest.param((6, 5, 7), -1, id="6x5x7-ax-1")])
def test_out_of_other_layouts(rng, shape, axis, x_layout, out_layout):
    C = channels(shape, axis)
    x = as_layout(make_data(rng, shape, np.float32, axis), x_layout, axis)
    dy = make_data(rng, shape, np.float32, axis)
    gamma, beta = params(rng, C, np.float32)
    rm, rv = uniform_stats(rng, C, np.float32)
    tol = TOL[F32]

    def fresh_out():
        o = as_layout(np.zeros(shape, np.float32), out_layout, axis)
        o[...] = 0
        root = _root(o)
        gaps = root.size - o.size if (root is not o and root.dtype == o.dtype) else 0
        return o, root, gaps

    def check_gaps(root, gaps, what):
        if gaps:
            assert int(np.isnan(root).sum()) == gaps, f"{what} wrote outside out"

    o, root, gaps = fresh_out()
    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis, out=o)
    assert y is o
    ey, emean, einvstd = ref.forward_train(x, gamma, beta, axis=axis)
    assert_close(o, ey, tol, "forward_train out")
    assert_close(mean, emean, tol, "mean")
    check_gaps(root, gaps, "forward_train")

    o, root, gaps = fresh_out()
    y = bn.forward_infer(x, rm, rv, gamma, beta, axis=axis, out=o)
    assert y is o
    assert_close(o, ref.forward_infer(x, rm, rv, gamma, beta, axis=axis), tol, "forward_infer out")
    check_gaps(root, gaps, "forward_infer")

    for training in (True, False):
        o, root, gaps = fresh_out()
        dx, dg, db = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis, out=o)
        assert dx is o
        edx, edg, edb = ref.backward(dy, x, mean, invstd, gamma, training=training, axis=axis)
        assert_close(o, edx, tol, f"backward out training={training}")
        assert_close(dg, edg, tol, "dgamma")
        assert_close(db, edb, tol, "dbeta")
        check_gaps(root, gaps, "backward")


def test_out_for_integer_and_half_input(rng):
    xi = make_data(rng, (5, 3, 2), np.int32)
    o = np.empty((5, 3, 2), np.float64)
    y, _, _ = bn.forward_train(xi, out=o)
    assert y is o
    assert_close(o, ref.forward_train(xi)[0], TOL[F64])

    xh = make_data(rng, (5, 3, 2), np.float16)
    oh = np.empty((5, 3, 2), np.float16)
    y, _, _ = bn.forward_train(xh, out=oh)
    assert y is oh
    assert_close(oh, ref.forward_train(xh)[0], TOL[F16])


# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------

OTHER_DTYPES = [np.float16, np.int8, np.uint8, np.int32, np.int64, np.bool_, ">f4", ">f8", "<f4"]


@pytest.mark.parametrize("layout", ["C", "negall", "step", "chlast"])
@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=lambda d: np.dtype(d).str)
@pytest.mark.parametrize("shape,axis", [pytest.param((7, 3), 1, id="7x3-ax1"),
                                        pytest.param((4, 5, 3, 2), 1, id="4x5x3x2-ax1"),
                                        pytest.param((3, 4, 6), -1, id="3x4x6-ax-1")])
def test_other_dtypes_all_ops(rng, shape, axis, dtype, layout):
    C = channels(shape, axis)
    x = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
    dy = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
    gamma, beta = params(rng, C, np.float32)
    rm, rv = uniform_stats(rng, C, np.float32)
    erm, erv = rm.astype(np.float64), rv.astype(np.float64)
    tol = TOL[result_dtype(dtype)]
    rs_tol = tol_for(dtype, np.float32)

    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
    ey, emean, einvstd = ref.forward_train(x, gamma, beta, running_mean=erm, running_var=erv, axis=axis)
    for name, got, want in (("y", y, ey), ("mean", mean, emean), ("invstd", invstd, einvstd)):
        assert_result_dtype(got, dtype, name)
        assert_close(got, want, tol, name)
    assert rm.dtype == F32
    assert_close(rm, erm, rs_tol, "running_mean")
    assert_close(rv, erv, rs_tol, "running_var")

    yi = bn.forward_infer(x, rm, rv, gamma, beta, axis=axis)
    assert_result_dtype(yi, dtype, "forward_infer")
    assert_close(yi, ref.forward_infer(x, rm, rv, gamma, beta, axis=axis), tol, "forward_infer")

    check_backward_against_reference(dy, x, mean, invstd, gamma, axis, dtype, tol)


def test_half_is_computed_in_float32_not_float16(rng):
    """float16 data whose variance float16 arithmetic cannot hold (values ~ 300 +- 0.3): the float32
    computation gets invstd right, a float16 one does not."""
    x = (300 + rng.standard_normal((64, 2)) * 0.3).astype(np.float16)
    y, mean, invstd = bn.forward_train(x)
    ey, emean, einvstd = ref.forward_train(x)
    assert y.dtype == F16 and invstd.dtype == F16
    assert_close(invstd, einvstd, 2e-3, "invstd")
    assert_close(y, ey, 2e-3, "y")


def test_bool_input(rng):
    x = np.array([[True, False, True], [False, False, True], [True, True, True], [False, True, True]])
    y, mean, invstd = bn.forward_train(x)
    assert y.dtype == F64
    assert_close(mean, [0.5, 0.5, 1.0], 1e-15, "mean")
    assert_close(invstd, 1 / np.sqrt(np.array([0.25, 0.25, 0.0]) + 1e-5), 1e-12, "invstd")
    assert_close(y, ref.forward_train(x)[0], 1e-10, "y")


@pytest.mark.parametrize("x_dtype,p_dtype", [(np.float32, np.float64), (np.float64, np.float32),
                                             (np.float32, np.int64), (np.float64, np.float16),
                                             (np.float16, np.float64), (np.int32, np.float32)],
                         ids=lambda d: np.dtype(d).name)
def test_parameters_of_other_dtypes_are_cast(rng, x_dtype, p_dtype):
    shape, C = (6, 4, 3), 4
    x = make_data(rng, shape, x_dtype)
    dy = make_data(rng, shape, x_dtype)
    if np.dtype(p_dtype).kind == "i":
        gamma, beta = np.array([1, -2, 3, 2], p_dtype), np.array([0, 1, -1, 5], p_dtype)
    else:
        gamma, beta = params(rng, C, p_dtype)
    s_dtype = p_dtype if np.dtype(p_dtype).kind == "f" else np.float64  # stats: float of some width
    rm, rv = uniform_stats(rng, C, s_dtype)
    tol = TOL[result_dtype(x_dtype)]

    y, mean, invstd = bn.forward_train(x, gamma, beta, axis=1)
    assert_result_dtype(y, x_dtype, "y")
    assert_close(y, ref.forward_train(x, gamma, beta)[0], tol, "forward_train")
    yi = bn.forward_infer(x, rm, rv, gamma, beta)
    assert_result_dtype(yi, x_dtype, "y")
    assert_close(yi, ref.forward_infer(x, rm, rv, gamma, beta), tol, "forward_infer")
    m64, s64 = mean.astype(s_dtype), invstd.astype(s_dtype)  # stats handed back in another dtype
    got = bn.backward(dy, x, m64, s64, gamma)
    want = ref.backward(dy, x, m64, s64, gamma)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        if name == "dx":
            assert_result_dtype(g, x_dtype, name)
        else:
            assert g.dtype == grad_dtype(x_dtype), (name, g.dtype)
        assert_close(g, w, tol, name)


def _vector_forms(v):
    """v (1-D float64) in the forms a channel vector can arrive in, each holding the same values."""
    f32 = v.astype(np.float32)

    class Sub(np.ndarray):
        pass

    def unaligned(a):
        buf = np.zeros(a.nbytes + 1, np.uint8)
        u = buf[1:].view(a.dtype)
        u[...] = a
        assert not u.flags.aligned
        return u

    return {
        "f32": f32, "f64": v.copy(), "f32_step": as_layout(f32, "step"), "f64_step": as_layout(v, "step"),
        "f32_neg": as_layout(f32, "negall"), "f64_neg": as_layout(v, "negall"),
        ">f4": f32.astype(">f4"), ">f8": v.astype(">f8"), "f32_unaligned": unaligned(f32),
        "f64_unaligned": unaligned(v), "f32_subclass": f32.view(Sub), "f64_readonly": _readonly(v.copy()),
        "list": [float(t) for t in f32],
    }


def _readonly(a):
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("dtype", FLOATS)
def test_channel_vectors_in_every_form_give_the_same_bits(rng, dtype):
    """gamma, beta, running statistics and the backward's mean/invstd as float32 or float64, strided,
    reversed, byte-swapped, unaligned, a subclass, read-only or a list: the same values give the same
    bits (the binding converts the common forms itself and hands the rest to NumPy), and no vector is
    changed."""
    shape, C = (7, 5, 3), 5
    x = make_data(rng, shape, dtype)
    dy = make_data(rng, shape, dtype)
    # values exact in float32, so that every form holds the same numbers
    vals = {k: rng.uniform(lo, hi, C).astype(np.float32).astype(np.float64)
            for k, lo, hi in (("g", 0.5, 2), ("b", -1, 1), ("rm", -1, 1), ("rv", 0.5, 2), ("m", -1, 1),
                              ("s", 0.5, 2))}

    def run(f):
        y, mean, invstd = bn.forward_train(x, f["g"], f["b"])
        return [y, mean, invstd, bn.forward_infer(x, f["rm"], f["rv"], f["g"], f["b"]),
                bn.normalize(x, f["m"], f["s"], f["g"], f["b"]),
                *bn.backward(dy, x, f["m"], f["s"], f["g"]),
                *bn.backward(dy, x, f["m"], f["s"], f["g"], training=False)]

    want = run(vals)
    forms = {k: _vector_forms(v) for k, v in vals.items()}
    for form in forms["g"]:
        f = {k: forms[k][form] for k in vals}
        before = {k: np.array(v, copy=True) for k, v in f.items()}
        got = run(f)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes(), (form, i)
        for k, v in f.items():
            np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=f"{form}: {k} changed")


def test_list_parameters_are_accepted(rng):
    x = make_data(rng, (5, 3), np.float64)
    y, _, _ = bn.forward_train(x, [1.0, 2.0, -1.0], (0.0, 1.0, 2.0))
    assert_close(y, ref.forward_train(x, [1.0, 2.0, -1.0], (0.0, 1.0, 2.0))[0], 1e-10)


def test_dy_of_another_dtype(rng):
    x = make_data(rng, (5, 4, 3), np.float32)
    dy = make_data(rng, (5, 4, 3), np.float64)
    mean, invstd = _batch_stats(x, 1, np.float32)
    dx, dg, db = bn.backward(dy, x, mean, invstd)
    assert dx.dtype == F32 and dg.dtype == F32 and db.dtype == F32
    for g, w in zip((dx, dg, db), ref.backward(dy, x, mean, invstd)):
        assert_close(g, w, TOL[F32])


# --------------------------------------------------------------------------------------------------
# running statistics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.73, 1.0])
@pytest.mark.parametrize("rs_dtype", [np.float32, np.float64], ids=["rs32", "rs64"])
@pytest.mark.parametrize("x_dtype", [np.float32, np.float64, np.float16, np.int32],
                         ids=["x32", "x64", "x16", "xi32"])
def test_running_stats_update(rng, x_dtype, rs_dtype, momentum):
    shape, axis = (7, 5, 3), 1
    x = as_layout(make_data(rng, shape, x_dtype, axis), "chlast", axis)
    rm, rv = uniform_stats(rng, 5, rs_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    ids = (id(rm), id(rv))
    erm, erv = rm.astype(np.float64), rv.astype(np.float64)
    bn.forward_train(x, running_mean=rm, running_var=rv, momentum=momentum, axis=axis)
    ref.forward_train(x, running_mean=erm, running_var=erv, momentum=momentum, axis=axis)
    assert (id(rm), id(rv)) == ids and rm.dtype == rs_dtype and rv.dtype == rs_dtype
    if momentum == 0.0:
        assert _bits(rm) == _bits(rm0) and _bits(rv) == _bits(rv0), "momentum=0 must leave stats as they were"
        return
    tol = tol_for(x_dtype, rs_dtype)
    assert_close(rm, erm, tol, "running_mean")
    assert_close(rv, erv, tol, "running_var")
    if momentum == 1.0:  # exactly the batch statistics, variance unbiased
        xf = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, 5)
        assert_close(rm, xf.mean(0), tol, "running_mean == batch mean")
        assert_close(rv, xf.var(0, ddof=1), tol, "running_var == unbiased batch var")


def test_running_var_is_unbiased_small_batch():
    x = np.array([[1.0, 10.0], [3.0, 10.0]])  # channel 0: biased var 1, unbiased 2; channel 1: 0
    rm, rv = np.zeros(2), np.ones(2)
    _, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, momentum=1.0)
    assert_close(rm, [2.0, 10.0], 1e-15)
    assert_close(rv, [2.0, 0.0], 1e-15)
    assert_close(invstd[0], 1 / np.sqrt(1.0 + 1e-5), 1e-15)


@pytest.mark.parametrize("view", ["step", "neg"])
def test_running_stats_as_strided_views(rng, view):
    x = make_data(rng, (6, 4, 5), np.float32)
    buf_m = np.full(8, np.nan)
    buf_v = np.full(8, np.nan)
    if view == "step":
        rm, rv = buf_m[::2], buf_v[1::2]
    else:
        rm, rv = buf_m[:4][::-1], buf_v[4:][::-1]
    rm[...] = [0.1, 0.2, 0.3, 0.4]
    rv[...] = [1.0, 2.0, 0.5, 1.5]
    erm, erv = rm.copy(), rv.copy()
    bn.forward_train(x, running_mean=rm, running_var=rv, momentum=0.4)
    ref.forward_train(x, running_mean=erm, running_var=erv, momentum=0.4)
    assert_close(rm, erm, TOL[F32], "running_mean")
    assert_close(rv, erv, TOL[F32], "running_var")
    assert int(np.isnan(buf_m).sum()) == 8 - 4 and int(np.isnan(buf_v).sum()) == 8 - 4, "wrote outside view"
    y = bn.forward_infer(x, rm, rv)
    assert_close(y, ref.forward_infer(x, rm, rv), TOL[F32], "forward_infer with strided stats")


@pytest.mark.parametrize("C", [1, 5, 67, 5000])
@pytest.mark.parametrize("rs_dtype", ["f4", "f8"])
def test_running_stats_update_has_the_same_bits_in_every_form(rng, C, rs_dtype):
    """Contiguous native running statistics are updated by a vectorized kernel, strided, byte-swapped
    and unaligned ones by the binding's general loop: the same expression, so the same bits."""
    x = make_data(rng, (9, C, 2), np.float32)
    rm0, rv0 = uniform_stats(rng, C, np.dtype(rs_dtype))

    def forms(v):
        strided = np.repeat(v, 2)[::2]
        swapped = v.astype(v.dtype.newbyteorder(">"))
        unaligned = np.ndarray(C, v.dtype, np.zeros(C * v.itemsize + 1, np.uint8), 1)
        unaligned[...] = v
        return {"contiguous": v.copy(), "strided": strided, "swapped": swapped, "unaligned": unaligned}

    ms, vs = forms(rm0), forms(rv0)
    for form in ms:
        bn.forward_train(x, running_mean=ms[form], running_var=vs[form], momentum=0.3)
    for form in ms:
        for got, want, what in ((ms[form], ms["contiguous"], "mean"), (vs[form], vs["contiguous"], "var")):
            assert _bits(np.asarray(got, rm0.dtype)) == _bits(want), f"running_{what} {form}"


def test_defaults_eps_and_momentum(rng):
    """Small-variance data makes eps matter: the default must be 1e-5, momentum 0.1, axis 1."""
    x = make_data(rng, (8, 3, 4), np.float64, scale=2e-3)
    rm, rv = np.zeros(3), np.ones(3)
    erm, erv = rm.copy(), rv.copy()
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv)
    ey, emean, einvstd = ref.forward_train(x, running_mean=erm, running_var=erv, momentum=0.1, eps=1e-5,
                                           axis=1)
    assert_close(y, ey, 1e-10)
    assert_close(invstd, einvstd, 1e-10)
    assert_close(rm, erm, 1e-12)
    assert_close(rv, erv, 1e-12)
    y2, _, invstd2 = bn.forward_train(x, eps=1e-3)
    assert_close(invstd2, ref.forward_train(x, eps=1e-3)[2], 1e-10)
    assert not np.allclose(invstd2, invstd), "eps was ignored"
    yi = bn.forward_infer(x, np.zeros(3), np.full(3, 1e-5))
    assert_close(yi, ref.forward_infer(x, np.zeros(3), np.full(3, 1e-5), eps=1e-5), 1e-10)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 0.5, 3.0])
def test_eps_values(rng, eps):
    x = make_data(rng, (5, 3, 4), np.float64)
    dy = make_data(rng, (5, 3, 4), np.float64)
    y, mean, invstd = bn.forward_train(x, eps=eps)
    ey, emean, einvstd = ref.forward_train(x, eps=eps)
    assert_close(y, ey, 1e-10)
    assert_close(invstd, einvstd, 1e-10)
    rm, rv = uniform_stats(rng, 3)
    assert_close(bn.forward_infer(x, rm, rv, eps=eps), ref.forward_infer(x, rm, rv, eps=eps), 1e-10)
    for g, w in zip(bn.backward(dy, x, mean, invstd), ref.backward(dy, x, mean, invstd)):
        assert_close(g, w, 1e-10)


def test_integer_like_axis(rng):
    x = make_data(rng, (3, 4, 5), np.float64, axis=2)
    want = ref.forward_train(x, axis=2)[0]
    assert_close(bn.forward_train(x, axis=np.int64(2))[0], want, 1e-10)
    assert_close(bn.forward_train(x, axis=-1)[0], want, 1e-10)
    assert_close(bn.forward_train(x, axis=np.int32(-3))[0], ref.forward_train(x, axis=0)[0], 1e-10)


def test_read_only_inputs(rng):
    shape = (4, 3, 5)
    x = make_data(rng, shape, np.float32)
    dy = make_data(rng, shape, np.float32)
    gamma, beta = params(rng, 3, np.float32)
    rm, rv = uniform_stats(rng, 3, np.float32)
    mean, invstd = _batch_stats(x, 1, np.float32)
    for a in (x, dy, gamma, beta, rm, rv, mean, invstd):
        a.flags.writeable = False
    assert_close(bn.forward_train(x, gamma, beta)[0], ref.forward_train(x, gamma, beta)[0], TOL[F32])
    assert_close(bn.forward_infer(x, rm, rv, gamma, beta), ref.forward_infer(x, rm, rv, gamma, beta), TOL[F32])
    for g, w in zip(bn.backward(dy, x, mean, invstd, gamma), ref.backward(dy, x, mean, invstd, gamma)):
        assert_close(g, w, TOL[F32])


def test_forward_train_results_are_fresh_arrays(rng):
    x = make_data(rng, (4, 3), np.float64)
    y, mean, invstd = bn.forward_train(x)
    assert not np.shares_memory(mean, invstd)
    mean[...] = 123.0  # writable, and owned by the caller
    y2, mean2, _ = bn.forward_train(x)
    assert np.array_equal(y, y2) and not np.allclose(mean2, 123.0)


# --------------------------------------------------------------------------------------------------
# finite differences
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", ["both", "none"])
@pytest.mark.parametrize("shape,axis", [pytest.param((3, 4, 5), 1, id="3x4x5-ax1"),
                                        pytest.param((2, 3, 2, 4), -1, id="2x3x2x4-ax-1"),
                                        pytest.param((4, 3), 0, id="4x3-ax0")])
def test_training_backward_finite_difference(shape, axis, affine):
    rng = np.random.default_rng(11)
    C = channels(shape, axis)
    x = make_data(rng, shape, np.float64, axis)
    r = rng.standard_normal(shape)
    gamma, beta = params(rng, C) if affine == "both" else (np.ones(C), np.zeros(C))
    g_arg, b_arg = (gamma, beta) if affine == "both" else (None, None)

    y, mean, invstd = bn.forward_train(x, g_arg, b_arg, axis=axis)
    dx, dgamma, dbeta = bn.backward(r, x, mean, invstd, g_arg, training=True, axis=axis)

    def loss():
        return float(np.sum(bn.forward_train(x, gamma, beta, axis=axis)[0] * r))

    h = 1e-5
    ndx = numeric_grad(loss, x, h)
    ndgamma = numeric_grad(loss, gamma, h)
    ndbeta = numeric_grad(loss, beta, h)
    assert_close(dx, ndx, 1e-6, "dx vs finite differences")
    assert_close(dgamma, ndgamma, 1e-6, "dgamma vs finite differences")
    assert_close(dbeta, ndbeta, 1e-6, "dbeta vs finite differences")
    # the gradient through the batch statistics is not the frozen one
    frozen = bn.backward(r, x, mean, invstd, g_arg, training=False, axis=axis)[0]
    assert not np.allclose(frozen, ndx, atol=1e-3)


def test_frozen_backward_finite_difference():
    rng = np.random.default_rng(12)
    shape, axis, C = (3, 4, 2), -2, 4
    x = make_data(rng, shape, np.float64, axis)
    r = rng.standard_normal(shape)
    gamma, beta = params(rng, C)
    rm, rv = uniform_stats(rng, C)
    eps = 1e-3
    invstd = 1 / np.sqrt(rv + eps)
    dx, dgamma, dbeta = bn.backward(r, x, rm, invstd, gamma, training=False, axis=axis)

    def loss():
        return float(np.sum(bn.forward_infer(x, rm, rv, gamma, beta, eps=eps, axis=axis) * r))

    assert_close(dx, numeric_grad(loss, x, 1e-5), 1e-6, "dx")
    assert_close(dgamma, numeric_grad(loss, gamma, 1e-5), 1e-6, "dgamma")
    assert_close(dbeta, numeric_grad(loss, beta, 1e-5), 1e-6, "dbeta")


# --------------------------------------------------------------------------------------------------
# PyTorch's functional batch_norm as a second, independent oracle
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6), (2, 3, 4, 5), (2, 3, 2, 3, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_torch_functional(rng, shape, training):
    torch = pytest.importorskip("torch")
    C = shape[1]
    x = make_data(rng, shape, np.float64)
    dy = make_data(rng, shape, np.float64)
    gamma, beta = params(rng, C)
    rm, rv = uniform_stats(rng, C)
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, trm, trv, gt, bt, training=training, momentum=0.2, eps=1e-4)
    yt.backward(torch.tensor(dy))
    if training:
        y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.2,
                                           eps=1e-4)
    else:
        y = bn.forward_infer(x, rm, rv, gamma, beta, eps=1e-4)
        mean, invstd = rm, 1 / np.sqrt(rv + 1e-4)
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, training=training)
    assert_close(y, yt.detach().numpy(), 1e-10, "y")
    assert_close(rm, trm.numpy(), 1e-10, "running_mean")
    assert_close(rv, trv.numpy(), 1e-10, "running_var")
    assert_close(dx, xt.grad.numpy(), 1e-10, "dx")
    assert_close(dgamma, gt.grad.numpy(), 1e-10, "dgamma")
    assert_close(dbeta, bt.grad.numpy(), 1e-10, "dbeta")


# --------------------------------------------------------------------------------------------------
# more layouts: strides beyond 2**31 bytes, out overlapping the inputs, byte-swapped arrays
# --------------------------------------------------------------------------------------------------


def _lazy_zeros(nbytes):
    """A zero-filled buffer whose pages are only mapped when touched (calloc): a few GB of address
    space costs a few pages of memory."""
    try:
        return np.zeros(nbytes, np.uint8)
    except MemoryError:
        pytest.skip("cannot reserve the address space")


@pytest.mark.parametrize("shape", [(6000, 300), (24, 300, 12, 12), (3, 4096), (40, 600, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_many_channels_and_row_groups(rng, shape):
    """More channels than the kernels' per-channel steps take in one block (256), with the rows split into
    groups (partial sums merged per channel) and without (one position per channel, coefficients read in
    place): against the float64 reference, fused epilogues included, and the same bits at 1 and 2 threads."""
    C = shape[1]
    x = make_data(rng, shape, np.float32, loc=3.0)
    dy = make_data(rng, shape, np.float32)
    gamma, beta = params(rng, C)
    rm, rv = uniform_stats(rng, C)
    runs = []
    for threads in (1, 2):
        bn.set_num_threads(threads)
        y, mean, invstd = bn.forward_train(x, gamma, beta, stats_dtype=np.float64)
        yr, _, _ = bn.forward_train(x, gamma, beta, stats_dtype=np.float64, activation="relu")
        runs.append([y, mean, invstd, yr, bn.forward_infer(x, rm, rv, gamma, beta),
                     *bn.backward(dy, x, mean, invstd, gamma),
                     *bn.backward(dy, x, mean, invstd, gamma, activation="relu", beta=beta),
                     *bn.backward(dy, x, mean, invstd, gamma, training=False)])
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()
    y, mean, invstd, yr, yi, dx, dg, db, dxr, dgr, dbr, dxf, dgf, dbf = runs[0]
    ry, rmean, rinv = ref.forward_train(x, gamma, beta)
    assert_close(y, ry, TOL[F32], "y")
    assert_close(mean, rmean, TOL[F32], "mean")  # the reference rounds its statistics to float32
    assert_close(invstd, rinv, TOL[F32], "invstd")
    assert_close(yr, np.maximum(ry, 0), TOL[F32], "relu y")
    assert_close(yi, ref.forward_infer(x, rm, rv, gamma, beta), TOL[F32], "infer")
    for got, want in zip((dx, dg, db), ref.backward(dy, x, mean, invstd, gamma)):
        assert_close(got, want, TOL[F32], "backward")
    g = np.where(yr > 0, dy, 0).astype(np.float32)
    for got, want in zip((dxr, dgr, dbr), ref.backward(g, x, mean, invstd, gamma)):
        assert_close(got, want, TOL[F32], "backward, mask from beta")
    for got, want in zip((dxf, dgf, dbf), ref.backward(dy, x, mean, invstd, gamma, training=False)):
        assert_close(got, want, TOL[F32], "frozen backward")


def test_strides_beyond_2_pow_31_bytes():
    from numpy.lib.stride_tricks import as_strided
    buf = _lazy_zeros(3 * 2**30 + 4096).view(np.float32)
    far = 2**31 + 4 * 7  # bytes
    x = as_strided(buf, shape=(2, 3), strides=(far, 4))
    x[...] = [[1.0, 2.0, -3.0], [3.0, 5.0, 4.0]]
    xt = as_strided(buf[64:], shape=(3, 2), strides=(4, far))  # channel axis 1 strided far
    xt[...] = [[1.0, 2.0], [5.0, 4.0], [-1.0, 7.0]]
    out = as_strided(buf[128:], shape=(2, 3), strides=(far, 4))
    dy = as_strided(buf[256:], shape=(2, 3), strides=(far, 4))
    dy[...] = [[0.5, -1.0, 2.0], [1.5, 0.0, -2.0]]
    for arr in (x, xt):
        y, mean, invstd = bn.forward_train(arr)
        ey, emean, einvstd = ref.forward_train(arr)
        assert_close(y, ey, TOL[F32], "y")
        assert_close(mean, emean, TOL[F32], "mean")
    y, mean, invstd = bn.forward_train(x, out=out)
    assert y is out
    assert_close(out, ref.forward_train(x)[0], TOL[F32], "out")
    for g, w in zip(bn.backward(dy, x, mean, invstd), ref.backward(dy, x, mean, invstd)):
        assert_close(g, w, TOL[F32], "backward")
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    assert_close(bn.forward_infer(x, rm, rv), ref.forward_infer(x, rm, rv), TOL[F32], "forward_infer")


@pytest.mark.parametrize("shift", [1, -1, 3, 7])
def test_out_partially_overlapping_the_input(rng, shift):
    """out and x share memory but are not the same elements: the result is still that of separate
    arrays (as for NumPy's ufuncs)."""
    shape, n = (4, 3, 5), 60
    a = make_data(rng, shape, np.float64)
    d = make_data(rng, shape, np.float64)
    gamma, beta = params(rng, 3)
    y_want, mean, invstd = ref.forward_train(a, gamma, beta)
    yi_want = ref.forward_infer(a, mean, 1 / invstd**2, gamma, beta, eps=0.0)
    dx_want = ref.backward(d, a, mean, invstd, gamma)[0]

    def views():
        buf = np.zeros(n + 2 * abs(shift))
        lo = abs(shift)
        x = buf[lo:lo + n].reshape(shape)
        x[...] = a
        out = buf[lo + shift:lo + shift + n].reshape(shape)
        return x, out

    x, out = views()
    assert bn.forward_train(x, gamma, beta, out=out)[0] is out
    assert_close(out, y_want, TOL[F64], "forward_train")
    x, out = views()
    assert bn.forward_infer(x, mean, 1 / invstd**2, gamma, beta, eps=0.0, out=out) is out
    assert_close(out, yi_want, TOL[F64], "forward_infer")
    x, out = views()
    dy = d.copy()
    assert bn.backward(dy, x, mean, invstd, gamma, out=out)[0] is out
    assert_close(out, dx_want, TOL[F64], "backward, out overlapping x")
    x2, out2 = views()  # now dy lives in the shared buffer and out overlaps it
    x2[...] = d
    assert bn.backward(x2, a, mean, invstd, gamma, out=out2)[0] is out2
    assert_close(out2, dx_want, TOL[F64], "backward, out overlapping dy")


@pytest.mark.parametrize("shape", [(4, 8, 1000), (64, 16, 64), (2, 3, 3)])
def test_channel_vectors_that_are_views_of_out(rng, shape):
    """gamma, beta, running_mean (inference), mean and invstd (backward) may be float64 views of out
    (here out=x or out=dy in place): they are read as they were before out was written, as if separate
    arrays. The kernels read them while writing out, so the binding must copy them first."""
    C = shape[1]
    a = make_data(rng, shape, np.float64)
    d = make_data(rng, shape, np.float64)
    g0, b0 = params(rng, C)
    m0 = a.mean(axis=(0, 2))
    s0 = 1.0 / np.sqrt(a.var(axis=(0, 2)) + 1e-5)

    def inside(buf, k, values):  # a view of channel 0's data in buf, holding `values`
        v = buf.reshape(-1)[k * C:(k + 1) * C]
        v[...] = values
        return v

    x = a.copy()
    g, b = inside(x, 0, g0), inside(x, 1, b0)
    x_want = x.copy()
    y = bn.forward_train(x, g, b, out=x)[0]
    assert_close(y, ref.forward_train(x_want, g0, b0)[0], TOL[F64], "forward_train, gamma/beta in out")
    x = a.copy()
    rm, g = inside(x, 0, m0), inside(x, 1, g0)
    x_want = x.copy()
    y = bn.forward_infer(x, rm, np.ones(C), g, b0, out=x)
    assert_close(y, ref.forward_infer(x_want, m0, np.ones(C), g0, b0), TOL[F64], "forward_infer, running_mean in out")
    dy = d.copy()
    m, s = inside(dy, 0, m0), inside(dy, 1, s0)
    dy_want = dy.copy()
    for training in (True, False):
        dy[...] = dy_want
        m[...], s[...] = m0, s0  # (the views are part of dy)
        got = bn.backward(dy, a, m, s, g0, training=training, out=dy)
        want = ref.backward(dy_want, a, m0, s0, g0, training=training)
        for gv, wv, what in zip(got, want, ("dx", "dgamma", "dbeta")):
            assert_close(gv, wv, TOL[F64], f"backward {what}, mean/invstd in out, training={training}")


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_byte_swapped_running_stats_in_place_x_and_out(rng, dtype):
    x = make_data(rng, (6, 4, 3), np.float32)
    rm, rv = uniform_stats(rng, 4, dtype)
    erm, erv = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, momentum=0.6)
    ref.forward_train(x, running_mean=erm, running_var=erv, momentum=0.6)
    assert rm.dtype == np.dtype(dtype)
    assert_close(rm, erm, TOL[F32], "running_mean")
    assert_close(rv, erv, TOL[F32], "running_var")
    # unaligned running stats too
    um = np.ndarray(4, np.float64, np.zeros(33, np.uint8), 1)
    uv = np.ndarray(4, np.float64, np.zeros(33, np.uint8), 1)
    uv[...] = 1.0
    bn.forward_train(x, running_mean=um, running_var=uv, momentum=1.0)
    assert_close(um, ref.forward_train(x)[1], TOL[F32], "unaligned running_mean")
    # byte-swapped x in place: same values as out of place
    xs = x.astype(">f4")
    want = bn.forward_train(xs)[0]
    got = bn.forward_train(xs, out=xs)[0]
    assert got is xs
    assert np.array_equal(np.asarray(xs, np.float32), want)


def test_byte_swapped_out_is_refused_or_right(rng):
    x = make_data(rng, (6, 4, 3), np.float32)
    out = np.zeros((6, 4, 3), ">f4")
    try:
        y = bn.forward_train(x, out=out)[0]
    except (TypeError, ValueError) as e:
        assert "out" in str(e)
        return
    assert y is out
    assert_close(out, ref.forward_train(x)[0], TOL[F32])


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int16, np.uint32])
def test_extreme_integers(dtype):
    info = np.iinfo(dtype)
    x = np.array([[info.max, info.min, 0], [info.max - 1, info.min + 1, 1], [info.max // 2, 0, 2]], dtype)
    y, mean, invstd = bn.forward_train(x)
    ey, emean, einvstd = ref.forward_train(x)
    assert y.dtype == F64
    assert_close(y, ey, TOL[F64], "y")
    np.testing.assert_allclose(mean, emean, rtol=1e-12)
    np.testing.assert_allclose(invstd, einvstd, rtol=1e-9)


def test_sequences_and_other_array_likes(rng):
    x = [[1.0, 2.0, 3.0], [3.0, 5.0, 4.0]]
    assert_close(bn.forward_train(x)[0], ref.forward_train(x)[0], TOL[F64])
    assert_close(bn.forward_train(tuple(map(tuple, x)))[0], ref.forward_train(x)[0], TOL[F64])
    dy = [[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]]
    _, mean, invstd = ref.forward_train(x)
    for g, w in zip(bn.backward(dy, x, list(mean), list(invstd)), ref.backward(dy, x, mean, invstd)):
        assert_close(g, w, TOL[F64])
