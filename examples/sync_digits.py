"""Data-parallel training with synchronized batch normalization, on scikit-learn's digits.

Run it with::

    mpiexec -n 4 python examples/sync_digits.py            # full run
    mpiexec -n 4 python examples/sync_digits.py --quick    # shorter run
    mpiexec -n 1 python examples/sync_digits.py --quick    # one process (so does plain `python ...`)

(as root, Open MPI also wants ``--allow-run-as-root``; with more processes than cores,
``--oversubscribe``). Needs mpi4py and an MPI library (``pip install "batchnorm[mpi]"``) and
scikit-learn (the data); threadpoolctl is used when installed.

The data, the network and the training loop are those of :mod:`batchnorm.demo`: the 8x8 digits scaled
to [0, 1] (float32) with the demo's stratified split, a net of three fully connected hidden layers of
100 sigmoid units with BN before each sigmoid, Glorot-uniform initial weights from a fixed seed, plain
SGD. Every step takes a *global* batch of 32 training images, drawn in the same order for every run,
and three runs start from the same weights:

(a) **local BN** -- P processes (P = the communicator's size), each takes its contiguous 32/P samples
    of the global batch and normalizes them with its own 32/P-sample statistics
    (:class:`batchnorm.BatchNorm1d`); every parameter's gradient (Linear weights and biases, BN gamma
    and beta) is averaged over the processes with one ``Allreduce``: data-parallel SGD on the mean
    loss over the global batch;
(b) **SyncBN** -- the same, with the BN layers converted to
    :class:`batchnorm.distributed.SyncBatchNorm`, which normalizes with the statistics of all 32
    samples;
(c) **one process, batch 32** -- rank 0 alone trains with plain BN on the whole global batch.

Scaling the gradients: each process's loss is the mean over its own 32/P samples, which is P times
its share of the global mean loss, so every gradient a process computes is P times its contribution.
Linear layers' gradients and SyncBN's ``grad_weight``/``grad_bias`` (each process's contribution to
the gradient of the sum over processes, as in PyTorch) scale alike, so averaging *all* of them over
the processes gives exactly the single-process gradient. (Summing would give P times it; SyncBN's dx
needs no correction, it is linear in dy.)

Every few steps, rank 0 measures the test accuracy of each run (BN in eval mode, i.e. with running
statistics; local BN with rank 0's) and the mean training loss over the global batches since the last
measurement, and prints a table with the largest parameter difference of runs (a) and (b) from run
(c), then a summary. What to expect with 4 processes (seed 0, lr 0.1; on 2 cores the quick run takes
6-10 s, 2-5 s of it training, the full one about 40 s):

- SyncBN tracks the single-process run step for step: parameters within about 1e-6 (4e-7 after 500
  steps, 1e-6 after 5000: float32 rounding, the sums are taken in another order), the same test
  accuracy and training loss (to 1e-8) at every row, running statistics equal to within rounding;
  test accuracy about 0.97 after 500 steps and 0.99 after 5000;
- local BN, whose statistics come from 8 samples, follows its own trajectory: parameters 0.06 (quick)
  to 0.2 (full) away, test accuracies up to a few percent off and jumpier (rank 0's running
  statistics average noisy 8-sample ones), a training loss several times higher;
- with SyncBN the running statistics are bit-identical on all ranks (checked with ``allgather``);
  with local BN each rank has its own. The parameters are identical on all ranks in both runs (every
  rank applies the same averaged gradients).

With one process the three runs coincide bit for bit. At larger learning rates (``--lr 0.5``) the
float32 rounding differences between SyncBN and the single-process run can grow through a loss spike
(to about 3e-5 here), yet the accuracies still agree.

Everything is float32, as in the demo.
"""

from __future__ import annotations

import os

# Four processes on a few cores: keep each process's BLAS and OpenMP pools to one thread (set before
# NumPy is imported; the matrices here are tiny, extra threads would only compete for the cores).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

try:
    from mpi4py import MPI
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit("examples/sync_digits.py needs mpi4py and an MPI library: pip install 'batchnorm[mpi]'")

import batchnorm  # noqa: E402
from batchnorm.demo import load_data, make_model  # noqa: E402
from batchnorm.distributed import SyncBatchNorm  # noqa: E402
from batchnorm.examples import SGD, SoftmaxCrossEntropy, accuracy, iterate_minibatches  # noqa: E402

GLOBAL_BATCH = 32
DEFAULT_LR = 0.1        # the demo's sigmoid net with BN: 95% test accuracy in 100 steps (500x fewer than without)
FULL = {"steps": 5000, "eval_every": 250}
QUICK = {"steps": 500, "eval_every": 50}
EARLY = (10, 20, 30, 50, 100)  # extra measurements before the first eval_every (BN nets learn fast)

RUNS = ("local", "sync", "single")
TITLES = {"local": "local BN", "sync": "SyncBN", "single": "1 process"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def bn_layers(model):
    return [layer for layer in model.layers if isinstance(layer, batchnorm.BatchNorm)]


def flat_params(model):
    """Every parameter of the model in one float64 vector (layer order)."""
    return np.concatenate([p.ravel() for p, _ in model.params_and_grads()]).astype(np.float64)


def flat_running_stats(model):
    return np.concatenate([np.concatenate([b.running_mean, b.running_var]) for b in bn_layers(model)])


def identical_on_all_ranks(comm, arr):
    """True when arr is bit-identical on every rank (every rank gets the answer)."""
    blobs = comm.allgather(np.ascontiguousarray(arr).tobytes())
    return all(b == blobs[0] for b in blobs)


def allreduce_mean(comm, pairs, loss):
    """Average every gradient (and the loss) over the processes, in place: one Allreduce of one
    float64 buffer. Returns the mean loss, i.e. the loss over the global batch."""
    buf = np.empty(sum(g.size for _, g in pairs) + 1, np.float64)
    i = 0
    for _, g in pairs:
        buf[i:i + g.size] = g.ravel()
        i += g.size
    buf[-1] = loss
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    buf /= comm.Get_size()
    i = 0
    for _, g in pairs:
        g[...] = buf[i:i + g.size].reshape(g.shape)
        i += g.size
    return float(buf[-1])


def evaluate(model, x, y):
    """Test accuracy with BN in eval mode (running statistics); no communication, even for SyncBN."""
    model.eval()
    acc = accuracy(model(x), y)
    model.train()
    return acc


def blas_one_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def train_all(comm, data, *, lr, steps, eval_at, seed, report):
    """Train the three runs side by side; rank 0 calls report(step, row) at each step of eval_at."""
    rank, size = comm.Get_rank(), comm.Get_size()
    per_proc = GLOBAL_BATCH // size
    x_tr, y_tr, x_te, y_te = data
    n_in, n_out = x_tr.shape[1], int(y_tr.max()) + 1

    # The same seed gives the same initial weights to the three nets.
    models = {name: make_model(n_in, n_out, activation="sigmoid", bn="before", seed=seed) for name in RUNS}
    models["sync"].layers = [SyncBatchNorm.from_layer(layer, comm) if isinstance(layer, batchnorm.BatchNorm)
                             else layer for layer in models["sync"].layers]
    active = ("local", "sync", "single") if rank == 0 else ("local", "sync")
    loss_fns = {name: SoftmaxCrossEntropy() for name in RUNS}
    opts = {name: SGD(lr=lr) for name in RUNS}
    # Every rank draws the same global batches; rank r takes rows [r * per_proc, (r + 1) * per_proc).
    batches = iterate_minibatches(len(x_tr), GLOBAL_BATCH, np.random.default_rng(seed + 1))
    mine = slice(rank * per_proc, (rank + 1) * per_proc)

    window = {name: [] for name in RUNS}
    history = []

    def measure(step):
        row = {"step": step}
        for name in RUNS:
            row[name + "_acc"] = evaluate(models[name], x_te, y_te)
            row[name + "_loss"] = float(np.mean(window[name])) if window[name] else float("nan")
            window[name].clear()
        ref = flat_params(models["single"])
        for name in ("local", "sync"):
            row[name + "_dparam"] = float(np.max(np.abs(flat_params(models[name]) - ref)))
        history.append(row)
        report(row)

    if rank == 0:
        measure(0)
    with np.errstate(all="raise"):
        for step in range(1, steps + 1):
            idx = next(batches)
            for name in active:
                model, loss_fn = models[name], loss_fns[name]
                rows = idx if name == "single" else idx[mine]
                loss = loss_fn(model(x_tr[rows]), y_tr[rows])     # forward (SyncBN: 1 Allgather per layer)
                model.backward(loss_fn.backward())                # backward (SyncBN: 1 Allgather per layer)
                pairs = model.params_and_grads()
                if name != "single":
                    loss = allreduce_mean(comm, pairs, loss)      # data-parallel: average the gradients
                opts[name].step(pairs)
                window[name].append(loss)
            if rank == 0 and step in eval_at:
                measure(step)
    return models, history


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(
        description="Data-parallel SGD on sklearn digits: local BN vs SyncBatchNorm vs one process "
                    "(run under mpiexec -n P, P dividing 32).")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['steps']} steps instead of {FULL['steps']}")
    p.add_argument("--steps", type=int, help="training steps (overrides --quick)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"SGD learning rate (default {DEFAULT_LR:g})")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, init and batch order (default 0)")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if GLOBAL_BATCH % size:
        if rank == 0:
            print(f"error: the global batch of {GLOBAL_BATCH} samples must split evenly over the processes; "
                  f"got {size} processes (use 1, 2, 4, 8, 16 or 32)", file=sys.stderr, flush=True)
        return 2
    cfg = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        if args.steps < 1:
            if rank == 0:
                print("error: --steps must be at least 1", file=sys.stderr)
            return 2
        cfg["steps"] = args.steps
    steps, every = cfg["steps"], cfg["eval_every"]
    eval_at = set(range(every, steps + 1, every)) | {s for s in EARLY if s < min(every, steps)} | {steps}

    data = load_data(args.seed)
    names = ["step"] + [f"{TITLES[n]} {what}" for n in RUNS for what in ("acc", "loss")] + \
        ["local max|dW|", "sync max|dW|"]
    widths = [max(len(c), 8) for c in names]
    if rank == 0:
        vendor, version = MPI.get_vendor()
        print(f"batchnorm {batchnorm.__version__}, numpy {np.__version__}, mpi4py with {vendor} "
              f"{'.'.join(map(str, version))}")
        print(f"{size} process(es), global batch {GLOBAL_BATCH} = {size} x {GLOBAL_BATCH // size} samples; "
              f"sklearn digits, {len(data[0])} train / {len(data[2])} test images;\nsigmoid 3x100 net, BN before "
              f"each sigmoid, float32; SGD lr {args.lr:g}, {steps} steps, seed {args.seed}\n")
        print("acc: held-out test accuracy, BN in eval mode (local BN: rank 0's running statistics); loss: mean\n"
              "training loss over the global batches since the previous row; max|dW|: largest parameter\n"
              "difference from the 1-process run\n")
        print("| " + " | ".join(f"{c:>{w}}" for c, w in zip(names, widths)) + " |")
        print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|", flush=True)

    def report(row):
        cells = [f"{row['step']}"]
        for n in RUNS:
            cells += [f"{row[n + '_acc']:.4f}", f"{row[n + '_loss']:.5f}"]
        cells += [f"{row['local_dparam']:.2e}", f"{row['sync_dparam']:.2e}"]
        print("| " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + " |", flush=True)

    comm.Barrier()
    t0 = time.perf_counter()
    with blas_one_thread():
        models, history = train_all(comm, data, lr=args.lr, steps=steps, eval_at=eval_at, seed=args.seed,
                                    report=report)
    seconds = time.perf_counter() - t0

    # Consistency across ranks (collective: every rank takes part).
    sync_stats_same = identical_on_all_ranks(comm, flat_running_stats(models["sync"]))
    local_stats_same = identical_on_all_ranks(comm, flat_running_stats(models["local"]))
    sync_params_same = identical_on_all_ranks(comm, flat_params(models["sync"]))
    local_params_same = identical_on_all_ranks(comm, flat_params(models["local"]))
    seconds_max = comm.allreduce(seconds, op=MPI.MAX)

    if rank == 0:
        n_test = len(data[2])
        ref_p, ref_s = flat_params(models["single"]), flat_running_stats(models["single"])
        print(f"\nTraining took {seconds_max:.1f} s ({steps} steps, {size} process(es)).\n")
        print("Differences from the 1-process run (batch 32 on one process), over the whole run:")
        cols = ["run      ", "max|dW| final", "max|dW| any row", "max|dW| / max|W|", "running stats max|diff|",
                "test acc max|diff|", "train loss max|diff|"]
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("-" * (len(c) + 1) + ":" for c in cols) + "|")
        for name in ("sync", "local"):
            dp = float(np.max(np.abs(flat_params(models[name]) - ref_p)))
            ds = float(np.max(np.abs(flat_running_stats(models[name]) - ref_s)))
            dacc = max(abs(r[name + "_acc"] - r["single_acc"]) for r in history)
            dloss = max((abs(r[name + "_loss"] - r["single_loss"]) for r in history[1:]), default=0.0)
            worst = max(r[name + "_dparam"] for r in history)
            cells = [TITLES[name], f"{dp:.2e}", f"{worst:.2e}", f"{dp / np.abs(ref_p).max():.1e}", f"{ds:.2e}",
                     f"{dacc:.4f} ({int(round(dacc * n_test))} img)", f"{dloss:.2e}"]
            print("| " + " | ".join(f"{c:>{len(h)}}" for c, h in zip(cells, cols)) + " |")
        print(f"(running stats: rank 0's; test accuracy compared at the {len(history)} rows, on {n_test} images)")
        final = history[-1]
        print(f"\nFinal test accuracy: local BN {final['local_acc']:.4f}, SyncBN {final['sync_acc']:.4f}, "
              f"1 process {final['single_acc']:.4f}")
        print(f"\nrunning statistics identical on all {size} ranks: {sync_stats_same}")
        if size > 1:
            print(f"  (local BN, each rank's own {GLOBAL_BATCH // size}-sample statistics: identical on all {size} "
                  f"ranks: {local_stats_same})")
        print(f"parameters identical on all {size} ranks: SyncBN {sync_params_same}, local BN {local_params_same}")
        ok = sync_stats_same and sync_params_same and max(r["sync_dparam"] for r in history) < 1e-4
        print(f"\nSyncBN tracks the 1-process run: {ok}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
