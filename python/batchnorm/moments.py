"""Exact population statistics: a streaming per-channel accumulator, and "precise BN".

:class:`Moments` accumulates the count, mean and m2 = sum((x - mean)**2) of every value seen per channel,
merging each batch's :func:`batchnorm.batch_stats` into the total with :func:`batchnorm.merge_stats`
(Chan's pairwise formula, float64): every value weighs the same, whatever the batch it came in, and no
``E[x^2] - E[x]^2`` cancellation loses the variance of data with a large mean.

:func:`precise_stats` uses it to replace the running statistics of BN layers, an exponential moving
average of past batches taken while the weights were still moving, by the exact statistics of the
current network over as many batches as wanted (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np

from ._core import batch_stats, merge_stats, normalize
from .layers import BatchNorm

__all__ = ["Moments", "precise_stats"]


class Moments:
    """Streaming per-channel count, mean and variance of everything passed to :meth:`Moments.update`.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    axis : int, default 1 (keyword only)
        The channel axis of the arrays given to :meth:`Moments.update` (-1 for channels-last data).

    Attributes
    ----------
    count : int
        Values seen per channel.
    mean : ndarray of shape (C,), float64
        Their mean (NaN before any value).
    var : ndarray of shape (C,), float64
        Their biased variance ``m2 / count``, as ``np.var`` and scikit-learn's ``StandardScaler.var_``
        (NaN before any value).
    var_unbiased : ndarray of shape (C,), float64
        The unbiased variance ``m2 / (count - 1)``, as ``np.var(ddof=1)`` and BN's running variance (NaN
        before two values).

    Notes
    -----
    Each batch's statistics are computed by :func:`batchnorm.batch_stats` (float64, in cached chunks,
    each in two passes or in one centred on the running mean) and merged into the total in order by :func:`batchnorm.merge_stats`, so the result is that of
    one pass over the concatenation of all batches up to the rounding of the merges (no per-batch
    weighting, no ``E[x^2] - E[x]^2``). The peer is ``sklearn.preprocessing.StandardScaler.partial_fit``
    (its ``mean_`` and ``var_``); this works on any channel axis and layout, and in parallel C.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> m = bn.Moments(2)
    >>> m.update(np.array([[1.0, 10.0], [3.0, 30.0]])).update(np.array([[5.0, 50.0]]))
    Moments(2, count=3)
    >>> m.mean, m.var_unbiased
    (array([ 3., 30.]), array([  4., 400.]))
    """

    def __init__(self, num_features, *, axis=1):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an integer, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
        self.num_features = int(num_features)
        self.axis = int(axis)
        self.reset()

    def reset(self):
        """Forget every value seen; returns self."""
        self._count = 0
        self._mean = np.zeros(self.num_features)
        self._m2 = np.zeros(self.num_features)
        return self

    # -- accumulating --------------------------------------------------------------------------------

    def update(self, x, mask=None):
        """Add the values of x, per channel; returns self.

        Parameters
        ----------
        x : array_like, at least 2-D
            A batch with ``num_features`` channels on axis ``axis``; any dtype :func:`batchnorm.batch_stats`
            takes. May be empty.
        mask : array_like of bool, optional
            Broadcastable to x's shape without its channel axis (e.g. (N, L) for (N, C, L) input, or for
            (N, L, C) input with ``axis=-1``): only the values at True positions are added (by
            :func:`batchnorm.batch_stats` with the mask: x is read in place, nothing is gathered).

        Raises
        ------
        TypeError, ValueError
            For a wrong number of channels, ndim < 2, a bad axis, a mask that is not boolean or does not
            broadcast, or a total count beyond 2**53. Nothing is changed then.
        """
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"x must have at least 2 dimensions (N, C, ...), got shape {x.shape}")
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"axis {self.axis} is out of bounds for x of shape {x.shape}")
        if x.shape[self.axis] != self.num_features:
            raise ValueError(f"x has shape {x.shape}, expected {self.num_features} channels on axis {self.axis}")
        count, mean, m2 = batch_stats(x, axis=self.axis, mask=mask)
        return self._add(count, mean, m2)

    def _add(self, count, mean, m2):
        """Merge the statistics of count more values (as batch_stats gives them) into the total."""
        if count == 0:
            return self
        self._count, self._mean, self._m2 = merge_stats([self._count, count], np.stack([self._mean, mean]),
                                                        np.stack([self._m2, m2]))
        return self

    def merge(self, other):
        """Add everything another accumulator has seen (e.g. one per process or per worker); returns self.

        Parameters
        ----------
        other : Moments
            With the same ``num_features`` (its ``axis`` does not matter). ``m.merge(m)`` counts m's values
            twice.
        """
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a batchnorm.Moments, got {type(other).__name__}")
        if other.num_features != self.num_features:
            raise ValueError(f"other has {other.num_features} features, expected {self.num_features}")
        return self._add(other._count, other._mean.copy(), other._m2.copy())

    # -- results -------------------------------------------------------------------------------------

    @property
    def count(self):
        """Values per channel accumulated so far (int)."""
        return self._count

    @property
    def mean(self):
        """Per-channel mean, float64 (C,); NaN before any value."""
        return self._mean.copy() if self._count else np.full(self.num_features, np.nan)

    @property
    def var(self):
        """Per-channel biased variance ``m2 / count``, float64 (C,); NaN before any value."""
        return self._m2 / self._count if self._count else np.full(self.num_features, np.nan)

    @property
    def var_unbiased(self):
        """Per-channel unbiased variance ``m2 / (count - 1)``, float64 (C,); NaN below two values."""
        return self._m2 / (self._count - 1) if self._count > 1 else np.full(self.num_features, np.nan)

    def normalize(self, x, *, eps=0.0, out=None):
        """Standardize x with the accumulated statistics: ``(x - mean) / sqrt(var + eps)`` (biased var).

        Parameters
        ----------
        x : array_like
            With ``num_features`` channels on axis ``axis``.
        eps : float, default 0.0
            Added to the variance; with 0 a constant channel gives inf/NaN (scikit-learn's
            ``StandardScaler`` leaves such channels unscaled instead).
        out : ndarray, optional
            As :func:`batchnorm.normalize`.

        Returns
        -------
        ndarray
            x's shape and dtype (float64 for integer input).
        """
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        if self._count == 0:
            raise ValueError("normalize needs statistics: no value has been added yet")
        with np.errstate(divide="ignore"):
            invstd = 1.0 / np.sqrt(self.var + eps)
        return normalize(x, self._mean, invstd, axis=self.axis, out=out)

    def __repr__(self):
        axis = f", axis={self.axis}" if self.axis != 1 else ""
        return f"Moments({self.num_features}{axis}, count={self._count})"


# --------------------------------------------------------------------------------------------------
# precise BN
# --------------------------------------------------------------------------------------------------


def _find_layers(obj, found, seen):
    """The BatchNorm layers in obj: a layer, a container with a ``layers`` attribute, or a list, tuple or
    dict of those, recursively; each layer once, in the order met."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, BatchNorm):
        found.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _find_layers(value, found, seen)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _find_layers(item, found, seen)
    elif hasattr(obj, "layers"):
        _find_layers(obj.layers, found, seen)


def _snapshot(layer):
    """Every attribute of a layer, arrays also as copies of their values."""
    return {key: (value, np.array(value, copy=True) if isinstance(value, np.ndarray) else None)
            for key, value in layer.__dict__.items()}


def _restore(layer, snap):
    """The layer's attributes back to snap: the same objects, arrays with their old values (in place, so
    that arrays handed out by ``parameters()`` stay the layer's)."""
    for key in [k for k in layer.__dict__ if k not in snap]:
        del layer.__dict__[key]
    for key, (value, values) in snap.items():
        if values is not None:
            value[...] = values
        layer.__dict__[key] = value


class precise_stats:
    """Context manager: on exit, BN layers' running statistics are the exact statistics of what they saw.

    Inside the ``with`` block, run forward passes of the model over some batches (e.g. a few hundred
    training batches, without backward or optimizer steps). Every BatchNorm layer found normalizes with
    each batch's own statistics, as in training mode, and accumulates them exactly (a :class:`Moments`
    per layer). On a normal exit each layer's ``running_mean`` is the mean, and ``running_var`` the
    unbiased variance, over every value it saw, each value weighing the same (not each batch, as PyTorch's
    ``swa_utils.update_bn`` and an exponential moving average do).

    Parameters
    ----------
    layers : BatchNorm, container or list
        A layer; an object with a ``layers`` attribute (e.g. :class:`batchnorm.examples.Sequential`); or a
        list, tuple or dict of these, searched recursively. Layers with ``track_running_stats=False`` have
        no running statistics and are left alone.

    Notes
    -----
    Nothing else about the layers changes: on exit, parameters, gradients, ``num_batches_tracked``,
    ``momentum``, the train/eval mode, the frozen-BN flags and the last forward (what ``backward`` would
    differentiate) are what they were on entry, whatever the block did with them. If the block raises, the
    layers are restored to exactly their state on entry (running statistics included) and the exception
    propagates. Inside the block the layers are in training mode, use plain batch statistics whatever
    their flags or variant options (Batch Renormalization, Ghost BN), and do not update their running
    statistics. A layer that saw no values keeps its running statistics (with a RuntimeWarning).
    :class:`batchnorm.distributed.SyncBatchNorm` layers accumulate the statistics of the whole batch over
    all processes, so every process ends with the same running statistics. Blocks cannot be nested over
    the same layer.

    Examples
    --------
    >>> import numpy as np, batchnorm as bn
    >>> layer = bn.BatchNorm1d(2, dtype=np.float64)
    >>> with bn.precise_stats(layer):
    ...     for batch in (np.array([[1.0, 10.0], [3.0, 30.0]]), np.array([[5.0, 50.0]] * 2)):
    ...         _ = layer(batch)
    >>> layer.running_mean, layer.running_var, layer.num_batches_tracked
    (array([ 3.5, 35. ]), array([  3.66666667, 366.66666667]), 0)
    """

    def __init__(self, layers):
        found = []
        _find_layers(layers, found, set())
        if not found:
            raise ValueError(f"precise_stats found no batchnorm layers in {type(layers).__name__} (expected a "
                             "BatchNorm layer, an object with a 'layers' attribute, or a list of them)")
        self.layers = found
        self._snapshots = None

    def __enter__(self):
        if self._snapshots is not None:
            raise RuntimeError("this precise_stats block is already active")
        for layer in self.layers:
            if getattr(layer, "_precise", None) is not None:
                raise ValueError(f"{layer!r} is already inside a precise_stats block")
        self._snapshots = [_snapshot(layer) for layer in self.layers]
        for layer in self.layers:
            layer.training = True
            if layer.track_running_stats:
                layer._precise = Moments(layer.num_features, axis=layer.axis)
        return self.layers

    def __exit__(self, exc_type, exc, tb):
        moments = [getattr(layer, "_precise", None) for layer in self.layers]
        for layer, snap in zip(self.layers, self._snapshots):
            _restore(layer, snap)
        self._snapshots = None
        if exc_type is not None:
            return False
        for i, (layer, m) in enumerate(zip(self.layers, moments)):
            if m is None:
                continue
            if m.count == 0:
                warnings.warn(f"precise_stats: layer {i} ({layer!r}) saw no values; its running statistics "
                              "are left as they were", RuntimeWarning, stacklevel=2)
                continue
            # count >= 2 here: a forward with a single value per channel raised in the block
            layer.running_mean[...] = m.mean
            layer.running_var[...] = m.var_unbiased
        return False
