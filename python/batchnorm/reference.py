"""Plain-NumPy Batch Normalization: the readable twin of the C kernels.

Every function here mirrors one in :mod:`batchnorm` (same arguments, same results) but is written for
clarity, not speed, and computes in float64. The tests compare the kernels with these functions; the
benchmark uses them as the "NumPy" column. They validate little: pass well-formed input.

Notation, for a channel c reduced over the M = x.size / C values that share it:

    mean   = sum(x) / M
    var    = sum((x - mean)**2) / M                 (biased: used to normalize)
    invstd = 1 / sqrt(var + eps)
    xhat   = (x - mean) * invstd
    y      = gamma * xhat + beta
"""

from __future__ import annotations

import numpy as np

__all__ = ["forward_train", "forward_infer", "backward"]


def _layout(x, axis):
    """Move the channel axis last and flatten the rest: (M, C) float64, plus how to undo it."""
    x = np.asarray(x)
    axis = axis % x.ndim
    moved = np.moveaxis(x.astype(np.float64), axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape, axis


def _restore(flat, moved_shape, axis):
    return np.moveaxis(flat.reshape(moved_shape), -1, axis)


def _result_dtype(x):
    x = np.asarray(x)
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _param(p, C, default):
    return np.full(C, default, np.float64) if p is None else np.asarray(p, np.float64).reshape(C)


def forward_train(x, gamma=None, beta=None, *, running_mean=None, running_var=None, momentum=0.1,
                  eps=1e-5, axis=1, out=None):
    """Training forward: normalize with batch statistics; returns (y, mean, invstd).

    Updates ``running_mean``/``running_var`` in place when given, with the unbiased batch variance.
    """
    flat, moved_shape, axis = _layout(x, axis)
    M, C = flat.shape
    mean = flat.mean(axis=0)
    # Two-pass variance: subtract the mean first so that a large mean cannot cancel the variance away.
    var = ((flat - mean) ** 2).mean(axis=0)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (flat - mean) * invstd * _param(gamma, C, 1.0) + _param(beta, C, 0.0)
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        unbiased = var * M / (M - 1)
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased
    dt = _result_dtype(x)
    y = _restore(y, moved_shape, axis).astype(dt)
    if out is not None:
        out[...] = y
        y = out
    return y, mean.astype(dt), invstd.astype(dt)


def forward_infer(x, running_mean, running_var, gamma=None, beta=None, *, eps=1e-5, axis=1, out=None):
    """Inference forward: normalize with the given (running) statistics; returns y."""
    flat, moved_shape, axis = _layout(x, axis)
    C = flat.shape[1]
    mean = np.asarray(running_mean, np.float64).reshape(C)
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64).reshape(C) + eps)
    y = (flat - mean) * invstd * _param(gamma, C, 1.0) + _param(beta, C, 0.0)
    y = _restore(y, moved_shape, axis).astype(_result_dtype(x))
    if out is not None:
        out[...] = y
        y = out
    return y


def backward(dy, x, mean, invstd, gamma=None, *, training=True, axis=1, out=None):
    """Gradients of y = gamma * (x - mean) * invstd + beta; returns (dx, dgamma, dbeta).

    With ``training=True`` mean and invstd are the batch statistics of x, so the gradient flows through
    them too:  dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    With ``training=False`` they are constants (frozen BN):  dx = gamma * invstd * dy.
    """
    flat, moved_shape, axis = _layout(x, axis)
    dflat, _, _ = _layout(dy, axis)
    M, C = flat.shape
    mean = np.asarray(mean, np.float64).reshape(C)
    invstd = np.asarray(invstd, np.float64).reshape(C)
    g = _param(gamma, C, 1.0)
    xhat = (flat - mean) * invstd
    dbeta = dflat.sum(axis=0)
    dgamma = (dflat * xhat).sum(axis=0)
    if training:
        dx = g * invstd * (dflat - dbeta / M - xhat * (dgamma / M))
    else:
        dx = g * invstd * dflat
    dt = _result_dtype(x)
    dx = _restore(dx, moved_shape, axis).astype(dt)
    if out is not None:
        out[...] = dx
        dx = out
    return dx, dgamma.astype(dt), dbeta.astype(dt)
