"""Masked Batch Normalization (issue 10, section 3): forward_train, batch_stats and backward with mask=.

The mask is boolean, x's shape without the channel axis (broadcast), True at real positions. Each result
is checked against batchnorm.reference, against plain BN of the compacted real positions (x[mask], an
(M, C) batch) and, where torch is installed, against torch's BN of that compacted batch; gradients
against central finite differences; several layouts, float32/float64, thread counts, errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from helpers import TOL, as_layout, assert_close, assert_unchanged, make_data, numeric_grad, snapshot

C = 3

# (x shape, axis, mask shape): NCL with an (N, L) mask, NLC with axis=-1, NCHW with (N, H, W) and with a
# broadcastable (N, 1, W), 2-D (N, C) with an (N,) mask, and one long-row case (row-mode kernels).
CASES = [
    ((5, C, 7), 1, (5, 7)),
    ((5, 7, C), -1, (5, 7)),
    ((4, C, 5, 6), 1, (4, 5, 6)),
    ((4, C, 5, 6), 1, (4, 1, 6)),
    ((4, 5, 6, C), -1, (4, 5, 1)),
    ((9, C), 1, (9,)),
    ((3, C, 70), 1, (3, 70)),
    ((3, C, 70), 1, (70,)),
]
IDS = [f"{s}-ax{a}-m{m}" for s, a, m in CASES]


def make_mask(rng, shape, p=0.6):
    """A random mask with at least two True entries and at least one False one (when it has room)."""
    m = rng.random(shape) < p
    flat = m.reshape(-1)
    flat[:2] = True
    if flat.size > 2:
        flat[-1] = False
    return m


def compact(a, mask, axis):
    """The real positions of a as an (M, C) float64 batch: a[mask] with the channel axis last."""
    a = np.moveaxis(np.asarray(a, np.float64), axis, -1)
    return a[np.broadcast_to(mask, a.shape[:-1])]


def at_real(a, mask, axis):
    a = np.moveaxis(np.asarray(a), axis, -1)
    full = np.broadcast_to(mask, a.shape[:-1])
    return a[full], a[~full]


# ------------------------------------------------------------------------------------------------
# forward_train and batch_stats
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,mshape", CASES, ids=IDS)
def test_forward_train_matches_reference_and_compacted_bn(rng, shape, axis, mshape, dtype):
    x = make_data(rng, shape, dtype, axis=axis, loc=3.0)
    mask = make_mask(rng, mshape)
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(size=C)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    rm_r, rv_r = rm.astype(np.float64), rv.astype(np.float64)
    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis, mask=mask,
                                       stats_dtype=np.float64)
    ye, meane, invstde = ref.forward_train(x, gamma, beta, running_mean=rm_r, running_var=rv_r, axis=axis,
                                           mask=mask, stats_dtype=np.float64)
    tol = TOL[np.dtype(dtype)]
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ye, tol, "y")
    assert_close(mean, meane, 1e-12, "mean")
    assert_close(invstd, invstde, 1e-12, "invstd")
    assert_close(rm, rm_r, tol, "running_mean")
    assert_close(rv, rv_r, tol, "running_var")
    # independently: plain BN of the compacted batch, and exact zeros at the padding
    xc = compact(x, mask, axis)
    yc, meanc, invstdc = bn.forward_train(xc, gamma, beta, stats_dtype=np.float64)
    real, pad = at_real(y, mask, axis)
    assert_close(real, yc, tol, "y at real positions")
    assert np.all(pad == 0)
    assert_close(mean, meanc, 1e-12, "mean vs compacted")
    assert_close(invstd, invstdc, 1e-12, "invstd vs compacted")
    M = len(xc)
    assert_close(rv, 0.9 + 0.1 * xc.var(0, ddof=1), tol, "running_var unbiased with the mask's count")
    assert M == np.broadcast_to(mask, np.moveaxis(x, axis, -1).shape[:-1]).sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,mshape", CASES, ids=IDS)
def test_batch_stats_counts_only_real_positions(rng, shape, axis, mshape, dtype):
    x = make_data(rng, shape, dtype, axis=axis, loc=-2.0)
    mask = make_mask(rng, mshape)
    count, mean, m2 = bn.batch_stats(x, axis=axis, mask=mask)
    xc = compact(x, mask, axis)
    assert isinstance(count, int) and count == len(xc)
    assert_close(mean, xc.mean(0), 1e-12, "mean")
    assert_close(m2, ((xc - xc.mean(0)) ** 2).sum(0), 1e-11, "m2")
    ce, meane, m2e = ref.batch_stats(x, axis=axis, mask=mask)
    assert ce == count
    assert_close(mean, meane, 1e-12, "mean vs reference")
    assert_close(m2, m2e, 1e-11, "m2 vs reference")
    # the statistics forward_train normalized with, to the bit
    _, mean_t, invstd_t = bn.forward_train(x, axis=axis, mask=mask, stats_dtype=np.float64, eps=0.0)
    assert mean_t.tobytes() == mean.tobytes()
    assert_close(invstd_t, 1 / np.sqrt(m2 / count), 1e-14, "invstd from m2")


def test_masked_parts_merge_into_the_whole(rng):
    """batch_stats(mask=) of parts merged with merge_stats = the whole masked batch (SyncBN's route); a part
    of pure padding has count 0 and is skipped."""
    x = make_data(rng, (8, C, 6))
    mask = make_mask(rng, (8, 6))
    mask[4:6] = False
    parts = [bn.batch_stats(x[a:b], mask=mask[a:b]) for a, b in ((0, 4), (4, 6), (6, 8))]
    assert parts[1][0] == 0
    count, mean, m2 = bn.merge_stats([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
    cw, mw, m2w = bn.batch_stats(x, mask=mask)
    assert count == cw
    assert_close(mean, mw, 1e-13, "mean")
    assert_close(m2, m2w, 1e-12, "m2")


def test_padding_values_are_never_read(rng):
    """NaN and inf at padded positions change nothing: statistics, y and dx come from real positions."""
    x = make_data(rng, (4, C, 9))
    mask = make_mask(rng, (4, 9))
    dirty = x.copy()
    dirty[:, 0][~mask] = np.nan
    dirty[:, 1][~mask] = np.inf
    dy = make_data(rng, x.shape)
    ddy = dy.copy()
    ddy[:, 2][~mask] = np.nan
    clean = bn.forward_train(x, mask=mask)
    got = bn.forward_train(dirty, mask=mask)
    for a, b in zip(got, clean):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(bn.backward(ddy, dirty, got[1], got[2], mask=mask), bn.backward(dy, x, *clean[1:], mask=mask)):
        assert a.tobytes() == b.tobytes()


def test_all_true_mask_is_plain_bn(rng):
    x, dy = make_data(rng, (6, C, 5)), make_data(rng, (6, C, 5))
    mask = np.ones((6, 5), bool)
    y, mean, invstd = bn.forward_train(x, mask=mask, stats_dtype=np.float64)
    y0, mean0, invstd0 = bn.forward_train(x, stats_dtype=np.float64)
    assert_close(y, y0, 1e-14, "y")
    assert_close(mean, mean0, 1e-15, "mean")
    assert_close(invstd, invstd0, 1e-14, "invstd")
    for a, b in zip(bn.backward(dy, x, mean, invstd, mask=mask), bn.backward(dy, x, mean0, invstd0)):
        assert_close(a, b, 1e-13, "backward")


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,mshape", CASES, ids=IDS)
def test_backward_matches_reference_and_compacted_bn(rng, shape, axis, mshape, dtype, training):
    x = make_data(rng, shape, dtype, axis=axis, loc=1.0)
    dy = make_data(rng, shape, dtype, axis=axis)
    mask = make_mask(rng, mshape)
    gamma = rng.uniform(0.5, 2, C)
    _, mean, invstd = bn.forward_train(x, axis=axis, mask=mask, stats_dtype=np.float64)
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis, mask=mask)
    dxe, dgammae, dbetae = ref.backward(dy, x, mean, invstd, gamma, training=training, axis=axis, mask=mask)
    tol = TOL[np.dtype(dtype)]
    assert dx.dtype == dtype and dgamma.dtype == dtype and dbeta.dtype == dtype
    assert_close(dx, dxe, tol, "dx")
    assert_close(dgamma, dgammae, tol, "dgamma")
    assert_close(dbeta, dbetae, tol, "dbeta")
    xc, dyc = compact(x, mask, axis), compact(dy, mask, axis)
    dxc, dgc, dbc = bn.backward(dyc, xc, mean, invstd, gamma, training=training)
    real, pad = at_real(dx, mask, axis)
    assert_close(real, dxc, tol, "dx at real positions")
    assert np.all(pad == 0)
    assert_close(dgamma, dgc, tol, "dgamma vs compacted")
    assert_close(dbeta, dbc, tol, "dbeta vs compacted")


@pytest.mark.parametrize("shape,axis,mshape", [CASES[0], CASES[1], CASES[3]], ids=[IDS[0], IDS[1], IDS[3]])
def test_gradients_match_finite_differences(rng, shape, axis, mshape):
    """L = sum(w * forward_train(x, gamma, beta, mask)) differentiated numerically in float64: dx (0 at the
    padding, where x does not enter L), dgamma, dbeta."""
    x = make_data(rng, shape, axis=axis)
    mask = make_mask(rng, mshape)
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(size=C)
    w = rng.standard_normal(shape)

    def loss():
        return float(np.sum(w * bn.forward_train(x, gamma, beta, axis=axis, mask=mask)[0]))

    _, mean, invstd = bn.forward_train(x, gamma, beta, axis=axis, mask=mask)
    dx, dgamma, dbeta = bn.backward(w, x, mean, invstd, gamma, axis=axis, mask=mask)
    assert_close(dx, numeric_grad(loss, x, 1e-6), 1e-7, "dx")
    assert_close(dgamma, numeric_grad(loss, gamma, 1e-6), 1e-7, "dgamma")
    assert_close(dbeta, numeric_grad(loss, beta, 1e-6), 1e-7, "dbeta")


def test_matches_torch_on_the_compacted_batch(rng):
    """torch's idiom for masked BN: gather the real positions into an (M, C) batch, run BatchNorm1d on it."""
    torch = pytest.importorskip("torch")
    x = make_data(rng, (6, C, 11), loc=2.0)
    mask = make_mask(rng, (6, 11))
    w = rng.standard_normal(x.shape)
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(size=C)
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.3, mask=mask)
    dx, dgamma, dbeta = bn.backward(w, x, mean, invstd, gamma, mask=mask)

    tb = torch.nn.BatchNorm1d(C, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        tb.weight.copy_(torch.from_numpy(gamma))
        tb.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    mt = torch.from_numpy(mask)
    real = xt.permute(0, 2, 1)[mt]  # (M, C)
    yt = tb(real)
    full = torch.zeros(6, 11, C, dtype=torch.float64)
    full[mt] = yt
    full = full.permute(0, 2, 1)
    (full * torch.from_numpy(w)).sum().backward()
    assert_close(y, full.detach().numpy(), 1e-12, "y")
    assert_close(rm, tb.running_mean.numpy(), 1e-13, "running_mean")
    assert_close(rv, tb.running_var.numpy(), 1e-13, "running_var")
    assert_close(dx, xt.grad.numpy(), 1e-12, "dx")
    assert_close(dgamma, tb.weight.grad.numpy(), 1e-12, "dgamma")
    assert_close(dbeta, tb.bias.grad.numpy(), 1e-12, "dbeta")


# ------------------------------------------------------------------------------------------------
# layouts, out=, threads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["F", "T", "chlast", "chfirst", "step", "negall", "slice"])
def test_any_memory_layout(rng, layout):
    """x read in place in a permuted layout (the mask laid out to match: the positions are reduced in x's
    memory order, so the sums may round differently from C order's), or copied when it must be."""
    shape = (4, C, 5, 6)
    base = make_data(rng, shape, np.float32)
    dbase = make_data(rng, shape, np.float32)
    mask = make_mask(rng, (4, 5, 6))
    x, dy = as_layout(base, layout), as_layout(dbase, layout)
    tol = TOL[np.dtype(np.float32)]
    want = bn.forward_train(base, mask=mask, stats_dtype=np.float64)
    got = bn.forward_train(x, mask=mask, stats_dtype=np.float64)
    assert_close(got[0], want[0], tol, "y")
    assert_close(got[1], want[1], 1e-13, "mean")
    assert_close(got[2], want[2], 1e-13, "invstd")
    wantb = bn.backward(dbase, base, want[1], want[2], mask=mask)
    gotb = bn.backward(dy, x, got[1], got[2], mask=mask)
    for a, b in zip(gotb, wantb):
        assert_close(a, b, tol, "backward")
    wants = bn.batch_stats(base, mask=mask)
    gots = bn.batch_stats(x, mask=mask)
    assert gots[0] == wants[0]
    assert_close(gots[1], wants[1], 1e-13, "mean")
    assert_close(gots[2], wants[2], 1e-13, "m2")
    assert_close(gots[2], ref.batch_stats(base, mask=mask)[2], 1e-12, "m2 vs reference")


def test_non_contiguous_mask(rng):
    x = make_data(rng, (4, C, 6))
    big = make_mask(rng, (8, 12))
    mask = big[::2, ::2]
    for a, b in zip(bn.forward_train(x, mask=mask), bn.forward_train(x, mask=np.ascontiguousarray(mask))):
        assert a.tobytes() == b.tobytes()


def test_out_and_in_place(rng):
    x, dy = make_data(rng, (5, C, 4)), make_data(rng, (5, C, 4))
    mask = make_mask(rng, (5, 4))
    y, mean, invstd = bn.forward_train(x, mask=mask)
    out = np.full_like(x, np.nan, order="F")
    assert bn.forward_train(x, mask=mask, out=out)[0] is out
    assert np.array_equal(out, y)
    xc = x.copy()
    bn.forward_train(xc, mask=mask, out=xc)
    assert xc.tobytes() == y.tobytes()
    dx = bn.backward(dy, x, mean, invstd, mask=mask)[0]
    dyc = dy.copy()
    assert bn.backward(dyc, x, mean, invstd, mask=mask, out=dyc)[0] is dyc
    assert dyc.tobytes() == dx.tobytes()


@pytest.mark.parametrize("shape,mshape,axis", [((37, C, 40, 30), (37, 40, 30), 1),
                                               ((700, 60, 40), (700, 60), -1)])
def test_thread_count_does_not_change_bits(rng, restore_threads, shape, mshape, axis):
    x = make_data(rng, shape, np.float32, axis=axis)
    dy = make_data(rng, shape, np.float32, axis=axis)
    mask = make_mask(rng, mshape)
    results = []
    for n in (1, 2, 3):
        bn.set_num_threads(n)
        rm, rv = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
        y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, axis=axis, mask=mask)
        stats = bn.batch_stats(x, axis=axis, mask=mask)
        results.append([a.tobytes() for a in (y, mean, invstd, rm, rv, stats[1], stats[2])]
                       + [a.tobytes() for a in bn.backward(dy, x, mean, invstd, axis=axis, mask=mask)])
    assert results[0] == results[1] == results[2]


# ------------------------------------------------------------------------------------------------
# errors and edge cases
# ------------------------------------------------------------------------------------------------


def test_empty_batch_is_accepted(rng):
    x = np.zeros((0, C, 3))
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, mask=np.zeros((0, 3), bool))
    assert y.shape == x.shape and np.all(mean == 0) and np.all(invstd == 0)
    assert np.all(rm == 0) and np.all(rv == 1)
    assert bn.batch_stats(x, mask=np.zeros((0, 3), bool))[0] == 0


def test_batch_stats_and_backward_accept_a_mask_without_real_positions(rng):
    x, dy = make_data(rng, (3, C, 4)), make_data(rng, (3, C, 4))
    none = np.zeros((3, 4), bool)
    count, mean, m2 = bn.batch_stats(x, mask=none)
    assert count == 0 and np.all(mean == 0) and np.all(m2 == 0)
    dx, dgamma, dbeta = bn.backward(dy, x, np.zeros(C), np.ones(C), mask=none)
    assert np.all(dx == 0) and np.all(dgamma == 0) and np.all(dbeta == 0)


def _call_errors(rng):
    x = make_data(rng, (4, C, 5))
    dy = make_data(rng, x.shape)
    good = make_mask(rng, (4, 5))
    one = np.zeros((4, 5), bool)
    one[2, 3] = True
    return x, dy, good, [
        (dict(mask=np.ones((4, 6), bool)), ValueError, r"mask has shape \(4, 6\), expected a shape broadcastable to \(4, 5\)"),
        (dict(mask=np.ones((2, 4, 5), bool)), ValueError, "broadcastable"),
        (dict(mask=np.ones((4, C, 5), bool)), ValueError, "without its channel axis"),
        (dict(mask=good.astype(np.int8)), TypeError, "mask must be a boolean array"),
        (dict(mask=good.astype(float)), TypeError, "mask must be a boolean array"),
        (dict(mask=np.ones((4, 5), bool), ghost_batch_size=2), ValueError, "ghost_batch_size"),
        (dict(mask=np.ones((4, 5), bool), activation="relu"), ValueError, "activation"),
    ], one


def test_errors_change_nothing(rng):
    x, dy, good, cases, one = _call_errors(rng)
    rm, rv = np.zeros(C), np.ones(C)
    out = np.zeros_like(x)
    before = snapshot(x, rm, rv, out)
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            bn.forward_train(x, running_mean=rm, running_var=rv, out=out, **kw)
    with pytest.raises(ValueError, match="residual"):
        bn.forward_train(x, running_mean=rm, running_var=rv, mask=good, residual=x)
    for m, n in ((one, 1), (np.zeros((4, 5), bool), 0)):
        with pytest.raises(ValueError, match=f"more than 1 value per channel.*mask with {n} True position"):
            bn.forward_train(x, running_mean=rm, running_var=rv, out=out, mask=m)
    assert_unchanged(before, [x, rm, rv, out], ["x", "running_mean", "running_var", "out"])
    for kw, exc, match in cases[:5]:
        with pytest.raises(exc, match=match):
            bn.batch_stats(x, **kw)
    _, mean, invstd = bn.forward_train(x, mask=good)
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            bn.backward(dy, x, mean, invstd, out=out, **kw)
    with pytest.raises(ValueError, match="residual"):
        bn.backward(dy, x, mean, invstd, mask=good, residual=True)
    with pytest.raises(ValueError, match=r"dy has shape"):
        bn.backward(dy[:2], x, mean, invstd, mask=good)
    assert_unchanged(before, [x, rm, rv, out], ["x", "running_mean", "running_var", "out"])


def test_mask_none_is_no_mask(rng):
    x = make_data(rng, (4, C, 5))
    for a, b in zip(bn.forward_train(x, mask=None), bn.forward_train(x)):
        assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------


def _layer_state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_step_for_step_against_reference(rng, dtype, momentum):
    """Training steps of BatchNorm1d on padded (N, C, L) sequences: y, running statistics, dx and the
    parameter gradients as the reference computes them from the same mask."""
    layer = bn.BatchNorm1d(C, momentum=momentum, dtype=dtype)
    layer.weight[...] = rng.uniform(0.5, 2, C)
    layer.bias[...] = rng.normal(size=C)
    rm, rv = np.zeros(C), np.ones(C)
    tol = TOL[np.dtype(dtype)]
    for step in range(3):
        x = make_data(rng, (4, C, 6 + step), dtype, loc=1.0)
        lengths = rng.integers(1, 7 + step, size=4)
        lengths[0] = 6 + step
        mask = np.arange(6 + step) < lengths[:, None]  # (N, L): True within each sequence's length
        dy = make_data(rng, x.shape, dtype)
        mom = 1.0 / (step + 1) if momentum is None else momentum
        ye, mean, invstd = ref.forward_train(x, layer.weight, layer.bias, running_mean=rm, running_var=rv,
                                             momentum=mom, mask=mask, stats_dtype=np.float64)
        dxe, dge, dbe = ref.backward(dy, x, mean, invstd, layer.weight, mask=mask)
        y = layer(x, mask=mask)
        dx = layer.backward(dy)
        assert_close(y, ye, tol, "y")
        assert_close(layer.running_mean, rm, tol, "running_mean")
        assert_close(layer.running_var, rv, tol, "running_var")
        assert_close(dx, dxe, tol, "dx")
        assert_close(layer.grad_weight, dge, tol, "grad_weight")
        assert_close(layer.grad_bias, dbe, tol, "grad_bias")
        assert layer.num_batches_tracked == step + 1


def test_layer_gradients_match_finite_differences(rng):
    layer = bn.BatchNorm2d(C, dtype=np.float64)
    layer.weight[...] = rng.uniform(0.5, 2, C)
    layer.bias[...] = rng.normal(size=C)
    x = make_data(rng, (3, C, 4, 5))
    mask = make_mask(rng, (3, 1, 5))
    w = rng.standard_normal(x.shape)
    import copy

    snap = copy.deepcopy(layer)

    def loss():
        return float(np.sum(w * copy.deepcopy(snap)(x, mask=mask)))

    layer(x, mask=mask)
    dx = layer.backward(w)
    assert_close(dx, numeric_grad(loss, x, 1e-6), 1e-7, "dx")
    assert_close(layer.grad_weight, numeric_grad(loss, snap.weight, 1e-6), 1e-7, "grad_weight")
    assert_close(layer.grad_bias, numeric_grad(loss, snap.bias, 1e-6), 1e-7, "grad_bias")


def test_layer_eval_and_frozen_flags(rng):
    """Eval mode normalizes with the running statistics and zeroes the padding, and backward is the frozen
    gradient there; update_running_stats=True with use_batch_stats=False updates from the real positions."""
    x, dy = make_data(rng, (5, 4, C), loc=2.0, axis=-1), make_data(rng, (5, 4, C), axis=-1)
    mask = make_mask(rng, (5, 4))
    layer = bn.BatchNorm(C, axis=-1, dtype=np.float64)
    layer.running_mean[...] = rng.normal(size=C)
    layer.running_var[...] = rng.uniform(0.5, 2, C)
    layer.eval()
    y = layer(x, mask=mask)
    ye = ref.forward_infer(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=layer.eps, axis=-1)
    real, pad = at_real(y, mask, -1)
    assert_close(real, at_real(ye, mask, -1)[0], 1e-12, "y")
    assert np.all(pad == 0)
    invstd = 1 / np.sqrt(layer.running_var + layer.eps)
    dx = layer.backward(dy)
    real, pad = at_real(dx, mask, -1)
    assert_close(real, at_real(dy * layer.weight * invstd, mask, -1)[0], 1e-12, "frozen dx")
    assert np.all(pad == 0)
    assert_close(layer.grad_bias, compact(dy, mask, -1).sum(0), 1e-12, "grad_bias")

    layer.update_running_stats = True
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    layer(x, mask=mask)
    xc = compact(x, mask, -1)
    assert_close(layer.running_mean, 0.9 * rm + 0.1 * xc.mean(0), 1e-12, "running_mean")
    assert_close(layer.running_var, 0.9 * rv + 0.1 * xc.var(0, ddof=1), 1e-12, "running_var")
    assert layer.num_batches_tracked == 1


def test_layer_precise_stats_with_mask(rng):
    """precise_stats over masked batches: the exact statistics of the real positions seen."""
    layer = bn.BatchNorm1d(C, dtype=np.float64)
    batches = [(make_data(rng, (3, C, n), loc=1.5), make_mask(rng, (3, n))) for n in (5, 8)]
    with bn.precise_stats(layer):
        for x, mask in batches:
            y = layer(x, mask=mask)
            assert np.all(at_real(y, mask, 1)[1] == 0)
    seen = np.concatenate([compact(x, m, 1) for x, m in batches])
    assert_close(layer.running_mean, seen.mean(0), 1e-12, "running_mean")
    assert_close(layer.running_var, seen.var(0, ddof=1), 1e-12, "running_var")


def test_layer_errors_keep_state(rng):
    x = make_data(rng, (4, C, 5))
    layer = bn.BatchNorm1d(C)
    layer(x, mask=make_mask(rng, (4, 5)))
    layer.backward(np.ones_like(x))
    before = _layer_state(layer)
    grads = snapshot(layer.grad_weight, layer.grad_bias)
    cache = layer._cache
    one = np.zeros((4, 5), bool)
    one[0, 0] = True
    bad = [(dict(mask=np.ones((4, 6), bool)), ValueError, "broadcastable"),
           (dict(mask=np.ones((4, 5), np.int64)), TypeError, "boolean"),
           (dict(mask=one), ValueError, "more than 1 value per channel"),
           (dict(mask=np.ones((4, 5), bool), residual=x), ValueError, "residual")]
    for train in (True, False):
        layer.train(train)
        if not train:
            layer.update_running_stats = True
        for kw, exc, match in bad:
            if not train and match == "more than 1 value per channel":
                kw = dict(mask=np.zeros((4, 5), bool))
            with pytest.raises(exc, match=match):
                layer(x, **kw)
            after = _layer_state(layer)
            assert after.keys() == before.keys()
            for k in before:
                assert after[k].tobytes() == before[k].tobytes(), k
            assert layer._cache is cache
        layer.update_running_stats = None
    assert_unchanged(grads, [layer.grad_weight, layer.grad_bias])
    layer.train()
    for attr, value, match in (("activation", "relu", "activation"), ("ghost_batch_size", 2, "ghost_batch_size"),
                               ("renorm", True, "renorm")):
        other = bn.BatchNorm1d(C)
        setattr(other, attr, value)
        with pytest.raises(ValueError, match=match):
            other(x, mask=np.ones((4, 5), bool))
        assert other.num_batches_tracked == 0 and np.all(other.running_mean == 0)


def test_sync_batchnorm_of_one_process_is_masked_batchnorm(rng):
    from batchnorm.distributed import SyncBatchNorm

    class OneRank:  # a communicator of one process that must never be used here
        def Get_size(self):
            return 1

        def Get_rank(self):
            return 0

        def Allgather(self, *a):  # pragma: no cover
            raise AssertionError("communicated")

        allgather = Allgather

    layer = SyncBatchNorm(C, comm=OneRank())
    plain = bn.BatchNorm1d(C)
    x = make_data(rng, (4, C, 5))
    dy = make_data(rng, (4, C, 5))
    mask = make_mask(rng, (4, 5))
    np.testing.assert_array_equal(layer(x, mask=mask), plain(x, mask=mask))
    np.testing.assert_array_equal(layer.backward(dy), plain.backward(dy))
    np.testing.assert_array_equal(layer.running_var, plain.running_var)
    np.testing.assert_array_equal(layer.grad_weight, plain.grad_weight)
    layer.eval()  # local: the running statistics normalize, the padding is zeroed
    y = layer(x, mask=mask)
    assert np.all(at_real(y, mask, 1)[1] == 0)
    assert np.all(at_real(layer.backward(np.ones_like(x)), mask, 1)[1] == 0)


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.bool_])
def test_other_dtypes_follow_the_plain_rules(rng, dtype):
    """float16 computes in float32 and returns float16 (gradients' sums float32); integers and bool in
    float64: each as plain BN of the compacted batch."""
    x = make_data(rng, (6, C, 5), dtype)
    dy = make_data(rng, (6, C, 5), np.float64).astype(np.float16 if dtype == np.float16 else np.float64)
    mask = make_mask(rng, (6, 5))
    y, mean, invstd = bn.forward_train(x, mask=mask)
    ye, meane, invstde = ref.forward_train(x, mask=mask)
    want = np.float16 if dtype == np.float16 else np.float64
    assert y.dtype == want and mean.dtype == want
    tol = TOL[np.dtype(want)]
    assert_close(y, ye, tol, "y")
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, mask=mask)
    dxe, dge, dbe = ref.backward(dy, x, mean, invstd, mask=mask)
    assert dx.dtype == want and dgamma.dtype == (np.float32 if dtype == np.float16 else np.float64)
    assert_close(dx, dxe, tol, "dx")
    assert_close(dbeta, dbe, tol, "dbeta")


def test_channel_axis_zero(rng):
    x = make_data(rng, (C, 8), axis=0)
    mask = make_mask(rng, (8,))
    for a, b in zip(bn.forward_train(x, axis=0, mask=mask), ref.forward_train(x, axis=0, mask=mask)):
        assert_close(a, b, 1e-12, "axis 0")
    assert_close(at_real(bn.forward_train(x, axis=0, mask=mask)[0], mask, 0)[0],
                 bn.forward_train(compact(x, mask, 0))[0], 1e-12, "vs compacted")
