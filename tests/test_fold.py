"""batchnorm.fold_into: a linear/conv layer followed by BN (eval mode) equals the folded layer."""

from __future__ import annotations

import numpy as np
import pytest

import batchnorm


def trained_bn(cls, C, rng, *, affine=True, dtype=np.float32, shape_rest=(), steps=3):
    """A BN layer whose running statistics and affine parameters are not the defaults, in eval mode."""
    bn = cls(C, affine=affine, dtype=dtype)
    for _ in range(steps):  # real running statistics, from a few training batches
        x = rng.normal(3.0, 2.0, (16, C) + shape_rest).astype(dtype)
        bn(x)
    if affine:
        bn.weight[...] = rng.uniform(0.5, 2.0, C)
        bn.bias[...] = rng.normal(0, 1, C)
    return bn.eval()


def close(a, b, dtype):
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    scale = max(1.0, float(np.max(np.abs(b))))
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale)


# ------------------------------------------------------------------------------------------------
# linear layers, both weight conventions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear_torch_style(rng, dtype, with_bias, affine):
    n_in, C = 7, 5
    W = rng.normal(0, 1, (C, n_in)).astype(dtype)          # (out, in): y = x @ W.T + b
    b = rng.normal(0, 1, C).astype(dtype) if with_bias else None
    bn = trained_bn(batchnorm.BatchNorm1d, C, rng, affine=affine, dtype=dtype)
    x = rng.normal(0, 1, (11, n_in)).astype(dtype)

    expected = bn(x @ W.T + (0 if b is None else b))
    W2, b2 = batchnorm.fold_into(W, b, bn)                  # axis=0 is the default
    assert W2.shape == W.shape and b2.shape == (C,)
    assert W2.dtype == np.dtype(dtype) and b2.dtype == np.dtype(dtype)
    close(x @ W2.T + b2, expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_linear_numpy_style(rng, dtype, with_bias, affine):
    n_in, C = 6, 4
    W = rng.normal(0, 1, (n_in, C)).astype(dtype)          # (in, out): y = x @ W + b
    b = rng.normal(0, 1, C).astype(dtype) if with_bias else None
    bn = trained_bn(batchnorm.BatchNorm1d, C, rng, affine=affine, dtype=dtype)
    x = rng.normal(0, 1, (9, n_in)).astype(dtype)

    expected = bn(x @ W + (0 if b is None else b))
    W2, b2 = batchnorm.fold_into(W, b, bn, axis=-1)
    close(x @ W2 + b2, expected, dtype)
    W2b, b2b = batchnorm.fold_into(W, b, bn, axis=1)        # the same axis, spelled positively
    np.testing.assert_array_equal(W2, W2b)
    np.testing.assert_array_equal(b2, b2b)


def test_examples_linear_layer(rng):
    """The NumPy-style Linear of batchnorm.examples, folded with axis=-1, as a drop-in replacement."""
    from batchnorm.examples import Linear

    lin = Linear(8, 5, rng=rng)
    lin.bias[...] = rng.normal(0, 1, 5)
    bn = trained_bn(batchnorm.BatchNorm1d, 5, rng)
    x = rng.normal(0, 1, (10, 8)).astype(np.float32)
    expected = bn(lin(x))
    lin.weight, lin.bias = batchnorm.fold_into(lin.weight, lin.bias, bn, axis=-1)
    close(lin(x), expected, np.float32)


# ------------------------------------------------------------------------------------------------
# convolutions
# ------------------------------------------------------------------------------------------------

def conv2d(x, W, b):
    """'valid' 2-D cross-correlation, PyTorch layout: x (N, Cin, H, W), W (Cout, Cin, kh, kw)."""
    kh, kw = W.shape[2:]
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))  # N, Cin, Ho, Wo, kh, kw
    y = np.einsum("nchwij,ocij->nohw", patches, W)
    return y if b is None else y + b[None, :, None, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_conv2d_einsum(rng, dtype, with_bias, affine):
    C_in, C = 3, 6
    W = rng.normal(0, 0.5, (C, C_in, 3, 3)).astype(dtype)
    b = rng.normal(0, 1, C).astype(dtype) if with_bias else None
    bn = trained_bn(batchnorm.BatchNorm2d, C, rng, affine=affine, dtype=dtype, shape_rest=(5, 5))
    x = rng.normal(0, 1, (4, C_in, 8, 7)).astype(dtype)

    expected = bn(conv2d(x, W, b))
    W2, b2 = batchnorm.fold_into(W, b, bn, axis=0)
    assert W2.shape == W.shape and W2.dtype == np.dtype(dtype)
    close(conv2d(x, W2, b2), expected, dtype)


def test_conv2d_torch(rng):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    C_in, C = 3, 8
    W = rng.normal(0, 0.5, (C, C_in, 3, 3))
    b = rng.normal(0, 1, C)
    bn = trained_bn(batchnorm.BatchNorm2d, C, rng, dtype=np.float64, shape_rest=(4, 4))
    x = rng.normal(0, 1, (2, C_in, 9, 9))

    t = torch.from_numpy
    expected = bn(F.conv2d(t(x), t(W), t(b), padding=1).numpy())
    W2, b2 = batchnorm.fold_into(W, b, bn)
    got = F.conv2d(t(x), t(W2), t(b2), padding=1).numpy()
    close(got, expected, np.float64)


def test_conv1d_channels_last_weight(rng):
    """A weight with the output channels last, e.g. (kw, in, out) as in some NumPy/TF code."""
    C_in, C, k = 2, 3, 3
    W = rng.normal(0, 1, (k, C_in, C))
    bn = trained_bn(batchnorm.BatchNorm1d, C, rng, dtype=np.float64)
    x = rng.normal(0, 1, (5, 10, C_in))                         # (N, L, Cin), channels last

    def conv(x, W, b):
        patches = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)   # N, Lo, Cin, k
        y = np.einsum("nlck,kco->nlo", patches, W)
        return y if b is None else y + b

    y = conv(x, W, None)                                         # (N, Lo, C): normalize channels last
    expected = batchnorm.forward_infer(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                       eps=bn.eps, axis=-1)
    W2, b2 = batchnorm.fold_into(W, None, bn, axis=-1)
    close(conv(x, W2, b2), expected, np.float64)


# ------------------------------------------------------------------------------------------------
# semantics and validation
# ------------------------------------------------------------------------------------------------

def test_uses_running_stats_in_training_mode_too(rng):
    bn = trained_bn(batchnorm.BatchNorm1d, 4, rng)
    W, b = rng.normal(0, 1, (4, 3)).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)
    folded_eval = batchnorm.fold_into(W, b, bn)
    bn.train()
    folded_train = batchnorm.fold_into(W, b, bn)
    for a, c in zip(folded_eval, folded_train):
        np.testing.assert_array_equal(a, c)
    assert bn.training  # fold_into does not change the mode


def test_inputs_not_modified(rng):
    bn = trained_bn(batchnorm.BatchNorm1d, 4, rng)
    W, b = rng.normal(0, 1, (4, 3)), rng.normal(0, 1, 4)
    W0, b0 = W.copy(), b.copy()
    state = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    W2, b2 = batchnorm.fold_into(W, b, bn)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(b, b0)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k])
    assert not np.shares_memory(W2, W) and not np.shares_memory(b2, b)


def test_dtype_follows_W(rng):
    bn = trained_bn(batchnorm.BatchNorm1d, 3, rng, dtype=np.float64)
    W32 = np.ones((3, 2), np.float32)
    W2, b2 = batchnorm.fold_into(W32, np.zeros(3, np.float64), bn)
    assert W2.dtype == np.float32 and b2.dtype == np.float32
    W2, b2 = batchnorm.fold_into(W32.astype(np.float64), None, batchnorm.BatchNorm1d(3).eval())
    assert W2.dtype == np.float64 and b2.dtype == np.float64
    W2, b2 = batchnorm.fold_into(np.ones((3, 2), np.int64), None, bn)   # integers: float64
    assert W2.dtype == np.float64 and b2.dtype == np.float64


def test_default_bn_is_nearly_identity():
    """A fresh BN (mean 0, var 1, weight 1, bias 0) folds to W / sqrt(1 + eps), b / sqrt(1 + eps)."""
    bn = batchnorm.BatchNorm1d(2, eps=1e-5).eval()
    W, b = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([5.0, 6.0])
    W2, b2 = batchnorm.fold_into(W, b, bn)
    np.testing.assert_allclose(W2, W / np.sqrt(1 + 1e-5), rtol=1e-15)
    np.testing.assert_allclose(b2, b / np.sqrt(1 + 1e-5), rtol=1e-15)


def test_requires_running_stats():
    bn = batchnorm.BatchNorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        batchnorm.fold_into(np.ones((3, 2)), None, bn)


@pytest.mark.parametrize("W_shape, axis", [((4, 3), 0), ((3, 4), -1), ((3, 4, 3), 1), ((4,), 0)])
def test_shape_mismatch(W_shape, axis):
    bn = batchnorm.BatchNorm1d(3).eval()
    with pytest.raises(ValueError, match="3 features"):
        batchnorm.fold_into(np.ones(W_shape), None, bn, axis=axis)


def test_bad_axis_and_bias():
    bn = batchnorm.BatchNorm1d(3).eval()
    with pytest.raises(ValueError, match="out of bounds"):
        batchnorm.fold_into(np.ones((3, 2)), None, bn, axis=2)
    with pytest.raises(ValueError, match="out of bounds"):
        batchnorm.fold_into(np.ones((3, 2)), None, bn, axis=-3)
    with pytest.raises(ValueError, match="b has shape"):
        batchnorm.fold_into(np.ones((3, 2)), np.ones(2), bn)
    with pytest.raises(ValueError):
        batchnorm.fold_into(np.float64(1.0), None, bn)
    with pytest.raises(TypeError):
        batchnorm.fold_into(np.ones((3, 2)), None, bn, axis=0.0)


def test_state_dict_loaded_from_torch_values(rng):
    """Fold a BN whose statistics came in through load_state_dict (PyTorch keys), against torch."""
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm1d(4).double()
    with torch.no_grad():
        tbn(torch.from_numpy(rng.normal(1, 3, (32, 4))))
        tbn.weight.uniform_(0.5, 1.5)
        tbn.bias.normal_()
    tbn.eval()
    bn = batchnorm.BatchNorm1d(4, dtype=np.float64)
    bn.load_state_dict({k: v.numpy() for k, v in tbn.state_dict().items()})
    lin = torch.nn.Linear(3, 4).double()
    x = torch.from_numpy(rng.normal(0, 1, (6, 3)))
    with torch.no_grad():
        expected = tbn(lin(x)).numpy()
    W2, b2 = batchnorm.fold_into(lin.weight.detach().numpy(), lin.bias.detach().numpy(), bn)
    close(x.numpy() @ W2.T + b2, expected, np.float64)
