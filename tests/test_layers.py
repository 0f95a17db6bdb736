"""The layer classes: BatchNorm (any channel axis) and BatchNorm1d/2d/3d, step for step against
torch.nn.BatchNorm*d where torch is importable, plus their own contract (attributes, modes,
state_dict, errors that leave the layer as it was)."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm import reference as ref
from helpers import TOL, as_layout, assert_close, make_data

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

# (name, channel axis, per-sample shape with channels at that position); the batch dim comes first.
KINDS = {
    "1d-2D": ("BatchNorm1d", 1, (5,)),
    "1d-3D": ("BatchNorm1d", 1, (5, 7)),
    "2d": ("BatchNorm2d", 1, (5, 4, 3)),
    "3d": ("BatchNorm3d", 1, (5, 3, 2, 3)),
    "generic-ax1": ("BatchNorm", 1, (5, 6)),
    "generic-ax-1": ("BatchNorm", -1, (4, 2, 5)),
    "generic-ax2": ("BatchNorm", 2, (3, 5, 4)),
}
C = 5


def make_layer(kind, num_features=C, **kw):
    name, axis, _ = KINDS[kind]
    cls = getattr(bn, name)
    if name == "BatchNorm":
        kw["axis"] = axis
    return cls(num_features, **kw)


def batch(rng, kind, n, dtype=np.float64):
    _, axis, rest = KINDS[kind]
    shape = (n,) + rest
    return make_data(rng, shape, dtype, axis=axis)


def torch_layer(torch, ndim, **kw):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[ndim]
    return cls(C, dtype=torch.float64, **kw)


def state(layer):
    """Everything a failed call must leave alone, as byte-exact copies."""
    def cp(a):
        return None if a is None else np.array(a, copy=True)
    return dict(weight=cp(layer.weight), bias=cp(layer.bias), running_mean=cp(layer.running_mean),
                running_var=cp(layer.running_var), num_batches_tracked=layer.num_batches_tracked,
                training=layer.training, grad_weight=cp(getattr(layer, "grad_weight", None)),
                grad_bias=cp(getattr(layer, "grad_bias", None)))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        u, v = a[k], b[k]
        if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
            assert isinstance(u, np.ndarray) and isinstance(v, np.ndarray), k
            assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), f"{k} changed"
        else:
            assert u == v, f"{k}: {u!r} != {v!r}"


# --------------------------------------------------------------------------------------------------
# step for step against torch
# --------------------------------------------------------------------------------------------------

MODES = [True, True, False, True, False, True, True]
SIZES = [4, 2, 3, 5, 3, 2, 6]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0], ids=["m0.1", "cma", "m0", "m1"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_matches_torch_step_for_step(rng, kind, affine, track, momentum, dtype):
    torch = pytest.importorskip("torch")
    name, axis, rest = KINDS[kind]
    eps = 1e-3
    layer = make_layer(kind, eps=eps, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    tl = torch_layer(torch, 1 + len(rest), eps=eps, momentum=momentum, affine=affine, track_running_stats=track)
    tol = TOL[np.dtype(dtype)]
    lr = 0.3
    for step, (training, n) in enumerate(zip(MODES, SIZES)):
        assert layer.train(training) is layer
        tl.train(training)
        assert layer.training is training
        x = batch(rng, kind, n, dtype)
        dy = batch(rng, kind, n, dtype)
        xt = torch.tensor(np.moveaxis(x.astype(np.float64), axis, 1), requires_grad=True)
        yt = tl(xt)
        y = layer(x) if step % 2 else layer.forward(x)
        what = f"step {step} ({'train' if training else 'eval'})"
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, np.moveaxis(yt.detach().numpy(), 1, axis), tol, f"y, {what}")
        if affine:
            tl.weight.grad = tl.bias.grad = None
        yt.backward(torch.tensor(np.moveaxis(dy.astype(np.float64), axis, 1)))
        dx = layer.backward(dy)
        assert dx.dtype == dtype and dx.shape == x.shape
        assert_close(dx, np.moveaxis(xt.grad.numpy(), 1, axis), tol, f"dx, {what}")
        if affine:
            assert_close(layer.grad_weight, tl.weight.grad.numpy(), tol, f"grad_weight, {what}")
            assert_close(layer.grad_bias, tl.bias.grad.numpy(), tol, f"grad_bias, {what}")
            # an SGD step, in place, on both
            layer.weight[...] -= lr * layer.grad_weight
            layer.bias[...] -= lr * layer.grad_bias
            with torch.no_grad():
                tl.weight -= lr * tl.weight.grad
                tl.bias -= lr * tl.bias.grad
        else:
            assert layer.weight is None and layer.bias is None
        if track:
            assert_close(layer.running_mean, tl.running_mean.numpy(), tol, f"running_mean, {what}")
            assert_close(layer.running_var, tl.running_var.numpy(), tol, f"running_var, {what}")
            assert layer.running_mean.dtype == dtype and layer.running_var.dtype == dtype
            assert isinstance(layer.num_batches_tracked, int)
            assert layer.num_batches_tracked == int(tl.num_batches_tracked), what
        else:
            assert layer.running_mean is None and layer.running_var is None


@pytest.mark.parametrize("layer_dtype,x_dtype", [(np.float32, np.float64), (np.float64, np.float32)],
                         ids=["layer32-x64", "layer64-x32"])
def test_input_dtype_other_than_layer_dtype(rng, layer_dtype, x_dtype):
    torch = pytest.importorskip("torch")
    layer = bn.BatchNorm2d(C, dtype=layer_dtype)
    tl = torch_layer(torch, 4)
    tol = TOL[F32]
    for training in (True, True, False):
        layer.train(training)
        tl.train(training)
        x = batch(rng, "2d", 3, x_dtype)
        dy = batch(rng, "2d", 3, x_dtype)
        xt = torch.tensor(x.astype(np.float64), requires_grad=True)
        yt = tl(xt)
        yt.backward(torch.tensor(dy.astype(np.float64)))
        y = layer(x)
        dx = layer.backward(dy)
        assert y.dtype == x_dtype and dx.dtype == x_dtype
        assert_close(y, yt.detach().numpy(), tol, "y")
        assert_close(dx, xt.grad.numpy(), tol, "dx")
        tl.weight.grad = tl.bias.grad = None
        assert layer.running_mean.dtype == layer_dtype and layer.weight.dtype == layer_dtype
        assert_close(layer.running_var, tl.running_var.numpy(), tol, "running_var")


def test_channels_last_memory_input_matches_torch(rng):
    torch = pytest.importorskip("torch")
    layer = bn.BatchNorm2d(C, dtype=np.float64)
    tl = torch_layer(torch, 4)
    for step in range(3):
        x = as_layout(batch(rng, "2d", 4), "chlast", 1)
        dy = as_layout(batch(rng, "2d", 4), "negall", 1)
        xt = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
        yt = tl(xt)
        yt.backward(torch.tensor(np.ascontiguousarray(dy)))
        assert_close(layer(x), yt.detach().numpy(), 1e-10, "y")
        assert_close(layer.backward(dy), xt.grad.numpy(), 1e-10, "dx")
        assert_close(layer.grad_weight, tl.weight.grad.numpy(), 1e-10)
        tl.weight.grad = tl.bias.grad = None
    assert_close(layer.running_var, tl.running_var.numpy(), 1e-10)


# --------------------------------------------------------------------------------------------------
# the layer's own contract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_initial_attributes(dtype):
    layer = bn.BatchNorm2d(17, dtype=dtype)
    assert layer.training is True
    assert isinstance(layer.num_batches_tracked, int) and layer.num_batches_tracked == 0
    for name, val in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        a = getattr(layer, name)
        assert isinstance(a, np.ndarray) and a.shape == (17,) and a.dtype == dtype, name
        assert np.all(a == val), name
    assert layer.gamma is layer.weight and layer.beta is layer.bias


def test_defaults_are_float32():
    layer = bn.BatchNorm(3)
    assert layer.weight.dtype == F32 and layer.running_mean.dtype == F32


def test_no_affine_no_tracking_attributes():
    layer = bn.BatchNorm1d(4, affine=False, track_running_stats=False)
    assert layer.weight is None and layer.bias is None
    assert layer.gamma is None and layer.beta is None
    assert layer.running_mean is None and layer.running_var is None


def test_train_eval_return_the_layer():
    layer = bn.BatchNorm3d(2)
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False
    assert layer.train(True) is layer and layer.training is True


def test_constructor_options_positional_in_pytorchs_order_then_keyword_only():
    layer = bn.BatchNorm1d(10, 1e-3, 0.3, False, True)
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.3, False, True)
    assert bn.BatchNorm2d(3, 1e-3, 0.1, True, True, "cpu", np.float64).dtype == F64
    with pytest.raises(TypeError):
        bn.BatchNorm(3, 1e-3, 0.1, True, True, None, np.float32, False)  # bias is keyword-only
    layer = bn.BatchNorm(3, eps=1e-3, momentum=None, affine=False, track_running_stats=True, axis=-1,
                         dtype=np.float64)
    assert layer.weight is None and layer.running_mean.dtype == F64
    assert layer.train(mode=False) is layer and layer.training is False


def test_repr_names_class_and_features():
    for cls in (bn.BatchNorm, bn.BatchNorm1d, bn.BatchNorm2d, bn.BatchNorm3d):
        r = repr(cls(17))
        assert cls.__name__ in r and "17" in r, r


@pytest.mark.parametrize("n", [0, -1, -5])
def test_num_features_below_one(n):
    for cls in (bn.BatchNorm, bn.BatchNorm1d, bn.BatchNorm2d, bn.BatchNorm3d):
        with pytest.raises(ValueError, match="num_features"):
            cls(n)


def test_num_features_not_integer():
    with pytest.raises((TypeError, ValueError), match="num_features"):
        bn.BatchNorm2d(2.5)


def test_eval_uses_running_stats_and_frozen_gradient(rng):
    layer = bn.BatchNorm1d(C, dtype=np.float64, eps=1e-4)
    layer.weight[...] = np.linspace(-1, 2, C)
    layer.bias[...] = np.linspace(0, 1, C)
    for _ in range(3):
        layer(batch(rng, "1d-3D", 4))
    layer.eval()
    x, dy = batch(rng, "1d-3D", 3), batch(rng, "1d-3D", 3)
    rm, rv = layer.running_mean.copy(), layer.running_var.copy()
    y = layer(x)
    assert_close(y, ref.forward_infer(x, rm, rv, layer.weight, layer.bias, eps=1e-4), 1e-10)
    dx = layer.backward(dy)
    invstd = 1 / np.sqrt(rv + 1e-4)
    edx, edg, edb = ref.backward(dy, x, rm, invstd, layer.weight, training=False)
    assert_close(dx, edx, 1e-10)
    assert_close(layer.grad_weight, edg, 1e-10)
    assert_close(layer.grad_bias, edb, 1e-10)
    assert layer.num_batches_tracked == 3
    assert np.array_equal(layer.running_mean, rm) and np.array_equal(layer.running_var, rv)


def test_eval_single_sample_is_fine(rng):
    layer = bn.BatchNorm1d(3).eval()
    y = layer(np.array([[1.0, 2.0, 3.0]], np.float32))
    assert_close(y, ref.forward_infer(np.array([[1.0, 2.0, 3.0]]), np.zeros(3), np.ones(3)), 1e-5)


def test_no_tracking_uses_batch_stats_in_eval(rng):
    layer = bn.BatchNorm2d(C, track_running_stats=False, dtype=np.float64).eval()
    x = batch(rng, "2d", 3)
    assert_close(layer(x), ref.forward_train(x)[0], 1e-10)


def test_cumulative_moving_average():
    layer = bn.BatchNorm1d(1, momentum=None, dtype=np.float64)
    means, vars_ = [], []
    for k, n in enumerate([2, 3, 4]):
        x = np.arange(n, dtype=np.float64).reshape(n, 1) * (k + 1)
        layer(x)
        means.append(x.mean())
        vars_.append(x.var(ddof=1))
    assert layer.num_batches_tracked == 3
    # running = mean of all batch stats, the initial value weighted out after the first batch
    assert_close(layer.running_mean, [np.mean(means)], 1e-12)
    assert_close(layer.running_var, [np.mean(vars_)], 1e-12)


def test_backward_uses_last_forward_and_overwrites_grads(rng):
    layer = bn.BatchNorm2d(C, dtype=np.float64)
    layer.weight[...] = np.linspace(0.5, 2, C)
    x1, x2, dy = batch(rng, "2d", 3), batch(rng, "2d", 3), batch(rng, "2d", 3)
    y1 = layer(x1)
    y1_copy = y1.copy()
    layer(x2)
    assert np.array_equal(y1, y1_copy), "the result of an earlier forward was overwritten"
    _, mean, invstd = ref.forward_train(x2)
    edx, edg, edb = ref.backward(dy, x2, mean, invstd, layer.weight)
    dx = layer.backward(dy)
    assert_close(dx, edx, 1e-10)
    assert_close(layer.grad_weight, edg, 1e-10)
    dx_copy, gw = dx.copy(), layer.grad_weight.copy()
    dx2 = layer.backward(dy)  # again: the same, nothing accumulates
    assert np.array_equal(dx2, dx_copy) and np.array_equal(dx, dx_copy), "an earlier dx was overwritten"
    assert np.array_equal(layer.grad_weight, gw), "grad_weight accumulated instead of being overwritten"
    assert_close(layer.grad_bias, edb, 1e-10)


def test_mode_switch_after_forward_keeps_that_forwards_gradient(rng):
    """Like autograd: the gradient is that of the forward that ran (here in training mode), even if
    eval() is called before backward."""
    layer = bn.BatchNorm1d(C, dtype=np.float64)
    x, dy = batch(rng, "1d-2D", 6), batch(rng, "1d-2D", 6)
    layer(x)
    layer.eval()
    dx = layer.backward(dy)
    _, mean, invstd = ref.forward_train(x)
    assert_close(dx, ref.backward(dy, x, mean, invstd, training=True)[0], 1e-10)


def test_forward_does_not_modify_input(rng):
    layer = bn.BatchNorm2d(C)
    x = batch(rng, "2d", 3, np.float32)
    x0 = x.copy()
    y = layer(x)
    assert np.array_equal(x, x0) and not np.shares_memory(x, y)
    dy = batch(rng, "2d", 3, np.float32)
    dy0 = dy.copy()
    layer.backward(dy)
    assert np.array_equal(dy, dy0)


def test_weights_edited_in_place_are_used(rng):
    layer = bn.BatchNorm1d(C, dtype=np.float64)
    layer.weight[...] = 2.0
    layer.bias[...] = -1.0
    x = batch(rng, "1d-2D", 4)
    assert_close(layer(x), 2.0 * ref.forward_train(x)[0] - 1.0, 1e-10)


def test_backward_before_forward_raises():
    layer = bn.BatchNorm1d(3)
    with pytest.raises(RuntimeError):
        layer.backward(np.ones((4, 3), np.float32))
    with pytest.raises((TypeError, ValueError)):
        layer(np.ones((4, 7), np.float32))  # wrong channel count ...
    with pytest.raises(RuntimeError):  # ... did not leave anything to differentiate
        layer.backward(np.ones((4, 3), np.float32))


# --------------------------------------------------------------------------------------------------
# ndim checks and calls that raise leave the layer as it was
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,bad_shapes", [
    ("BatchNorm1d", [(3,), (2, 3, 4, 5)]),
    ("BatchNorm2d", [(2, 3), (2, 3, 4), (2, 3, 4, 5, 6)]),
    ("BatchNorm3d", [(2, 3, 4), (2, 3, 4, 5), (2, 3, 4, 5, 6, 7)]),
])
def test_ndim_checks(rng, cls, bad_shapes):
    for shape in bad_shapes:
        layer = getattr(bn, cls)(3)
        before = state(layer)
        with pytest.raises(ValueError):
            layer(rng.standard_normal(shape).astype(np.float32))
        assert_same_state(before, state(layer))


def test_generic_layer_rejects_1d():
    with pytest.raises((TypeError, ValueError)):
        bn.BatchNorm(3)(np.ones(3, np.float32))


BAD_CALLS = {
    "wrong-channels": lambda rng: rng.standard_normal((4, C + 1, 3, 2)),
    "wrong-ndim": lambda rng: rng.standard_normal((4, C, 3)),
    "one-value-per-channel": lambda rng: rng.standard_normal((1, C, 1, 1)),
    "complex": lambda rng: rng.standard_normal((4, C, 3, 2)) + 1j,
}


@pytest.mark.parametrize("bad", list(BAD_CALLS))
def test_failed_forward_leaves_layer_unchanged(rng, bad):
    a, b = bn.BatchNorm2d(C), bn.BatchNorm2d(C)  # twins: b never sees the bad call
    x = batch(rng, "2d", 3, np.float32)
    dy = batch(rng, "2d", 3, np.float32)
    for layer in (a, b):
        layer(x)
    before = state(a)
    with pytest.raises((TypeError, ValueError)) as info:
        a(BAD_CALLS[bad](rng))
    if bad == "one-value-per-channel":
        assert "Expected more than 1 value per channel when training" in str(info.value)
    if bad == "complex":
        assert info.type is TypeError
    assert_same_state(before, state(a))
    assert_same_state(state(a), state(b))
    # the cached forward is still x's
    dxa, dxb = a.backward(dy), b.backward(dy)
    assert dxa.tobytes() == dxb.tobytes()
    assert_same_state(state(a), state(b))


def test_failed_backward_leaves_layer_unchanged(rng):
    a, b = bn.BatchNorm2d(C), bn.BatchNorm2d(C)
    x = batch(rng, "2d", 3, np.float32)
    dy = batch(rng, "2d", 3, np.float32)
    for layer in (a, b):
        layer(x)
        layer.backward(dy)
    before = state(a)
    for bad in (np.ones((3, C, 4, 2), np.float32), np.ones((3, C, 4), np.float32),
                np.ones((4, C, 4, 3), np.float32), np.ones((3, C, 4, 3), np.complex64)):
        with pytest.raises((TypeError, ValueError)):
            a.backward(bad)
        assert_same_state(before, state(a))
    dy2 = batch(rng, "2d", 3, np.float32)
    assert a.backward(dy2).tobytes() == b.backward(dy2).tobytes()
    assert_same_state(state(a), state(b))


# --------------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_keys_and_values(rng, affine, track):
    layer = bn.BatchNorm2d(C, affine=affine, track_running_stats=track)
    layer(batch(rng, "2d", 3, np.float32))
    sd = layer.state_dict()
    want = set()
    if affine:
        want |= {"weight", "bias"}
    if track:
        want |= {"running_mean", "running_var", "num_batches_tracked"}
    assert set(sd) == want
    for k, v in sd.items():
        assert isinstance(v, (np.ndarray, np.generic)), f"{k}: {type(v)}"
    if track:
        assert int(sd["num_batches_tracked"]) == 1
        assert np.array_equal(sd["running_var"], layer.running_var)
    try:
        import torch
    except ImportError:
        return
    tl = torch.nn.BatchNorm2d(C, affine=affine, track_running_stats=track)
    assert set(tl.state_dict()) == want
    # and torch loads ours as it is
    tl.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in sd.items()})
    if track:
        assert int(tl.num_batches_tracked) == 1
        assert np.array_equal(tl.running_mean.numpy(), layer.running_mean)


def test_state_dict_round_trip(rng):
    a = bn.BatchNorm1d(C, dtype=np.float64)
    for _ in range(3):
        a(batch(rng, "1d-3D", 4))
        a.backward(batch(rng, "1d-3D", 4))
        a.weight[...] -= 0.1 * a.grad_weight
        a.bias[...] -= 0.1 * a.grad_bias
    b = bn.BatchNorm1d(C, dtype=np.float64)
    b.load_state_dict(a.state_dict())
    assert b.num_batches_tracked == 3 and isinstance(b.num_batches_tracked, int)
    x = batch(rng, "1d-3D", 2)
    assert a.eval()(x).tobytes() == b.eval()(x).tobytes()


def test_load_torch_state_dict(rng):
    torch = pytest.importorskip("torch")
    tl = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        tl.weight.copy_(torch.linspace(-1, 2, C))
        tl.bias.copy_(torch.linspace(0, 1, C))
    for _ in range(4):
        tl(torch.tensor(batch(rng, "2d", 3, np.float32)))
    layer = bn.BatchNorm2d(C)
    layer.load_state_dict({k: v.detach().numpy() for k, v in tl.state_dict().items()})
    assert layer.num_batches_tracked == 4 and isinstance(layer.num_batches_tracked, int)
    assert layer.weight.dtype == F32 and layer.running_var.dtype == F32
    tl.eval()
    layer.eval()
    x = batch(rng, "2d", 2, np.float32)
    assert_close(layer(x), tl(torch.tensor(x)).detach().numpy(), 1e-5)


def test_load_state_dict_from_lists_casts_and_copies(rng):
    layer = bn.BatchNorm1d(3, dtype=np.float32)
    sd = {"weight": np.array([1.0, 2.0, 3.0]), "bias": [0.5, 0.0, -0.5], "running_mean": (1, 2, 3),
          "running_var": np.array([4.0, 5.0, 6.0]), "num_batches_tracked": 7}
    layer.load_state_dict(sd)
    assert layer.weight.dtype == F32 and layer.bias.dtype == F32 and layer.running_mean.dtype == F32
    assert np.array_equal(layer.weight, [1, 2, 3]) and np.array_equal(layer.running_mean, [1, 2, 3])
    assert layer.num_batches_tracked == 7 and isinstance(layer.num_batches_tracked, int)
    # the layer owns its arrays: changing the dict afterwards changes nothing
    sd2 = {k: np.array(v, dtype=np.float32) for k, v in sd.items() if k != "num_batches_tracked"}
    sd2["num_batches_tracked"] = np.array(7)
    layer.load_state_dict(sd2)
    for k in ("weight", "bias", "running_mean", "running_var"):
        sd2[k][...] = 99
        assert not np.any(getattr(layer, k) == 99), f"{k} aliases the loaded array"


def _loaded_sd(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("problem", ["missing", "unexpected", "wrong-shape", "wrong-shape-first-ok",
                                     "not-affine-weight"])
def test_bad_load_state_dict_changes_nothing(rng, problem):
    affine = problem != "not-affine-weight"
    layer = bn.BatchNorm2d(C, affine=affine)
    layer(batch(rng, "2d", 3, np.float32))
    good = {k: np.asarray(v) + 1 for k, v in _loaded_sd(layer).items()}  # every value differs
    bad = dict(good)
    if problem == "missing":
        del bad["running_var"]
    elif problem == "unexpected":
        bad["momentum_buffer"] = np.zeros(C)
    elif problem == "wrong-shape":
        bad["running_mean"] = np.zeros(C + 1)
    elif problem == "wrong-shape-first-ok":
        bad["num_batches_tracked"] = good["num_batches_tracked"]
        bad["running_var"] = np.ones((C, 1))
    else:
        bad["weight"] = np.ones(C)
    before = state(layer)
    with pytest.raises((KeyError, ValueError)):
        layer.load_state_dict(bad)
    assert_same_state(before, state(layer))
