"""Batch Renormalization (Ioffe, 2017) as functions, built on the phases.

Batch Renormalization keeps training-mode BN's normalization by the batch statistics but corrects it
towards the running statistics, so that what a unit outputs depends less on the other samples of a small
or non-i.i.d. batch. Per channel, with the running statistics ``mu`` and ``sigma = sqrt(running_var + eps)``
from *before* this batch updates them, and the batch's ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (biased
``var_B``)::

    r    = clip(sigma_B / sigma, 1 / rmax, rmax)
    d    = clip((mu_B - mu) / sigma, -dmax, dmax)
    xhat = (x - mu_B) / sigma_B
    y    = gamma * (xhat * r + d) + beta

r and d are constants for the gradient (the paper's choice), so the gradient is training-mode BN's with
``gamma * r`` for gamma; only dgamma changes: ``dgamma = sum(dy * (xhat * r + d)) = r * sum(dy * xhat) +
d * sum(dy)``. With r = 1 and d = 0 (rmax = 1, dmax = 0) it is plain training-mode BN.

The forward is :func:`batchnorm.batch_stats` then :func:`batchnorm.normalize` with the scale
``gamma * r`` and the shift ``gamma * d + beta`` (the memory traffic of :func:`batchnorm.forward_train`:
one read for the statistics, one read and one write to normalize), and the backward is
:func:`batchnorm.backward` with the same two, so the fused epilogues (``activation``, ``residual``) and
the backward's ReLU mask recomputed from ``beta=`` work as for plain BN. The layers use these when built
with ``renorm=True``.
"""

from __future__ import annotations

import numbers

import numpy as np

from ._core import backward, batch_stats, normalize, update_running_stats

__all__ = ["forward_train_renorm", "backward_renorm"]


def _real(value, name, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not value >= low:  # NaN fails too
        raise ValueError(f"{name} must be at least {low}, got {value!r}")
    return float(value)


def _running(arr, name, C, update):
    """A running statistic: read as float64 (C,); when it is to be updated, a writable float ndarray."""
    if update:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), got {type(arr).__name__}")
        if arr.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64 (it is updated in place), got dtype {arr.dtype}")
        if not arr.flags.writeable:
            raise ValueError(f"{name} is read-only (it is updated in place)")
    if arr is None:
        raise TypeError(f"{name} is required (renorm corrects towards it), got None")
    return _vector(arr, name, C, None)


def _vector(v, name, C, default):
    """A per-channel vector as float64 (C,); None gives `default` everywhere."""
    if v is None:
        return np.full(C, default)
    value = np.asarray(v)
    if value.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be real numbers, got dtype {value.dtype}")
    if value.shape != (C,):
        raise ValueError(f"{name} has shape {value.shape}, expected ({C},): one value per channel of x")
    return value.astype(np.float64)


def _corrections(mean, invstd, running_mean, running_var, eps, rmax, dmax):
    """r and d (float64) of the batch's mean and invstd against the running statistics (also used by
    SyncBatchNorm, with the whole batch's statistics)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
        r = np.clip(1.0 / (invstd * sigma), 1.0 / rmax, rmax)
        d = np.clip((mean - np.asarray(running_mean, np.float64)) / sigma, -dmax, dmax)
    return r, d


def forward_train_renorm(x, running_mean, running_var, gamma=None, beta=None, *, rmax=3.0, dmax=5.0,
                         momentum=0.1, eps=1e-5, axis=1, out=None, update=True, activation=None, residual=None):
    """Batch Renormalization forward pass in training mode.

    ``y = gamma * (xhat * r + d) + beta`` with the batch's ``xhat`` and the corrections r and d towards
    the running statistics (see the module's docstring); then, with ``update=True``, the running
    statistics are updated as :func:`batchnorm.forward_train` updates them (r and d use their values from
    before the update).

    Parameters
    ----------
    x : array_like, at least 2-D
        Input; dtypes as in :func:`batchnorm.forward_train`.
    running_mean, running_var : ndarray of shape (C,)
        The running statistics r and d are taken against; with ``update=True`` float32 or float64
        arrays, updated in place.
    gamma, beta : array_like of shape (C,), optional
        Scale and shift; None means 1 and 0.
    rmax : float, default 3.0
        Bound of r, at least 1 (1 gives r = 1).
    dmax : float, default 5.0
        Bound of ``|d|``, at least 0 (0 gives d = 0).
    momentum : float, default 0.1
        Weight of the batch in the running statistics, in [0, 1].
    eps : float, default 1e-5
        Added to both variances before the square root.
    axis : int, default 1
        The channel axis (-1 for channels-last).
    out : ndarray, optional
        Where to write y, as in :func:`batchnorm.normalize`.
    update : bool, default True
        Update the running statistics.
    activation : None or "relu", optional
        Fused epilogue, as in :func:`batchnorm.forward_train`: ``y = relu(renorm(x) + residual)`` in the
        pass that writes y. For the backward, pass the same ``activation`` (and ``residual``) to
        :func:`backward_renorm` with ``y=`` or ``beta=``.
    residual : array_like, optional
        Added before the activation; x's shape.

    Returns
    -------
    y : ndarray
        x's shape and dtype (float64 for integer or bool input).
    mean, invstd : ndarray of shape (C,), float64
        The batch mean and ``1 / sigma_B``: pass them to :func:`backward_renorm`.
    r, d : ndarray of shape (C,), float64
        The corrections used.

    Raises
    ------
    TypeError, ValueError
        For bad arguments, as :func:`batchnorm.forward_train`, and for rmax < 1 or dmax < 0. Nothing is
        modified when it raises.

    Notes
    -----
    An empty batch gives an empty y, zero mean and invstd, r = 1, d = 0, and no update.
    """
    rmax = _real(rmax, "rmax", 1.0)
    dmax = _real(dmax, "dmax", 0.0)
    eps = _real(eps, "eps", 0.0)
    if not isinstance(update, (bool, np.bool_)):
        raise TypeError(f"update must be True or False, got {update!r}")
    count, mean, m2 = batch_stats(x, axis=axis)
    C = mean.shape[0]
    rm = _running(running_mean, "running_mean", C, update)
    rv = _running(running_var, "running_var", C, update)
    g = _vector(gamma, "gamma", C, 1.0)
    b = _vector(beta, "beta", C, 0.0)
    if count == 1:  # forward_train's message
        raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                         f"{np.shape(x)} with channel axis {axis}")
    if count == 0:
        zeros = np.zeros(C)
        y = normalize(x, zeros, zeros, g, b, axis=axis, out=out, activation=activation, residual=residual)
        return y, zeros, zeros.copy(), np.ones(C), np.zeros(C)
    with np.errstate(divide="ignore", invalid="ignore"):  # eps = 0 with a constant channel: inf, as BN
        invstd = 1.0 / np.sqrt(m2 / count + eps)
    r, d = _corrections(mean, invstd, rm, rv, eps, rmax, dmax)
    if update:  # into copies first: update_running_stats checks momentum and count before anything changes
        new_mean, new_var = rm.copy(), rv.copy()
        update_running_stats(new_mean, new_var, mean, m2, count, momentum=momentum)
    # y = (x - mean) * invstd * (g * r) + (g * d + b): BN with gamma' = g * r and beta' = g * d + b, the
    # coefficients backward_renorm hands to backward, whose ReLU mask from beta= then repeats this
    # forward's arithmetic bit for bit
    y = normalize(x, mean, invstd, g * r, g * d + b, axis=axis, out=out, activation=activation,
                  residual=residual)
    if update:  # last: every check above passed
        np.copyto(running_mean, new_mean, casting="unsafe")
        np.copyto(running_var, new_var, casting="unsafe")
    return y, mean, invstd, r, d


def backward_renorm(dy, x, mean, invstd, r, d, gamma=None, *, axis=1, out=None, activation=None, residual=None,
                    y=None, beta=None):
    """Batch Renormalization backward pass, with r and d constants (the paper's gradient).

    ``dx`` is training-mode BN's gradient with ``gamma * r`` for gamma;
    ``dgamma = sum(dy * (xhat * r + d)) = r * sum(dy * xhat) + d * sum(dy)``, ``dbeta = sum(dy)``.

    Parameters
    ----------
    dy : array_like
        Gradient of the loss with respect to y; x's shape.
    x : array_like, at least 2-D
        The forward pass's input.
    mean, invstd, r, d : array_like of shape (C,)
        As :func:`forward_train_renorm` returned them.
    gamma : array_like of shape (C,), optional
        The scale used in the forward pass; None means 1.
    axis : int, default 1
        The channel axis.
    out : ndarray, optional
        Where to write dx, as in :func:`batchnorm.backward`.
    activation, residual, y, beta : optional
        The fused epilogue of the forward, as in :func:`batchnorm.backward`: with ``activation="relu"``
        dy passes only where the forward's output was > 0, known from ``y=`` (that output) or recomputed
        from x with ``beta=`` (the forward's beta; the mask is then the forward's, bit for bit). With
        ``residual`` (the array, or True without an activation) d_residual is returned fourth.

    Returns
    -------
    dx : ndarray
        x's shape and dtype.
    dgamma, dbeta : ndarray of shape (C,)
        In the dtype :func:`batchnorm.backward` gives them.
    d_residual : ndarray
        Only with ``residual``: the gradient at the residual (dy, masked by the ReLU).

    Raises
    ------
    TypeError, ValueError
        As :func:`batchnorm.backward`, and for r or d of the wrong shape.
    """
    C = np.shape(mean)[0] if np.ndim(mean) == 1 else None
    if C is None:
        raise ValueError(f"mean has shape {np.shape(mean)}, expected (C,)")
    r = _vector(r, "r", C, 1.0)
    d = _vector(d, "d", C, 0.0)
    g = _vector(gamma, "gamma", C, 1.0)
    # beta' = g * d + beta, as forward_train_renorm normalized with (the same float64 expression)
    b = None if beta is None else g * d + _vector(beta, "beta", C, 0.0)
    res = backward(dy, x, mean, invstd, g * r, training=True, axis=axis, out=out, activation=activation,
                   residual=residual, y=y, beta=b)
    dx, sum_dy_xhat, sum_dy = res[:3]
    # y = gamma * (r * xhat + d) + beta: dL/dgamma = r * sum(dy * xhat) + d * sum(dy), in float64 and then
    # in backward's dtype (dy masked by the ReLU, when there is one)
    dgamma = (r * sum_dy_xhat.astype(np.float64) + d * sum_dy.astype(np.float64)).astype(sum_dy.dtype)
    return (dx, dgamma, sum_dy) + tuple(res[3:])
