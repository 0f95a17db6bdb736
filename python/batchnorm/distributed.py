"""Synchronized Batch Normalization across processes, over MPI (mpi4py).

When a batch is spread over several processes (data-parallel training), :class:`SyncBatchNorm`
normalizes with the statistics of the *whole* batch, the union of every process's part, instead of each
process's few samples. It is PyTorch's ``SyncBatchNorm`` (GPU only there) on the CPU, for NumPy:

- training forward: each process computes its part's ``(count, mean, m2)`` (:func:`batchnorm.batch_stats`),
  one ``Allgather`` shares them, and every process merges the parts in rank order
  (:func:`batchnorm.merge_stats`), so all hold bit-identical statistics and running statistics;
- training backward: one ``Allgather`` of each part's ``(sum_dy, sum_dy_xmu)``
  (:func:`batchnorm.backward_reduce`), summed in rank order on every process (deterministic, not left to
  the MPI library's reduction order), then :func:`batchnorm.backward_apply` with the global sums;
- eval mode communicates nothing: it normalizes with the running statistics like :class:`batchnorm.BatchNorm`;
  neither does a communicator of one process, where the layer is :class:`batchnorm.BatchNorm` (same bits).

Two collectives per training step, each of ``processes x (2 C + 2)`` float64 values. ``dx`` on each
process is that process's rows of the gradient of single-process BN over the concatenated batch.
``grad_weight`` and ``grad_bias`` are this process's *contributions* (summed over processes they are the
single-process gradients), as in PyTorch: reduce them together with the other parameters' gradients
(sum, or average when the loss is averaged over processes).

A process whose input is invalid does not leave the others waiting in a collective: it still joins the
collective, flagged as failed; then it raises its own error and every other process raises
:class:`SyncBatchNormError` naming the failing rank(s). No state changes on any process.

``import batchnorm`` never imports mpi4py; this module imports it the first time a communicator is needed.
"""

from __future__ import annotations

import copy

import numpy as np

from ._core import (
    backward_apply,
    backward_reduce,
    batch_stats,
    merge_stats,
    normalize,
    update_running_stats,
)
from .layers import BatchNorm
from .reference import _result_dtype
from .variants import _corrections

__all__ = ["SyncBatchNorm", "SyncBatchNormError", "world"]


class SyncBatchNormError(RuntimeError):
    """Raised on the processes whose own input was fine when another process's failed.

    ``ranks`` lists the failing ranks (in the communicator), ``messages`` their errors.
    """

    def __init__(self, message, ranks=(), messages=()):
        super().__init__(message)
        self.ranks = list(ranks)
        self.messages = list(messages)


def world():
    """``mpi4py.MPI.COMM_WORLD``, importing mpi4py (and so initializing MPI) on first use."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("batchnorm.distributed needs mpi4py and an MPI library: "
                          "pip install 'batchnorm[mpi]'") from exc
    return MPI.COMM_WORLD


def _check_comm(comm):
    for attr in ("Allgather", "allgather", "Get_rank", "Get_size"):
        if not hasattr(comm, attr):
            raise TypeError(f"comm must be an mpi4py communicator (with {attr}), got {type(comm).__name__}")
    return comm


def _copy_state(src, dst):
    """Parameters, running statistics, counter, mode and frozen-BN flags of src into dst (a layer of the
    same options)."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(src, name)
        if value is not None:
            getattr(dst, name)[...] = value
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    dst.use_batch_stats = src.use_batch_stats
    dst.update_running_stats = src.update_running_stats


class SyncBatchNorm(BatchNorm):
    """Batch Normalization with statistics over the batches of every process in ``comm``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    comm : mpi4py communicator, optional
        The processes that share statistics (any intracommunicator, e.g. one from ``comm.Split``).
        None means ``MPI.COMM_WORLD``, looked up when first needed.
    eps, momentum, affine, track_running_stats, axis, dtype, bias, activation, renorm, rmax, dmax
        As :class:`batchnorm.BatchNorm`. With ``activation="relu"`` the forward is fused as BatchNorm's;
        the backward masks dy in a NumPy pass of its own before the phases (they have no fused form).
        With ``renorm=True`` r and d come from the whole batch's statistics (Batch Renormalization of
        the union of the processes' batches). Ghost BN (``ghost_batch_size``) is not supported.

    Attributes
    ----------
    comm : mpi4py communicator or None
        The communicator; None until a training forward looks up ``MPI.COMM_WORLD``. May be set.
        The other attributes are :class:`batchnorm.BatchNorm`'s.

    Notes
    -----
    Every process in ``comm`` must call the layer (forward, and backward after a training forward)
    the same number of times in the same order, as with any collective operation; a process with no
    samples passes an empty batch (N = 0), joins the collectives and gets an empty dx. Input of any
    layout (channel axis ``axis``) and ndim >= 2 is accepted; the processes may split the batch unevenly.
    The communicator is not pickled or put into ``state_dict``: an unpickled layer uses ``MPI.COMM_WORLD``
    until ``layer.comm`` is set; ``copy.deepcopy`` shares it with the original.

    Examples
    --------
    Converting a layer needs no MPI; a training forward does (run the script under ``mpiexec -n P``):

    >>> import batchnorm as bn
    >>> from batchnorm.distributed import SyncBatchNorm
    >>> sync = SyncBatchNorm.from_layer(bn.BatchNorm2d(8))
    >>> sync
    SyncBatchNorm(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    >>> sync.to_layer()
    BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    """

    def __init__(self, num_features, *, comm=None, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, bias=True, activation=None, renorm=False,
                 rmax=3.0, dmax=5.0):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, dtype=dtype, bias=bias,
                         activation=activation, renorm=renorm, rmax=rmax, dmax=dmax)
        self.comm = None if comm is None else _check_comm(comm)
        self._layer_class = BatchNorm

    # -- conversion ------------------------------------------------------------------------------

    @classmethod
    def from_layer(cls, layer, comm=None):
        """A SyncBatchNorm with ``layer``'s options, parameters, running statistics and mode (copies)."""
        if not isinstance(layer, BatchNorm):
            raise TypeError(f"layer must be a batchnorm.BatchNorm, got {type(layer).__name__}")
        if layer.ghost_batch_size is not None:
            raise ValueError("SyncBatchNorm does not support Ghost BN (ghost_batch_size)")
        new = cls(layer.num_features, comm=comm, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
                  track_running_stats=layer.track_running_stats, axis=layer.axis, dtype=layer.dtype,
                  bias=layer.has_bias, activation=layer.activation, renorm=layer.renorm, rmax=layer.rmax,
                  dmax=layer.dmax)
        _copy_state(layer, new)
        new._layer_class = layer._layer_class if isinstance(layer, SyncBatchNorm) else type(layer)
        return new

    @classmethod
    def convert_sync_batchnorm(cls, module, comm=None):
        """PyTorch's converter: a BatchNorm layer becomes a SyncBatchNorm (:meth:`from_layer`); a container
        with a ``layers`` list (e.g. ``batchnorm.examples.Sequential``) has its BatchNorm layers replaced,
        recursively, in place, and is returned. Anything else is returned as it is."""
        if isinstance(module, BatchNorm) and not isinstance(module, SyncBatchNorm):
            return cls.from_layer(module, comm)
        layers = getattr(module, "layers", None)
        if isinstance(layers, list):
            layers[:] = [cls.convert_sync_batchnorm(layer, comm) for layer in layers]
        return module

    def to_layer(self):
        """A local layer (the class this one was converted from, else BatchNorm) with this one's options,
        parameters, running statistics and mode (copies)."""
        cls = self._layer_class
        new = cls(self.num_features, eps=self.eps, momentum=self.momentum, affine=self.affine,
                  track_running_stats=self.track_running_stats, axis=self.axis, dtype=self.dtype,
                  bias=self.has_bias, activation=self.activation, renorm=self.renorm, rmax=self.rmax,
                  dmax=self.dmax)
        _copy_state(self, new)
        return new

    # -- communication ---------------------------------------------------------------------------

    def _communicator(self):
        if self.comm is None:
            self.comm = world()
        return self.comm

    def _gather(self, comm, local, ok, error, what, note=False):
        """Allgather one float64 row per process, flag in column 0 (0: failed; 1 or, with ``note``, 2: ok);
        raise everywhere if any failed. Returns the rows and the processes' notes (bool)."""
        row = np.empty(local.size + 1, np.float64)
        row[0] = (2.0 if note else 1.0) if ok else 0.0
        row[1:] = local
        table = np.empty((comm.Get_size(), row.size), np.float64)
        comm.Allgather(row, table)
        failed = [r for r in range(table.shape[0]) if table[r, 0] not in (1.0, 2.0)]
        if failed:
            # Every process saw the same flags, so every process joins this second collective.
            messages = comm.allgather(None if ok else f"{type(error).__name__}: {error}")
            if not ok:
                raise error
            detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
            raise SyncBatchNormError(
                f"SyncBatchNorm {what} failed on rank{'s' if len(failed) > 1 else ''} "
                f"{', '.join(map(str, failed))} of {table.shape[0]} ({detail}); no state was changed",
                failed, [messages[r] for r in failed])
        return table[:, 1:], table[:, 0] == 2.0

    # -- forward / backward ----------------------------------------------------------------------

    def _check_params(self):
        for name in ("weight", "bias"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != (self.num_features,):
                raise ValueError(f"{name} has shape {np.shape(value)}, expected ({self.num_features},)")

    def forward(self, x, residual=None, *, mask=None):
        """Normalize x with the statistics of every process's batch (training mode, collective) or
        with the running statistics (eval mode, local); the ``use_batch_stats`` and
        ``update_running_stats`` flags act as on :class:`batchnorm.BatchNorm`. Returns y; ``residual`` and the
        layer's ``activation`` as in :meth:`batchnorm.BatchNorm.forward`. ``mask`` (masked BN, as
        BatchNorm's: True at real positions, y 0 at the others) may differ from process to process (or be
        absent on some); with batch statistics the statistics are those of every process's real positions,
        and a whole batch with fewer than 2 of them raises on every process."""
        precise = self._precise is not None
        use = precise or self._uses_batch_stats()
        update = not precise and self._updates_running_stats(use)
        if not use:
            if update:  # from this process's part alone the processes' running statistics would drift apart
                raise ValueError("SyncBatchNorm does not support update_running_stats=True with "
                                 "use_batch_stats=False")
            return super().forward(x, residual, mask=mask)
        if self.ghost_batch_size is not None:  # an attribute, set after construction
            raise ValueError("SyncBatchNorm does not support ghost_batch_size")
        comm = self._communicator()
        if comm.Get_size() == 1:
            # Nothing to share: the fused kernels give the phases' bits (running statistics included)
            # and save a pass of glue; backward then takes BatchNorm's path too.
            return super().forward(x, residual, mask=mask)
        C = self.num_features
        local = np.zeros(1 + 2 * C)
        error = None
        try:
            x = self._check_input(x)
            self._check_params()
            if residual is not None:
                residual = np.asarray(residual)
            if mask is not None:  # refuses the options BatchNorm(mask=) refuses
                mask = self._check_mask(x, mask, residual)
            count, mean, m2 = batch_stats(x, axis=self.axis, mask=mask)
            local[0], local[1:C + 1], local[C + 1:] = count, mean, m2
        except Exception as exc:  # joins the collective as failed, re-raised there
            error = exc
        # the note: this process has values (so a global count of 0 means that masks left out all of them)
        table, has_values = self._gather(comm, local, error is None, error, "forward",
                                         note=error is None and x.size > 0)
        counts = table[:, 0].astype(np.int64)
        count, mean, m2 = merge_stats(counts, table[:, 1:C + 1], table[:, C + 1:])
        if count == 1 or (count == 0 and has_values.any()):
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} over the "
                             f"{len(counts)} processes of the communicator (input of shape {x.shape} here"
                             f"{'' if mask is None else ', with a mask'})")
        # every process's batch empty: nothing to normalize or count, as BatchNorm (invstd 0, as there)
        invstd = 1.0 / np.sqrt(m2 / count + self.eps) if count else np.zeros(C)
        extra, weight, bias = None, self.weight, self.bias
        if self.renorm and not precise:
            # Batch Renormalization with the whole batch's statistics, as forward_train_renorm: BN with
            # gamma * r and gamma * d + beta (r and d from the running statistics before this update)
            if count:
                r, d = _corrections(mean, invstd, self.running_mean, self.running_var, self.eps, self.rmax,
                                    self.dmax)
            else:
                r, d = np.ones(C), np.zeros(C)
            extra = ("renorm", r, d)
            weight, bias = self._renorm_coefs(self.weight, self.bias, r, d)
        y = normalize(x, mean, invstd, weight, bias, axis=self.axis, activation=self.activation,
                      residual=residual)
        if mask is not None:
            y = self._zero_padding(y, mask)
            extra = ("mask", mask)
        if precise:  # inside batchnorm.precise_stats: the whole batch's statistics, the same on every process
            self._precise._add(count, mean, m2)
        if update and count:
            update_running_stats(self.running_mean, self.running_var, mean, m2, count,
                                 momentum=self._momentum_now())
            self.num_batches_tracked += 1
        self._remember(x, mean, invstd, True, count, extra=extra, residual=residual)
        return y

    __call__ = forward

    def _renorm_coefs(self, weight, bias, r, d):
        """gamma * r and gamma * d + beta in float64, the same expressions as forward_train_renorm's."""
        g = np.ones(self.num_features) if weight is None else np.asarray(weight, np.float64)
        b = np.zeros(self.num_features) if bias is None else np.asarray(bias, np.float64)
        return g * r, g * d + b

    def backward(self, dy):
        """dx for this process's rows; ``grad_weight``/``grad_bias`` get this process's contributions.
        Collective after a training-mode forward, local after an eval-mode one."""
        if self._cache is None or self._cache[5] is None:
            return super().backward(dy)
        comm = self._communicator()
        C = self.num_features
        local = np.zeros(2 * C)
        error = None
        try:
            dy, x, mean, invstd, _, weight, count = self._cached(dy)
            extra = self._cache_extra
            beta = None if self._cache_epilogue is None else self._cache_epilogue[1]
            if extra is not None and extra[0] == "renorm":
                weight, beta = self._renorm_coefs(weight, beta, extra[1], extra[2])
            dy = self._grad_at_bn(dy, x, mean, invstd, weight, beta)
            real = None
            if extra is not None and extra[0] == "mask":
                # The padding drops out of the sums: dy 0 and x the mean there (0 * a NaN or inf in the
                # padding would not be 0); dx is zeroed there below. NumPy passes of their own.
                real = self._real_positions(x.shape, extra[1])
                at = [1] * x.ndim  # the shape of a per-channel vector against x
                at[self.axis % x.ndim] = C
                dy = np.where(real, dy, np.zeros((), dy.dtype))
                x = np.where(real, x, mean.reshape(at).astype(x.dtype))
            sum_dy, sum_dy_xmu = backward_reduce(dy, x, mean, axis=self.axis)
            local[:C], local[C:] = sum_dy, sum_dy_xmu
        except Exception as exc:
            error = exc
        table, _ = self._gather(comm, local, error is None, error, "backward")
        total = table[0].copy()
        for r in range(1, table.shape[0]):  # rank order, on every process alike
            total += table[r]
        # count 0 (every batch empty): x is empty too, and 1 only keeps the divisor legal
        if real is None:
            dx = backward_apply(dy, x, mean, invstd, weight, total[:C], total[C:], max(count, 1), axis=self.axis)
        else:
            # backward_apply's formula in NumPy (float64, rounded once): its count may not be below the
            # part's own number of values, and here the padding makes the whole batch's count smaller
            col = lambda v: np.asarray(v, np.float64).reshape(at)  # noqa: E731
            g = np.ones(C) if weight is None else weight
            n = max(count, 1)
            xc = np.asarray(x, np.float64) - col(mean)
            dx = col(np.asarray(g, np.float64) * invstd) * (
                np.asarray(dy, np.float64) - col(total[:C] / n) - xc * col(invstd ** 2 * total[C:] / n))
            dx = np.where(real, dx, 0.0).astype(_result_dtype(x))
        dgamma = invstd * sum_dy_xmu
        if extra is not None and extra[0] == "renorm":  # backward_renorm's dgamma = r * sum(dy xhat) + d * sum(dy)
            dgamma = extra[1] * dgamma + extra[2] * sum_dy
        self._set_gradients(dgamma, sum_dy)
        if self._cache_epilogue is not None and self._cache_epilogue[0] is not None:
            return dx, dy.astype(_result_dtype(x), copy=False)
        return dx

    def _grad_at_bn(self, dy, x, mean, invstd, weight, beta):
        """dy masked by the fused ReLU, if any: where the forward's output (recomputed by the same normalize
        with the residual, which gives its bits) was > 0. The phases have no fused backward: these are
        NumPy passes of their own."""
        if self.activation is None or self._cache_epilogue is None:
            return dy
        residual = self._cache_epilogue[0]
        pre = normalize(x, mean, invstd, weight, beta, axis=self.axis, residual=residual)
        return np.where(pre > 0, dy, np.zeros((), dy.dtype))

    # -- state -----------------------------------------------------------------------------------

    def __getstate__(self):
        state = super().__getstate__()
        state["comm"] = None  # a communicator belongs to the running processes, not to the layer's state
        return state

    def __deepcopy__(self, memo):
        # A copy in the same processes shares the communicator (it is not data); the rest is copied, and
        # like a pickled layer the copy needs a forward before backward.
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            setattr(new, key, copy.deepcopy(value, memo))
        new.comm = self.comm
        return new
