"""batchnorm: fast, exact Batch Normalization for NumPy.

Functions (C kernels, OpenMP-parallel, bit-identical for any thread count):
    forward_train, forward_infer, backward, set_num_threads, get_num_threads
The phases they are made of, for synchronized and custom BN (see batchnorm.distributed):
    batch_stats, merge_stats, normalize, update_running_stats, backward_reduce, backward_apply
Layers (PyTorch's semantics, NumPy arrays):
    BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
Helpers: fold_into (fold BN into the preceding layer), show_config.
The plain-NumPy twin of every kernel lives in :mod:`batchnorm.reference`.
"""

from ._core import (
    backward,
    backward_apply,
    backward_reduce,
    batch_stats,
    forward_infer,
    forward_train,
    get_num_threads,
    merge_stats,
    normalize,
    set_num_threads,
    update_running_stats,
)
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, StateDictError
from ._fold import fold_into
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
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "StateDictError",
    "fold_into",
    "show_config",
    "reference",
    "__version__",
]
