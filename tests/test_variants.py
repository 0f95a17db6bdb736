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
from helpers import TOL, assert_close, make_data, numeric_grad

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
