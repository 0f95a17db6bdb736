"""Run by tests/test_distributed.py under ``mpiexec -n K``: one scenario per launch, every rank checks its
own results (against single-process BatchNorm on the whole batch, which every rank computes itself) and
the ranks compare what must be identical. Prints "OK <scenario> rank <r>" on success; any failure raises,
and MPI's error handler aborts the whole job (a failure must not leave the other ranks waiting)."""

from __future__ import annotations

import pickle
import sys
from collections import namedtuple
import traceback
import zlib

import numpy as np
from mpi4py import MPI

import batchnorm as bn
from batchnorm.distributed import SyncBatchNorm, SyncBatchNormError

WORLD = MPI.COMM_WORLD


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    return float(np.max(np.abs(a - b), initial=0.0)) / scale


def check(cond, msg):
    if not cond:
        raise AssertionError(f"rank {WORLD.rank}: {msg}")


def same_on_all(comm, arr, what):
    """arr is bit-identical on every rank of comm."""
    arrs = comm.allgather(np.ascontiguousarray(arr).tobytes())
    check(all(a == arrs[0] for a in arrs), f"{what} differs between ranks")


def split_sizes(N, P, kind):
    if kind == "even":
        base = [N // P] * P
        for i in range(N % P):
            base[i] += 1
        return base
    if kind == "uneven":
        sizes = [max(0, (i + 1) * 2 - 1) for i in range(P)]
        sizes[-1] += N - sum(sizes)
        return sizes
    if kind == "empty":  # rank 0 has nothing (P > 1); the rest share N
        sizes = [0] + split_sizes(N, P - 1, "even") if P > 1 else [N]
        return sizes
    raise ValueError(kind)


LAYOUTS = {
    # name: (global shape, axis, make from C-order data)
    "2d": ((13, 5), 1, lambda a: a),
    "3d": ((11, 4, 7), 1, lambda a: a),
    "nchw": ((9, 3, 5, 6), 1, lambda a: a),
    "nhwc": ((9, 5, 6, 3), -1, lambda a: a),
    "fortran": ((10, 4, 6), 1, np.asfortranarray),
    "strided": ((12, 4, 6), 1, lambda a: np.repeat(a, 2, axis=2)[:, :, ::2]),
}


Case = namedtuple("Case", "dtype tol name shape axis make kind rng N C sizes lo hi")


def cases(comm, tag, names, kinds):
    """Each dtype (with its tolerance) x layout of LAYOUTS x split of the batch over comm's ranks: the
    layout, the split (sizes per rank; lo:hi this rank's rows) and a generator seeded by tag, layout and
    split."""
    P, rank = comm.Get_size(), comm.Get_rank()
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        for name in names:
            shape, axis, make = LAYOUTS[name]
            for kind in kinds:
                sizes = split_sizes(shape[0], P, kind)
                yield Case(dtype, tol, name, shape, axis, make, kind,
                           np.random.default_rng(zlib.crc32(f"{tag}{name}/{kind}".encode())), shape[0], shape[axis],
                           sizes, sum(sizes[:rank]), sum(sizes[:rank + 1]))


def check_step(comm, what, sync, ref, y, y_ref, dx, dx_ref, lo, hi, tol):
    """One training step of sync against ref on the whole batch: y and dx (this rank's rows), the running
    statistics (bit-identical on every rank) and the parameter gradients summed over the ranks."""
    check(rel_err(y, y_ref[lo:hi]) <= tol, f"{what}: y off by {rel_err(y, y_ref[lo:hi])}")
    check(rel_err(dx, dx_ref[lo:hi]) <= tol, f"{what}: dx off by {rel_err(dx, dx_ref[lo:hi])}")
    for stat in ("running_mean", "running_var"):
        same_on_all(comm, getattr(sync, stat), f"{what}: {stat}")
        e = rel_err(getattr(sync, stat), getattr(ref, stat))
        check(e <= tol, f"{what}: {stat} off by {e}")
    gw = comm.allreduce(sync.grad_weight.copy())
    gb = comm.allreduce(sync.grad_bias.copy())
    check(rel_err(gw, ref.grad_weight) <= tol * 10, f"{what}: summed grad_weight")
    check(rel_err(gb, ref.grad_bias) <= tol * 10, f"{what}: summed grad_bias")


def scenario_parity(comm=WORLD):
    for dtype, tol, name, shape, axis, make, kind, rng, N, C, sizes, lo, hi in cases(
            comm, "", LAYOUTS, ("even", "uneven", "empty")):
        ref = bn.BatchNorm(C, axis=axis, dtype=np.float64, momentum=0.3)
        sync = SyncBatchNorm(C, comm=comm, axis=axis, dtype=np.float64, momentum=0.3)
        w = rng.normal(1, 0.3, C)
        b = rng.normal(0, 0.3, C)
        ref.weight[...] = w; ref.bias[...] = b
        sync.weight[...] = w; sync.bias[...] = b
        for step in range(3):
            xg = make((rng.normal(3.0, 2.0, shape) + 50 * step).astype(dtype))
            dyg = make(rng.normal(0, 1, shape).astype(dtype))
            y_ref = ref(xg)
            dx_ref = ref.backward(dyg)
            x = xg[lo:hi]
            y = sync(x)
            dx = sync.backward(dyg[lo:hi])
            what = f"{name}/{kind}/{np.dtype(dtype).name}/step {step}"
            check(y.shape == x.shape and y.dtype == x.dtype, f"{what}: y {y.shape} {y.dtype}")
            check(dx.shape == x.shape and dx.dtype == x.dtype, f"{what}: dx {dx.shape} {dx.dtype}")
            check_step(comm, what, sync, ref, y, y_ref, dx, dx_ref, lo, hi, tol)
            check(sync.num_batches_tracked == step + 1, f"{what}: num_batches_tracked")
        sync.eval(); ref.eval()
        xg = make(rng.normal(3.0, 2.0, shape).astype(dtype))
        check(rel_err(sync(xg[lo:hi]), ref(xg)[lo:hi]) <= tol, f"{name}/{kind}: eval y")


def scenario_fused(comm=WORLD):
    """activation='relu' and a residual: y, dx and d_residual equal single-process BatchNorm's on the whole
    batch; the ReLU mask is the fused forward's (d_residual is exactly dy where y > 0)."""
    for dtype, tol, name, shape, axis, make, kind, rng, N, C, sizes, lo, hi in cases(
            comm, "fused/", ("3d", "nhwc"), ("even", "empty")):
        ref = bn.BatchNorm(C, axis=axis, dtype=np.float64, activation="relu")
        sync = SyncBatchNorm(C, comm=comm, axis=axis, dtype=np.float64, activation="relu")
        ref.bias[...] = sync.bias[...] = rng.normal(0, 0.5, C)
        for step in range(2):
            xg = make(rng.normal(1.0, 2.0, shape).astype(dtype))
            rg = make(rng.normal(0, 1, shape).astype(dtype))
            dyg = make(rng.normal(0, 1, shape).astype(dtype))
            y_ref = ref(xg, residual=rg)
            dx_ref, dr_ref = ref.backward(dyg)
            y = sync(xg[lo:hi], residual=rg[lo:hi])
            dx, dr = sync.backward(dyg[lo:hi])
            what = f"fused {name}/{kind}/{np.dtype(dtype).name}/step {step}"
            check(rel_err(y, y_ref[lo:hi]) <= tol, f"{what}: y off by {rel_err(y, y_ref[lo:hi])}")
            check(rel_err(dx, dx_ref[lo:hi]) <= tol, f"{what}: dx off by {rel_err(dx, dx_ref[lo:hi])}")
            check(dr.dtype == y.dtype and np.array_equal(dr, np.where(y > 0, dyg[lo:hi], 0)),
                  f"{what}: d_residual is not dy masked by the forward's y > 0")
            check(rel_err(dr, dr_ref[lo:hi]) <= tol, f"{what}: d_residual")


def scenario_renorm(comm=WORLD):
    """renorm=True (alone, and with the fused ReLU and a residual): y, dx, d_residual, running statistics
    and summed parameter gradients equal single-process BatchNorm(renorm=True) on the whole batch (tight
    bounds, so that r and d are clipped in some channels); from_layer and to_layer keep the option."""
    activations = {"3d": None, "nhwc": "relu", "2d": "relu"}
    for dtype, tol, name, shape, axis, make, kind, rng, N, C, sizes, lo, hi in cases(
            comm, "renorm/", activations, ("even", "uneven", "empty")):
        act = activations[name]
        ref = bn.BatchNorm(C, axis=axis, dtype=np.float64, momentum=0.3, renorm=True, rmax=1.5, dmax=0.5,
                           activation=act)
        ref.weight[...] = rng.normal(1, 0.3, C)
        ref.bias[...] = rng.normal(0, 0.5, C)
        ref.running_mean[...] = rng.normal(0, 1, C)
        ref.running_var[...] = rng.uniform(0.2, 8, C)
        sync = SyncBatchNorm.from_layer(ref, comm=comm)
        check(sync.renorm and (sync.rmax, sync.dmax) == (1.5, 0.5), "from_layer dropped renorm")
        for step in range(3):
            xg = make(rng.normal(1.0, 2.0, shape).astype(dtype))
            rg = make(rng.normal(0, 1, shape).astype(dtype)) if act else None
            dyg = make(rng.normal(0, 1, shape).astype(dtype))
            y_ref = ref(xg, residual=rg)
            got_ref = ref.backward(dyg)
            y = sync(xg[lo:hi], residual=None if rg is None else rg[lo:hi])
            got = sync.backward(dyg[lo:hi])
            what = f"renorm {name}/{act}/{kind}/{np.dtype(dtype).name}/step {step}"
            dx, dx_ref = (got[0], got_ref[0]) if act else (got, got_ref)
            check_step(comm, what, sync, ref, y, y_ref, dx, dx_ref, lo, hi, tol)
            if act:
                check(np.array_equal(got[1], np.where(y > 0, dyg[lo:hi], 0)),
                      f"{what}: d_residual is not dy masked by the forward's y > 0")
        check(sync.to_layer().renorm, "to_layer dropped renorm")


def scenario_masked(comm=WORLD):
    """mask= with batch statistics: y, dx, running statistics and summed parameter gradients equal
    single-process BatchNorm(mask=) on the whole batch; NaN in the padding stays out; a process whose
    part is all padding, or empty, or without a mask, takes part; a whole batch with < 2 real positions
    raises on every process."""
    P, rank = comm.Get_size(), comm.Get_rank()
    for dtype, tol, name, shape, axis, make, kind, rng, N, C, sizes, lo, hi in cases(
            comm, "masked/", ("3d", "nhwc"), ("even", "uneven", "empty")):
        mshape = tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
        ref = bn.BatchNorm(C, axis=axis, dtype=np.float64, momentum=0.3)
        sync = SyncBatchNorm(C, comm=comm, axis=axis, dtype=np.float64, momentum=0.3)
        ref.weight[...] = sync.weight[...] = rng.normal(1, 0.3, C)
        ref.bias[...] = sync.bias[...] = rng.normal(0, 0.5, C)
        for step in range(3):
            mask = rng.random(mshape) < 0.6
            if step == 1 and P > 1:
                mask[:sizes[0]] = False  # rank 0's part all padding
            if step == 2:
                mask[:] = True  # ranks may also pass no mask: rank 0 passes None below
            xg = rng.normal(1.0, 2.0, shape)
            xg = np.where(np.expand_dims(mask, axis), xg, np.nan)  # broadcast along the channel axis
            xg = make(xg.astype(dtype))
            dyg = make(rng.normal(0, 1, shape).astype(dtype))
            y_ref = ref(xg, mask=mask)
            dx_ref = ref.backward(dyg)
            own = None if (step == 2 and rank == 0) else mask[lo:hi]
            y = sync(xg[lo:hi], mask=own)
            dx = sync.backward(dyg[lo:hi])
            what = f"masked {name}/{kind}/{np.dtype(dtype).name}/step {step}"
            check(not np.isnan(y).any() and not np.isnan(dx).any(), f"{what}: NaN from the padding")
            check_step(comm, what, sync, ref, y, y_ref, dx, dx_ref, lo, hi, tol)
        # one real position in the whole batch: the usual error on every process, nothing updated
        # and none at all
        for real in (1, 0):
            mask = np.zeros(mshape, bool)
            mask[N - 1].flat[:real] = True
            before = sync.running_mean.copy()
            try:
                sync(make(rng.normal(size=shape).astype(dtype))[lo:hi], mask=mask[lo:hi])
            except ValueError as exc:
                check("more than 1 value" in str(exc), f"masked {name}/{kind}: message {exc}")
            else:
                check(False, f"masked {name}/{kind}: {real} real positions did not raise")
            check(np.array_equal(sync.running_mean, before), f"masked {name}/{kind}: state changed")


def scenario_deterministic():
    """Two runs of the same steps give the same bits, and the statistics are the same on every rank."""
    P, rank = WORLD.Get_size(), WORLD.Get_rank()
    outs = []
    for _ in range(2):
        rng = np.random.default_rng(7)
        sync = SyncBatchNorm(6, dtype=np.float64)  # default communicator: COMM_WORLD
        got = []
        for step in range(3):
            xg = rng.normal(1e3, 1.0, (4 * P + 3, 6, 5))
            sizes = split_sizes(len(xg), P, "uneven")
            lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
            got.append(sync(xg[lo:hi]).tobytes())
            got.append(sync.backward(np.sin(xg[lo:hi])).tobytes())
        got.append(sync.running_mean.tobytes() + sync.running_var.tobytes())
        same_on_all(WORLD, sync.running_var, "running_var")
        outs.append(got)
    check(outs[0] == outs[1], "two identical runs differ")


def scenario_world1():
    """On one process SyncBatchNorm gives BatchNorm's bits."""
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        for shape, axis in (((40, 6, 50), 1), ((300, 7), 1), ((8, 5, 5, 6), -1)):
            C = shape[axis]
            ref, sync = bn.BatchNorm(C, axis=axis), SyncBatchNorm(C, axis=axis)
            ref.weight[...] = sync.weight[...] = rng.normal(1, 0.2, C)
            for _ in range(2):
                x = rng.normal(5, 3, shape).astype(dtype)
                dy = rng.normal(0, 1, shape).astype(dtype)
                check(np.array_equal(ref(x), sync(x)), f"{shape}: y bits")
                check(np.array_equal(ref.backward(dy), sync.backward(dy)), f"{shape}: dx bits")
                for a in ("running_mean", "running_var", "grad_weight", "grad_bias"):
                    check(np.array_equal(getattr(ref, a), getattr(sync, a)), f"{shape}: {a} bits")


def _state(layer):
    return pickle.dumps((layer.weight, layer.bias, layer.running_mean, layer.running_var,
                         layer.num_batches_tracked, layer.grad_weight, layer.grad_bias))


def _expect_failure(fn, rank, bad_rank, own_exc):
    try:
        fn()
    except SyncBatchNormError as exc:
        check(rank != bad_rank, f"the failing rank got SyncBatchNormError: {exc}")
        check(f"rank {bad_rank}" in str(exc) and exc.ranks == [bad_rank], f"message does not name rank: {exc}")
        return
    except own_exc:
        check(rank == bad_rank, "a healthy rank raised the failing rank's own error")
        return
    raise AssertionError(f"rank {rank}: no error raised")


def scenario_errors():
    """Bad input on one rank: every rank raises, none hangs, no state changes; the layer works after."""
    P, rank = WORLD.Get_size(), WORLD.Get_rank()
    bad = P - 1
    rng = np.random.default_rng(rank)
    sync = SyncBatchNorm(4, momentum=0.5)
    x = rng.normal(0, 1, (3, 4, 5)).astype(np.float32)
    sync(x)
    sync.backward(np.ones_like(x))
    before = _state(sync)
    # wrong channel count, wrong ndim, unsupported dtype, wrong axis: forward
    for badx, exc in ((rng.normal(0, 1, (3, 5, 5)), ValueError), (np.ones(4), ValueError),
                      (np.ones((3, 4, 5), complex), TypeError), ("not an array", (TypeError, ValueError))):
        _expect_failure(lambda: sync(badx if rank == bad else x), rank, bad, exc)
        check(_state(sync) == before, "state changed after a failed forward")
    # backward with a wrong dy shape on one rank
    sync(x)
    after_fwd = _state(sync)
    _expect_failure(lambda: sync.backward(np.ones((2, 4, 5)) if rank == bad else np.ones_like(x)), rank, bad,
                    ValueError)
    check(_state(sync) == after_fwd, "gradients changed after a failed backward")
    # the communicator is still in step: a good step works everywhere
    y = sync(x)
    sync.backward(np.ones_like(x))
    check(y.shape == x.shape, "step after errors")
    # a global count of 1 per channel: the usual error, on every rank, state unchanged
    before = _state(sync)
    tiny = np.ones((1, 4), np.float32) if rank == 0 else np.ones((0, 4), np.float32)
    try:
        sync(tiny)
    except ValueError as exc:
        check("more than 1 value per channel" in str(exc), str(exc))
    else:
        raise AssertionError("global count 1 accepted")
    check(_state(sync) == before, "state changed after the count-1 error")
    # every process's batch empty: an empty result and nothing counted, as BatchNorm does
    y = sync(np.ones((0, 4, 5), np.float32))
    dx = sync.backward(np.ones((0, 4, 5), np.float32))
    check(y.shape == dx.shape == (0, 4, 5) and y.dtype == np.float32, "all-empty batch: shapes")
    check(not sync.grad_weight.any() and not sync.grad_bias.any(), "all-empty batch: gradients not zero")
    # parameters, running statistics and the counter (the first five of _state) as they were
    kept = pickle.loads(before)[:5]
    now = pickle.loads(_state(sync))[:5]
    check(all(np.array_equal(a, b) for a, b in zip(kept, now)), "state changed after an all-empty batch")


def scenario_subcomm():
    """Statistics over a sub-communicator: the ranks of each half only."""
    rank = WORLD.Get_rank()
    sub = WORLD.Split(color=rank % 2, key=rank)
    rng = np.random.default_rng(11 + rank % 2)  # the same batch within a half
    xg = rng.normal(2, 3, (5 * sub.Get_size() + 1, 3, 4))
    sizes = split_sizes(len(xg), sub.Get_size(), "even")
    lo, hi = sum(sizes[:sub.rank]), sum(sizes[:sub.rank + 1])
    ref, sync = bn.BatchNorm(3, dtype=np.float64), SyncBatchNorm(3, comm=sub, dtype=np.float64)
    check(rel_err(sync(xg[lo:hi]), ref(xg)[lo:hi]) <= 1e-12, "subcomm y")
    check(rel_err(sync.backward(np.cos(xg[lo:hi])), ref.backward(np.cos(xg))[lo:hi]) <= 1e-12, "subcomm dx")
    scenario_parity(sub)
    sub.Free()


def scenario_bench_smoke():
    """benchmarks/sync_bench.py's step runs here (keeps the benchmark honest and working)."""
    sync = SyncBatchNorm(8)
    x = np.random.default_rng(WORLD.rank).normal(0, 1, (4, 8, 6, 6)).astype(np.float32)
    for _ in range(3):
        sync(x)
        sync.backward(x)


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}

if __name__ == "__main__":
    name = sys.argv[1]
    try:
        SCENARIOS[name]()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        WORLD.Abort(1)
    print(f"OK {name} rank {WORLD.rank}", flush=True)
