"""Property-based tests (hypothesis): the functional API and the phases against their twins in
:mod:`batchnorm.reference`, over random shapes (2-D..5-D, dims of 1 included), channel axes (negative
included), memory layouts (axis permutations, Fortran order, step slices, negative strides, unaligned
data), dtypes (float16, float32, float64, '>f4', int32, bool) and aliasing (out=x, out=dy).

Every result must be within ``TOL[result dtype] * max(1, max|ref|)`` of the float64 reference (see
tests/helpers.py), have the contract's dtype, leave the inputs it does not write alone, and write
nothing outside ``out``. The data are drawn from a seeded NumPy generator with per-channel spread and
moderate values, and eps is at least 1e-3, so that every comparison is well conditioned.

Examples per test: 100 in CI, derandomized (the same examples on every run). More, and random ones:

    BATCHNORM_HYPOTHESIS_EXAMPLES=2000 python -m pytest tests/test_properties.py

(any value other than the default also turns derandomization off, so each run explores new examples;
set BATCHNORM_HYPOTHESIS_DERANDOMIZE=1 to keep them fixed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import reference as ref
from helpers import (F64, TOL, assert_close, assert_result_dtype, assert_unchanged, grad_dtype, make_data,
                     params, result_dtype, snapshot, tol_for)

# --------------------------------------------------------------------------------------------------
# settings
# --------------------------------------------------------------------------------------------------

CI_EXAMPLES = 100
_examples = int(os.environ.get("BATCHNORM_HYPOTHESIS_EXAMPLES", CI_EXAMPLES))
_derandomize = os.environ.get("BATCHNORM_HYPOTHESIS_DERANDOMIZE", "1" if _examples == CI_EXAMPLES else "0")
settings.register_profile(
    "batchnorm",
    max_examples=_examples,
    deadline=None,  # timings vary (CI machines, sanitizer builds)
    derandomize=_derandomize not in ("", "0"),
    database=None if _derandomize not in ("", "0") else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# Applied per test (not loaded globally), so other test files keep hypothesis's defaults.
SETTINGS = settings.get_profile("batchnorm")

DTYPES = [np.dtype(d) for d in ("float16", "float32", "float64", ">f4", "int32", "bool")]
STAT_DTYPES = [np.dtype(d) for d in ("float64", "float32", ">f8", ">f4")]  # running statistics
VEC_KINDS = ["float64", "float32", "list"]  # how per-channel vectors are passed


def _garbage(dtype):
    dt = np.dtype(dtype)
    return np.nan if dt.kind == "f" else (True if dt.kind == "b" else 99)


# --------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------


@st.composite
def shapes_axes(draw, min_per_channel=1):
    """(shape, axis): 2-D..5-D, small dims (1 included), sometimes one long axis (>= 32 values, for the
    kernels' row mode, pairwise chunks and row groups); axis in [-ndim, ndim)."""
    ndim = draw(st.integers(2, 5))
    side = {2: 9, 3: 6, 4: 4, 5: 3}[ndim]
    shape = draw(st.lists(st.integers(1, side), min_size=ndim, max_size=ndim))
    if draw(st.booleans()):
        j = draw(st.integers(0, ndim - 1))
        shape[j] = draw(st.integers(side + 1, 80))
    axis = draw(st.integers(-ndim, ndim - 1))
    ax = axis % ndim
    # keep sizes small: at most ~4000 values (float16 sums over a channel stay far from overflow)
    while int(np.prod(shape)) > 4000:
        j = max((k for k in range(ndim)), key=lambda k: shape[k])
        shape[j] = max(1, shape[j] // 2)
    C = shape[ax]
    if int(np.prod(shape)) // C < min_per_channel:
        j = (ax + 1) % ndim
        shape[j] = max(shape[j], min_per_channel)
    return tuple(shape), axis


@dataclass(frozen=True)
class Layout:
    perm: tuple  # memory order: perm[0] is the outermost logical axis
    steps: tuple  # step of each logical axis in its buffer
    flips: tuple  # negative stride along each logical axis
    unaligned: bool  # data pointer off the item size by one byte

    def __str__(self):
        return (f"Layout(perm={self.perm}, steps={self.steps}, flips={self.flips}, "
                f"unaligned={self.unaligned})")


@st.composite
def layouts(draw, ndim):
    """A memory layout: C order, Fortran order or any permutation of the axes, either dense (the
    kernels read it in place) or strided (step slices and/or negative strides: copied)."""
    kind = draw(st.sampled_from(["C", "F", "perm"]))
    if kind == "C":
        perm = tuple(range(ndim))
    elif kind == "F":
        perm = tuple(range(ndim))[::-1]
    else:
        perm = tuple(draw(st.permutations(range(ndim))))
    if draw(st.booleans()):  # dense
        steps, flips = (1,) * ndim, (False,) * ndim
    else:
        steps = tuple(draw(st.lists(st.sampled_from([1, 2, 3]), min_size=ndim, max_size=ndim)))
        flips = tuple(draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim)))
    unaligned = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else False
    return Layout(perm, steps, flips, unaligned)


class Placed:
    """An array in a given layout inside a bigger buffer whose other elements hold garbage, so that a
    read of them shows up (NaN) and a write to them is detected (check_gaps)."""

    def __init__(self, values, layout, dtype=None):
        values = np.asarray(values)
        dt = np.dtype(dtype) if dtype is not None else values.dtype
        nd = values.ndim
        big = [values.shape[i] * layout.steps[i] for i in range(nd)]
        mem_shape = tuple(big[p] for p in layout.perm)
        size = int(np.prod(mem_shape))
        if layout.unaligned:
            raw = np.zeros(size * dt.itemsize + 1, np.uint8)
            mem = np.ndarray(mem_shape, dtype=dt, buffer=raw, offset=1)
        else:
            mem = np.empty(mem_shape, dtype=dt)
        mem[...] = _garbage(dt)
        mask_mem = np.zeros(mem_shape, bool)
        idx = tuple(slice(None, None, -s) if f else slice(None, None, s)
                    for s, f in zip(layout.steps, layout.flips))
        inv = tuple(int(k) for k in np.argsort(layout.perm))
        self.arr = mem.transpose(inv)[idx]
        mask_mem.transpose(inv)[idx] = True
        self.arr[...] = values
        self.mem, self.gaps = mem, ~mask_mem
        self.garbage = mem[self.gaps].copy()

    def check_gaps(self, what):
        after = self.mem[self.gaps]
        assert after.tobytes() == self.garbage.tobytes(), f"{what} wrote outside the array it was given"


@dataclass
class Case:
    shape: tuple
    axis: int
    C: int
    M: int
    dtype: np.dtype
    seed: int
    loc: float
    scale: float
    quantized: bool
    x_layout: Layout

    def rng(self, k=0):
        return np.random.default_rng([self.seed, k])

    def values(self, dtype=None, k=0):
        """Data with per-channel means and spreads (helpers.make_data), values moderate."""
        dt = self.dtype if dtype is None else np.dtype(dtype)
        if dt.kind == "f":
            v = make_data(self.rng(k), self.shape, np.float64, self.axis, loc=self.loc, scale=self.scale)
            if self.quantized:  # ties and few distinct values (some channels may even be constant)
                v = np.round(v * 2) / 2
            return v.astype(dt)
        return make_data(self.rng(k), self.shape, dt, self.axis)


@st.composite
def cases(draw, min_per_channel=1):
    shape, axis = draw(shapes_axes(min_per_channel))
    dtype = draw(st.sampled_from(DTYPES))
    C = shape[axis % len(shape)]
    case = Case(shape=shape, axis=axis, C=C, M=int(np.prod(shape)) // C, dtype=dtype,
                seed=draw(st.integers(0, 2**32 - 1)), loc=draw(st.floats(-4.0, 4.0)),
                scale=draw(st.sampled_from([1.0, 0.1, 3.0])), quantized=draw(st.booleans()),
                x_layout=draw(layouts(len(shape))))
    note(f"case: {case}")
    # shown by pytest --hypothesis-show-statistics
    event(f"x dtype {dtype.str}")
    dense = case.x_layout.steps == (1,) * len(shape) and not any(case.x_layout.flips)
    event("x dense" if dense else "x strided")
    return case


def place(draw, case, values, what):
    """values in a drawn layout (x's own, or another)."""
    lay = case.x_layout if draw(st.booleans()) else draw(layouts(len(case.shape)))
    note(f"{what} layout: {lay}")
    return Placed(values, lay)


def vector(draw, values, what):
    """A per-channel vector as float64, float32 (values rounded to it first) or a list."""
    kind = draw(st.sampled_from(VEC_KINDS))
    note(f"{what}: {kind}")
    v = np.asarray(values, np.float64)
    if kind == "float32":
        return v.astype(np.float32)
    if kind == "list":
        return v.tolist()
    return v.copy()


def affine(draw, case, k):
    which = draw(st.sampled_from(["both", "none", "gamma", "beta"]))
    note(f"affine: {which}")
    g, b = params(case.rng(k), case.C, np.float64)
    gamma = vector(draw, g, "gamma") if which in ("gamma", "both") else None
    beta = vector(draw, b, "beta") if which in ("beta", "both") else None
    return gamma, beta


def running_stat(draw, values, what):
    """A (C,) running statistic updated in place: float32/float64, either byte order, maybe strided."""
    dt = draw(st.sampled_from(STAT_DTYPES))
    step = draw(st.sampled_from([1, 2, -1]))
    note(f"{what}: dtype {dt.str}, step {step}")
    C = len(values)
    buf = np.full(C * abs(step), np.nan, dt)
    r = buf[::step] if step > 0 else buf[::-1]
    r[...] = values
    return r


def out_choice(draw, case, aliasable):
    """None, a new out array of the result dtype (either byte order, any layout), or the name of an
    input to alias (out=x, out=dy) whose dtype holds the result."""
    rdt = result_dtype(case.dtype)
    options = ["none", "new"] + [name for name, a in aliasable if np.dtype(a.dtype).type is rdt.type]
    choice = draw(st.sampled_from(options))
    note(f"out: {choice}")
    event(f"out={choice}")
    if choice == "none":
        return None, None
    if choice == "new":
        dt = rdt.newbyteorder(">") if (rdt.itemsize > 2 and draw(st.booleans())) else rdt
        p = Placed(np.zeros(case.shape, dt), draw(layouts(len(case.shape))))
        return p.arr, p
    return dict(aliasable)[choice], None


def representable(dtype, *refs):
    """Reject an example whose float64 reference results a float16 result cannot hold (sums over a
    channel, dgamma and dbeta, reach 65504 with a few thousand values): the cast to float16 makes them
    inf, and near that threshold whether a value rounds to inf is not a meaningful comparison."""
    if result_dtype(dtype).itemsize == 2:
        assume(all(float(np.max(np.abs(r), initial=0.0)) < 3e4 for r in refs))


def inputs(out, *arrays):
    """The arrays (lists and scalars as arrays; None dropped) a call must leave alone: all but out."""
    return [np.asarray(a) for a in arrays if a is not None and a is not out]


def check_out(got, out, placed, want, tol, what):
    if out is not None:
        assert got is out, f"{what}: must return out"
    assert got.shape == want.shape
    assert_close(got, want, tol, what)
    if placed is not None:
        placed.check_gaps(what)


# --------------------------------------------------------------------------------------------------
# the fused functions
# --------------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), case=cases(min_per_channel=2))
def test_forward_train(data, case):
    draw = data.draw
    px = Placed(case.values(), case.x_layout)
    x = px.arr
    gamma, beta = affine(draw, case, 1)
    rng = case.rng(2)
    rm0, rv0 = rng.standard_normal(case.C), rng.uniform(0.5, 2.0, case.C)
    rm = running_stat(draw, rm0, "running_mean") if draw(st.booleans()) else None
    rv = running_stat(draw, rv0, "running_var") if draw(st.booleans()) else None
    momentum = draw(st.floats(0.0, 1.0))
    eps = draw(st.sampled_from([1e-3, 1e-2, 0.5]))
    stats_dtype = draw(st.sampled_from([None, np.float64, np.float32, np.float16]))
    out, pout = out_choice(draw, case, [("x", x)])

    erm = None if rm is None else rm.astype(np.float64)
    erv = None if rv is None else rv.astype(np.float64)
    ey, emean, einvstd = ref.forward_train(x.copy(), gamma, beta, running_mean=erm, running_var=erv,
                                           momentum=momentum, eps=eps, axis=case.axis)
    keep = inputs(out, x, gamma, beta)
    before = snapshot(*keep)

    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, momentum=momentum,
                                       eps=eps, axis=case.axis, out=out, stats_dtype=stats_dtype)
    tol = TOL[result_dtype(case.dtype)]
    assert_result_dtype(y, case.dtype, "y")
    check_out(y, out, pout, ey, tol, "y")
    sdt = result_dtype(case.dtype) if stats_dtype is None else np.dtype(stats_dtype)
    stol = tol_for(case.dtype, sdt)
    for name, got, want in (("mean", mean, emean), ("invstd", invstd, einvstd)):
        assert got.dtype == sdt and got.shape == (case.C,), name
        assert_close(got, want, stol, name)
    for name, got, want in (("running_mean", rm, erm), ("running_var", rv, erv)):
        if got is not None:
            assert_close(got, want, tol_for(case.dtype, got.dtype), name)
    if out is None:
        assert not np.shares_memory(y, x)
    assert_unchanged(before, keep)
    px.check_gaps("forward_train")


@SETTINGS
@given(data=st.data(), case=cases())
def test_forward_infer(data, case):
    draw = data.draw
    px = Placed(case.values(), case.x_layout)
    x = px.arr
    gamma, beta = affine(draw, case, 1)
    rng = case.rng(2)
    rm = vector(draw, rng.standard_normal(case.C) * 2, "running_mean")
    rv = vector(draw, rng.uniform(0.0, 3.0, case.C), "running_var")
    eps = draw(st.sampled_from([1e-3, 1e-2, 0.5]))
    out, pout = out_choice(draw, case, [("x", x)])

    ey = ref.forward_infer(x.copy(), rm, rv, gamma, beta, eps=eps, axis=case.axis)
    keep = inputs(out, x, rm, rv, gamma, beta)
    before = snapshot(*keep)
    y = bn.forward_infer(x, rm, rv, gamma, beta, eps=eps, axis=case.axis, out=out)
    assert_result_dtype(y, case.dtype, "y")
    check_out(y, out, pout, ey, TOL[result_dtype(case.dtype)], "y")
    assert_unchanged(before, keep)
    px.check_gaps("forward_infer")


@SETTINGS
@given(data=st.data(), case=cases())
def test_backward(data, case):
    draw = data.draw
    training = draw(st.booleans())
    px = Placed(case.values(), case.x_layout)
    x = px.arr
    dy_dtype = case.dtype if draw(st.booleans()) else draw(st.sampled_from(DTYPES))
    note(f"training={training}, dy dtype {dy_dtype.str}")
    pdy = place(draw, case, case.values(dy_dtype, k=3), "dy")
    dy = pdy.arr
    gamma, _ = affine(draw, case, 1)
    rdt = result_dtype(case.dtype)
    if training:  # the batch's own statistics, as forward_train returns them
        _, mean, invstd = ref.forward_train(x, eps=draw(st.sampled_from([1e-3, 1e-2, 0.5])), axis=case.axis)
        mean, invstd = mean.astype(rdt), invstd.astype(rdt)
    else:
        rng = case.rng(2)
        mean = rng.standard_normal(case.C).astype(rdt)
        invstd = rng.uniform(0.1, 3.0, case.C).astype(rdt)
    out, pout = out_choice(draw, case, [("dy", dy), ("x", x)])

    edx, edgamma, edbeta = ref.backward(dy.copy(), x.copy(), mean, invstd, gamma, training=training,
                                        axis=case.axis)
    representable(case.dtype, edx)  # dgamma and dbeta of float16 input are float32
    keep = inputs(out, dy, x, mean, invstd, gamma)
    before = snapshot(*keep)
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=case.axis, out=out)
    tol = TOL[rdt]
    assert_result_dtype(dx, case.dtype, "dx")
    assert dgamma.dtype == dbeta.dtype == grad_dtype(case.dtype), (dgamma.dtype, dbeta.dtype)
    check_out(dx, out, pout, edx, tol, "dx")
    assert dgamma.shape == dbeta.shape == (case.C,)
    assert_close(dgamma, edgamma, tol, "dgamma")
    assert_close(dbeta, edbeta, tol, "dbeta")
    assert_unchanged(before, keep)
    px.check_gaps("backward (x)")
    pdy.check_gaps("backward (dy)")


# --------------------------------------------------------------------------------------------------
# the phases
# --------------------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), case=cases())
def test_batch_stats_and_merge_stats(data, case):
    draw = data.draw
    px = Placed(case.values(), case.x_layout)
    x = px.arr
    before = snapshot(x)
    count, mean, m2 = bn.batch_stats(x, axis=case.axis)
    ecount, emean, em2 = ref.batch_stats(x, axis=case.axis)
    assert type(count) is int and count == ecount == case.M
    tol = TOL[result_dtype(case.dtype)]
    for name, got, want in (("mean", mean, emean), ("m2", m2, em2)):
        assert isinstance(got, np.ndarray) and got.dtype == F64 and got.shape == (case.C,), name
        assert_close(got, want, tol, name)
    assert_unchanged(before, [x])
    px.check_gaps("batch_stats")

    # x cut along a reduced axis into parts (some empty), each part's statistics merged in order
    ax = case.axis % len(case.shape)
    j = draw(st.sampled_from([k for k in range(len(case.shape)) if k != ax]))
    n = case.shape[j]
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    bounds = [0] + cuts + [n]
    parts = [bn.batch_stats(x[(slice(None),) * j + (slice(a, b),)], axis=case.axis)
             for a, b in zip(bounds[:-1], bounds[1:])]
    counts = [p[0] for p in parts]
    means = np.stack([p[1] for p in parts])
    m2s = np.stack([p[2] for p in parts])
    kind = draw(st.sampled_from(["list", "int64", "float64"]))
    note(f"split along axis {j} at {cuts}, counts {counts} as {kind}")
    c_arg = counts if kind == "list" else np.array(counts, dtype=kind)
    before = snapshot(means, m2s)
    mcount, mmean, mm2 = bn.merge_stats(c_arg, means, m2s)
    rcount, rmean, rm2 = ref.merge_stats(np.array(counts), means, m2s)
    assert type(mcount) is int and mcount == rcount == case.M
    for name, got, want in (("merged mean", mmean, rmean), ("merged m2", mm2, rm2)):
        assert got.dtype == F64 and got.shape == (case.C,), name
        assert_close(got, want, 1e-12, name)
    # and the merge is the whole batch's statistics
    assert_close(mmean, emean, TOL[F64], "merged mean vs whole")
    assert_close(mm2, em2, TOL[F64], "merged m2 vs whole")
    assert_unchanged(before, [means, m2s])


@SETTINGS
@given(data=st.data(), case=cases())
def test_normalize(data, case):
    draw = data.draw
    px = Placed(case.values(), case.x_layout)
    x = px.arr
    gamma, beta = affine(draw, case, 1)
    rng = case.rng(2)
    mean = vector(draw, rng.standard_normal(case.C) * 2, "mean")
    invstd = vector(draw, rng.uniform(0.1, 3.0, case.C), "invstd")
    out, pout = out_choice(draw, case, [("x", x)])
    ey = ref.normalize(x.copy(), mean, invstd, gamma, beta, axis=case.axis)
    keep = inputs(out, x, mean, invstd, gamma, beta)
    before = snapshot(*keep)
    y = bn.normalize(x, mean, invstd, gamma, beta, axis=case.axis, out=out)
    assert_result_dtype(y, case.dtype, "y")
    check_out(y, out, pout, ey, TOL[result_dtype(case.dtype)], "normalize")
    assert_unchanged(before, keep)
    px.check_gaps("normalize")


@SETTINGS
@given(data=st.data(), case=cases())
def test_backward_reduce_and_apply(data, case):
    draw = data.draw
    px = Placed(case.values(), case.x_layout)
    x = px.arr
    dy_dtype = case.dtype if draw(st.booleans()) else draw(st.sampled_from(DTYPES))
    note(f"dy dtype {dy_dtype.str}")
    pdy = place(draw, case, case.values(dy_dtype, k=3), "dy")
    dy = pdy.arr
    rdt = result_dtype(case.dtype)
    _, bmean, binvstd = ref.forward_train(x, eps=draw(st.sampled_from([1e-3, 1e-2, 0.5])), axis=case.axis)
    mean = vector(draw, bmean, "mean")
    invstd = vector(draw, binvstd, "invstd")
    tol = TOL[rdt]

    keep = inputs(None, dy, x, mean)
    before = snapshot(*keep)
    s1, s2 = bn.backward_reduce(dy, x, mean, axis=case.axis)
    e1, e2 = ref.backward_reduce(dy, x, mean, axis=case.axis)
    for name, got, want in (("sum_dy", s1, e1), ("sum_dy_xmu", s2, e2)):
        assert isinstance(got, np.ndarray) and got.dtype == F64 and got.shape == (case.C,), name
        assert_close(got, want, tol, name)
    assert_unchanged(before, keep)

    # apply with this part's sums, or with the sums of a bigger batch this is a part of
    mult = draw(st.integers(1, 3))
    count = case.M * mult
    if mult > 1:
        rng = case.rng(4)
        s1 = s1 + rng.standard_normal(case.C) * np.sqrt(count)
        s2 = s2 + rng.standard_normal(case.C) * np.sqrt(count)
    gamma, _ = affine(draw, case, 5)
    count_arg = draw(st.sampled_from([count, float(count), np.int64(count)]))
    out, pout = out_choice(draw, case, [("dy", dy), ("x", x)])
    edx = ref.backward_apply(dy.copy(), x.copy(), mean, invstd, gamma, s1, s2, count, axis=case.axis)
    representable(case.dtype, edx)
    keep = inputs(out, dy, x, mean, invstd, gamma, s1, s2)
    before = snapshot(*keep)
    dx = bn.backward_apply(dy, x, mean, invstd, gamma, s1, s2, count_arg, axis=case.axis, out=out)
    assert_result_dtype(dx, case.dtype, "dx")
    check_out(dx, out, pout, edx, tol, "backward_apply")
    assert_unchanged(before, keep)
    px.check_gaps("backward_apply (x)")
    pdy.check_gaps("backward_apply (dy)")


@SETTINGS
@given(data=st.data(), C=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_update_running_stats(data, C, seed):
    draw = data.draw
    rng = np.random.default_rng(seed)
    rm = running_stat(draw, rng.standard_normal(C), "running_mean") if draw(st.booleans()) else None
    rv = running_stat(draw, rng.uniform(0.5, 2.0, C), "running_var") if draw(st.booleans()) else None
    count = draw(st.integers(2, 10**6))
    mean = vector(draw, rng.standard_normal(C) * 3, "mean")
    m2 = vector(draw, rng.uniform(0.0, 4.0, C) * (count - 1), "m2")
    momentum = draw(st.floats(0.0, 1.0))
    count_arg = draw(st.sampled_from([count, float(count), np.int64(count)]))
    erm = None if rm is None else rm.astype(np.float64)
    erv = None if rv is None else rv.astype(np.float64)
    ref.update_running_stats(erm, erv, mean, m2, count, momentum=momentum)
    keep = inputs(None, mean, m2)
    before = snapshot(*keep)
    assert bn.update_running_stats(rm, rv, mean, m2, count_arg, momentum=momentum) is None
    for name, got, want in (("running_mean", rm, erm), ("running_var", rv, erv)):
        if got is not None:
            assert_close(got, want, TOL[np.dtype(got.dtype.type)], name)
    assert_unchanged(before, keep)
