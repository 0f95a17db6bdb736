"""The layers as a drop-in for torch.nn.BatchNorm*d code and checkpoints: constructor order, bias=False,
repr, resets, empty batches, float16 batches into float32 layers, and what load_state_dict accepts.
Compared with torch where it is installed."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.layers import IncompatibleKeys, StateDictError

try:
    import torch
except ImportError:  # pragma: no cover - the parity checks need torch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch not installed")


# --------------------------------------------------------------------------------------------------
# float16 batches into float32 layers; the functional backward's parameter gradients
# --------------------------------------------------------------------------------------------------


def test_float16_batch_gives_float32_parameter_gradients_that_do_not_overflow():
    """BatchNorm2d(8) on a (4, 8, 256, 256) float16 batch: sum(dy) per channel is 262144, beyond
    float16's 65504; the gradients are accumulated in float64 and kept in the layer's float32."""
    rng = np.random.default_rng(0)
    layer = bn.BatchNorm2d(8)
    x = rng.standard_normal((4, 8, 256, 256)).astype(np.float16)
    y = layer(x)
    assert y.dtype == np.float16
    dy = np.ones_like(x)
    dx = layer.backward(dy)
    assert dx.dtype == np.float16
    assert layer.grad_bias.dtype == np.float32 and layer.grad_weight.dtype == np.float32
    np.testing.assert_array_equal(layer.grad_bias, np.full(8, 4 * 256 * 256, np.float32))
    # dgamma = sum(dy * xhat) with dy = 1: ~0 against a scale of 262144
    assert np.all(np.isfinite(layer.grad_weight)) and np.max(np.abs(layer.grad_weight)) < 1.0


def test_float16_parameter_gradients_are_float32_accurate():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3, 16)).astype(np.float16)
    dy = rng.standard_normal((64, 3, 16)).astype(np.float16)
    layer = bn.BatchNorm1d(3, dtype=np.float64)
    layer(x)
    layer.backward(dy)
    # the same computation on the same (float16-valued) numbers in float64
    ref = bn.BatchNorm1d(3, dtype=np.float64)
    ref(x.astype(np.float64))
    ref.backward(dy.astype(np.float64))
    np.testing.assert_allclose(layer.grad_weight, ref.grad_weight, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.grad_bias, ref.grad_bias, rtol=1e-6, atol=1e-6)


def test_functional_backward_of_float16_returns_float32_sums():
    x = np.ones((300, 2), np.float16)
    x[::2] = 3
    dy = np.full((300, 2), 300, np.float16)
    y, mean, invstd = bn.forward_train(x)
    dx, dgamma, dbeta = bn.backward(dy, x, mean, invstd)
    assert dx.dtype == np.float16 and dgamma.dtype == dbeta.dtype == np.float32
    np.testing.assert_array_equal(dbeta, [90000, 90000])  # float16 would say inf


# --------------------------------------------------------------------------------------------------
# empty batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [((0, 3), 1), ((0, 3, 5), 1), ((4, 3, 0), 1), ((0, 4, 4, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_functional_api_accepts_an_empty_batch(shape, axis, dtype):
    C = shape[axis]
    x = np.zeros(shape, dtype)
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    y, mean, invstd = bn.forward_train(x, running_mean=rm, running_var=rv, axis=axis)
    want = np.float64 if np.dtype(dtype).kind == "i" else dtype
    assert y.shape == shape and y.dtype == want and mean.shape == (C,)
    np.testing.assert_array_equal(rm, 0.5)  # running statistics untouched
    np.testing.assert_array_equal(rv, 2.0)
    assert bn.forward_infer(x, rm, rv, axis=axis).shape == shape
    dx, dgamma, dbeta = bn.backward(x, x, rm, rv, axis=axis)
    assert dx.shape == shape and not dgamma.any() and not dbeta.any()
    out = np.empty(shape, want)
    assert bn.forward_train(x, out=out, axis=axis)[0] is out


def test_a_single_value_per_channel_is_still_an_error():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn.forward_train(np.ones((1, 3)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn.BatchNorm1d(3)(np.ones((1, 3)))


@pytest.mark.parametrize("training", [True, False])
def test_layer_with_an_empty_batch_changes_nothing(training):
    layer = bn.BatchNorm2d(3, momentum=None)
    rng = np.random.default_rng(0)
    layer(rng.standard_normal((4, 3, 2, 2)).astype(np.float32))
    layer.backward(np.ones((4, 3, 2, 2), np.float32))
    layer.train(training)
    before = {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}
    y = layer(np.zeros((0, 3, 2, 2), np.float32))
    assert y.shape == (0, 3, 2, 2) and y.dtype == np.float32
    after = layer.state_dict()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)  # no statistics, no count
    dx = layer.backward(np.zeros((0, 3, 2, 2), np.float32))
    assert dx.shape == (0, 3, 2, 2)
    np.testing.assert_array_equal(layer.grad_weight, 0)
    np.testing.assert_array_equal(layer.grad_bias, 0)


@needs_torch
def test_empty_batch_output_and_statistics_match_torch():
    t = torch.nn.BatchNorm1d(3)
    ours = bn.BatchNorm1d(3)
    x = np.zeros((0, 3, 4), np.float32)
    ty = t(torch.from_numpy(x))
    y = ours(x)
    assert tuple(ty.shape) == y.shape
    np.testing.assert_array_equal(t.running_mean.numpy(), ours.running_mean)
    np.testing.assert_array_equal(t.running_var.numpy(), ours.running_var)


# --------------------------------------------------------------------------------------------------
# constructor, bias=False, repr, resets
# --------------------------------------------------------------------------------------------------


def test_repr_is_pytorchs():
    assert repr(bn.BatchNorm2d(64)) == "BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    assert repr(bn.BatchNorm1d(10, 1e-3, 0.3, False, True)) == \
        "BatchNorm1d(10, eps=0.001, momentum=0.3, affine=False, track_running_stats=True)"
    assert repr(bn.BatchNorm1d(10, bias=False)) == \
        "BatchNorm1d(10, eps=1e-05, momentum=0.1, affine=True, bias=False, track_running_stats=True)"
    assert repr(bn.BatchNorm3d(2, momentum=None, axis=-1)).endswith("momentum=None, affine=True, "
                                                                     "track_running_stats=True, axis=-1)")


@pytest.mark.parametrize("kw, exc", [
    ({"eps": "a"}, TypeError), ({"eps": -1.0}, ValueError), ({"eps": True}, TypeError),
    ({"momentum": "x"}, TypeError), ({"momentum": 1.5}, ValueError), ({"affine": "yes"}, TypeError),
    ({"track_running_stats": None}, TypeError), ({"bias": 1}, TypeError), ({"dtype": "int8"}, TypeError),
    ({"dtype": "no such dtype"}, TypeError), ({"device": "cuda"}, ValueError), ({"axis": 1.0}, TypeError),
])
def test_constructor_types_and_values(kw, exc):
    name = next(iter(kw))
    with pytest.raises(exc, match=name):
        bn.BatchNorm1d(4, **kw)


def test_bias_false_learns_the_weight_alone():
    rng = np.random.default_rng(2)
    layer = bn.BatchNorm1d(4, bias=False)
    assert layer.bias is None and layer.grad_bias is None and layer.weight is not None
    assert sorted(layer.state_dict()) == ["num_batches_tracked", "running_mean", "running_var", "weight"]
    assert len(layer.parameters()) == 1 and len(layer.gradients()) == 1
    layer.weight[...] = [1, 2, 3, 4]
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = layer(x)
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)  # no shift
    layer.backward(rng.standard_normal((16, 4)).astype(np.float32))
    assert np.any(layer.grad_weight != 0)
    layer.eval()
    W, b = bn.fold_into(np.eye(4, dtype=np.float32), None, layer, axis=-1)
    np.testing.assert_allclose(x @ W + b, layer(x), rtol=1e-5, atol=1e-5)


@needs_torch
def test_bias_false_matches_torch_and_loads_its_checkpoint():
    rng = np.random.default_rng(3)
    t = torch.nn.BatchNorm1d(5, bias=False)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 5).astype(np.float32)))
    ours = bn.BatchNorm1d(5, bias=False)
    ours.load_state_dict(t.state_dict())
    x = rng.standard_normal((8, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(ours(x), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert sorted(ours.state_dict()) == sorted(t.state_dict())


def test_reset_running_stats_and_parameters():
    layer = bn.BatchNorm1d(3)
    rm, w = layer.running_mean, layer.weight
    layer(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32) + 4)
    layer.weight[...] = 2
    layer.bias[...] = 1
    layer.reset_running_stats()
    assert layer.running_mean is rm and not rm.any() and np.all(layer.running_var == 1)
    assert layer.num_batches_tracked == 0 and np.all(layer.weight == 2)
    layer.reset_parameters()
    assert layer.weight is w and np.all(w == 1) and not layer.bias.any()
    plain = bn.BatchNorm1d(3, affine=False, track_running_stats=False)
    plain.reset_parameters()  # nothing to reset: fine


# --------------------------------------------------------------------------------------------------
# load_state_dict
# --------------------------------------------------------------------------------------------------


def _checkpoint(C=3):
    return {"weight": np.full(C, 2.0), "bias": np.full(C, 0.5), "running_mean": np.full(C, 1.0),
            "running_var": np.full(C, 3.0), "num_batches_tracked": np.array(7)}


def test_checkpoint_without_num_batches_tracked_loads_and_keeps_the_count():
    layer = bn.BatchNorm1d(3)
    layer.num_batches_tracked = 4
    sd = _checkpoint()
    del sd["num_batches_tracked"]
    result = layer.load_state_dict(sd)
    assert result == IncompatibleKeys(["num_batches_tracked"], [])
    assert layer.num_batches_tracked == 4 and np.all(layer.running_var == 3)


def test_strict_false_reports_missing_and_unexpected_keys():
    layer = bn.BatchNorm1d(3)
    sd = _checkpoint()
    del sd["bias"]
    sd["extra"] = np.zeros(1)
    with pytest.raises(StateDictError, match="bias"):
        layer.load_state_dict(sd)
    assert np.all(layer.weight == 1)  # nothing changed
    result = layer.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]
    missing, unexpected = result
    assert np.all(layer.weight == 2) and np.all(layer.bias == 0) and layer.num_batches_tracked == 7


@needs_torch
def test_strict_false_result_matches_torch():
    sd = _checkpoint()
    del sd["running_var"]
    sd["foo"] = np.zeros(3)
    t = torch.nn.BatchNorm1d(3)
    tres = t.load_state_dict({k: torch.as_tensor(v) for k, v in sd.items()}, strict=False)
    ours = bn.BatchNorm1d(3).load_state_dict(sd, strict=False)
    assert sorted(ours.missing_keys) == sorted(tres.missing_keys)
    assert sorted(ours.unexpected_keys) == sorted(tres.unexpected_keys)


@pytest.mark.parametrize("bad", [-1, 2.5, np.array([1, 2]), "3", np.nan, True])
def test_bad_num_batches_tracked_is_refused_and_changes_nothing(bad):
    layer = bn.BatchNorm1d(3)
    sd = _checkpoint()
    sd["num_batches_tracked"] = bad
    with pytest.raises((StateDictError, TypeError, ValueError), match="num_batches_tracked"):
        layer.load_state_dict(sd)
    assert layer.num_batches_tracked == 0 and np.all(layer.weight == 1)


def test_integral_float_num_batches_tracked_is_accepted():
    layer = bn.BatchNorm1d(3)
    sd = _checkpoint()
    sd["num_batches_tracked"] = 12.0
    layer.load_state_dict(sd)
    assert layer.num_batches_tracked == 12 and isinstance(layer.num_batches_tracked, int)


@pytest.mark.parametrize("dtype", [">f4", "<f4", ">f8", np.float16, ">f2", np.int32, np.bool_])
def test_reference_returns_the_kernels_dtypes(dtype):
    from batchnorm import reference as ref

    x = (np.arange(24).reshape(4, 3, 2) % 5).astype(dtype)
    dy = np.ones((4, 3, 2), dtype)
    got, want = bn.forward_train(x), ref.forward_train(x)
    assert [a.dtype for a in got] == [a.dtype for a in want]
    assert bn.forward_infer(x, np.zeros(3), np.ones(3)).dtype == ref.forward_infer(x, np.zeros(3), np.ones(3)).dtype
    assert bn.normalize(x, np.zeros(3), np.ones(3)).dtype == ref.normalize(x, np.zeros(3), np.ones(3)).dtype
    g1 = bn.backward(dy, x, got[1], got[2])
    g2 = ref.backward(dy, x, got[1], got[2])
    assert [a.dtype for a in g1] == [a.dtype for a in g2]
    assert not got[0].dtype.byteorder == ">"
