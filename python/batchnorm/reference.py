"""Plain-NumPy Batch Normalization: the readable twin of the C kernels.

Every function here mirrors one in :mod:`batchnorm` (same arguments, same results) but is written for
clarity, not speed, and computes in float64. The tests compare the kernels with these functions; the
benchmark uses them as the "NumPy" column. They validate little: pass well-formed input.

Notation, for a channel c reduced over the M = x.size / C values that share it::

    mean   = sum(x) / M
    var    = sum((x - mean)**2) / M                 (biased: used to normalize)
    invstd = 1 / sqrt(var + eps)
    xhat   = (x - mean) * invstd
    y      = gamma * xhat + beta
"""

from __future__ import annotations

import numpy as np

__all__ = ["forward_train", "forward_infer", "backward", "batch_stats", "merge_stats", "normalize",
           "backward_reduce", "backward_apply", "update_running_stats", "forward_train_renorm",
           "backward_renorm"]


def _layout(x, axis):
    """Move the channel axis last and flatten the rest: (M, C) float64, plus how to undo it."""
    x = np.asarray(x)
    axis = axis % x.ndim
    moved = np.moveaxis(x.astype(np.float64), axis, -1)
    return moved.reshape(-1, moved.shape[-1]), moved.shape, axis


def _restore(flat, moved_shape, axis):
    return np.moveaxis(flat.reshape(moved_shape), -1, axis)


def _result_dtype(x):
    """The kernels' result dtype: float16/32/64 keep their precision (in native byte order), integers
    and bool give float64."""
    dt = np.asarray(x).dtype
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):
        return np.dtype(dt.type)
    return np.dtype(np.float64)


def _finish(flat, moved_shape, axis, x, out):
    """flat (M, C) back to x's shape, in the result dtype, written into out when given."""
    res = _restore(flat, moved_shape, axis).astype(_result_dtype(x))
    if out is not None:
        out[...] = res
        res = out
    return res


def _flat_mask(mask, x, axis):
    """The mask (x's shape without the channel axis, broadcast) as a boolean vector over _layout's rows."""
    x = np.asarray(x)
    axis = axis % x.ndim
    shape = x.shape[:axis] + x.shape[axis + 1:]
    return np.broadcast_to(np.asarray(mask, bool), shape).reshape(-1)


def _param(p, C, default):
    return np.full(C, default, np.float64) if p is None else np.asarray(p, np.float64).reshape(C)


def _epilogue(y, residual, activation, axis):
    """The fused epilogue on the (M, C) float64 y: + residual, then ReLU (NaN stays NaN)."""
    if residual is not None:
        y = y + _layout(residual, axis)[0]
    if activation == "relu":
        y = np.where(y < 0, 0.0, y)
    return y


def _grad_at_bn(dy, x, mean, invstd, gamma, axis, activation, residual, y, beta):
    """(M, C) float64 g, the gradient at BN's output: dy where the fused forward's output was > 0.

    The output's sign comes from y, or is recomputed from x (and residual) and beta, rounded to the
    result dtype as the forward's output was."""
    dflat, _, _ = _layout(dy, axis)
    if activation != "relu":
        return dflat
    if y is not None:
        out = _layout(y, axis)[0]
    else:
        flat, _, _ = _layout(x, axis)
        C = flat.shape[1]
        pre = (flat - np.asarray(mean, np.float64).reshape(C)) * np.asarray(invstd, np.float64).reshape(C)
        pre = pre * _param(gamma, C, 1.0) + _param(beta, C, 0.0)
        out = _epilogue(pre, None if isinstance(residual, bool) else residual, None, axis)
        out = out.astype(_result_dtype(x))
    return np.where(out > 0, dflat, 0.0)


def forward_train(x, gamma=None, beta=None, *, running_mean=None, running_var=None, momentum=0.1,
                  eps=1e-5, axis=1, out=None, stats_dtype=None, activation=None, residual=None,
                  ghost_batch_size=None, mask=None):
    """Training forward: normalize with batch statistics; returns (y, mean, invstd).

    With ``activation="relu"`` and/or ``residual``: y = max(bn(x) + residual, 0).
    Updates ``running_mean``/``running_var`` in place when given, with the unbiased batch variance.
    An empty batch gives an empty y, zero mean and invstd, and leaves the running statistics alone.
    With ``ghost_batch_size`` each chunk of that many samples along axis 0 is normalized on its own (see
    ``_ghost_forward_train``).
    With ``mask`` (boolean, x's shape without the channel axis, broadcast) the statistics are those of
    the real (True) positions only, y is 0 at the others, and the running variance is unbiased with the
    count of True positions.
    """
    if mask is not None:
        return _masked_forward_train(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out,
                                     stats_dtype, mask)
    if ghost_batch_size is not None:
        return _ghost_forward_train(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out,
                                    stats_dtype, ghost_batch_size, activation, residual)
    flat, moved_shape, axis = _layout(x, axis)
    M, C = flat.shape
    if M == 0:
        sdt = _result_dtype(x) if stats_dtype is None else np.dtype(stats_dtype)
        return _finish(flat, moved_shape, axis, x, out), np.zeros(C, sdt), np.zeros(C, sdt)
    mean = flat.mean(axis=0)
    # Two-pass variance: subtract the mean first so that a large mean cannot cancel the variance away.
    var = ((flat - mean) ** 2).mean(axis=0)
    invstd = 1.0 / np.sqrt(var + eps)
    y = (flat - mean) * invstd * _param(gamma, C, 1.0) + _param(beta, C, 0.0)
    y = _epilogue(y, residual, activation, axis)
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        unbiased = var * M / (M - 1)
        running_var[...] = (1 - momentum) * running_var + momentum * unbiased
    y = _finish(y, moved_shape, axis, x, out)
    sdt = _result_dtype(x) if stats_dtype is None else np.dtype(stats_dtype)
    return y, mean.astype(sdt), invstd.astype(sdt)


def _masked_forward_train(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out, stats_dtype,
                          mask):
    """Masked BN: plain BN over the compacted real rows, y = 0 at the padding."""
    flat, moved_shape, axis = _layout(x, axis)
    real = _flat_mask(mask, x, axis)
    C = flat.shape[1]
    sdt = _result_dtype(x) if stats_dtype is None else np.dtype(stats_dtype)
    if flat.shape[0] == 0:
        return _finish(flat, moved_shape, axis, x, out), np.zeros(C, sdt), np.zeros(C, sdt)
    y_real, mean, invstd = forward_train(flat[real], gamma, beta, running_mean=running_mean,
                                         running_var=running_var, momentum=momentum, eps=eps,
                                         stats_dtype=np.float64)
    y = np.zeros_like(flat)
    y[real] = y_real
    return _finish(y, moved_shape, axis, x, out), mean.astype(sdt), invstd.astype(sdt)


def _chunks(a, g):
    """Consecutive slices of g samples along axis 0 (the last may be smaller)."""
    a = np.asarray(a)
    return [a[i:i + g] for i in range(0, a.shape[0], g)]


def _ghost_forward_train(x, gamma, beta, running_mean, running_var, momentum, eps, axis, out, stats_dtype, g,
                         activation=None, residual=None):
    """Ghost Batch Normalization (Hoffer et al., 2017): each chunk of g consecutive samples along axis 0
    (the last may be smaller) normalized with its own statistics; mean and invstd are (K, C), one row per
    chunk. The running statistics move once, towards the average over the chunks of their means and of
    their unbiased variances (Keras's virtual_batch_size rule)."""
    x = np.asarray(x)
    C = x.shape[axis]
    sdt = _result_dtype(x) if stats_dtype is None else np.dtype(stats_dtype)
    res = [None] * len(_chunks(x, g)) if residual is None else _chunks(residual, g)
    parts = [forward_train(chunk, gamma, beta, eps=eps, axis=axis, stats_dtype=np.float64, activation=activation,
                           residual=r) for chunk, r in zip(_chunks(x, g), res)]
    y = np.concatenate([p[0] for p in parts]) if parts else np.zeros(x.shape, _result_dtype(x))
    means = np.array([p[1] for p in parts]).reshape(len(parts), C)
    invstds = np.array([p[2] for p in parts]).reshape(len(parts), C)
    if parts and x.size:
        stats = [batch_stats(chunk, axis=axis) for chunk in _chunks(x, g)]
        unbiased = np.array([m2 / (n - 1) for n, _, m2 in stats])
        if running_mean is not None:
            running_mean[...] = (1 - momentum) * running_mean + momentum * means.mean(axis=0)
        if running_var is not None:
            running_var[...] = (1 - momentum) * running_var + momentum * unbiased.mean(axis=0)
    if out is not None:
        out[...] = y
        y = out
    return y, means.astype(sdt), invstds.astype(sdt)


def forward_infer(x, running_mean, running_var, gamma=None, beta=None, *, eps=1e-5, axis=1, out=None,
                  activation=None, residual=None):
    """Inference forward: normalize with the given (running) statistics; returns y."""
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    return normalize(x, running_mean, invstd, gamma, beta, axis=axis, out=out, activation=activation,
                     residual=residual)


def backward(dy, x, mean, invstd, gamma=None, *, training=True, axis=1, out=None, activation=None,
             residual=None, y=None, beta=None, ghost_batch_size=None, mask=None):
    """Gradients of y = gamma * (x - mean) * invstd + beta; returns (dx, dgamma, dbeta).

    With ``training=True`` mean and invstd are the batch statistics of x, so the gradient flows through
    them too:  dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
    With ``training=False`` they are constants (frozen BN):  dx = gamma * invstd * dy.
    With ``activation="relu"`` dy is first masked where the forward's output (``y``, or recomputed with
    ``beta``) was not > 0; with ``residual`` the masked dy is returned fourth, as d_residual.
    With ``ghost_batch_size`` mean and invstd are (K, C), one row per ghost batch: each ghost batch's
    gradient with its own row; dgamma and dbeta are the sums over the ghost batches.
    With ``mask`` the sums run over the real (True) positions only, M is their count, and dx is 0 at
    the others.
    """
    if mask is not None:
        flat, moved_shape, ax = _layout(x, axis)
        real = _flat_mask(mask, x, ax)
        dflat = _layout(dy, ax)[0]
        dx_real, dgamma, dbeta = backward(dflat[real], flat[real], mean, invstd, gamma, training=training)
        dx = np.zeros_like(flat)
        dx[real] = dx_real
        dt = _result_dtype(x)
        gdt = np.dtype(np.float32) if dt == np.float16 else dt
        return _finish(dx, moved_shape, ax, x, out), dgamma.astype(gdt), dbeta.astype(gdt)
    if ghost_batch_size is not None:
        g = ghost_batch_size
        n = len(_chunks(x, g))
        per_chunk = lambda a: [a] * n if a is None or isinstance(a, bool) else _chunks(a, g)  # noqa: E731
        parts = [backward(dy_k, x_k, m, s, gamma, training=training, axis=axis, activation=activation,
                          residual=r_k, y=y_k, beta=beta)
                 for dy_k, x_k, m, s, r_k, y_k in zip(_chunks(dy, g), _chunks(x, g), np.asarray(mean),
                                                      np.asarray(invstd), per_chunk(residual), per_chunk(y))]
        C = np.shape(x)[axis]
        dt = _result_dtype(x)
        gdt = np.dtype(np.float32) if dt == np.float16 else dt
        dx = np.concatenate([p[0] for p in parts]) if parts else np.zeros(np.shape(x), dt)
        dgamma = np.sum([p[1].astype(np.float64) for p in parts], axis=0) if parts else np.zeros(C)
        dbeta = np.sum([p[2].astype(np.float64) for p in parts], axis=0) if parts else np.zeros(C)
        if out is not None:
            out[...] = dx
            dx = out
        result = (dx, dgamma.astype(gdt), dbeta.astype(gdt))
        if residual is not None and residual is not False:
            result += (np.concatenate([p[3] for p in parts]) if parts else np.zeros(np.shape(x), dt),)
        return result
    flat, moved_shape, axis = _layout(x, axis)
    dflat = _grad_at_bn(dy, x, mean, invstd, gamma, axis, activation, residual, y, beta)
    M, C = flat.shape
    mean = np.asarray(mean, np.float64).reshape(C)
    invstd = np.asarray(invstd, np.float64).reshape(C)
    g = _param(gamma, C, 1.0)
    xhat = (flat - mean) * invstd
    dbeta = dflat.sum(axis=0)
    dgamma = (dflat * xhat).sum(axis=0)
    if training:
        M = max(M, 1)  # an empty batch: empty dx, no 0/0
        dx = g * invstd * (dflat - dbeta / M - xhat * (dgamma / M))
    else:
        dx = g * invstd * dflat
    dt = _result_dtype(x)
    gdt = np.dtype(np.float32) if dt == np.float16 else dt  # sums overflow float16: float32 at least
    result = (_finish(dx, moved_shape, axis, x, out), dgamma.astype(gdt), dbeta.astype(gdt))
    if residual is not None and residual is not False:
        result += (_finish(dflat, moved_shape, axis, x, None),)
    return result


# --------------------------------------------------------------------------------------------------
# The phases: statistics -> merge -> normalize forward, reduce -> apply backward. Over the K parts of a
# batch (one per process), each part runs batch_stats and backward_reduce on its own rows, the parts'
# results are merged (merge_stats) or added, and every part normalizes and differentiates its own rows
# with the whole batch's numbers.
# --------------------------------------------------------------------------------------------------


def batch_stats(x, *, axis=1, mask=None):
    """Per channel: count (values per channel), mean and m2 = sum((x - mean)**2), float64.

    An empty x gives count 0 and zeros. With ``mask`` only the True positions count.
    """
    flat, _, axis = _layout(x, axis)
    if mask is not None:
        flat = flat[_flat_mask(mask, x, axis)] if flat.size else flat[:0]
    M, C = flat.shape
    if M == 0:
        return 0, np.zeros(C), np.zeros(C)
    mean = flat.mean(axis=0)
    return M, mean, ((flat - mean) ** 2).sum(axis=0)


def merge_stats(counts, means, m2s):
    """Merge parts k = 0..K-1 in order with Chan's pairwise formula; parts with count 0 are skipped.

    For parts a and b with n = n_a + n_b and delta = mean_b - mean_a::

        mean = mean_a + delta * n_b / n,    m2 = m2_a + m2_b + delta**2 * n_a * n_b / n

    except that where delta is not finite (a part's mean is +-inf or NaN) the mean is the weighted sum
    mean_a * n_a / n + mean_b * n_b / n: +-inf for one sign of infinity, NaN for both, as np.mean.
    """
    counts = np.asarray(counts)
    means = np.asarray(means, np.float64)
    m2s = np.asarray(m2s, np.float64)
    C = means.shape[1]
    n, mean, m2 = 0, np.zeros(C), np.zeros(C)
    for k in range(len(counts)):
        nb = int(counts[k])
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, means[k].copy(), m2s[k].copy()
            continue
        total = n + nb
        with np.errstate(invalid="ignore", over="ignore"):
            delta = means[k] - mean
            mean = np.where(np.abs(delta) <= np.finfo(np.float64).max, mean + delta * (nb / total),
                            mean * (n / total) + means[k] * (nb / total))
            m2 = m2 + m2s[k] + delta * delta * n * (nb / total)
        n = total
    return n, mean, m2


def normalize(x, mean, invstd, gamma=None, beta=None, *, axis=1, out=None, activation=None, residual=None):
    """y = gamma * (x - mean) * invstd + beta with given statistics (then the fused epilogue, if any)."""
    flat, moved_shape, axis = _layout(x, axis)
    C = flat.shape[1]
    mean = np.asarray(mean, np.float64).reshape(C)
    invstd = np.asarray(invstd, np.float64).reshape(C)
    y = (flat - mean) * invstd * _param(gamma, C, 1.0) + _param(beta, C, 0.0)
    return _finish(_epilogue(y, residual, activation, axis), moved_shape, axis, x, out)


def backward_reduce(dy, x, mean, *, axis=1):
    """Per channel: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)), float64."""
    flat, _, _ = _layout(x, axis)
    dflat, _, _ = _layout(dy, axis)
    mean = np.asarray(mean, np.float64).reshape(flat.shape[1])
    return dflat.sum(axis=0), (dflat * (flat - mean)).sum(axis=0)


def backward_apply(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count, *, axis=1, out=None):
    """The training gradient of x's rows given sums over a whole batch.

    With ``count`` values per channel in the whole batch::

        dx = gamma * invstd * (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count)
    """
    flat, moved_shape, axis = _layout(x, axis)
    dflat, _, _ = _layout(dy, axis)
    C = flat.shape[1]
    mean = np.asarray(mean, np.float64).reshape(C)
    invstd = np.asarray(invstd, np.float64).reshape(C)
    sum_dy = np.asarray(sum_dy, np.float64).reshape(C)
    sum_dy_xmu = np.asarray(sum_dy_xmu, np.float64).reshape(C)
    g = _param(gamma, C, 1.0)
    dx = g * invstd * (dflat - sum_dy / count - (flat - mean) * invstd ** 2 * (sum_dy_xmu / count))
    return _finish(dx, moved_shape, axis, x, out)


def update_running_stats(running_mean, running_var, mean, m2, count, *, momentum=0.1):
    """In place: r = (1 - momentum) * r + momentum * batch, with the unbiased m2 / (count - 1) for the
    variance (PyTorch's rule)."""
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * running_mean + momentum * np.asarray(mean, np.float64)
    if running_var is not None:
        running_var[...] = (1 - momentum) * running_var + momentum * (np.asarray(m2, np.float64) / (count - 1))


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------


def forward_train_renorm(x, running_mean, running_var, gamma=None, beta=None, *, rmax=3.0, dmax=5.0,
                         momentum=0.1, eps=1e-5, axis=1, out=None, update=True, activation=None, residual=None):
    """Batch Renormalization (Ioffe, 2017), training forward; returns (y, mean, invstd, r, d).

    ::

        sigma_B = sqrt(var + eps),  sigma = sqrt(running_var + eps)      (the running stats before update)
        r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mean - running_mean) / sigma, -dmax, dmax)
        y = gamma * (xhat * r + d) + beta

    then the running statistics are updated as forward_train updates them (when ``update``). With
    ``activation="relu"`` and/or ``residual``: y = max(renorm(x) + residual, 0).
    """
    flat, moved_shape, axis = _layout(x, axis)
    M, C = flat.shape
    if M == 0:
        y = _epilogue(flat + _param(beta, C, 0.0), residual, activation, axis)
        return _finish(y, moved_shape, axis, x, out), np.zeros(C), np.zeros(C), np.ones(C), np.zeros(C)
    mean = flat.mean(axis=0)
    var = ((flat - mean) ** 2).mean(axis=0)
    sigma_b = np.sqrt(var + eps)
    sigma = np.sqrt(np.asarray(running_var, np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
    d = np.clip((mean - np.asarray(running_mean, np.float64)) / sigma, -dmax, dmax)
    xhat = (flat - mean) / sigma_b
    y = _epilogue(_param(gamma, C, 1.0) * (xhat * r + d) + _param(beta, C, 0.0), residual, activation, axis)
    if update:
        running_mean[...] = (1 - momentum) * running_mean + momentum * mean
        running_var[...] = (1 - momentum) * running_var + momentum * var * M / (M - 1)
    return _finish(y, moved_shape, axis, x, out), mean, 1.0 / sigma_b, r, d


def backward_renorm(dy, x, mean, invstd, r, d, gamma=None, *, axis=1, out=None, activation=None, residual=None,
                    y=None, beta=None):
    """Gradients of Batch Renormalization with r and d constants; returns (dx, dgamma, dbeta).

    With g = dL/dxhat = dy * gamma * r, the batch-statistics chain rule of xhat gives ::

        dx = invstd * (g - mean(g) - xhat * mean(g * xhat)),

    and dgamma = sum(dy * (xhat * r + d)), dbeta = sum(dy). With ``activation="relu"`` dy is first masked
    where the forward's output (``y``, or recomputed with ``beta``) was not > 0; with ``residual`` the
    masked dy is returned fourth, as d_residual.
    """
    flat, moved_shape, axis = _layout(x, axis)
    M, C = flat.shape
    mean = np.asarray(mean, np.float64).reshape(C)
    invstd = np.asarray(invstd, np.float64).reshape(C)
    r = np.asarray(r, np.float64).reshape(C)
    d = np.asarray(d, np.float64).reshape(C)
    gamma = _param(gamma, C, 1.0)
    # the forward is BN with gamma * r and gamma * d + beta
    dflat = _grad_at_bn(dy, x, mean, invstd, gamma * r, axis, activation, residual, y,
                        gamma * d + _param(beta, C, 0.0))
    xhat = (flat - mean) * invstd
    g = dflat * gamma * r
    M = max(M, 1)
    dx = invstd * (g - g.sum(axis=0) / M - xhat * ((g * xhat).sum(axis=0) / M))
    dgamma = (dflat * (xhat * r + d)).sum(axis=0)
    dbeta = dflat.sum(axis=0)
    dt = _result_dtype(x)
    gdt = np.dtype(np.float32) if dt == np.float16 else dt
    result = (_finish(dx, moved_shape, axis, x, out), dgamma.astype(gdt), dbeta.astype(gdt))
    if residual is not None and residual is not False:
        result += (_finish(dflat, moved_shape, axis, x, None),)
    return result
