"""Batch Normalization layers with PyTorch's semantics, for hand-written NumPy training loops.

A layer holds its parameters (``weight``, ``bias``), their gradients (``grad_weight``, ``grad_bias``) and
running statistics as NumPy arrays, and calls the C kernels. ``layer(x)`` runs the forward pass and
remembers what ``layer.backward(dy)`` needs; ``backward`` returns dx and *overwrites* the parameter
gradients (there is no autograd graph to accumulate into).

The layer keeps a reference to the last forward's input, not a copy (a copy would cost a pass over
memory on every step): do not overwrite that array in place before calling ``backward``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from ._core import backward as _backward
from ._core import batch_stats as _batch_stats
from ._core import forward_infer as _forward_infer
from ._core import forward_train as _forward_train
from ._core import normalize as _normalize
from ._core import update_running_stats as _update_running_stats
from .variants import backward_renorm as _backward_renorm
from .variants import forward_train_renorm as _forward_train_renorm

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "StateDictError", "IncompatibleKeys"]


class IncompatibleKeys(NamedTuple):
    """What :meth:`BatchNorm.load_state_dict` found missing or unexpected (PyTorch's result type)."""

    missing_keys: list
    unexpected_keys: list


def _batch_count(value):
    """num_batches_tracked from a checkpoint: a single non-negative integer (an integral float is taken)."""
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise StateDictError(f"num_batches_tracked must be a single integer, got {value!r}")
    v = value.reshape(()).item()
    if not (v >= 0 and float(v).is_integer()):
        raise StateDictError(f"num_batches_tracked must be a non-negative integer, got {v!r}")
    return int(v)


class StateDictError(ValueError, KeyError, RuntimeError):
    """A state dict that does not fit the layer (missing or unexpected keys, wrong shapes).

    It is a ValueError and a KeyError for NumPy/scikit-learn habits, and a RuntimeError, which is what
    PyTorch's ``load_state_dict`` raises, so existing ``except`` clauses keep working.
    """

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BatchNorm:
    """Batch Normalization over the channel axis of an input with at least two dimensions.

    Parameters
    ----------
    num_features : int
        C, the number of channels (features) of the input.
    eps : float, default 1e-5
        Added to the variance before the square root.
    momentum : float or None, default 0.1
        Weight of each batch in the running statistics: ``r = (1 - momentum) * r + momentum * batch``.
        None gives the cumulative moving average (the mean over all batches seen).
    affine : bool, default True
        Learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
    track_running_stats : bool, default True
        Keep ``running_mean`` (init 0) and ``running_var`` (init 1), updated in training mode with the
        unbiased batch variance, and used in eval mode. When False, batch statistics are used in both
        modes and ``running_mean``/``running_var`` are None.
    device : None or "cpu"
        Accepted for PyTorch's positional order; NumPy arrays live in host memory.
    dtype : float32 or float64, default float32
        dtype of the parameters, their gradients and the statistics, whatever the input's dtype (the
        result has the input's dtype).
    bias : bool, default True (keyword only)
        With ``affine``, also learn the shift; ``bias=False`` learns ``weight`` alone (``bias`` is None).
    axis : int, default 1 (keyword only)
        The channel axis of the input; -1 for channels-last data.
    activation : None or "relu", default None (keyword only)
        A ReLU fused into the layer: ``y = max(bn(x) + residual, 0)`` in the pass that writes y, and
        its mask recomputed from x in backward (nothing more is kept than without it). With a residual
        (``layer(x, residual=r)``) this is the tail of a ResNet block.
    use_batch_stats : None, True or False, default None (keyword only)
        Normalize with the batch's statistics (True) or the running ones (False), whatever the mode;
        None follows the mode (batch statistics in training mode or without running statistics). An
        attribute, changeable at any time.
    update_running_stats : None, True or False, default None (keyword only)
        Update the running statistics from the batch (True) or keep them (False), whatever the mode;
        None updates exactly when PyTorch would: in training mode, when batch statistics normalize. An
        attribute, changeable at any time.
    renorm : bool, default False (keyword only)
        Batch Renormalization (Ioffe, 2017) whenever batch statistics normalize:
        ``y = gamma * (xhat * r + d) + beta`` with ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and
        ``d = clip((mu_B - mu) / sigma, -dmax, dmax)`` against the running statistics (from before this
        batch updates them), r and d constants in backward (see ``batchnorm.variants``). Eval mode is
        ordinary BN. Needs ``track_running_stats=True``.
    rmax, dmax : float, default 3.0 and 5.0 (keyword only)
        The bounds of r (at least 1) and of ``|d|`` (at least 0); attributes, changeable between steps (the
        paper ramps them up from 1 and 0).
    ghost_batch_size : int or None, default None (keyword only)
        Ghost Batch Normalization (Hoffer et al., 2017) whenever batch statistics normalize: consecutive
        chunks of this many samples along axis 0 (the last may be smaller) are normalized with their own
        statistics, and backward is exact per chunk. The running statistics move once per forward,
        towards the average over the chunks of their means and of their unbiased variances (Keras's
        ``virtual_batch_size`` rule). An attribute, changeable at any time; None is ordinary BN. Not
        with ``renorm=True``.

    Attributes
    ----------
    weight, bias : ndarray of shape (C,) or None
        The learned scale (gamma, init 1) and shift (beta, init 0), in ``dtype``; None when not
        ``affine`` (``bias`` also with ``bias=False``). Optimizers update them in place.
    grad_weight, grad_bias : ndarray of shape (C,) or None
        Their gradients, overwritten by each :meth:`backward`.
    gamma, beta
        The paper's names for ``weight`` and ``bias`` (the same arrays).
    running_mean, running_var : ndarray of shape (C,) or None
        Running estimates (init 0 and 1), None with ``track_running_stats=False``.
    num_batches_tracked : int or None
        Training batches seen (empty ones excepted), None with ``track_running_stats=False``.
    training : bool
        True in training mode (the default), False after :meth:`eval`.
    num_features, eps, momentum, affine, track_running_stats, axis, dtype, activation
        The constructor's arguments (``eps`` a float, ``dtype`` a :class:`numpy.dtype`).
    use_batch_stats, update_running_stats, renorm, rmax, dmax, ghost_batch_size
        The variants' options, as given to the constructor; changeable between calls.
    has_bias : bool
        The constructor's ``bias`` argument.

    Notes
    -----
    Follows ``torch.nn.BatchNorm*d`` step for step: training mode normalizes with the batch statistics
    (biased variance) and updates the running ones; eval mode normalizes with the running statistics;
    ``num_batches_tracked`` counts training batches. A call that raises leaves the layer unchanged.
    An empty batch (N = 0) gives an empty result and changes nothing (no statistics, no count; zero
    parameter gradients in backward). Where it differs from PyTorch on purpose, the README's
    "Differences from PyTorch" says so.

    The frozen-BN flags ``use_batch_stats`` and ``update_running_stats`` decouple the two things the
    mode decides. ``backward`` follows what the forward did: the gradient through the batch statistics
    after a forward that used them, the frozen gradient (statistics as constants) otherwise.
    ``num_batches_tracked`` counts the forwards that updated the running statistics. With
    ``update_running_stats=True`` and ``use_batch_stats=False`` the batch's statistics update the running
    ones after y was normalized with (and backward treats as constants) the running statistics from before
    the update. Without running statistics (``track_running_stats=False``) ``use_batch_stats=False`` and
    ``update_running_stats=True`` are refused (ValueError). The flags are attributes of the layer: they are
    pickled and copied with it, and are not ``state_dict`` keys (PyTorch would reject them).

    The first five arguments may be given positionally, in PyTorch's order:
    ``BatchNorm1d(10, 1e-3, 0.3, False, True)``.

    Examples
    --------
    >>> import numpy as np
    >>> import batchnorm as bn
    >>> layer = bn.BatchNorm1d(3)
    >>> x = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]], dtype=np.float32)
    >>> layer(x).round(4)                          # training mode: the batch's statistics
    array([[-1., -1., -1.],
           [ 1.,  1.,  1.]], dtype=float32)
    >>> layer.running_mean                         # 0.9 * 0 + 0.1 * batch mean
    array([0.2, 0.4, 0.6], dtype=float32)
    >>> dx = layer.backward(np.ones_like(x))       # fills grad_weight and grad_bias
    >>> layer.grad_bias
    array([2., 2., 2.], dtype=float32)
    >>> layer.eval()                               # now the running statistics
    BatchNorm1d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """

    _valid_ndims: tuple[int, ...] | None = None  # None: any ndim >= 2
    _expected: str = "at least 2D"

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=np.float32, *, bias=True, axis=1, activation=None, use_batch_stats=None,
                 update_running_stats=None, renorm=False, rmax=3.0, dmax=5.0, ghost_batch_size=None):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"num_features must be an integer, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
        if not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
            raise TypeError(f"momentum must be None or a real number, got {type(momentum).__name__}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be None or in [0, 1], got {momentum!r}")
        for name, flag in (("affine", affine), ("track_running_stats", track_running_stats), ("bias", bias),
                           ("renorm", renorm)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if device is not None and str(device) != "cpu":
            raise ValueError(f"device must be None or 'cpu' (NumPy arrays live in host memory), got {device!r}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {type(axis).__name__}")
        if activation is not None and not isinstance(activation, str):
            raise TypeError(f"activation must be None or 'relu', got {activation!r}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from exc
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.has_bias = bool(bias)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.activation = activation
        self.dtype = dtype
        self.training = True
        C = self.num_features
        self.weight = self.bias = self.grad_weight = self.grad_bias = None
        if self.affine:
            self.weight = np.ones(C, dtype)
            self.grad_weight = np.zeros(C, dtype)
            if self.has_bias:
                self.bias = np.zeros(C, dtype)
                self.grad_bias = np.zeros(C, dtype)
        if self.track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self._use_batch_stats = self._update_running_stats = None
        self.use_batch_stats = use_batch_stats
        self.update_running_stats = update_running_stats
        if renorm and not self.track_running_stats:
            raise ValueError("renorm=True needs running statistics to renormalize against, and "
                             "track_running_stats=False keeps none")
        self.renorm = bool(renorm)
        self.rmax = rmax
        self.dmax = dmax
        self._ghost_batch_size = None
        self.ghost_batch_size = ghost_batch_size
        self._cache = None
        self._cache_epilogue = None
        self._cache_extra = None
        self._precise = None  # a Moments while batchnorm.precise_stats is active

    def reset_running_stats(self):
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (in place), as PyTorch's."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self):
        """:meth:`reset_running_stats`, and weight 1, bias 0 (in place), as PyTorch's."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1
        if self.bias is not None:
            self.bias[...] = 0

    # gamma/beta are the paper's names for weight/bias.
    @property
    def gamma(self):
        """The scale, another name for ``weight`` (the same array; setting one sets the other)."""
        return self.weight

    @gamma.setter
    def gamma(self, value):
        self.weight = value

    @property
    def beta(self):
        """The shift, another name for ``bias`` (the same array; setting one sets the other)."""
        return self.bias

    @beta.setter
    def beta(self, value):
        self.bias = value

    # -- modes ---------------------------------------------------------------------------------------

    def train(self, mode=True):
        """Set training mode (True) or eval mode (False); returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode; returns the layer."""
        return self.train(False)

    # -- frozen-BN flags -----------------------------------------------------------------------------

    @staticmethod
    def _check_flag(name, value):
        if value is not None and not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be None, True or False, got {value!r}")
        return None if value is None else bool(value)

    @property
    def use_batch_stats(self):
        """None (follow the mode), True (batch statistics) or False (running statistics)."""
        return self._use_batch_stats

    @use_batch_stats.setter
    def use_batch_stats(self, value):
        value = self._check_flag("use_batch_stats", value)
        if value is False and not self.track_running_stats:
            raise ValueError("use_batch_stats=False needs running statistics to normalize with, and this layer "
                             "has track_running_stats=False")
        self._use_batch_stats = value

    @property
    def update_running_stats(self):
        """None (as PyTorch: in training mode with batch statistics), True or False."""
        return self._update_running_stats

    @update_running_stats.setter
    def update_running_stats(self, value):
        value = self._check_flag("update_running_stats", value)
        if value is True and not self.track_running_stats:
            raise ValueError("update_running_stats=True needs running statistics to update, and this layer has "
                             "track_running_stats=False")
        self._update_running_stats = value

    # -- Batch Renormalization bounds ----------------------------------------------------------------

    @staticmethod
    def _check_bound(name, value, low):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not value >= low:
            raise ValueError(f"{name} must be at least {low}, got {value!r}")
        return float(value)

    @property
    def rmax(self):
        """Batch Renormalization's bound of r = sigma_B / sigma: clipped to [1/rmax, rmax]; at least 1."""
        return self._rmax

    @rmax.setter
    def rmax(self, value):
        self._rmax = self._check_bound("rmax", value, 1.0)

    @property
    def dmax(self):
        """Batch Renormalization's bound of d = (mu_B - mu) / sigma: clipped to [-dmax, dmax]; at least 0."""
        return self._dmax

    @dmax.setter
    def dmax(self, value):
        self._dmax = self._check_bound("dmax", value, 0.0)

    # -- Ghost BN ------------------------------------------------------------------------------------

    @property
    def ghost_batch_size(self):
        """Samples per ghost batch (None: the whole batch)."""
        return self._ghost_batch_size

    @ghost_batch_size.setter
    def ghost_batch_size(self, value):
        if value is not None:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
                raise TypeError(f"ghost_batch_size must be None or a positive integer, got {value!r}")
            if value < 1:
                raise ValueError(f"ghost_batch_size must be None or a positive integer, got {value!r}")
            if self.renorm:
                raise ValueError("ghost_batch_size is not supported together with renorm=True")
            value = int(value)
        self._ghost_batch_size = value

    def _uses_batch_stats(self):
        """Whether a forward now normalizes with the batch's statistics."""
        if self._use_batch_stats is not None:
            return self._use_batch_stats
        return self.training or not self.track_running_stats

    def _updates_running_stats(self, use_batch_stats):
        """Whether a forward now updates the running statistics (given what it normalizes with)."""
        if self._update_running_stats is not None:
            return self._update_running_stats
        return self.training and self.track_running_stats and use_batch_stats

    # -- forward / backward --------------------------------------------------------------------------

    def _check_input(self, x):
        x = np.asarray(x)
        if self._valid_ndims is not None and x.ndim not in self._valid_ndims:
            raise ValueError(f"expected {self._expected} input, got {x.ndim}D input of shape {x.shape}")
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.ndim}D input of shape {x.shape}")
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(f"axis {self.axis} is out of bounds for input of shape {x.shape}")
        if x.shape[self.axis] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels on axis {self.axis}, "
                             f"got input of shape {x.shape}")
        return x

    def _momentum_now(self):
        """The weight of this batch in the running statistics (None: cumulative moving average)."""
        return 1.0 / (self.num_batches_tracked + 1) if self.momentum is None else self.momentum

    def _frozen_stats(self):
        """The running statistics as the constants an eval-mode forward normalizes with, in float64,
        saved as used: a later change of the running stats must not alter the gradient of this forward."""
        mean = self.running_mean.astype(np.float64)
        invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        return mean, invstd

    def _remember(self, x, mean, invstd, batch_stats, count=None, extra=None, residual=None):
        weight = None if self.weight is None else np.array(self.weight, copy=True)
        self._cache = (x, mean, invstd, batch_stats, weight, count)
        # what a variant's backward needs besides (kept apart so that the tuple keeps its shape)
        self._cache_extra = extra
        # What the fused epilogue's backward needs: the residual (a reference, as x is) when the ReLU mask
        # is recomputed with it, and beta as the forward used it.
        beta = None
        if self.activation is not None:
            beta = np.zeros(self.num_features) if self.bias is None else np.array(self.bias, np.float64)
        self._cache_epilogue = None if self.activation is None and residual is None else (residual, beta)

    def _epilogue_kwargs(self):
        """The fused-epilogue arguments of the kernels' backward for the last forward."""
        if self._cache_epilogue is None:
            return {}
        residual, beta = self._cache_epilogue
        kw = {}
        if self.activation is not None:
            kw.update(activation=self.activation, beta=beta)
        if residual is not None:
            kw["residual"] = residual if self.activation is not None else True
        return kw

    def _check_masked_count(self, x, mask, count):
        if x.size and count < 2:  # the message forward_train(mask=) gives
            raise ValueError(f"Expected more than 1 value per channel when training, got a mask with {count} True "
                             f"position{'' if count == 1 else 's'} (mask of shape {np.shape(mask)}, x of shape "
                             f"{x.shape} with channel axis {self.axis})")

    def _check_training_count(self, x, count):
        if count == 1:  # the message forward_train gives
            raise ValueError(f"Expected more than 1 value per channel when training, got input of shape "
                             f"{x.shape} with channel axis {self.axis}")

    def forward(self, x, residual=None, *, mask=None):
        """Normalize x; in training mode also update the running statistics. Returns y.

        What normalizes and whether the running statistics are updated follow the mode, or the
        ``use_batch_stats``/``update_running_stats`` flags where they are set. With ``residual`` (an
        array of x's shape) y is ``act(bn(x) + residual)``, with the layer's ``activation`` (none or
        ReLU), fused into the same pass; ``backward`` then also returns the gradient with respect to the
        residual.

        With ``mask`` (masked BN: a boolean array broadcastable to x's shape without the channel axis,
        True at real positions, e.g. (N, L) for padded (N, C, L) sequences) the batch statistics and the
        running statistics' updates use only the True positions, and y is 0 at the False ones, in every
        mode; ``backward`` uses the same mask (dx is 0 at the False positions). Not combined with
        ``renorm``, ``ghost_batch_size``, ``activation`` or ``residual``.
        """
        x = self._check_input(x)
        if residual is not None:
            residual = np.asarray(residual)
        if mask is not None:
            mask = self._check_mask(x, mask, residual)
        epilogue = {"activation": self.activation, "residual": residual}
        precise = self._precise is not None
        use = precise or self._uses_batch_stats()
        update = not precise and self._updates_running_stats(use)
        if precise:
            y, mean, invstd, extra = self._forward_precise(x, epilogue, mask)
        elif use:
            y, mean, invstd, extra = self._forward_batch(x, update, epilogue, mask)
        else:
            y, mean, invstd, extra = self._forward_frozen(x, update, epilogue, mask)
        if update and x.size:  # an empty batch is no batch: PyTorch's checkpoints count alike
            self.num_batches_tracked += 1
        if mask is not None:
            extra = ("mask", mask)
        self._remember(x, mean, invstd, use, extra=extra, residual=residual)
        return y

    __call__ = forward

    def _check_mask(self, x, mask, residual):
        """The mask as given (a boolean array broadcastable to x's shape without the channel axis), checked
        before anything changes, with the options it does not combine with refused."""
        for name, on in (("renorm=True", self.renorm), ("ghost_batch_size", self._ghost_batch_size is not None),
                         ("activation", self.activation is not None), ("residual", residual is not None)):
            if on:
                raise ValueError(f"mask cannot be combined with {name} (not supported)")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array (True where a position is real data), got dtype "
                            f"{mask.dtype}; use e.g. mask.astype(bool)")
        axis = self.axis % x.ndim
        want = x.shape[:axis] + x.shape[axis + 1:]
        try:
            np.broadcast_to(mask, want)
        except ValueError:
            raise ValueError(f"mask has shape {mask.shape}, expected a shape broadcastable to {want} (the shape of "
                             f"x without its channel axis {self.axis})") from None
        return mask

    def _real_positions(self, shape, mask):
        """mask broadcast to an array of ``shape``, of size 1 along the channel axis (True: real data)."""
        axis = self.axis % len(shape)
        return np.expand_dims(np.broadcast_to(mask, shape[:axis] + shape[axis + 1:]), axis)

    def _zero_padding(self, y, mask):
        """y = 0 at the positions mask marks as padding (for the paths without a masked kernel)."""
        np.copyto(y, 0, where=~self._real_positions(y.shape, mask))
        return y

    def _forward_batch(self, x, update, epilogue, mask=None):
        """Normalize with x's own statistics; update the running ones when asked.
        Returns (y, mean, invstd, extra) with what backward needs."""
        if self.renorm:
            return self._forward_renorm(x, update, epilogue)
        if mask is not None:
            y, mean, invstd = _forward_train(
                x, self.weight, self.bias,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None,
                momentum=self._momentum_now() if update else 0.0, eps=self.eps, axis=self.axis,
                stats_dtype=np.float64, mask=mask)
            return y, mean, invstd, None
        ghost = self._ghost_batch_size
        y, mean, invstd = _forward_train(
            x, self.weight, self.bias,
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None,
            momentum=self._momentum_now() if update else 0.0, eps=self.eps, axis=self.axis,
            # float64 whatever x's type: backward from float32 statistics loses digits when the
            # data's mean is large against its spread (5e-5 of dx at mean = 1e5 std), and the ReLU
            # mask is recomputed from exactly the statistics the forward used
            stats_dtype=np.float64, ghost_batch_size=ghost, **epilogue)
        return y, mean, invstd, None if ghost is None else ("ghost", ghost)

    def _update_stats(self, x, mask=None):
        """(count, mean, m2) of x for update_running_stats, as a training forward would update with them;
        with ghost_batch_size, the chunks' average mean and average unbiased variance (as m2 over a
        count of 2, whose m2 / (count - 1) is that variance); with a mask, of its True positions. Count 0
        for an empty batch."""
        if mask is not None:
            count, mean, m2 = _batch_stats(x, axis=self.axis, mask=mask)
            self._check_masked_count(x, mask, count)
            return count, mean, m2
        g = self._ghost_batch_size
        if g is None:
            count, mean, m2 = _batch_stats(x, axis=self.axis)
            self._check_training_count(x, count)
            return count, mean, m2
        if x.size == 0:
            return 0, None, None
        sum_mean, sum_var, chunks = 0.0, 0.0, 0
        for start in range(0, x.shape[0], g):
            count, mean, m2 = _batch_stats(x[start:start + g], axis=self.axis)
            if count == 1:
                raise ValueError(f"Expected more than 1 value per channel when training, got a ghost batch of 1 "
                                 f"value per channel (input of shape {x.shape}, ghost_batch_size={g})")
            sum_mean, sum_var, chunks = sum_mean + mean, sum_var + m2 / (count - 1), chunks + 1
        return 2, sum_mean / chunks, sum_var / chunks

    def _forward_renorm(self, x, update, epilogue):
        """Batch Renormalization: batch statistics corrected by r and d towards the running ones."""
        if self._ghost_batch_size is not None:  # both set as attributes after construction
            raise ValueError("ghost_batch_size is not supported together with renorm=True")
        y, mean, invstd, r, d = _forward_train_renorm(
            x, self.running_mean, self.running_var, self.weight, self.bias, rmax=self.rmax, dmax=self.dmax,
            momentum=self._momentum_now(), eps=self.eps, axis=self.axis, update=update, **epilogue)
        return y, mean, invstd, ("renorm", r, d)

    def _forward_precise(self, x, epilogue, mask=None):
        """Inside batchnorm.precise_stats: plain batch statistics, recorded exactly (m2, not invstd), no
        update. batch_stats then normalize give forward_train's bits. With a mask, the statistics of its
        True positions, and y zeroed at the others."""
        count, mean, m2 = _batch_stats(x, axis=self.axis, mask=mask)
        if mask is None:
            self._check_training_count(x, count)
        else:
            self._check_masked_count(x, mask, count)
        invstd = 1.0 / np.sqrt(m2 / count + self.eps) if count else np.zeros(self.num_features)
        y = _normalize(x, mean, invstd, self.weight, self.bias, axis=self.axis, **epilogue)
        if mask is not None:
            y = self._zero_padding(y, mask)
        self._precise._add(count, mean, m2)
        return y, mean, invstd, None

    def _forward_frozen(self, x, update, epilogue, mask=None):
        """Normalize with the running statistics (constants for backward); with ``update``, then update
        them from x's statistics (of mask's True positions). Returns (y, mean, invstd, extra)."""
        mean, invstd = self._frozen_stats()
        if update:
            count, batch_mean, batch_m2 = self._update_stats(x, mask)
        y = _forward_infer(x, self.running_mean, self.running_var, self.weight, self.bias,
                           eps=self.eps, axis=self.axis, **epilogue)
        if mask is not None:
            y = self._zero_padding(y, mask)
        if update and count:  # last: nothing is changed when a call above raised
            _update_running_stats(self.running_mean, self.running_var, batch_mean, batch_m2, count,
                                  momentum=self._momentum_now())
        return y, mean, invstd, None

    def _cached(self, dy):
        """The last forward's saved values, and dy checked against its input."""
        if self._cache is None:
            raise RuntimeError("backward() called before forward(): there is no forward pass to differentiate")
        x = self._cache[0]
        dy = np.asarray(dy)
        if dy.shape != x.shape:
            raise ValueError(f"dy has shape {dy.shape}, expected {x.shape} (the shape of the last forward's input)")
        return (dy,) + self._cache

    def _set_gradients(self, dgamma, dbeta):
        # In place, so that an optimizer holding layer.gradients() sees the new values; in the layer's
        # dtype whatever the input's (a float16 batch's gradients are accumulated in float64).
        if self.grad_weight is not None:
            np.copyto(self.grad_weight, dgamma, casting="unsafe")
        if self.grad_bias is not None:
            np.copyto(self.grad_bias, dbeta, casting="unsafe")

    def backward(self, dy):
        """Gradient of the loss with respect to the last forward's input, given dy = dL/dy.

        Overwrites ``grad_weight`` and ``grad_bias`` (when affine) and returns dx, or ``(dx,
        d_residual)`` when the last forward was given a residual. After a forward that normalized with
        the batch statistics (training mode, or ``use_batch_stats=True``) the gradient flows through
        them; after one that used the running statistics they are constants (frozen BN). With
        ``activation="relu"`` dy passes only where the forward's output was > 0.
        """
        dy, x, mean, invstd, batch_stats, weight, _ = self._cached(dy)
        extra = self._cache_extra
        if extra is not None and extra[0] == "renorm":
            grads = _backward_renorm(dy, x, mean, invstd, extra[1], extra[2], weight, axis=self.axis,
                                     **self._epilogue_kwargs())
        else:
            kw = {"ghost_batch_size": extra[1]} if extra is not None and extra[0] == "ghost" else {}
            if extra is not None and extra[0] == "mask":
                kw = {"mask": extra[1]}
            grads = _backward(dy, x, mean, invstd, weight, training=batch_stats, axis=self.axis,
                              **kw, **self._epilogue_kwargs())
        self._set_gradients(grads[1], grads[2])
        return (grads[0], grads[3]) if len(grads) == 4 else grads[0]

    # -- parameters and state ------------------------------------------------------------------------

    def parameters(self):
        """The learnable arrays, [weight, bias] ([weight] with ``bias=False``, empty when not affine);
        SGD updates them in place."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def gradients(self):
        """The gradients of :meth:`parameters`, in the same order."""
        return [g for g in (self.grad_weight, self.grad_bias) if g is not None]

    def _state_keys(self):
        keys = []
        if self.weight is not None:
            keys.append("weight")
        if self.bias is not None:
            keys.append("bias")
        if self.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def state_dict(self):
        """A dict with PyTorch's keys and NumPy values (copies)."""
        state = {}
        for key in self._state_keys():
            if key == "num_batches_tracked":
                state[key] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[key] = getattr(self, key).copy()
        return state

    def load_state_dict(self, state_dict, strict=True):
        """Load a state dict with PyTorch's keys; values may be anything ``np.asarray`` takes (torch
        tensors too).

        As PyTorch's: with ``strict=True`` missing or unexpected keys raise :class:`StateDictError`; with
        ``strict=False`` they are reported, and the layer keeps its own values for the missing ones. A
        checkpoint without ``num_batches_tracked`` (older PyTorch, plain dicts) loads and keeps the
        layer's count. Wrong shapes, non-numeric values and a ``num_batches_tracked`` that is not a
        non-negative integer always raise, and then nothing is changed.

        Returns
        -------
        IncompatibleKeys
            A named tuple ``(missing_keys, unexpected_keys)``, like PyTorch's result.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        expected = self._state_keys()
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        # older checkpoints have no counter; PyTorch loads them and keeps the module's
        hard_missing = [k for k in missing if k != "num_batches_tracked"]
        if strict and (hard_missing or unexpected):
            raise StateDictError(f"error loading state_dict into {type(self).__name__}: missing keys "
                                 f"{hard_missing}, unexpected keys {unexpected}")
        new = {}
        for key in expected:
            if key not in state_dict:
                continue
            value = state_dict[key]
            if hasattr(value, "detach"):  # a torch tensor straight from a torch state dict
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            if key == "num_batches_tracked":
                new[key] = _batch_count(value)
                continue
            if value.shape != (self.num_features,):
                raise StateDictError(f"{key} has shape {value.shape}, expected ({self.num_features},)")
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{key} must be real numbers, got dtype {value.dtype}")
            new[key] = value.astype(self.dtype, copy=True)
        for key, value in new.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:  # in place: arrays handed out by parameters() stay the layer's arrays
                getattr(self, key)[...] = value
        return IncompatibleKeys(missing, unexpected)

    def __setstate__(self, state):
        state.setdefault("has_bias", state.get("bias") is not None or not state.get("affine", True))
        state.setdefault("activation", None)
        state.setdefault("_cache_epilogue", None)
        # layers pickled before the variants existed
        for key in ("_use_batch_stats", "_update_running_stats", "_cache_extra", "_precise"):
            state.setdefault(key, None)
        state.setdefault("renorm", False)
        state.setdefault("_rmax", 3.0)
        state.setdefault("_dmax", 5.0)
        state.setdefault("_ghost_batch_size", None)
        self.__dict__.update(state)

    def __getstate__(self):
        # The cached forward (which holds the last input batch) is not part of the layer's state, as
        # activations are not part of a PyTorch module's: a restored layer needs a forward before backward.
        state = self.__dict__.copy()
        state["_cache"] = state["_cache_epilogue"] = state["_cache_extra"] = state["_precise"] = None
        return state

    def extra_repr(self):
        """The arguments part of the repr, as PyTorch's ``extra_repr``."""
        # PyTorch's form; bias only when it is off, as the common case reads like older PyTorch's repr
        s = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
        if not self.has_bias:
            s += "bias=False, "
        s += f"track_running_stats={self.track_running_stats}"
        if self.axis != 1:
            s += f", axis={self.axis}"
        if self.dtype != np.float32:
            s += f", dtype={self.dtype.name}"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        for name in ("use_batch_stats", "update_running_stats"):
            if getattr(self, name) is not None:
                s += f", {name}={getattr(self, name)}"
        if self.renorm:
            s += f", renorm=True, rmax={self.rmax}, dmax={self.dmax}"
        if self._ghost_batch_size is not None:
            s += f", ghost_batch_size={self._ghost_batch_size}"
        return s

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class BatchNorm1d(BatchNorm):
    """Batch Normalization of (N, C) or (N, C, L) input; see :class:`BatchNorm`."""

    _valid_ndims = (2, 3)
    _expected = "2D or 3D"


class BatchNorm2d(BatchNorm):
    """Batch Normalization of (N, C, H, W) input; see :class:`BatchNorm`."""

    _valid_ndims = (4,)
    _expected = "4D"


class BatchNorm3d(BatchNorm):
    """Batch Normalization of (N, C, D, H, W) input; see :class:`BatchNorm`."""

    _valid_ndims = (5,)
    _expected = "5D"
