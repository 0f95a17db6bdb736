"""Type stubs for the C extension batchnorm._core (the kernels re-exported by the batchnorm package)."""

from typing import Literal, Optional, Tuple, TypedDict, Union

from numpy.typing import DTypeLike

import numpy as np
from numpy.typing import ArrayLike, NDArray

class _BuildInfo(TypedDict):
    openmp: bool
    openmp_version: Optional[int]
    simd: str
    compiler: str
    max_threads: int

def forward_train(
    x: ArrayLike,
    gamma: Optional[ArrayLike] = None,
    beta: Optional[ArrayLike] = None,
    *,
    running_mean: Optional[NDArray[np.floating]] = None,
    running_var: Optional[NDArray[np.floating]] = None,
    momentum: float = 0.1,
    eps: float = 1e-05,
    axis: int = 1,
    out: Optional[NDArray[np.floating]] = None,
    stats_dtype: DTypeLike = None,
    activation: Optional[Literal["relu"]] = None,
    residual: Optional[ArrayLike] = None,
    ghost_batch_size: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
) -> Tuple[NDArray[np.floating], NDArray[np.floating], NDArray[np.floating]]:
    """Training forward pass: returns ``(y, mean, invstd)``; updates the running statistics in place.
    With ``ghost_batch_size`` mean and invstd are (K, C), one row per ghost batch; with ``mask`` (boolean,
    x's shape without the channel axis) only the True positions count and y is 0 at the others."""
    ...

def forward_infer(
    x: ArrayLike,
    running_mean: ArrayLike,
    running_var: ArrayLike,
    gamma: Optional[ArrayLike] = None,
    beta: Optional[ArrayLike] = None,
    *,
    eps: float = 1e-05,
    axis: int = 1,
    out: Optional[NDArray[np.floating]] = None,
    activation: Optional[Literal["relu"]] = None,
    residual: Optional[ArrayLike] = None,
) -> NDArray[np.floating]:
    """Inference forward pass with given (running) statistics: returns ``y``."""
    ...

def backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: Optional[ArrayLike] = None,
    *,
    training: bool = True,
    axis: int = 1,
    out: Optional[NDArray[np.floating]] = None,
    activation: Optional[Literal["relu"]] = None,
    residual: Union[None, bool, ArrayLike] = None,
    y: Optional[ArrayLike] = None,
    beta: Optional[ArrayLike] = None,
    ghost_batch_size: Optional[int] = None,
    mask: Optional[ArrayLike] = None,
) -> Tuple[NDArray[np.floating], ...]:
    """Backward pass: returns ``(dx, dgamma, dbeta)``, and ``d_residual`` fourth with ``residual``; with
    ``ghost_batch_size``, mean and invstd are the (K, C) statistics forward_train returned for it."""
    ...

def batch_stats(
    x: ArrayLike, *, axis: int = 1, mask: Optional[ArrayLike] = None
) -> Tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """Statistics phase: ``(count, mean, m2)`` per channel, float64 (over the True positions of mask)."""
    ...

def merge_stats(
    counts: ArrayLike, means: ArrayLike, m2s: ArrayLike
) -> Tuple[int, NDArray[np.float64], NDArray[np.float64]]:
    """Merge phase: the parts' ``(count, mean, m2)`` combined in order (Chan's formula)."""
    ...

def normalize(
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: Optional[ArrayLike] = None,
    beta: Optional[ArrayLike] = None,
    *,
    axis: int = 1,
    out: Optional[NDArray[np.floating]] = None,
    activation: Optional[Literal["relu"]] = None,
    residual: Optional[ArrayLike] = None,
) -> NDArray[np.floating]:
    """Normalize phase: ``y = gamma * (x - mean) * invstd + beta``."""
    ...

def backward_reduce(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, *, axis: int = 1
) -> Tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Backward reduce phase: ``(sum_dy, sum_dy_xmu)`` per channel, float64."""
    ...

def backward_apply(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    invstd: ArrayLike,
    gamma: Optional[ArrayLike],
    sum_dy: ArrayLike,
    sum_dy_xmu: ArrayLike,
    count: Union[int, float],
    *,
    axis: int = 1,
    out: Optional[NDArray[np.floating]] = None,
) -> NDArray[np.floating]:
    """Backward apply phase: the training-mode dx from (global) sums and count."""
    ...

def update_running_stats(
    running_mean: Optional[NDArray[np.floating]],
    running_var: Optional[NDArray[np.floating]],
    mean: ArrayLike,
    m2: ArrayLike,
    count: Union[int, float],
    *,
    momentum: float = 0.1,
) -> None:
    """Update running statistics in place (PyTorch's rule, unbiased variance m2 / (count - 1))."""
    ...

def set_num_threads(n: int) -> None:
    """Set the number of threads the kernels may use (at least 1)."""
    ...

def get_num_threads() -> int:
    """The number of threads the kernels use for large inputs."""
    ...

def empty_cache() -> int:
    """Hand back all the freed memory batchnorm keeps for the next calls; returns its bytes."""
    ...

def set_cache_limit(max_bytes: int) -> int:
    """Bytes of freed large arrays (over 1 MiB) kept for reuse (0: none); returns the previous limit."""
    ...

def _build_info() -> _BuildInfo:
    """How the extension was built: OpenMP, its version, SIMD path, compiler, max threads."""
    ...
