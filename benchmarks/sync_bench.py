#!/usr/bin/env python
"""Benchmark of SyncBatchNorm's training step against local BatchNorm at 1, 2 and 4 MPI processes, and
of the bytes it communicates per step.

    mpiexec -n 2 python benchmarks/sync_bench.py            # one process count (Open MPI: add
                                                             #   --oversubscribe for more ranks than cores)
    python benchmarks/sync_bench.py                          # P = 1, no mpiexec needed
    python benchmarks/sync_bench.py --all                    # launches mpiexec for P = 1, 2, 4 itself and
                                                             #   prints one combined table (~1 minute)
    python benchmarks/sync_bench.py --all --quick            # the same, < 30 s: fewer repeats
    ... --json out.json                                      # also write every number as JSON

What is measured. Every process holds its own batch of a fixed size (weak scaling: the per-process
batch is the same at every P, so the global batch is P times larger) for a few shapes (float32; NCHW
images and a 2-D (N, C) case). One *step* is a training-mode forward and its backward:
``y = layer(x); dx = layer.backward(dy)``. Per shape and P, in one process group:
  * local   batchnorm.BatchNorm: each process normalizes with its own batch's statistics (no
            communication): the cost of the arithmetic alone;
  * sync    batchnorm.distributed.SyncBatchNorm on COMM_WORLD: the same arithmetic plus two
            ``Allgather`` collectives per step (forward: flag, count, mean[C], m2[C] = 2C+2 float64s per
            process; backward: flag, sum_dy[C], sum_dy_xmu[C] = 2C+1 float64s) and the merges of the
            gathered rows in rank order;
  * 2xAG    the two bare ``comm.Allgather`` calls of a step alone (float64 rows of 2C+2 and 2C+1
            values): the communication latency, without the BN arithmetic.
Each repeat runs local, sync and 2xAG once each, round-robin (the first one rotating), each as a
batch of k back-to-back steps (k, the same on every rank, makes a batch last >= ~20 ms, 5 ms with
--quick: long against the OS scheduler's time slice, so that ranks sharing a core are time-sliced
within a batch and the local times of oversubscribed runs include that sharing). Before every timed
batch all ranks meet in ``comm.Barrier()``; every rank times its own batch, and a repeat's time is
the *largest* over the ranks (a data-parallel step is as slow as its slowest process). Reported: the
median over repeats of batch time / k (p25 and p75 in the JSON), after warm-up steps, with garbage
collection off while timing. ``sync/local`` is the ratio of the medians and ``sync-local`` their
difference: what synchronizing costs per step (communication, merges, the split kernels and Python
glue of SyncBatchNorm, and the ranks waiting for each other).

Bytes. Computed from python/batchnorm/distributed.py's protocol: per step each process sends
8 * ((2C+2) + (2C+1)) = 8 * (4C+3) bytes, and its receive buffers hold P times that (its own row
included; (P-1) * 8 * (4C+3) bytes come from the other processes); with P = 1 nothing is sent (a one-process
communicator takes BatchNorm's path). The volume depends on C only, not
on the batch. The script also *measures* it: a few steps run with the communicator wrapped in a proxy
that counts the calls and the bytes of the buffers passed to Allgather/allgather (SyncBatchNorm takes
any object with Allgather, allgather, Get_rank, Get_size), and both values are printed; the timings use
the bare communicator.

Threads. Every process runs the kernels on one thread (``batchnorm.set_num_threads(1)``): with 2 cores
and up to 4 processes more threads would only oversubscribe further; P = 1 uses 1 thread too, so that
the rows compare the same per-process work.

What the numbers mean. On one machine the processes talk through shared memory, so the
collectives are cheap next to a network; and on a 2-core machine 4 processes oversubscribe the cores
(two ranks share a core and the OS time-slices them), so local step times grow with P too, and a
collective waits for descheduled ranks (Open MPI turns on mpi_yield_when_idle when oversubscribed: a
waiting rank still polls, yielding the core between polls). So this measures the communication and
merge overhead of SyncBatchNorm on one node and compares it with the BN arithmetic; it is not a
prediction for a real cluster, where the Allgather latency is that of the interconnect and grows
with P. Run it on an idle machine: with P <= cores Open MPI busy-polls without yielding, and any other
busy process can stall a collective by whole scheduler time slices (milliseconds). The ``others``
column says how many other runnable tasks there were while timing.

Before timing, each shape is checked once: rank 0's rows of y and dx and the running statistics of a
fresh SyncBatchNorm are compared with a local BatchNorm over the concatenation of every rank's batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench import _import_batchnorm, cpu_name  # noqa: E402  (the side-by-side benchmark's helpers)

bn = _import_batchnorm()

# (name, per-process shape, channel axis); float32 throughout
SHAPES = [
    ("32x64x28x28 NCHW", (32, 64, 28, 28), 1),
    ("8x256x14x14 NCHW", (8, 256, 14, 14), 1),
    ("256x1024 (N, C)", (256, 1024), 1),
    ("8x64x8x8 NCHW", (8, 64, 8, 8), 1),
]
DTYPE = np.float32
PROCS = (1, 2, 4)

PROFILES = {
    # budget: seconds per (shape, implementation) of timed batches (per rank); bounds on repeats;
    # batch: the least duration of one timed batch; warm: untimed warm-up steps per implementation
    "full": dict(budget=1.5, rmin=11, rmax=61, batch=0.02, warm=5, count_steps=5),
    "quick": dict(budget=0.12, rmin=3, rmax=9, batch=0.005, warm=2, count_steps=2),
}


# ----------------------------------------------------------------------------------------------------
# bytes: the formula and the counting communicator


def formula_bytes(C, P):
    """Bytes per training step per process, from distributed.py's protocol (float64 rows, flag first).
    A one-process communicator communicates nothing (the layer takes BatchNorm's fused path)."""
    fwd, bwd = 2 * C + 2, 2 * C + 1
    row = 8 * (fwd + bwd) if P > 1 else 0
    return dict(allgathers=2 if P > 1 else 0, sent=row, recv_buffer=P * row, recv_from_others=(P - 1) * row,
                fwd_values=fwd, bwd_values=bwd)


def _nbytes(buf):
    """Bytes of an mpi4py buffer argument: an array, or [array, ...] / (array, ...) buffer specs."""
    if isinstance(buf, (list, tuple)) and buf:
        buf = buf[0]
    try:
        return memoryview(buf).nbytes
    except TypeError:
        return np.asarray(buf).nbytes


class CountingComm:
    """A thin proxy of a communicator that counts the collectives SyncBatchNorm calls and their bytes
    (send buffer and receive buffer); everything else is passed through."""

    def __init__(self, comm):
        self._comm = comm
        self.reset()

    def reset(self):
        self.calls = {"Allgather": 0, "allgather": 0}
        self.sent = 0
        self.received = 0

    def Allgather(self, sendbuf, recvbuf):
        self.calls["Allgather"] += 1
        self.sent += _nbytes(sendbuf)
        self.received += _nbytes(recvbuf)
        return self._comm.Allgather(sendbuf, recvbuf)

    def allgather(self, obj):  # only on the error path: pickled objects
        import pickle
        self.calls["allgather"] += 1
        self.sent += len(pickle.dumps(obj))
        out = self._comm.allgather(obj)
        self.received += sum(len(pickle.dumps(o)) for o in out)
        return out

    def Get_rank(self):
        return self._comm.Get_rank()

    def Get_size(self):
        return self._comm.Get_size()

    def __getattr__(self, name):
        return getattr(self._comm, name)


# ----------------------------------------------------------------------------------------------------
# one process group: the worker


def make_data(shape, axis, rank, seed=0):
    rng = np.random.default_rng([seed, rank])
    x = rng.standard_normal(shape, dtype=DTYPE)
    dy = rng.standard_normal(shape, dtype=DTYPE)
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    x += rng.uniform(-1.0, 1.0, C).astype(DTYPE).reshape(bshape)  # per-channel offsets, like real data
    return x, dy


def make_layers(C, axis, comm):
    from batchnorm.distributed import SyncBatchNorm
    opts = dict(eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, axis=axis, dtype=DTYPE)
    return bn.BatchNorm(C, **opts), SyncBatchNorm(C, comm=comm, **opts)


def maxdiff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def check_shape(comm, shape, axis, x, dy):
    """One step of a fresh SyncBatchNorm against a local BatchNorm over every rank's batch concatenated
    (on rank 0, for its rows). Returns a dict on rank 0, None elsewhere."""
    C = shape[axis]
    _, sync = make_layers(C, axis, comm)
    y = sync(x)
    dx = sync.backward(dy)
    xs, dys = comm.gather(x, root=0), comm.gather(dy, root=0)
    if comm.Get_rank() != 0:
        return None
    ref, _ = make_layers(C, axis, None)
    X, DY = np.concatenate(xs, axis=0), np.concatenate(dys, axis=0)
    Y = ref(X)
    DX = ref.backward(DY)
    n = x.shape[0]
    res = dict(y=maxdiff(y, Y[:n]), dx=maxdiff(dx, DX[:n]),
               running_mean=maxdiff(sync.running_mean, ref.running_mean),
               running_var=maxdiff(sync.running_var, ref.running_var))
    # float32 data: a few ulps of |values| ~ 1-5 are expected from the different merge order
    res["ok"] = all(v <= 1e-4 for v in res.values())
    return res


def count_bytes(comm, shape, axis, x, dy, steps):
    """Run `steps` SyncBatchNorm steps through a CountingComm; per step: calls, bytes sent, received."""
    C = shape[axis]
    cc = CountingComm(comm)
    _, sync = make_layers(C, axis, cc)
    sync(x)
    sync.backward(dy)  # warm-up, not counted
    cc.reset()
    for _ in range(steps):
        sync(x)
        sync.backward(dy)
    return dict(allgathers=cc.calls["Allgather"] / steps, object_allgathers=cc.calls["allgather"] / steps,
                sent=cc.sent / steps, recv_buffer=cc.received / steps)


def others_runnable(P):
    """Runnable tasks on this machine besides this benchmark's P ranks (from /proc/loadavg; None if
    unavailable): how many other processes compete for the cores right now."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - P)


def bench_shape(comm, name, shape, axis, prof, log):
    rank, P = comm.Get_rank(), comm.Get_size()
    C = shape[axis]
    x, dy = make_data(shape, axis, rank)
    check = check_shape(comm, shape, axis, x, dy)
    measured = count_bytes(comm, shape, axis, x, dy, prof["count_steps"])
    local, sync = make_layers(C, axis, comm)

    def step_local():
        local(x)
        local.backward(dy)

    def step_sync():
        sync(x)
        sync.backward(dy)

    f = formula_bytes(C, P)
    row_f, row_b = np.ones(f["fwd_values"]), np.ones(f["bwd_values"])
    tab_f, tab_b = np.empty((P, row_f.size)), np.empty((P, row_b.size))
    Allgather = comm.Allgather

    def allgather_pair():
        Allgather(row_f, tab_f)
        Allgather(row_b, tab_b)

    entries = [("local", step_local), ("sync", step_sync), ("2xAG", allgather_pair)]

    # warm-up and calibration: k steps per timed batch and the number of repeats, the same on every rank
    # (the collectives need every rank to make the same calls): computed from values reduced over ranks
    from mpi4py import MPI
    ks, ests = {}, {}
    for nm, fn in entries:
        for _ in range(prof["warm"]):
            fn()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        est = comm.allreduce((time.perf_counter() - t0) / 3, op=MPI.MAX)
        ests[nm] = est
        ks[nm] = max(1, int(math.ceil(prof["batch"] / max(est, 1e-7))))
    per_repeat = sum(ks[nm] * ests[nm] for nm, _ in entries)
    R = int(min(prof["rmax"], max(prof["rmin"], len(entries) * prof["budget"] / max(per_repeat, 1e-9))))

    mine = {nm: [] for nm, _ in entries}
    others = []
    pc = time.perf_counter
    barrier = comm.Barrier
    gc_was = gc.isenabled()
    gc.disable()
    try:
        n = len(entries)
        for r in range(R):
            for j in range(n):
                nm, fn = entries[(r + j) % n]
                k = ks[nm]
                barrier()
                t0 = pc()
                for _ in range(k):
                    fn()
                mine[nm].append((pc() - t0) / k)
            if rank == 0:  # between repeats, untimed; the other ranks are runnable too (at the barrier)
                others.append(others_runnable(P))
    finally:
        if gc_was:
            gc.enable()
    everyone = comm.gather(mine, root=0)
    if rank != 0:
        return None
    res = dict(case=name, shape=list(shape), axis=axis, C=C, dtype=np.dtype(DTYPE).name, P=P,
               x_bytes=x.nbytes, repeats=R, k=ks, check=check, bytes_formula=f, bytes_measured=measured,
               others_runnable=(None if None in others else float(np.mean(others))))
    for nm, _ in entries:
        per_rank = np.array([e[nm] for e in everyone])  # (P, R)
        slowest = per_rank.max(axis=0)                  # per repeat: the slowest rank
        q = statistics.quantiles(slowest, n=4) if len(slowest) >= 2 else [slowest[0]] * 3
        res[nm] = dict(median=float(np.median(slowest)), p25=q[0], p75=q[2], min=float(slowest.min()),
                       per_rank_median=[float(np.median(v)) for v in per_rank])
    res["sync_over_local"] = res["sync"]["median"] / res["local"]["median"]
    res["sync_minus_local"] = res["sync"]["median"] - res["local"]["median"]
    log(f"  {name} P={P}: local {res['local']['median'] * 1e3:.3f} ms  sync {res['sync']['median'] * 1e3:.3f}"
        f" ms  2xAG {res['2xAG']['median'] * 1e6:.1f} us  ({R} repeats)")
    return res


def ncpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def worker(args):
    """The benchmark in this process group (COMM_WORLD: 1 process without mpiexec)."""
    try:
        from mpi4py import MPI
        import mpi4py
    except ImportError:
        sys.exit("sync_bench.py needs mpi4py and an MPI library: pip install 'batchnorm[mpi]'")
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    prof = PROFILES["quick" if args.quick else "full"]
    quiet = args.quiet or rank != 0
    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    bn.set_num_threads(1)
    assert bn.get_num_threads() == 1, bn.get_num_threads()
    shapes = [s for s in SHAPES if not args.cases or any(c in s[0] for c in args.cases)]
    t_start = time.perf_counter()
    meta = dict(
        batchnorm=getattr(bn, "__version__", "?"), numpy=np.__version__, mpi4py=mpi4py.__version__,
        mpi=MPI.Get_library_version().strip().splitlines()[0].strip(), python=platform.python_version(),
        cpu=cpu_name(), cpus=ncpus(), P=P, threads_per_process=1, quick=args.quick, profile=prof,
        hosts=sorted(set(comm.allgather(MPI.Get_processor_name()))),
        affinity=comm.allgather(sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    log(f"P={P}: {len(shapes)} shapes, 1 thread per process")
    cases = []
    for name, shape, axis in shapes:
        r = bench_shape(comm, name, shape, axis, prof, log)
        if rank == 0:
            cases.append(r)
    comm.Barrier()
    if rank != 0:
        return
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = dict(meta=meta, runs=[dict(P=P, meta=meta)], cases=cases)
    print_report(out)
    write_json(args.json, out)


# ----------------------------------------------------------------------------------------------------
# the driver: mpiexec for P = 1, 2, 4


def find_mpiexec():
    here = os.path.dirname(os.path.abspath(sys.executable))
    for name in ("mpiexec", "mpirun"):
        cand = os.path.join(here, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    for name in ("mpiexec", "mpirun"):
        cand = shutil.which(name)
        if cand:
            return cand
    return None


def is_open_mpi(mpiexec):
    try:
        cp = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = (cp.stdout + cp.stderr).lower()
    return "open mpi" in text or "openrte" in text or "open-rte" in text or "prrte" in text


def driver(args):
    mpiexec = find_mpiexec()
    if mpiexec is None:
        sys.exit("--all: no mpiexec found beside sys.executable or on PATH")
    ompi = is_open_mpi(mpiexec)
    env = dict(os.environ)
    if ompi:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    timeout = 120 if args.quick else 600
    t_start = time.perf_counter()
    runs, cases = [], []
    with tempfile.TemporaryDirectory(prefix="sync_bench_") as tmp:
        for P in PROCS:
            path = os.path.join(tmp, f"p{P}.json")
            cmd = [mpiexec] + (["--oversubscribe"] if ompi else []) + ["-n", str(P), sys.executable,
                                                                         os.path.abspath(__file__),
                                                                         "--json", path, "--quiet"]
            if args.quick:
                cmd.append("--quick")
            if args.cases:
                cmd += ["--cases"] + args.cases
            print(f"P={P}: {' '.join(cmd[:5 if ompi else 4])} ... ", end="", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                cp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as e:
                print(f"timed out after {timeout} s", file=sys.stderr)
                sys.stderr.write((e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
                sys.exit(1)
            wall = time.perf_counter() - t0
            if cp.returncode != 0 or not os.path.exists(path):
                print(f"failed (exit {cp.returncode})", file=sys.stderr)
                sys.stderr.write(cp.stdout[-4000:] + cp.stderr[-4000:])
                sys.exit(1)
            print(f"{wall:.1f} s", file=sys.stderr, flush=True)
            with open(path) as f:
                res = json.load(f)
            res["meta"]["wall_s"] = wall
            res["meta"]["command"] = " ".join(cmd)
            runs.append(dict(P=P, meta=res["meta"]))
            cases += res["cases"]
    meta = dict(runs[0]["meta"])
    meta.update(P=list(PROCS), mpiexec=mpiexec, open_mpi=ompi, elapsed_s=time.perf_counter() - t_start,
                loadavg_end=os.getloadavg() if hasattr(os, "getloadavg") else None)
    out = dict(meta=meta, runs=runs, cases=cases)
    print_report(out)
    write_json(args.json, out)


# ----------------------------------------------------------------------------------------------------
# report


def write_json(path, out):
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def fmt_ms(s):
    return f"{s * 1e3:.3f}" if s < 0.1 else f"{s * 1e3:.1f}"


def print_report(out, file=sys.stdout):
    p = lambda *a: print(*a, file=file)  # noqa: E731
    m = out["meta"]
    Ps = sorted({r["P"] for r in out["runs"]})
    p("")
    p(f"SyncBatchNorm vs BatchNorm, training step (forward + backward), float32, weak scaling (fixed "
      f"per-process batch)")
    p(f"batchnorm {m['batchnorm']}  numpy {m['numpy']}  mpi4py {m['mpi4py']}  python {m['python']}  "
      f"{m['mpi']}")
    p(f"on {m['cpu']} ({m['cpus']} CPUs, host(s) {', '.join(m['hosts'])})  P = {', '.join(map(str, Ps))}"
      f"{'  [--quick]' if m['quick'] else ''}")
    p("Threads: 1 per process (batchnorm.set_num_threads(1)), at every P including P = 1, for comparability"
      f"; with {m['cpus']} CPUs, P > {m['cpus']} processes oversubscribe the cores.")
    aff = []
    for r in out["runs"]:
        a = r["meta"].get("affinity")
        if a and all(v is not None for v in a):
            aff.append(f"P={r['P']}: " + " ".join(",".join(map(str, v)) for v in a))
    if aff:
        p("CPUs each rank may run on (MPI binding): " + ";  ".join(aff))
    p("Times: median over repeats of the slowest rank's time per step (comm.Barrier() before each timed "
      "batch of k steps). local = BatchNorm (no communication), sync = SyncBatchNorm (2 Allgathers + "
      "merges), 2xAG = the step's two bare Allgathers alone (2C+2 and 2C+1 float64s per process). "
      "sync-local = the synchronization overhead per step; spread = (p75 - p25) / median of sync. "
      "sent/recv = bytes per step per process (measured; see below). others = mean number of other "
      "runnable tasks on the machine while timing (0 on an idle machine).")
    hdr = (f"{'shape (per process)':20s} {'C':>5s} {'P':>2s} {'local ms':>9s} {'sync ms':>9s} "
           f"{'sync/local':>10s} {'sync-local us':>13s} {'2xAG us':>8s} {'spread':>6s} "
           f"{'sent B/step':>11s} {'recv B/step':>11s} {'others':>6s}")
    p("")
    p(hdr)
    p("-" * len(hdr))
    order = {s[0]: i for i, s in enumerate(SHAPES)}
    cases = sorted(out["cases"], key=lambda c: (order.get(c["case"], 99), c["P"]))
    prev = None
    for c in cases:
        if prev is not None and c["case"] != prev:
            p("")
        prev = c["case"]
        s = c["sync"]
        spread = (s["p75"] - s["p25"]) / s["median"]
        b = c["bytes_measured"]
        p(f"{c['case']:20s} {c['C']:>5d} {c['P']:>2d} {fmt_ms(c['local']['median']):>9s} "
          f"{fmt_ms(s['median']):>9s} {c['sync_over_local']:10.2f} {c['sync_minus_local'] * 1e6:>13.1f} "
          f"{c['2xAG']['median'] * 1e6:>8.1f} {spread * 100:5.0f}% {b['sent']:>11.0f} {b['recv_buffer']:>11.0f} "
          f"{'-' if c.get('others_runnable') is None else format(c['others_runnable'], '.1f'):>6s}")
    p("")
    p("Bytes per step per process, measured (a proxy communicator counting the buffers SyncBatchNorm passes "
      "to Allgather/allgather) vs the formula (sent = 8*(4C+3): rows of 2C+2 and 2C+1 float64s; "
      "received = P * sent, own row included; from the other processes = (P-1) * sent). "
      "Independent of the batch size.")
    hdr2 = (f"  {'shape':20s} {'C':>5s} {'P':>2s} {'Allgathers':>10s} {'sent meas':>10s} {'formula':>10s} "
            f"{'recv meas':>10s} {'formula':>10s} {'from others':>11s} {'x bytes':>10s} {'match':>5s}")
    p(hdr2)
    for c in cases:
        b, f = c["bytes_measured"], c["bytes_formula"]
        ok = (b["sent"] == f["sent"] and b["recv_buffer"] == f["recv_buffer"]
              and b["allgathers"] == f["allgathers"] and b["object_allgathers"] == 0)
        p(f"  {c['case']:20s} {c['C']:>5d} {c['P']:>2d} {b['allgathers']:>10g} {b['sent']:>10.0f} "
          f"{f['sent']:>10d} {b['recv_buffer']:>10.0f} {f['recv_buffer']:>10d} {f['recv_from_others']:>11d} "
          f"{c['x_bytes']:>10d} {'yes' if ok else 'NO':>5s}")
    p("")
    p("Check (one fresh SyncBatchNorm step vs BatchNorm over every rank's batch concatenated; rank 0's rows; "
      "max abs diff):")
    for c in cases:
        k = c["check"]
        p(f"  {c['case']:20s} P={c['P']}:  y {k['y']:.2g}  dx {k['dx']:.2g}  running_mean "
          f"{k['running_mean']:.2g}  running_var {k['running_var']:.2g}  {'ok' if k['ok'] else 'MISMATCH'}")
    p("")
    walls = [f"P={r['P']}: {r['meta'].get('wall_s', r['meta']['elapsed_s']):.1f} s" for r in out["runs"]]
    p("Run time " + ", ".join(walls) + (f"; total {m['elapsed_s']:.1f} s" if len(out["runs"]) > 1 else ""))
    busy = [c["others_runnable"] for c in cases if c.get("others_runnable") is not None]
    if busy and max(busy) >= 0.5:
        p(f"Note: other processes competed for the CPUs (up to {max(busy):.1f} other runnable tasks on "
          f"average while timing a row): times are slower and noisier than on an idle machine, sync rows "
          f"most (a collective waits for every rank; without oversubscription Open MPI busy-polls).")
    if Ps and max(Ps) > m["cpus"]:
        p(f"Note: P > {m['cpus']} oversubscribes the {m['cpus']} CPUs: ranks time-slice a core, so both local "
          f"and sync times grow with P, and these numbers show one node's overhead, not a cluster's.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats (--all --quick: < 30 s in total)")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    ap.add_argument("--all", action="store_true",
                    help="launch mpiexec for P = 1, 2, 4 and print one combined table")
    ap.add_argument("--cases", nargs="+", metavar="SUBSTR", help="only shapes whose name contains one")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.all:
        if any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
            sys.exit("--all launches mpiexec itself: run it as plain `python benchmarks/sync_bench.py --all`")
        driver(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
