"""The BN variants of the layers and functions: frozen-BN flags, Batch Renormalization, Ghost BN.

Each is checked against its plain-NumPy twin in batchnorm.reference, its gradients against central finite
differences (float64), and against torch where a torch idiom reproduces it."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from helpers import LAYOUTS, TOL, as_layout, assert_close, layout_applies, make_data, numeric_grad

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
C = 3

# (layer class, channel axis, per-sample shape with the channels at that axis)
KINDS = {
    "1d": ("BatchNorm1d", 1, (C,)),
    "2d": ("BatchNorm2d", 1, (C, 2, 3)),
    "chlast": ("BatchNorm", -1, (4, C)),
}


def make_layer(kind, **kw):
    name, axis, _ = KINDS[kind]
    if name == "BatchNorm":
        kw["axis"] = axis
    return getattr(bn, name)(C, **kw)


def batch(rng, kind, n, dtype=np.float64):
    _, axis, rest = KINDS[kind]
    return make_data(rng, (n,) + rest, dtype, axis=axis)


def state(layer):
    """Everything about a layer a failed or frozen call must leave alone (copies)."""
    out = {}
    for k in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        v = getattr(layer, k)
        out[k] = None if v is None else v.copy()
    for k in ("num_batches_tracked", "training", "momentum", "use_batch_stats", "update_running_stats"):
        out[k] = getattr(layer, k)
    return out


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray) or isinstance(b[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), f"{k} changed"
        else:
            assert a[k] == b[k], f"{k}: {a[k]!r} != {b[k]!r}"


def randomize(layer, rng):
    """Non-default parameters and running statistics, so that mixing them up shows."""
    if layer.weight is not None:
        layer.weight[...] = rng.uniform(0.5, 2.0, C)
    if layer.bias is not None:
        layer.bias[...] = rng.normal(0, 1, C)
    if layer.running_mean is not None:
        layer.running_mean[...] = rng.normal(0, 1, C)
        layer.running_var[...] = rng.uniform(0.5, 3.0, C)
    return layer


def fd_check(layer, x, rng, tol=1e-6):
    """The layer's backward (dx, grad_weight, grad_bias) against central differences of
    L = sum(w * layer(x)), each evaluation on a fresh copy of the layer so that running statistics updated
    by a forward do not leak into the next one."""
    w = rng.standard_normal(x.shape)
    x = x.astype(np.float64).copy()
    snapshot = copy.deepcopy(layer)

    def loss():
        return float(np.sum(w * copy.deepcopy(snapshot)(x)))

    layer(x)
    dx = layer.backward(w)
    assert_close(dx, numeric_grad(loss, x, 1e-6), tol, "dx")
    for p, g in ((snapshot.weight, layer.grad_weight), (snapshot.bias, layer.grad_bias)):
        if p is not None:
            assert_close(g, numeric_grad(loss, p, 1e-6), tol, "parameter gradient")


# --------------------------------------------------------------------------------------------------
# frozen-BN flags
# --------------------------------------------------------------------------------------------------

# (use_batch_stats, update_running_stats, training) -> (normalizes with batch stats, updates)
FLAG_CASES = {
    "train-default": (None, None, True, True, True),
    "eval-default": (None, None, False, False, False),
    "train-batch-noupdate": (None, False, True, True, False),
    "train-frozen": (False, None, True, False, False),
    "eval-batch": (True, None, False, True, False),
    "eval-update": (None, True, False, False, True),
    "frozen-update": (False, True, True, False, True),
    "batch-update-eval": (True, True, False, True, True),
}


def torch_twin(torch, layer, ndim):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[ndim]
    t = cls(C, eps=layer.eps, momentum=layer.momentum, dtype=torch.float64)
    with torch.no_grad():
        t.weight.copy_(torch.tensor(layer.weight.astype(np.float64)))
        t.bias.copy_(torch.tensor(layer.bias.astype(np.float64)))
        t.running_mean.copy_(torch.tensor(layer.running_mean.astype(np.float64)))
        t.running_var.copy_(torch.tensor(layer.running_var.astype(np.float64)))
        t.num_batches_tracked.fill_(layer.num_batches_tracked)
    return t


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cma"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flags_match_torch_idiom(rng, case, kind, momentum, dtype):
    """Each combination against torch: batch statistics without update is training mode with momentum 0
    (whose num_batches_tracked still counts: ours does not); frozen statistics are eval mode; an update
    with frozen statistics is eval mode's y and gradient plus a training-mode forward's running
    statistics."""
    torch = pytest.importorskip("torch")
    use, update, training, uses_batch, updates = FLAG_CASES[case]
    _, axis, rest = KINDS[kind]
    layer = randomize(make_layer(kind, momentum=momentum, dtype=dtype, use_batch_stats=use,
                                 update_running_stats=update), rng).train(training)
    layer.num_batches_tracked = 4
    tol = TOL[np.dtype(dtype)]
    for step in range(3):
        t = torch_twin(torch, layer, 1 + len(rest))
        t_stats = torch_twin(torch, layer, 1 + len(rest))  # sees the batch in training mode, for the update
        x = batch(rng, kind, 4 + step, dtype)
        dy = batch(rng, kind, 4 + step, dtype)
        xt = torch.tensor(np.moveaxis(x.astype(np.float64), axis, 1), requires_grad=True)
        if uses_batch:
            t.momentum = 0.0
            t.train()
        else:
            t.eval()
        yt = t(xt)
        yt.backward(torch.tensor(np.moveaxis(dy.astype(np.float64), axis, 1)))
        with torch.no_grad():
            t_stats.train()(xt)
        count = layer.num_batches_tracked
        y = layer(x)
        dx = layer.backward(dy)
        assert layer.training is training
        assert y.dtype == dtype and dx.dtype == dtype
        assert_close(y, np.moveaxis(yt.detach().numpy(), 1, axis), tol, f"y, step {step}")
        assert_close(dx, np.moveaxis(xt.grad.numpy(), 1, axis), tol, f"dx, step {step}")
        assert_close(layer.grad_weight, t.weight.grad.numpy(), tol, "grad_weight")
        assert_close(layer.grad_bias, t.bias.grad.numpy(), tol, "grad_bias")
        want = t_stats if updates else t
        assert_close(layer.running_mean, want.running_mean.numpy(), tol, "running_mean")
        assert_close(layer.running_var, want.running_var.numpy(), tol, "running_var")
        assert layer.num_batches_tracked == count + updates


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flags_match_reference(rng, case):
    """The same combinations against the reference functions, in float64 to 1e-12."""
    use, update, training, uses_batch, updates = FLAG_CASES[case]
    layer = randomize(make_layer("2d", dtype=np.float64, use_batch_stats=use, update_running_stats=update),
                      rng).train(training)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    x, dy = batch(rng, "2d", 5), batch(rng, "2d", 5)
    y, dx = layer(x), layer.backward(dy)
    if uses_batch:
        y_ref, mean, invstd = ref.forward_train(x, layer.weight, layer.bias, eps=layer.eps)
    else:
        mean, invstd = rm, 1 / np.sqrt(rv + layer.eps)
        y_ref = ref.forward_infer(x, rm, rv, layer.weight, layer.bias, eps=layer.eps)
    dx_ref, dg_ref, db_ref = ref.backward(dy, x, mean, invstd, layer.weight, training=uses_batch)
    if updates:
        ref.forward_train(x, running_mean=rm, running_var=rv, momentum=layer.momentum)
    for got, want, what in ((y, y_ref, "y"), (dx, dx_ref, "dx"), (layer.grad_weight, dg_ref, "dgamma"),
                            (layer.grad_bias, db_ref, "dbeta"), (layer.running_mean, rm, "running_mean"),
                            (layer.running_var, rv, "running_var")):
        assert_close(got, want, 1e-12, what)


@pytest.mark.parametrize("case", ["train-frozen", "eval-batch", "frozen-update", "train-batch-noupdate"])
def test_flags_gradients_match_finite_differences(rng, case):
    use, update, training, _, _ = FLAG_CASES[case]
    layer = randomize(make_layer("2d", dtype=np.float64, use_batch_stats=use, update_running_stats=update),
                      rng).train(training)
    fd_check(layer, batch(rng, "2d", 3), rng)


def test_cumulative_average_counts_only_updating_forwards(rng):
    """momentum=None: the running mean is the plain mean of the batch means of the forwards that updated,
    and num_batches_tracked their number."""
    layer = bn.BatchNorm1d(C, momentum=None, dtype=np.float64)
    means = []
    for step, (use, update) in enumerate([(None, None), (None, False), (False, None), (None, None),
                                          (False, True), (True, False), (None, None)]):
        layer.use_batch_stats, layer.update_running_stats = use, update
        x = batch(rng, "1d", 4 + step)
        layer(x)
        if layer._updates_running_stats(layer._uses_batch_stats()):
            means.append(x.mean(axis=0))
    assert layer.num_batches_tracked == len(means) == 4
    assert_close(layer.running_mean, np.mean(means, axis=0), 1e-13, "running_mean")


def test_flags_are_independent_of_train_eval():
    layer = bn.BatchNorm1d(C, use_batch_stats=False, update_running_stats=True)
    layer.train()
    assert layer.use_batch_stats is False and layer.update_running_stats is True
    layer.eval()
    assert layer.use_batch_stats is False and layer.update_running_stats is True
    assert "use_batch_stats=False" in repr(layer) and "update_running_stats=True" in repr(layer)
    assert "use_batch_stats" not in repr(bn.BatchNorm1d(C))


@pytest.mark.parametrize("name", ["use_batch_stats", "update_running_stats"])
@pytest.mark.parametrize("bad", [1, 0, "yes", 1.0, np.array([True])])
def test_flag_types_are_checked(name, bad):
    layer = bn.BatchNorm1d(C)
    with pytest.raises(TypeError, match=name):
        setattr(layer, name, bad)
    assert getattr(layer, name) is None
    with pytest.raises(TypeError, match=name):
        bn.BatchNorm1d(C, **{name: bad})
    setattr(layer, name, np.bool_(True))
    assert getattr(layer, name) is True


def test_flags_without_running_stats():
    """Without running statistics there is nothing to normalize with or to update: refused, with the
    reason; the layer keeps its value. The other values are accepted and mean what they say."""
    with pytest.raises(ValueError, match="use_batch_stats=False.*track_running_stats=False"):
        bn.BatchNorm1d(C, track_running_stats=False, use_batch_stats=False)
    with pytest.raises(ValueError, match="update_running_stats=True.*track_running_stats=False"):
        bn.BatchNorm1d(C, track_running_stats=False, update_running_stats=True)
    layer = bn.BatchNorm1d(C, track_running_stats=False, use_batch_stats=True, update_running_stats=False)
    with pytest.raises(ValueError):
        layer.use_batch_stats = False
    with pytest.raises(ValueError):
        layer.update_running_stats = True
    assert layer.use_batch_stats is True and layer.update_running_stats is False
    x = np.arange(12.0).reshape(4, C)
    layer.eval()
    assert_close(layer(x), ref.forward_train(x)[0], 1e-6)
    assert layer.num_batches_tracked is None


@pytest.mark.parametrize("protocol", ["pickle", "deepcopy"])
def test_flags_round_trip_as_attributes_not_state_dict_keys(rng, protocol):
    layer = make_layer("2d", use_batch_stats=True, update_running_stats=False).eval()
    layer(batch(rng, "2d", 3, np.float32))
    clone = pickle.loads(pickle.dumps(layer)) if protocol == "pickle" else copy.deepcopy(layer)
    assert clone.use_batch_stats is True and clone.update_running_stats is False
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    x = batch(rng, "2d", 4, np.float32)
    assert layer(x).tobytes() == clone(x).tobytes()
    assert_same_state(state(layer), state(clone))
    # a layer pickled before the flags existed loads with both None
    old = layer.__getstate__()
    for key in ("_use_batch_stats", "_update_running_stats", "_cache_extra"):
        del old[key]
    fresh = bn.BatchNorm2d.__new__(bn.BatchNorm2d)
    fresh.__setstate__(old)
    assert fresh.use_batch_stats is None and fresh.update_running_stats is None
    fresh(x)


def test_failed_forward_with_flags_keeps_the_layer(rng):
    """A frozen-update forward that raises (one value per channel) changes nothing, and the earlier
    forward's cache still serves backward."""
    layer = randomize(bn.BatchNorm2d(C, use_batch_stats=False, update_running_stats=True), rng)
    twin = copy.deepcopy(layer)  # never sees the bad call
    x, dy = batch(rng, "2d", 3, np.float32), batch(rng, "2d", 3, np.float32)
    layer(x)
    twin(x)
    before = state(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(rng.standard_normal((1, C, 1, 1)))
    assert_same_state(before, state(layer))
    assert layer.backward(dy).tobytes() == twin.backward(dy).tobytes()
    assert_same_state(state(layer), state(twin))


def test_sync_batchnorm_conversion_keeps_flags():
    from batchnorm.distributed import SyncBatchNorm

    layer = bn.BatchNorm1d(C, use_batch_stats=True, update_running_stats=False)
    sync = SyncBatchNorm.from_layer(layer)
    assert sync.use_batch_stats is True and sync.update_running_stats is False
    back = sync.to_layer()
    assert back.use_batch_stats is True and back.update_running_stats is False


# --------------------------------------------------------------------------------------------------
# Batch Renormalization
# --------------------------------------------------------------------------------------------------

RENORM_SHAPES = {  # (shape, axis)
    "2d": ((6, C), 1),
    "3d": ((2, C, 5), 1),
    "4d-odd": ((3, C, 1, 7), 1),
    "chlast": ((2, 3, 4, C), -1),
    "one-sample": ((1, C, 9), 1),
}


def renorm_running(rng, C_, dtype=np.float64):
    """Running statistics that put some channels' r and d inside their bounds and some outside."""
    rm = np.array([0.0, 40.0, -3.0, 1.0][:C_] + [0.0] * max(0, C_ - 4), dtype)
    rv = np.array([1.0, 0.01, 90.0, 4.0][:C_] + [1.0] * max(0, C_ - 4), dtype)
    return rm, rv


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", list(RENORM_SHAPES))
def test_renorm_matches_reference(rng, shape, dtype):
    shape, axis = RENORM_SHAPES[shape]
    x = make_data(rng, shape, dtype, axis=axis)
    dy = make_data(rng, shape, dtype, axis=axis)
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(0, 1, C)
    rm, rv = renorm_running(rng, C)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    got = bn.forward_train_renorm(x, rm, rv, gamma, beta, rmax=2.0, dmax=1.5, momentum=0.3, eps=1e-3, axis=axis)
    want = ref.forward_train_renorm(x, rm_ref, rv_ref, gamma, beta, rmax=2.0, dmax=1.5, momentum=0.3, eps=1e-3,
                                    axis=axis)
    tol = TOL[np.dtype(dtype)]
    assert got[0].dtype == dtype and got[0].shape == x.shape
    for g, w, what in zip(got, want, ("y", "mean", "invstd", "r", "d")):
        assert_close(g, w, tol, what)
    # some channels clipped, some not: both branches are exercised
    r = got[3]
    assert np.any((r > 1 / 2.0) & (r < 2.0)) and np.any((r == 2.0) | (r == 0.5))
    assert np.any(np.abs(got[4]) == 1.5) and np.any(np.abs(got[4]) < 1.5)
    assert_close(rm, rm_ref, tol, "running_mean")
    assert_close(rv, rv_ref, tol, "running_var")
    _, mean, invstd, r, d = got
    bgot = bn.backward_renorm(dy, x, mean, invstd, r, d, gamma, axis=axis)
    bwant = ref.backward_renorm(dy, x, mean, invstd, r, d, gamma, axis=axis)
    for g, w, what in zip(bgot, bwant, ("dx", "dgamma", "dbeta")):
        assert g.dtype == dtype
        assert_close(g, w, tol, what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", ["3d", "4d-odd", "chlast"])
@pytest.mark.parametrize("epi", ["relu", "add", "add_relu"])
def test_renorm_fused_epilogue_matches_reference_and_masks_as_the_forward(rng, shape, dtype, epi):
    shape, axis = RENORM_SHAPES[shape]
    activation = "relu" if "relu" in epi else None
    x = make_data(rng, shape, dtype, axis=axis)
    dy = make_data(rng, shape, dtype, axis=axis)
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(0, 1, C)
    rm, rv = renorm_running(rng, C)
    kw = dict(rmax=2.0, dmax=1.5, eps=1e-3, axis=axis, update=False)
    plain = bn.forward_train_renorm(x, rm, rv, gamma, beta, **kw)
    # the residual cancels the plain output at some positions: ties at exactly 0 for the ReLU
    residual = None
    if "add" in epi:
        residual = np.array(make_data(rng, shape, dtype, axis=axis), order="C")
        residual.reshape(-1)[::3] = -plain[0].reshape(-1)[::3]
    got = bn.forward_train_renorm(x, rm, rv, gamma, beta, activation=activation, residual=residual, **kw)
    want = ref.forward_train_renorm(x, rm.copy(), rv.copy(), gamma, beta, activation=activation, residual=residual,
                                    **kw)
    tol = TOL[np.dtype(dtype)]
    y = got[0]
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, want[0], tol, "y")
    for g, p_ in zip(got[1:], plain[1:]):  # the statistics, r and d do not depend on the epilogue
        np.testing.assert_array_equal(g, p_)
    unfused = plain[0].astype(np.float64) + (0 if residual is None else residual)
    if activation:
        unfused = np.maximum(unfused, 0)
        assert np.any(y == 0) and np.any(y > 0)
    assert_close(y, unfused, tol, "y against the unfused composition")
    _, mean, invstd, r, d = got
    res_arg = residual if activation else (True if residual is not None else None)
    from_y = bn.backward_renorm(dy, x, mean, invstd, r, d, gamma, axis=axis, activation=activation,
                                residual=res_arg, y=y if activation else None)
    from_beta = bn.backward_renorm(dy, x, mean, invstd, r, d, gamma, axis=axis, activation=activation,
                                   residual=res_arg, beta=beta if activation else None)
    bwant = ref.backward_renorm(dy, x, mean, invstd, r, d, gamma, axis=axis, activation=activation,
                                residual=res_arg, y=y if activation else None)
    assert len(from_y) == len(bwant) == (4 if residual is not None else 3)
    g = np.where(y > 0, dy, 0).astype(dtype) if activation else dy
    plain_b = bn.backward_renorm(g, x, mean, invstd, r, d, gamma, axis=axis)
    for i, what in enumerate(("dx", "dgamma", "dbeta", "d_residual")[:len(from_y)]):
        np.testing.assert_array_equal(from_beta[i], from_y[i], err_msg=f"{what}: mask from beta= and from y=")
        assert_close(from_y[i], bwant[i], tol, what)
        np.testing.assert_array_equal(from_y[i], g if i == 3 else plain_b[i], err_msg=f"{what} vs unfused")


def test_renorm_relu_mask_from_beta_is_the_forwards_at_exact_ties(rng):
    """A residual of minus the plain output makes the fused forward's pre-activation exactly 0 (float64:
    the same arithmetic); the backward's mask recomputed with beta= must say "not > 0" there too, which
    needs the forward's own coefficients to the last bit (r and d inside their bounds, so rounded)."""
    C_ = 16
    x = rng.normal(0.5, 2.0, (64, C_))
    dy = rng.normal(size=x.shape)
    gamma, beta = rng.uniform(0.5, 2, C_), rng.normal(0, 1, C_)
    rm, rv = rng.normal(0, 0.3, C_), rng.uniform(2, 6, C_)
    kw = dict(rmax=10.0, dmax=10.0, update=False)
    plain = bn.forward_train_renorm(x, rm, rv, gamma, beta, **kw)
    y, mean, invstd, r, d = bn.forward_train_renorm(x, rm, rv, gamma, beta, activation="relu", residual=-plain[0],
                                                    **kw)
    assert np.all(y == 0)
    from_y = bn.backward_renorm(dy, x, mean, invstd, r, d, gamma, activation="relu", residual=-plain[0], y=y)
    from_beta = bn.backward_renorm(dy, x, mean, invstd, r, d, gamma, activation="relu", residual=-plain[0],
                                   beta=beta)
    np.testing.assert_array_equal(from_y[3], np.zeros_like(dy))
    for a, b, what in zip(from_beta, from_y, ("dx", "dgamma", "dbeta", "d_residual")):
        np.testing.assert_array_equal(a, b, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_renorm_layer_with_activation_and_residual(rng, dtype):
    x = make_data(rng, (8, C, 5), dtype)
    res = make_data(rng, (8, C, 5), dtype)
    dy = make_data(rng, (8, C, 5), dtype)
    fused = bn.BatchNorm1d(C, renorm=True, rmax=2.0, dmax=1.5, activation="relu", dtype=dtype)
    plain = bn.BatchNorm1d(C, renorm=True, rmax=2.0, dmax=1.5, dtype=dtype)
    for layer in (fused, plain):
        layer.running_mean[:], layer.running_var[:] = renorm_running(rng, C)
        layer.weight[:] = np.linspace(0.5, 2, C)
        layer.bias[:] = np.linspace(-1, 1, C)
    y = fused(x, residual=res)
    y_plain = plain(x)
    np.testing.assert_array_equal(fused.running_mean, plain.running_mean)
    np.testing.assert_array_equal(fused.running_var, plain.running_var)
    assert_close(y, np.maximum(y_plain.astype(np.float64) + res, 0), TOL[np.dtype(dtype)], "y")
    dx, dres = fused.backward(dy)
    g = np.where(y > 0, dy, 0).astype(dtype)
    np.testing.assert_array_equal(dres, g)
    np.testing.assert_array_equal(dx, plain.backward(g))
    np.testing.assert_array_equal(fused.grad_weight, plain.grad_weight)
    np.testing.assert_array_equal(fused.grad_bias, plain.grad_bias)
    assert "renorm=True" in repr(fused) and "relu" in repr(fused)


def test_renorm_gradient_matches_finite_differences_with_r_d_constant(rng):
    x = make_data(rng, (4, C, 3))
    w = rng.standard_normal(x.shape)
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(0, 1, C)
    rm, rv = renorm_running(rng, C)
    _, mean, invstd, r, d = bn.forward_train_renorm(x, rm, rv, gamma, beta, rmax=2.0, dmax=1.5, update=False)
    shape = (1, C, 1)

    def loss():  # r and d held at the values of the forward being differentiated
        _, m, s = bn.forward_train(x, eps=1e-5, stats_dtype=np.float64)
        xhat = (x - m.reshape(shape)) * s.reshape(shape)
        y = gamma.reshape(shape) * (xhat * r.reshape(shape) + d.reshape(shape)) + beta.reshape(shape)
        return float(np.sum(w * y))

    dx, dgamma, dbeta = bn.backward_renorm(w, x, mean, invstd, r, d, gamma)
    assert_close(dx, numeric_grad(loss, x, 1e-6), 1e-7, "dx")
    assert_close(dgamma, numeric_grad(loss, gamma, 1e-6), 1e-7, "dgamma")
    assert_close(dbeta, numeric_grad(loss, beta, 1e-6), 1e-7, "dbeta")


def test_renorm_with_unit_bounds_is_plain_training_bn(rng):
    x, dy = make_data(rng, (5, C, 2)), make_data(rng, (5, C, 2))
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(0, 1, C)
    rm, rv = renorm_running(rng, C)
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd, r, d = bn.forward_train_renorm(x, rm, rv, gamma, beta, rmax=1, dmax=0)
    assert np.all(r == 1) and np.all(d == 0)
    y0, mean0, invstd0 = bn.forward_train(x, gamma, beta, running_mean=rm2, running_var=rv2, stats_dtype=np.float64)
    assert y.tobytes() == y0.tobytes() and mean.tobytes() == mean0.tobytes()
    assert rm.tobytes() == rm2.tobytes() and rv.tobytes() == rv2.tobytes()
    got, want = bn.backward_renorm(dy, x, mean, invstd, r, d, gamma), bn.backward(dy, x, mean0, invstd0, gamma)
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_renorm_layer_step_for_step_against_reference(rng, kind, dtype):
    """Training steps (rmax/dmax ramped between them, momentum None on some), an eval step (ordinary BN
    with the running statistics) and an eval-mode step with use_batch_stats=True (renormalized, no
    update), against the reference functions."""
    _, axis, _ = KINDS[kind]
    layer = randomize(make_layer(kind, renorm=True, rmax=1.0, dmax=0.0, dtype=dtype), rng)
    rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
    tol = TOL[np.dtype(dtype)]
    steps = [(True, None, 1.5, 0.5), (True, None, 2.0, 1.0), (False, None, 3.0, 5.0), (False, True, 3.0, 5.0),
             (True, None, 3.0, 5.0)]
    for step, (training, use, rmax, dmax) in enumerate(steps):
        layer.train(training)
        layer.use_batch_stats = use
        layer.rmax, layer.dmax = rmax, dmax
        x, dy = batch(rng, kind, 3 + step, dtype), batch(rng, kind, 3 + step, dtype)
        count = layer.num_batches_tracked
        y = layer(x)
        dx = layer.backward(dy)
        gamma, beta = layer.weight, layer.bias
        if training or use:
            y_ref, mean, invstd, r, d = ref.forward_train_renorm(x, rm, rv, gamma, beta, rmax=rmax, dmax=dmax,
                                                                 momentum=layer.momentum, eps=layer.eps,
                                                                 axis=axis, update=training)
            dx_ref, dg_ref, db_ref = ref.backward_renorm(dy, x, mean, invstd, r, d, gamma, axis=axis)
        else:
            y_ref = ref.forward_infer(x, rm, rv, gamma, beta, eps=layer.eps, axis=axis)
            dx_ref, dg_ref, db_ref = ref.backward(dy, x, rm, 1 / np.sqrt(rv + layer.eps), gamma, training=False,
                                                  axis=axis)
        what = f"step {step}"
        assert_close(y, y_ref, tol, f"y, {what}")
        assert_close(dx, dx_ref, tol, f"dx, {what}")
        assert_close(layer.grad_weight, dg_ref, tol, f"grad_weight, {what}")
        assert_close(layer.grad_bias, db_ref, tol, f"grad_bias, {what}")
        assert_close(layer.running_mean, rm, tol, f"running_mean, {what}")
        assert_close(layer.running_var, rv, tol, f"running_var, {what}")
        assert layer.num_batches_tracked == count + training
        rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
        # an SGD step so that the parameters move
        layer.weight -= np.asarray(0.1 * layer.grad_weight, dtype)
        layer.bias -= np.asarray(0.1 * layer.grad_bias, dtype)


def test_renorm_layer_gradients_match_finite_differences(rng):
    """The layer's gradient with r and d as constants: against central differences of a twin layer whose
    r and d are pinned (rmax = dmax bounds at the values of the forward, so clipping holds them)."""
    layer = randomize(bn.BatchNorm2d(C, renorm=True, dtype=np.float64, rmax=2.0, dmax=1.0), rng)
    x = batch(rng, "2d", 3)
    w = rng.standard_normal(x.shape)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    _, _, _, r, d = bn.forward_train_renorm(x, rm.copy(), rv.copy(), rmax=2.0, dmax=1.0, eps=layer.eps,
                                            update=False)
    layer(x)
    dx = layer.backward(w)
    shape = (1, C, 1, 1)

    def loss():
        _, m, s = bn.forward_train(x, eps=layer.eps, stats_dtype=np.float64)
        xhat = (x - m.reshape(shape)) * s.reshape(shape)
        y = layer.weight.reshape(shape) * (xhat * r.reshape(shape) + d.reshape(shape)) + layer.bias.reshape(shape)
        return float(np.sum(w * y))

    assert_close(dx, numeric_grad(loss, x, 1e-6), 1e-7, "dx")
    assert_close(layer.grad_weight, numeric_grad(loss, layer.weight, 1e-6), 1e-7, "grad_weight")
    assert_close(layer.grad_bias, numeric_grad(loss, layer.bias, 1e-6), 1e-7, "grad_bias")


def test_renorm_layer_without_affine(rng):
    layer = randomize(bn.BatchNorm1d(C, renorm=True, affine=False, dtype=np.float64), rng)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    x, dy = batch(rng, "1d", 5), batch(rng, "1d", 5)
    y, dx = layer(x), layer.backward(dy)
    y_ref, mean, invstd, r, d = ref.forward_train_renorm(x, rm, rv)
    assert_close(y, y_ref, 1e-12)
    assert_close(dx, ref.backward_renorm(dy, x, mean, invstd, r, d)[0], 1e-12)


def test_renorm_options_are_checked():
    with pytest.raises(ValueError, match="renorm=True needs running statistics"):
        bn.BatchNorm1d(C, renorm=True, track_running_stats=False)
    with pytest.raises(TypeError, match="renorm"):
        bn.BatchNorm1d(C, renorm=1)
    for name, bad, err in (("rmax", 0.5, ValueError), ("rmax", "3", TypeError), ("dmax", -1.0, ValueError),
                           ("dmax", float("nan"), ValueError), ("rmax", True, TypeError)):
        with pytest.raises(err, match=name):
            bn.BatchNorm1d(C, renorm=True, **{name: bad})
        layer = bn.BatchNorm1d(C, renorm=True)
        with pytest.raises(err, match=name):
            setattr(layer, name, bad)
        assert (layer.rmax, layer.dmax) == (3.0, 5.0)
    layer = bn.BatchNorm1d(C, renorm=True, rmax=2, dmax=np.float32(0.5))
    assert (layer.rmax, layer.dmax) == (2.0, 0.5) and type(layer.rmax) is float
    assert "renorm=True, rmax=2.0, dmax=0.5" in repr(layer)
    from batchnorm.distributed import SyncBatchNorm
    sync = SyncBatchNorm.from_layer(layer)
    assert sync.renorm and (sync.rmax, sync.dmax) == (2.0, 0.5) and "renorm=True" in repr(sync)
    back = sync.to_layer()
    assert type(back) is bn.BatchNorm1d and back.renorm and (back.rmax, back.dmax) == (2.0, 0.5)
    with pytest.raises(ValueError, match="rmax"):
        SyncBatchNorm(C, renorm=True, rmax=0.5)
    ghost = bn.BatchNorm1d(C, ghost_batch_size=2)
    with pytest.raises(ValueError, match="ghost_batch_size"):
        SyncBatchNorm.from_layer(ghost)


def test_renorm_functional_errors_change_nothing(rng):
    x = make_data(rng, (4, C))
    rm, rv = renorm_running(rng, C)
    out = np.zeros_like(x)
    before = rm.copy(), rv.copy(), out.copy()
    bad_calls = [
        (dict(rmax=0.9), ValueError, "rmax"),
        (dict(dmax=-0.1), ValueError, "dmax"),
        (dict(momentum=1.5), ValueError, "momentum"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(out=np.zeros((4, C), np.float32)), TypeError, "out"),
        (dict(update="yes"), TypeError, "update"),
        (dict(gamma=np.ones(C + 1)), ValueError, "gamma"),
    ]
    for kw, err, match in bad_calls:
        kw = dict(kw)
        gamma = kw.pop("gamma", None)
        with pytest.raises(err, match=match):
            bn.forward_train_renorm(x, rm, rv, gamma, out=kw.pop("out", out), **kw)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(before, (rm, rv, out))), kw
    with pytest.raises(ValueError, match="read-only"):
        ro = rv.copy()
        ro.flags.writeable = False
        bn.forward_train_renorm(x, rm, ro)
    with pytest.raises(TypeError, match="running_mean"):
        bn.forward_train_renorm(x, list(rm), rv)
    with pytest.raises(ValueError, match=r"running_var has shape \(5,\)"):
        bn.forward_train_renorm(x, rm, np.ones(5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn.forward_train_renorm(x[:1], rm, rv)
    assert rm.tobytes() == before[0].tobytes() and rv.tobytes() == before[1].tobytes()
    with pytest.raises(TypeError, match="running_mean must be a numpy.ndarray"):
        bn.forward_train_renorm(x, None, rv)
    with pytest.raises(TypeError, match="running_var is required"):  # renorm corrects towards it
        bn.forward_train_renorm(x, rm, None, update=False)
    # read-only or list running statistics are fine when they are not updated
    y = bn.forward_train_renorm(x, list(rm), tuple(rv), update=False)[0]
    assert_close(y, ref.forward_train_renorm(x, rm.copy(), rv.copy(), update=False)[0], 1e-12)


def test_renorm_empty_batch_and_failed_layer_forward(rng):
    rm, rv = renorm_running(rng, C)
    y, mean, invstd, r, d = bn.forward_train_renorm(np.zeros((0, C)), rm, rv)
    assert y.shape == (0, C) and np.all(r == 1) and np.all(d == 0)
    layer = randomize(bn.BatchNorm2d(C, renorm=True), rng)
    twin = copy.deepcopy(layer)
    x, dy = batch(rng, "2d", 3, np.float32), batch(rng, "2d", 3, np.float32)
    layer(x)
    twin(x)
    before = state(layer)
    for bad in (np.ones((1, C, 1, 1)), np.ones((3, C + 1, 2, 2))):
        with pytest.raises(ValueError):
            layer(bad)
        assert_same_state(before, state(layer))
    assert layer.backward(dy).tobytes() == twin.backward(dy).tobytes()
    layer(np.zeros((0, C, 2, 3), np.float32))
    assert layer.num_batches_tracked == before["num_batches_tracked"]


def test_renorm_layer_pickles_with_its_bounds(rng):
    layer = bn.BatchNorm1d(C, renorm=True, rmax=1.5, dmax=0.25)
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.renorm is True and (clone.rmax, clone.dmax) == (1.5, 0.25)
    x = batch(rng, "1d", 4, np.float32)
    assert layer(x).tobytes() == clone(x).tobytes()


# --------------------------------------------------------------------------------------------------
# Ghost Batch Normalization
# --------------------------------------------------------------------------------------------------

GHOST_CASES = {  # (shape, axis, ghost_batch_size)
    "2d-even": ((8, C), 1, 4),
    "2d-uneven": ((10, C), 1, 4),         # 4, 4, 2 samples
    "3d-last-one": ((7, C, 2), 1, 3),     # 3, 3, 1 samples (the last with 2 values per channel)
    "4d": ((5, C, 2, 3), 1, 2),
    "chlast": ((5, 2, 3, C), -1, 2),
    "ax2": ((4, 2, C), 2, 3),
    "one-chunk": ((4, C, 3), 1, 10),
    "per-sample": ((3, C, 4), 1, 1),
    "unit-batch-axis": ((1, C, 5), 1, 1),
}


def _ghost_case(rng, name, dtype, layout="C"):
    shape, axis, g = GHOST_CASES[name]
    x = as_layout(make_data(rng, shape, dtype, axis=axis), layout, axis)
    dy = as_layout(make_data(rng, shape, dtype, axis=axis), layout, axis)
    return x, dy, axis, g


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(GHOST_CASES))
def test_ghost_matches_reference(rng, name, dtype):
    x, dy, axis, g = _ghost_case(rng, name, dtype)
    gamma, beta = rng.uniform(0.5, 2, C), rng.normal(0, 1, C)
    rm, rv = rng.normal(0, 1, C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    tol = TOL[np.dtype(dtype)]
    y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, momentum=0.3, axis=axis,
                                       ghost_batch_size=g)
    y_ref, mean_ref, invstd_ref = ref.forward_train(x, gamma, beta, running_mean=rm_ref, running_var=rv_ref,
                                                    momentum=0.3, axis=axis, ghost_batch_size=g)
    K = -(-x.shape[0] // g)
    assert mean.shape == invstd.shape == (K, C) and mean.dtype == dtype
    assert y.dtype == dtype and y.shape == x.shape
    for got, want, what in ((y, y_ref, "y"), (mean, mean_ref, "mean"), (invstd, invstd_ref, "invstd"),
                            (rm, rm_ref, "running_mean"), (rv, rv_ref, "running_var")):
        assert_close(got, want, tol, what)
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, axis=axis, ghost_batch_size=g)
    want = ref.backward(dy, x, mean, invstd, gamma, axis=axis, ghost_batch_size=g)
    for got, w, what in zip((dx, dgamma, dbeta), want, ("dx", "dgamma", "dbeta")):
        assert got.dtype == dtype
        assert_close(got, w, tol, what)
    # frozen statistics per ghost batch work too
    got = bn.backward(dy, x, mean, invstd, gamma, training=False, axis=axis, ghost_batch_size=g)
    want = ref.backward(dy, x, mean, invstd, gamma, training=False, axis=axis, ghost_batch_size=g)
    for a, b in zip(got, want):
        assert_close(a, b, tol, "frozen")


def test_ghost_chunks_are_plain_bn_of_each_chunk(rng):
    """Each ghost batch's rows are forward_train/backward of that chunk alone, to the bit."""
    x, dy = make_data(rng, (7, C, 3)), make_data(rng, (7, C, 3))
    gamma = rng.uniform(0.5, 2, C)
    y, mean, invstd = bn.forward_train(x, gamma, ghost_batch_size=3, stats_dtype=np.float64)
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd, gamma, ghost_batch_size=3)
    sums = np.zeros(C), np.zeros(C)
    for k, start in enumerate(range(0, 7, 3)):
        yk, mk, sk = bn.forward_train(x[start:start + 3], gamma, stats_dtype=np.float64)
        assert yk.tobytes() == y[start:start + 3].tobytes()
        assert mk.tobytes() == mean[k].tobytes() and sk.tobytes() == invstd[k].tobytes()
        dxk, dgk, dbk = bn.backward(dy[start:start + 3], x[start:start + 3], mk, sk, gamma)
        assert dxk.tobytes() == dx[start:start + 3].tobytes()
        sums = sums[0] + dgk, sums[1] + dbk
    assert dgamma.tobytes() == sums[0].tobytes() and dbeta.tobytes() == sums[1].tobytes()


def test_ghost_running_statistics_follow_the_keras_rule(rng):
    """Moved once, towards the average over the chunks of their means and unbiased variances."""
    x = make_data(rng, (10, C, 2))
    rm, rv = np.zeros(C), np.ones(C)
    bn.forward_train(x, running_mean=rm, running_var=rv, momentum=0.25, ghost_batch_size=4)
    chunks = [x[0:4], x[4:8], x[8:10]]
    means = np.mean([np.moveaxis(c, 1, -1).reshape(-1, C).mean(0) for c in chunks], axis=0)
    unbiased = np.mean([np.moveaxis(c, 1, -1).reshape(-1, C).var(0, ddof=1) for c in chunks], axis=0)
    assert_close(rm, 0.25 * means, 1e-14)
    assert_close(rv, 0.75 + 0.25 * unbiased, 1e-14)


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "bcast"] + ["bcast"])
def test_ghost_any_layout(rng, layout):
    """Every memory layout gives the C-order bits (chunks along axis 0 that are not sub-blocks of the
    memory, as in Fortran order or x.T, are computed from one C-order copy)."""
    shape, axis, g = (7, C, 2, 3), 1, 3
    if not layout_applies(layout, shape, axis):
        pytest.skip("layout does not apply")
    base = make_data(rng, shape, np.float32, axis=axis)
    dbase = make_data(rng, shape, np.float32, axis=axis)
    x, dy = as_layout(base, layout, axis), as_layout(dbase, layout, axis)
    if layout == "bcast":
        base, dbase = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    want = bn.forward_train(base, ghost_batch_size=g)
    got = bn.forward_train(x, ghost_batch_size=g)
    for a, b in zip(got, want):
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    wantb = bn.backward(dbase, base, want[1], want[2], ghost_batch_size=g)
    gotb = bn.backward(dy, x, got[1], got[2], ghost_batch_size=g)
    for a, b in zip(gotb, wantb):
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def test_ghost_out_and_in_place(rng):
    x = make_data(rng, (6, C, 4))
    y, mean, invstd = bn.forward_train(x, ghost_batch_size=4)
    out = np.asfortranarray(np.zeros_like(x))
    assert bn.forward_train(x, ghost_batch_size=4, out=out)[0] is out
    assert np.array_equal(out, y)
    xc = x.copy()
    bn.forward_train(xc, ghost_batch_size=4, out=xc)
    assert xc.tobytes() == y.tobytes()
    dy = make_data(rng, x.shape)
    dx = bn.backward(dy, x, mean, invstd, ghost_batch_size=4)[0]
    dyc = dy.copy()
    assert bn.backward(dyc, x, mean, invstd, ghost_batch_size=4, out=dyc)[0] is dyc
    assert dyc.tobytes() == dx.tobytes()


def test_ghost_one_chunk_is_plain_bn(rng):
    x, dy = make_data(rng, (5, C, 3)), make_data(rng, (5, C, 3))
    rm, rv, rm2, rv2 = np.zeros(C), np.ones(C), np.zeros(C), np.ones(C)
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, ghost_batch_size=5)
    y0, mean0, invstd0 = bn.forward_train(x, running_mean=rm2, running_var=rv2)
    assert y.tobytes() == y0.tobytes() and mean[0].tobytes() == mean0.tobytes()
    assert rm.tobytes() == rm2.tobytes()
    assert_close(rv, rv2, 1e-15)
    for a, b in zip(bn.backward(dy, x, mean, invstd, ghost_batch_size=99), bn.backward(dy, x, mean0, invstd0)):
        assert a.tobytes() == b.tobytes()


def test_ghost_thread_count_does_not_change_bits(rng, restore_threads):
    x = make_data(rng, (37, C, 40, 30), np.float32)
    dy = make_data(rng, x.shape, np.float32)
    results = []
    for n in (1, 2, 3):
        bn.set_num_threads(n)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, ghost_batch_size=8)
        results.append([a.tobytes() for a in (y, mean, invstd, rm, rv)]
                       + [a.tobytes() for a in bn.backward(dy, x, mean, invstd, ghost_batch_size=8)])
    assert results[0] == results[1] == results[2]


def test_ghost_empty_batch(rng):
    x = np.zeros((0, C, 3))
    rm, rv = np.zeros(C), np.ones(C)
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, ghost_batch_size=2)
    assert y.shape == x.shape and mean.shape == invstd.shape == (0, C)
    assert np.all(rm == 0) and np.all(rv == 1)
    dx, dgamma, dbeta = bn.backward(x, x, mean, invstd, np.ones(C), ghost_batch_size=2)
    assert dx.shape == x.shape and np.all(dgamma == 0) and np.all(dbeta == 0)


def test_ghost_errors_change_nothing(rng):
    x = make_data(rng, (5, C))
    rm, rv = np.zeros(C), np.ones(C)
    out = np.zeros_like(x)
    before = rm.copy(), rv.copy(), out.copy()
    for g, err, match in ((0, ValueError, "ghost_batch_size must be None or a positive integer"),
                          (-3, ValueError, "ghost_batch_size"), (2.0, TypeError, "ghost_batch_size"),
                          (True, TypeError, "ghost_batch_size"), ("2", TypeError, "ghost_batch_size"),
                          (2, ValueError, "Expected more than 1 value per channel when training.*ghost batch 2")):
        with pytest.raises(err, match=match):
            bn.forward_train(x, running_mean=rm, running_var=rv, out=out, ghost_batch_size=g)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(before, (rm, rv, out))), g
    with pytest.raises(ValueError, match="axis 0 is the channel axis"):
        bn.forward_train(make_data(rng, (C, 6), axis=0), axis=0, ghost_batch_size=2)
    y, mean, invstd = bn.forward_train(x, ghost_batch_size=3)
    dy = make_data(rng, x.shape)
    for m, s, match in ((mean[0], invstd, r"mean has shape \(3,\), expected \(2, 3\): one row per ghost batch"),
                        (mean, invstd[:1], r"invstd has shape \(1, 3\), expected \(2, 3\)"),
                        (mean, invstd.astype(complex), "complex")):
        dxo = np.zeros_like(x)
        with pytest.raises((TypeError, ValueError), match=match):
            bn.backward(dy, x, m, s, ghost_batch_size=3, out=dxo)
        assert not dxo.any()
    with pytest.raises(ValueError, match=r"mean has shape \(2, 3\), expected \(3, 3\)"):
        bn.backward(dy, x, mean, invstd, ghost_batch_size=2)


def test_ghost_signature_and_docstrings():
    import inspect

    for f in (bn.forward_train, bn.backward):
        p = inspect.signature(f).parameters["ghost_batch_size"]
        assert p.kind == p.KEYWORD_ONLY and p.default is None
        assert "ghost_batch_size" in f.__doc__.split("Returns")[0]
    assert "unbiased variances" in bn.forward_train.__doc__


# -- the layer --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("momentum", [0.2, None], ids=["m0.2", "cma"])
def test_ghost_layer_step_for_step_against_reference(rng, kind, momentum):
    _, axis, _ = KINDS[kind]
    layer = randomize(make_layer(kind, ghost_batch_size=3, momentum=momentum, dtype=np.float64), rng)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    # sizes whose last ghost batch of 3 has at least 2 samples (the 1d kind has one value per sample)
    steps = [(True, None, None, 5), (True, None, None, 8), (False, None, None, 3), (True, False, True, 5),
             (False, True, False, 6)]
    updates = 0
    for step, (training, use, update, n) in enumerate(steps):
        layer.train(training)
        layer.use_batch_stats, layer.update_running_stats = use, update
        x, dy = batch(rng, kind, n), batch(rng, kind, n)
        y, dx = layer(x), layer.backward(dy)
        uses = training if use is None else use
        updates_now = (training and uses) if update is None else update
        mom = momentum if momentum is not None else 1 / (updates + 1)
        gamma, beta = layer.weight, layer.bias
        if uses:
            y_ref, mean, invstd = ref.forward_train(x, gamma, beta, running_mean=rm if updates_now else None,
                                                    running_var=rv if updates_now else None, momentum=mom,
                                                    eps=layer.eps, axis=axis, ghost_batch_size=3)
            g_ref = ref.backward(dy, x, mean, invstd, gamma, axis=axis, ghost_batch_size=3)
        else:
            y_ref = ref.forward_infer(x, rm, rv, gamma, beta, eps=layer.eps, axis=axis)
            g_ref = ref.backward(dy, x, rm, 1 / np.sqrt(rv + layer.eps), gamma, training=False, axis=axis)
            if updates_now:  # the frozen statistics update with the ghost rule too
                ref.forward_train(x, running_mean=rm, running_var=rv, momentum=mom, axis=axis, ghost_batch_size=3)
        updates += updates_now
        what = f"step {step}"
        for got, want, w in ((y, y_ref, "y"), (dx, g_ref[0], "dx"), (layer.grad_weight, g_ref[1], "dgamma"),
                             (layer.grad_bias, g_ref[2], "dbeta"), (layer.running_mean, rm, "running_mean"),
                             (layer.running_var, rv, "running_var")):
            assert_close(got, want, 1e-12, f"{w}, {what}")
        assert layer.num_batches_tracked == updates


def test_ghost_layer_gradients_match_finite_differences(rng):
    layer = randomize(bn.BatchNorm2d(C, ghost_batch_size=2, dtype=np.float64), rng)
    fd_check(layer, batch(rng, "2d", 5), rng)


def test_ghost_layer_float32_and_options(rng):
    layer = bn.BatchNorm(C, axis=-1, ghost_batch_size=3)
    x = batch(rng, "chlast", 7, np.float32)
    y = layer(x)
    assert y.dtype == np.float32
    assert_close(y, ref.forward_train(x, axis=-1, ghost_batch_size=3)[0], TOL[F32])
    assert layer.num_batches_tracked == 1
    assert "ghost_batch_size=3" in repr(layer)
    for bad, err in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match="ghost_batch_size"):
            layer.ghost_batch_size = bad
        with pytest.raises(err, match="ghost_batch_size"):
            bn.BatchNorm1d(C, ghost_batch_size=bad)
    assert layer.ghost_batch_size == 3
    layer.ghost_batch_size = np.int64(4)
    assert layer.ghost_batch_size == 4 and type(layer.ghost_batch_size) is int
    layer.ghost_batch_size = None
    with pytest.raises(ValueError, match="renorm"):
        bn.BatchNorm1d(C, renorm=True, ghost_batch_size=2)
    from batchnorm.distributed import SyncBatchNorm
    with pytest.raises(ValueError, match="Ghost"):
        SyncBatchNorm.from_layer(bn.BatchNorm1d(C, ghost_batch_size=2))
    clone = pickle.loads(pickle.dumps(bn.BatchNorm1d(C, ghost_batch_size=5)))
    assert clone.ghost_batch_size == 5


def test_ghost_layer_failed_forward_keeps_state(rng):
    layer = randomize(bn.BatchNorm1d(C, ghost_batch_size=2), rng)
    twin = copy.deepcopy(layer)
    x, dy = batch(rng, "1d", 4, np.float32), batch(rng, "1d", 4, np.float32)
    layer(x)
    twin(x)
    before = state(layer)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(batch(rng, "1d", 5, np.float32))  # the last ghost batch has one sample of one value
    assert_same_state(before, state(layer))
    layer.use_batch_stats, layer.update_running_stats = False, True
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(batch(rng, "1d", 5, np.float32))
    layer.use_batch_stats = layer.update_running_stats = None
    assert_same_state(before, state(layer))
    assert layer.backward(dy).tobytes() == twin.backward(dy).tobytes()
