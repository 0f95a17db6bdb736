"""batchnorm: fast, exact Batch Normalization for NumPy.

Functions
    :func:`forward_train`, :func:`forward_infer`, :func:`backward` (C kernels, OpenMP-parallel,
    bit-identical for any thread count); :func:`set_num_threads`, :func:`get_num_threads`.
The phases they are made of, for synchronized and custom BN (see :mod:`batchnorm.distributed`)
    :func:`batch_stats`, :func:`merge_stats`, :func:`normalize`, :func:`update_running_stats`,
    :func:`backward_reduce`, :func:`backward_apply`.
Layers (PyTorch's semantics, NumPy arrays)
    :class:`BatchNorm`, :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`.
Variants (see ``batchnorm.variants``)
    Batch Renormalization (:func:`forward_train_renorm`, :func:`backward_renorm`, ``BatchNorm(...,
    renorm=True)``), Ghost BN (``ghost_batch_size=``), the frozen-BN flags, fused ReLU and residual
    (``activation=``, ``residual=``).
Exact population statistics
    :class:`Moments` (streaming per-channel mean and variance), :func:`precise_stats` (recompute the
    running statistics of BN layers exactly over many batches).
Helpers
    :func:`fold_into` (fold BN into the preceding layer), :func:`show_config`, :func:`empty_cache` and
    :func:`set_cache_limit` (the freed memory kept for the next calls).

The plain-NumPy twin of every kernel lives in :mod:`batchnorm.reference`.

Examples
--------
>>> import numpy as np
>>> import batchnorm as bn
>>> x = np.random.default_rng(0).normal(5.0, 3.0, size=(64, 8)).astype(np.float32)
>>> y, mean, invstd = bn.forward_train(x)
>>> bool(np.allclose(y.mean(axis=0), 0, atol=1e-5)), bool(np.allclose(y.std(axis=0), 1, atol=1e-3))
(True, True)
"""

from ._core import (
    backward,
    backward_apply,
    backward_reduce,
    batch_stats,
    empty_cache,
    forward_infer,
    forward_train,
    get_num_threads,
    merge_stats,
    normalize,
    set_cache_limit,
    set_num_threads,
    update_running_stats,
)
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, StateDictError
from ._fold import fold_into
from .moments import Moments, precise_stats
from .variants import backward_renorm, forward_train_renorm
from ._config import check_simd_env as _check_simd_env, show_config
from . import reference

_check_simd_env()

from ._version import __version__

__all__ = [
    "forward_train",
    "forward_infer",
    "backward",
    "batch_stats",
    "merge_stats",
    "normalize",
    "backward_reduce",
    "backward_apply",
    "update_running_stats",
    "set_num_threads",
    "get_num_threads",
    "empty_cache",
    "set_cache_limit",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "StateDictError",
    "Moments",
    "precise_stats",
    "forward_train_renorm",
    "backward_renorm",
    "fold_into",
    "show_config",
    "reference",
    "__version__",
]
