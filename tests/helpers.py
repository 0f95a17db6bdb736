"""Helpers shared by the batchnorm tests: dtypes and tolerances, data in many memory layouts,
comparison against :mod:`batchnorm.reference`, and the workload used by the thread tests."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import numpy as np

import batchnorm as bn
from batchnorm import reference as ref

# --------------------------------------------------------------------------------------------------
# dtypes and tolerances
# --------------------------------------------------------------------------------------------------

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

# Accuracy contract: results within TOL * max(1, max|ref|) of the float64 reference on the same input.
# float16 is computed in float32 and rounded to float16 (half-ulp ~ 4.9e-4 relative).
TOL = {F16: 1e-3, F32: 1e-5, F64: 1e-10}


def result_dtype(dtype) -> np.dtype:
    """The dtype of every result for input of ``dtype``: float16/32/64 keep their precision (in native
    byte order), everything else (integers, bool) is computed and returned in float64."""
    dt = np.dtype(dtype)
    if dt.kind == "f" and dt.itemsize in (2, 4, 8):
        return np.dtype(dt.type)  # drops a non-native byte order: '>f4' -> float32
    return F64


def grad_dtype(dtype) -> np.dtype:
    """dtype of backward's dgamma/dbeta for input of ``dtype``: the result dtype, but float32 for float16
    (a sum over a batch overflows float16)."""
    dt = result_dtype(dtype)
    return F32 if dt == F16 else dt


def tol_for(*dtypes) -> float:
    """The loosest tolerance among the result dtypes of ``dtypes`` (used e.g. for float32 running
    statistics updated from float64 data)."""
    return max(TOL[result_dtype(d)] for d in dtypes)


def assert_close(actual, expected, tol, what=""):
    """|actual - expected| <= tol * max(1, max|expected|), elementwise; NaN only where expected is."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite), initial=0.0)))
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=0, atol=tol * scale,
                               equal_nan=True, err_msg=what)


def assert_result_dtype(arr, x_dtype, what=""):
    want = result_dtype(x_dtype)
    assert isinstance(arr, np.ndarray), f"{what}: expected ndarray, got {type(arr)}"
    # Compare the scalar type so that a byte-swapped result of the right precision would pass.
    assert arr.dtype.type is want.type, f"{what}: dtype {arr.dtype} != {want}"


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def make_data(rng, shape, dtype=np.float64, axis=1, loc=0.0, scale=1.0):
    """Random data of ``shape``/``dtype`` whose per-channel mean and spread differ from channel to channel,
    so that reducing over the wrong axes, or mixing channels up, changes the answer."""
    dt = np.dtype(dtype)
    shape = tuple(shape)
    ndim = len(shape)
    C = shape[axis % ndim]
    bshape = [1] * ndim
    bshape[axis % ndim] = C
    if dt.kind == "b":
        p = np.linspace(0.2, 0.8, C).reshape(bshape)
        return rng.random(shape) < p
    if dt.kind in "iu":
        lo = 0 if dt.kind == "u" else -40
        off = (np.arange(C) * 3 % 11).reshape(bshape)
        return (rng.integers(lo, 40, size=shape) + off).astype(dt)
    c_loc = (np.linspace(-1.0, 2.0, C) * scale).reshape(bshape)
    c_scale = np.linspace(0.5, 2.0, C)[::-1].reshape(bshape)
    x = loc + c_loc + rng.standard_normal(shape) * c_scale * scale
    return x.astype(dt)


def _garbage(dtype):
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return np.nan
    if dt.kind == "b":
        return True
    return 99  # fits every integer type we use


def as_layout(a, layout, axis=1):
    """A new array (never sharing memory with ``a``) with ``a``'s shape, dtype and values (except
    "bcast", a read-only view) in the memory layout ``layout``.

    Layouts that skip memory fill the skipped elements with NaN (floats) so that reading them shows up.
    """
    a = np.asarray(a)
    nd = a.ndim
    axis = axis % nd
    if layout == "C":
        return np.ascontiguousarray(a).copy()
    if layout == "F":
        return np.asfortranarray(a).copy(order="F")
    if layout == "T":  # full transpose of a contiguous array
        return np.array(a.T, order="C", copy=True).T
    if layout == "chlast":  # channel axis innermost in memory
        return np.moveaxis(np.array(np.moveaxis(a, axis, -1), order="C", copy=True), -1, axis)
    if layout == "chfirst":  # channel axis outermost in memory
        return np.moveaxis(np.array(np.moveaxis(a, axis, 0), order="C", copy=True), 0, axis)
    if layout == "step":  # a[::2] of a bigger array
        big = np.full((2 * a.shape[0],) + a.shape[1:], _garbage(a.dtype), dtype=a.dtype)
        big[::2] = a
        return big[::2]
    if layout == "negC":  # negative stride along the channel axis
        return np.flip(np.flip(a, axis).copy(), axis)
    if layout == "negall":  # negative strides everywhere
        return np.flip(np.flip(a).copy())
    if layout == "slice":  # offset slices in every dim, step 2 in the last one
        big_shape = tuple(d + 3 for d in a.shape[:-1]) + (2 * a.shape[-1] + 3,)
        big = np.full(big_shape, _garbage(a.dtype), dtype=a.dtype)
        idx = tuple(slice(1, 1 + d) for d in a.shape[:-1]) + (slice(2, 2 + 2 * a.shape[-1], 2),)
        big[idx] = a
        return big[idx]
    if layout == "bcast":  # zero stride along one reduced axis (values repeat along it)
        j = bcast_axis(a.shape, axis)
        base = np.take(a, [0], axis=j)
        return np.broadcast_to(base, a.shape)
    if layout == "unaligned":  # data pointer not aligned to the item size
        buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
        u = np.ndarray(a.shape, dtype=a.dtype, buffer=buf, offset=1)
        u[...] = a
        assert a.dtype.itemsize == 1 or not u.flags.aligned
        return u
    raise ValueError(layout)


def bcast_axis(shape, axis):
    """A reduced axis of size > 1 that can be broadcast, leaving another reduced axis with size > 1."""
    nd = len(shape)
    axis = axis % nd
    reduced = [j for j in range(nd) if j != axis and shape[j] > 1]
    return reduced[-1] if len(reduced) >= 2 else None


LAYOUTS = ["C", "F", "T", "chlast", "chfirst", "step", "negC", "negall", "slice", "bcast", "unaligned"]


def layout_applies(layout, shape, axis):
    if layout == "bcast":
        return bcast_axis(shape, axis) is not None
    return True


def uniform_stats(rng, C, dtype=np.float64):
    """(running_mean, running_var) with distinct, positive-variance values per channel."""
    rm = (rng.standard_normal(C) * 0.5).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    return rm, rv


def params(rng, C, dtype=np.float64):
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype) * np.where(np.arange(C) % 3 == 2, -1, 1).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return gamma, beta


def channels(shape, axis):
    return shape[axis % len(shape)]


def snapshot(*arrays):
    """Byte-exact copies (None passes through) for unchanged-checks."""
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, after, names=None):
    for i, (b, a) in enumerate(zip(before, after)):
        name = names[i] if names else str(i)
        if b is None:
            continue
        a = np.asarray(a)
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name} changed dtype/shape"
        assert a.tobytes() == b.tobytes(), f"{name} was modified"


# --------------------------------------------------------------------------------------------------
# thread-determinism workload (also imported by subprocesses)
# --------------------------------------------------------------------------------------------------

THREAD_CASES = [
    # (shape, dtype, axis, layout)
    ((64, 8, 56, 56), "float32", 1, "C"),
    ((20000, 37), "float32", 1, "C"),
    ((3, 2, 100000), "float64", 1, "C"),
    ((16, 28, 28, 64), "float32", -1, "C"),  # channels-last
    ((16, 64, 28, 28), "float32", 1, "chlast"),  # NCHW view of NHWC memory
    ((37, 20000), "float64", 0, "T"),
    ((300, 5000), "float32", 1, "C"),  # many channels per row: more than one channel block
    ((256, 64, 5, 5), "float64", 1, "C"),  # short rows (spatial size 25)
    ((2, 300000), "float32", -1, "C"),  # two values per channel, very many channels
    # 16 MiB of rows of 255 positions: the statistics read chunks of 5 rows as virtual rows of 1275
    ((16500, 255), "float32", 1, "C"),
]


def _digest(h, arr):
    arr = np.asarray(arr)
    h.update(str(arr.dtype).encode())
    h.update(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())


def thread_workload(cases=None, seed=7):
    """Run every op on every case; return {case: sha256 of all outputs and updated running stats}."""
    out = {}
    for shape, dtype, axis, layout in cases or THREAD_CASES:
        rng = np.random.default_rng(seed)
        C = channels(shape, axis)
        x = as_layout(make_data(rng, shape, dtype, axis=axis), layout, axis)
        dy = as_layout(make_data(rng, shape, dtype, axis=axis), layout, axis)
        gamma, beta = params(rng, C, np.float32)
        rm, rv = uniform_stats(rng, C, np.float32)
        h = hashlib.sha256()
        y, mean, invstd = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
        for a in (y, mean, invstd, rm, rv):
            _digest(h, a)
        _digest(h, bn.forward_infer(x, rm, rv, gamma, beta, axis=axis))
        for training in (True, False):
            for a in bn.backward(dy, x, mean, invstd, gamma, training=training, axis=axis):
                _digest(h, a)
        out[f"{shape}-{dtype}-{axis}-{layout}"] = h.hexdigest()
    return out


def subprocess_env(**overrides):
    """os.environ with the directory holding the imported ``batchnorm`` and this folder on PYTHONPATH;
    a value of None removes the variable."""
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(bn.__file__)))
    here = os.path.dirname(os.path.abspath(__file__))
    parts = [pkg_parent, here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


# --------------------------------------------------------------------------------------------------
# a compact accuracy sweep (also run in subprocesses, e.g. under another SIMD build)
# --------------------------------------------------------------------------------------------------

SWEEP_CASES = [
    ((2, 3, 7, 5), 1), ((5, 3), 0), ((4, 6, 40, 3), 1), ((3, 5, 33), -1), ((70, 9, 5, 5), 1),
    ((200, 4, 64), 1), ((40000, 5), 1), ((2, 5000), 1), ((3, 2, 9000), 1), ((6, 7, 3, 37), 2),
]


def accuracy_sweep(seed=1):
    """Every op on SWEEP_CASES x {f32, f64, f16} x a few layouts against the reference; returns the
    list of failures (empty when all agree within the contract's tolerances)."""
    failures = []
    for shape, axis in SWEEP_CASES:
        for dtype in (np.float32, np.float64, np.float16):
            C = channels(shape, axis)
            if dtype is np.float16 and int(np.prod(shape)) // C > 2000:
                continue  # sums over the channel (dbeta) would overflow float16
            for layout in ("C", "chlast", "negall", "step"):
                rng = np.random.default_rng(seed)
                x = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
                dy = as_layout(make_data(rng, shape, dtype, axis), layout, axis)
                gamma, beta = params(rng, C, np.float32)
                rm, rv = uniform_stats(rng, C, np.float64)
                erm, erv = rm.copy(), rv.copy()
                tol = TOL[result_dtype(dtype)]
                tag = f"{shape} axis={axis} {np.dtype(dtype).name} {layout}"
                try:
                    got = bn.forward_train(x, gamma, beta, running_mean=rm, running_var=rv, axis=axis)
                    want = ref.forward_train(x, gamma, beta, running_mean=erm, running_var=erv, axis=axis)
                    pairs = list(zip(("y", "mean", "invstd"), got, want))
                    pairs += [("running_mean", rm, erm), ("running_var", rv, erv)]
                    pairs.append(("forward_infer", bn.forward_infer(x, rm, rv, gamma, beta, axis=axis),
                                  ref.forward_infer(x, rm, rv, gamma, beta, axis=axis)))
                    for training in (True, False):
                        g = bn.backward(dy, x, got[1], got[2], gamma, training=training, axis=axis)
                        w = ref.backward(dy, x, got[1], got[2], gamma, training=training, axis=axis)
                        pairs += list(zip((f"dx[{training}]", f"dgamma[{training}]", f"dbeta[{training}]"), g, w))
                    for name, g, w in pairs:
                        try:
                            assert_close(g, w, tol, name)
                        except AssertionError as e:
                            failures.append(f"{tag}: {name}: {str(e).splitlines()[0:6]}")
                except Exception as e:  # noqa: BLE001 - report, don't stop the sweep
                    failures.append(f"{tag}: raised {type(e).__name__}: {e}")
    return failures


def numeric_grad(f, arr, h):
    """Central finite differences of the scalar f() with respect to every element of arr (in place)."""
    g = np.empty_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + h
        fp = f()
        arr[idx] = old - h
        fm = f()
        arr[idx] = old
        g[idx] = (fp - fm) / (2 * h)
    return g


# --------------------------------------------------------------------------------------------------
# child processes that must not hang the suite
# --------------------------------------------------------------------------------------------------


def run_killable(cmd, timeout, env=None):
    """Run cmd in its own session; return (exit code, output). On timeout the whole process group is
    killed and the test fails with what the child printed: a hang fails instead of blocking the suite."""
    import pytest

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))[:200]} hung for {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out
