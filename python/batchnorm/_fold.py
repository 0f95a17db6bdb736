"""Fold an inference-mode batch normalization into the linear or convolution layer before it."""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["fold_into"]


def fold_into(W, b, bn, *, axis=0):
    """Fold a batch normalization layer into the weights of the layer that feeds it.

    In eval mode a BN layer is an affine map per channel, so ``bn(layer(x))`` for a linear or
    convolution ``layer(x) = W x + b`` equals one layer with weights ``W2``, ``b2``::

        scale = weight / sqrt(running_var + eps)
        W2    = W * scale             (scale broadcast along W's output axis)
        b2    = (b - running_mean) * scale + bias

    Parameters
    ----------
    W : array_like
        Weights of the preceding layer, with its output channels on ``axis``: (out, in) for a
        PyTorch-style linear layer, (out, in, kh, kw) for a convolution (``axis=0``), or (in, out) for
        a NumPy-style ``x @ W`` linear layer (``axis=-1``).
    b : array_like of shape (out,) or None
        Bias of the preceding layer; None means no bias (zero).
    bn : BatchNorm
        A :class:`batchnorm.BatchNorm` layer (or anything with ``running_mean``, ``running_var``,
        ``weight``, ``bias`` and ``eps`` attributes). ``weight``/``bias`` None (``affine=False``) mean
        1 and 0. Its running statistics are used whatever its mode, so the result matches the pair
        in eval mode.
    axis : int, default 0
        The output-channel axis of ``W``; its length must equal the number of BN features.

    Returns
    -------
    W2 : ndarray
        Folded weights, ``W``'s shape. dtype: ``W``'s when it is floating point, else float64.
    b2 : ndarray of shape (out,)
        Folded bias, same dtype as ``W2``.

    Raises
    ------
    ValueError
        If ``bn`` has no running statistics (``track_running_stats=False``), if ``axis`` is out of
        range, or if a shape does not match the number of BN features.

    Notes
    -----
    The arithmetic is done in float64 and rounded once to the result dtype.

    Examples
    --------
    >>> import numpy as np, batchnorm
    >>> bn = batchnorm.BatchNorm1d(3).eval()
    >>> bn.running_mean[:] = [1, 2, 3]; bn.running_var[:] = [4, 4, 4]
    >>> W, b = np.ones((5, 3), np.float32), np.zeros(3, np.float32)   # y = x @ W + b
    >>> W2, b2 = batchnorm.fold_into(W, b, bn, axis=-1)
    >>> x = np.arange(10, dtype=np.float32).reshape(2, 5)
    >>> bool(np.allclose(x @ W2 + b2, bn(x @ W + b), atol=1e-5))
    True
    """
    W = np.asarray(W)
    if W.ndim < 1:
        raise ValueError("W must have at least one dimension (the output channels)")
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -W.ndim <= ax < W.ndim:
        raise ValueError(f"axis {axis} is out of bounds for W of shape {W.shape}")
    ax %= W.ndim

    running_mean = getattr(bn, "running_mean", None)
    running_var = getattr(bn, "running_var", None)
    if running_mean is None or running_var is None:
        raise ValueError(
            f"cannot fold {type(bn).__name__}: it has no running statistics (track_running_stats=False "
            "normalizes with batch statistics, which are not constants)")
    mean = np.asarray(running_mean, np.float64)
    var = np.asarray(running_var, np.float64)
    C = mean.shape[0] if mean.ndim == 1 else -1
    if mean.ndim != 1 or var.shape != mean.shape:
        raise ValueError(f"bn.running_mean and bn.running_var must be 1-D of the same length, got "
                         f"shapes {mean.shape} and {var.shape}")
    num_features = getattr(bn, "num_features", C)
    if num_features != C:
        raise ValueError(f"bn.num_features is {num_features} but its running statistics have {C} entries")
    if W.shape[ax] != C:
        raise ValueError(f"W has {W.shape[ax]} output channels on axis {axis} (shape {W.shape}) but the "
                         f"batch normalization has {C} features; for NumPy-style (in, out) weights "
                         "pass axis=-1")

    def param(value, default, name):
        if value is None:
            return np.full(C, default, np.float64)
        value = np.asarray(value, np.float64)
        if value.shape != (C,):
            raise ValueError(f"{name} has shape {value.shape}, expected ({C},)")
        return value

    gamma = param(getattr(bn, "weight", None), 1.0, "bn.weight")
    beta = param(getattr(bn, "bias", None), 0.0, "bn.bias")
    bias = param(b, 0.0, "b")
    eps = float(getattr(bn, "eps", 1e-5))

    scale = gamma / np.sqrt(var + eps)
    shape = [1] * W.ndim
    shape[ax] = C
    dtype = W.dtype if W.dtype.kind == "f" else np.dtype(np.float64)
    W2 = (W.astype(np.float64) * scale.reshape(shape)).astype(dtype)
    b2 = ((bias - mean) * scale + beta).astype(dtype)
    return W2, b2
