"""batchnorm.Moments (streaming exact per-channel statistics) and batchnorm.precise_stats (exact
population statistics for BN layers), against NumPy on the concatenated data and scikit-learn's
StandardScaler.partial_fit."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import numpy as np
import pytest

import batchnorm as bn
from batchnorm.examples import Linear, ReLU, Sequential
from helpers import assert_close, make_data

C = 4


def batches(rng, shapes, axis=1, dtype=np.float64, loc=0.0):
    return [make_data(rng, s, dtype, axis=axis, loc=loc) for s in shapes]


def flat(xs, axis):
    """All values of xs per channel, as (M, C) float64."""
    return np.concatenate([np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, C) for x in xs])


# --------------------------------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------------------------------

CASES = {
    "2d": (1, [(5, C), (1, C), (7, C), (0, C), (3, C)]),
    "3d": (1, [(2, C, 3), (4, C, 1), (1, C, 5)]),
    "chlast": (-1, [(2, 3, C), (5, 1, C), (1, 2, C)]),
    "4d": (1, [(2, C, 3, 2), (3, C, 2, 2)]),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.int16], ids=["f64", "f32", "i16"])
@pytest.mark.parametrize("case", list(CASES))
def test_moments_match_numpy_on_the_concatenation(rng, case, dtype):
    axis, shapes = CASES[case]
    xs = batches(rng, shapes, axis, dtype)
    m = bn.Moments(C, axis=axis)
    for x in xs:
        assert m.update(x) is m
    allv = flat(xs, axis)
    assert m.count == allv.shape[0] and isinstance(m.count, int)
    assert_close(m.mean, allv.mean(0), 1e-13, "mean")
    assert_close(m.var, allv.var(0), 1e-13, "var")
    assert_close(m.var_unbiased, allv.var(0, ddof=1), 1e-13, "var_unbiased")
    for v in (m.mean, m.var, m.var_unbiased):
        assert v.dtype == np.float64 and v.shape == (C,)


def test_moments_of_large_mean_data_match_sklearn_and_the_truth(rng):
    """Data far from 0 (mean 1e6, std 1 to 4) in 60 small batches, against exactly rounded sums
    (math.fsum): the mean to a few ulps, the variance to 1e-10 relative (measured 3e-12; scikit-learn's
    partial_fit 3e-11), and scikit-learn agrees with both."""
    sklearn = pytest.importorskip("sklearn.preprocessing")
    xs = [1e6 + rng.standard_normal((int(n), C)) * np.arange(1, C + 1) for n in rng.integers(2, 40, 60)]
    m = bn.Moments(C)
    scaler = sklearn.StandardScaler()
    for x in xs:
        m.update(x)
        scaler.partial_fit(x)
    allv = np.concatenate(xs)
    true_mean = np.array([math.fsum(allv[:, c]) / len(allv) for c in range(C)])
    true_var = np.array([math.fsum((allv[:, c] - true_mean[c]) ** 2) / len(allv) for c in range(C)])
    assert m.count == scaler.n_samples_seen_ == len(allv)
    np.testing.assert_allclose(m.mean, true_mean, rtol=2e-15, atol=0)
    np.testing.assert_allclose(m.var, true_var, rtol=1e-10, atol=0)
    np.testing.assert_allclose(m.mean, scaler.mean_, rtol=2e-15)
    np.testing.assert_allclose(m.var, scaler.var_, rtol=1e-9)


def test_moments_match_sklearn_on_ordinary_data(rng):
    sklearn = pytest.importorskip("sklearn.preprocessing")
    m = bn.Moments(C, axis=-1)
    scaler = sklearn.StandardScaler()
    for n in (3, 17, 1, 64):
        x = make_data(rng, (n, C), np.float64, axis=-1)
        m.update(x)
        scaler.partial_fit(x)
    np.testing.assert_allclose(m.mean, scaler.mean_, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(m.var, scaler.var_, rtol=1e-12)
    x = make_data(rng, (5, C), np.float64, axis=-1)
    np.testing.assert_allclose(m.normalize(x), scaler.transform(x), rtol=1e-12, atol=1e-12)


def test_merge_equals_one_accumulator_over_everything(rng):
    xs = batches(rng, [(5, C), (3, C), (8, C), (2, C)])
    whole = bn.Moments(C)
    for x in xs:
        whole.update(x)
    a, b = bn.Moments(C), bn.Moments(C, axis=-1)
    a.update(xs[0]).update(xs[1])
    b.update(xs[2].T.copy().T)  # another layout; b's axis is -1 but (8, C) has its channels there too
    b.update(xs[3])
    assert a.merge(b) is a
    assert a.count == whole.count
    assert_close(a.mean, whole.mean, 1e-14)
    assert_close(a.var, whole.var, 1e-13)
    assert b.count == 10  # merged from, not changed
    # with an empty one, either way round: nothing changes
    before = (a.count, a.mean.tobytes(), a.var.tobytes())
    a.merge(bn.Moments(C))
    assert (a.count, a.mean.tobytes(), a.var.tobytes()) == before
    empty = bn.Moments(C).merge(a)
    assert (empty.count, empty.mean.tobytes(), empty.var.tobytes()) == before
    # with itself: every value twice, same mean and biased variance
    twice = copy.deepcopy(a).merge(a)
    assert twice.count == 2 * a.count
    assert_close(twice.mean, a.mean, 1e-14)
    assert_close(twice.var, a.var, 1e-13)


def test_reset_and_empty_statistics(rng):
    m = bn.Moments(C)
    assert m.count == 0
    assert np.isnan(m.mean).all() and np.isnan(m.var).all() and np.isnan(m.var_unbiased).all()
    m.update(np.ones((1, C)))
    assert m.count == 1 and np.array_equal(m.var, np.zeros(C)) and np.isnan(m.var_unbiased).all()
    m.update(make_data(rng, (6, C)))
    assert m.reset() is m and m.count == 0 and np.isnan(m.mean).all()
    with pytest.raises(ValueError, match="no value"):
        m.normalize(np.ones((2, C)))


def test_results_are_copies(rng):
    m = bn.Moments(C).update(make_data(rng, (5, C)))
    mean = m.mean
    mean[...] = 99
    assert not np.any(m.mean == 99)


@pytest.mark.parametrize("case", ["nlc-axis1", "nlc-axis-1", "nchw", "broadcast-row"])
def test_mask_selects_the_true_positions(rng, case):
    if case == "nlc-axis1":      # (N, C, L) with mask (N, L)
        axis, x = 1, make_data(rng, (3, C, 5), axis=1)
        mask = rng.random((3, 5)) < 0.6
        chosen = np.moveaxis(x, 1, -1)[mask]
    elif case == "nlc-axis-1":   # (N, L, C) with mask (N, L)
        axis, x = -1, make_data(rng, (3, 5, C), axis=-1)
        mask = rng.random((3, 5)) < 0.6
        chosen = x[mask]
    elif case == "nchw":         # (N, C, H, W) with mask (N, H, W)
        axis, x = 1, make_data(rng, (2, C, 3, 4), axis=1)
        mask = rng.random((2, 3, 4)) < 0.5
        chosen = np.moveaxis(x, 1, -1)[mask]
    else:                        # (N, C, L) with mask (L,) broadcast over N
        axis, x = 1, make_data(rng, (3, C, 5), axis=1)
        mask = np.array([True, False, True, True, False])
        chosen = np.moveaxis(x, 1, -1)[:, mask].reshape(-1, C)
    m = bn.Moments(C, axis=axis).update(x, mask=mask)
    assert m.count == chosen.shape[0]
    assert_close(m.mean, chosen.mean(0), 1e-14)
    assert_close(m.var_unbiased, chosen.var(0, ddof=1), 1e-13)
    # all False adds nothing; all True is no mask
    m2 = bn.Moments(C, axis=axis).update(x, mask=np.zeros(mask.shape, bool))
    assert m2.count == 0
    full = bn.Moments(C, axis=axis).update(x, mask=np.ones(mask.shape, bool))
    plain = bn.Moments(C, axis=axis).update(x)
    assert full.count == plain.count
    assert_close(full.mean, plain.mean, 1e-15)
    assert_close(full.var, plain.var, 1e-14)


@pytest.mark.parametrize("bad,err,match", [
    (lambda x: np.ones((3, 5), np.int8), TypeError, "mask must be a boolean"),
    (lambda x: np.ones((3, 4), bool), ValueError, r"mask has shape \(3, 4\)"),
    (lambda x: np.ones((3, C, 5), bool), ValueError, "mask has shape"),
])
def test_bad_masks_change_nothing(rng, bad, err, match):
    x = make_data(rng, (3, C, 5))
    m = bn.Moments(C).update(make_data(rng, (4, C, 5)))
    before = (m.count, m.mean.tobytes(), m.var.tobytes())
    with pytest.raises(err, match=match):
        m.update(x, mask=bad(x))
    assert (m.count, m.mean.tobytes(), m.var.tobytes()) == before


def test_bad_arguments(rng):
    for bad, err in ((0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="num_features"):
            bn.Moments(bad)
    with pytest.raises(TypeError, match="axis"):
        bn.Moments(C, axis=1.0)
    m = bn.Moments(C).update(make_data(rng, (4, C)))
    before = (m.count, m.mean.tobytes(), m.var.tobytes())
    for x, match in ((np.ones((4, C + 1)), "channels"), (np.ones(C), "at least 2"),
                     (np.ones((4, C)) + 1j, "complex")):
        with pytest.raises((TypeError, ValueError), match=match):
            m.update(x)
    with pytest.raises(ValueError, match="out of bounds"):
        bn.Moments(C, axis=3).update(np.ones((2, C)))
    with pytest.raises(TypeError, match="other"):
        m.merge("stats")
    with pytest.raises(ValueError, match="features"):
        m.merge(bn.Moments(C + 1).update(np.ones((2, C + 1))))
    with pytest.raises(ValueError, match="eps"):
        m.normalize(np.ones((2, C)), eps=-1.0)
    assert (m.count, m.mean.tobytes(), m.var.tobytes()) == before


def test_moments_pickle_and_repr(rng):
    m = bn.Moments(C, axis=-1).update(make_data(rng, (4, C), axis=-1))
    clone = pickle.loads(pickle.dumps(m))
    assert clone.count == m.count and clone.mean.tobytes() == m.mean.tobytes()
    assert repr(m) == "Moments(4, axis=-1, count=4)"


# --------------------------------------------------------------------------------------------------
# precise_stats
# --------------------------------------------------------------------------------------------------


def model(rng, dtype=np.float64, **bn_kw):
    return Sequential(Linear(6, C, bias=False, rng=rng, dtype=dtype), bn.BatchNorm1d(C, dtype=dtype, **bn_kw),
                      ReLU(), Linear(C, C, rng=rng, dtype=dtype), bn.BatchNorm1d(C, dtype=dtype, **bn_kw))


def bn_inputs(net, xs):
    """What each BN layer of net sees over xs in training mode (on a copy: plain batch statistics),
    as (M, C) float64 per layer."""
    net = copy.deepcopy(net).train()
    seen = {}
    for x in xs:
        h = x
        for i, layer in enumerate(net.layers):
            if isinstance(layer, bn.BatchNorm):
                seen.setdefault(i, []).append(np.asarray(h, np.float64))
            h = layer(h)
    return {i: np.concatenate(v) for i, v in seen.items()}


def layer_state(layer):
    out = {}
    for k, v in layer.__dict__.items():
        out[k] = v.copy() if isinstance(v, np.ndarray) else v
    return out


def assert_state_equal(a, b, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k in skip:
            continue
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
        else:
            assert a[k] is b[k] or a[k] == b[k], k


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_precise_stats_are_the_statistics_of_every_sample(rng, dtype):
    net = model(rng, dtype, momentum=None)
    xs = [rng.normal(1.0, 2.0, (n, 6)).astype(dtype) for n in (5, 2, 9, 3)]
    for x in xs[:2]:  # some history: running stats, counters, gradients
        net(x)
        net.backward(np.full((len(x), C), 0.1, dtype))
    net.eval()
    weight_arrays = [layer.weight for layer in net.layers if isinstance(layer, bn.BatchNorm)]
    before = [layer_state(layer) for layer in net.layers if isinstance(layer, bn.BatchNorm)]
    want = bn_inputs(net, xs)
    with bn.precise_stats(net) as layers:
        assert len(layers) == 2 and all(layer.training for layer in layers)
        for x in xs:
            net(x)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    for (i, seen), b in zip(want.items(), before):
        layer = net.layers[i]
        assert_close(layer.running_mean, seen.mean(0), tol, "running_mean")
        assert_close(layer.running_var, seen.var(0, ddof=1), tol, "running_var")
        assert_state_equal(layer_state(layer), b, skip=("running_mean", "running_var"))
        assert layer.running_mean.dtype == dtype
        assert layer.training is False
    assert [layer.weight for layer in net.layers if isinstance(layer, bn.BatchNorm)] == weight_arrays


def test_precise_stats_weigh_samples_not_batches(rng):
    """Batches of sizes 2 and 8: the running mean is the mean over the 10 samples, which the mean of the
    two batch means (PyTorch's update_bn, momentum=None) is not."""
    layer = bn.BatchNorm1d(C, dtype=np.float64)
    a, b = rng.normal(0, 1, (2, C)), rng.normal(5, 1, (8, C))
    with bn.precise_stats(layer):
        layer(a)
        layer(b)
    both = np.concatenate([a, b])
    assert_close(layer.running_mean, both.mean(0), 1e-13)
    assert not np.allclose(layer.running_mean, (a.mean(0) + b.mean(0)) / 2)


def test_precise_stats_torch_update_bn_with_equal_batches(rng):
    """With equal batch sizes the mean agrees with torch.optim.swa_utils.update_bn (which averages batch
    means); the variances differ by design (update_bn averages unbiased batch variances)."""
    torch = pytest.importorskip("torch")
    from torch.optim.swa_utils import update_bn

    xs = [rng.normal(2.0, 3.0, (6, C)) for _ in range(5)]
    layer = bn.BatchNorm1d(C, dtype=np.float64)
    with bn.precise_stats([layer]):
        for x in xs:
            layer(x)
    tl = torch.nn.BatchNorm1d(C, dtype=torch.float64)
    update_bn([torch.tensor(x) for x in xs], tl)
    np.testing.assert_allclose(layer.running_mean, tl.running_mean.numpy(), rtol=1e-12)
    assert_close(layer.running_var, np.concatenate(xs).var(0, ddof=1), 1e-12)


def test_precise_stats_channels_last_and_generic_layer(rng):
    layer = bn.BatchNorm(C, axis=-1, dtype=np.float64)
    xs = [make_data(rng, (n, 3, C), axis=-1) for n in (2, 3)]
    with bn.precise_stats({"only": layer}):
        for x in xs:
            layer(x)
    allv = flat(xs, -1)
    assert_close(layer.running_mean, allv.mean(0), 1e-13)
    assert_close(layer.running_var, allv.var(0, ddof=1), 1e-13)


def test_precise_stats_forward_and_backward_inside_are_training_bn(rng):
    layer = bn.BatchNorm2d(C, dtype=np.float64).eval()
    twin = copy.deepcopy(layer).train()
    twin.update_running_stats = False
    x, dy = make_data(rng, (3, C, 2, 2)), make_data(rng, (3, C, 2, 2))
    with bn.precise_stats(layer):
        y = layer(x)
        dx = layer.backward(dy)
        assert y.tobytes() == twin(x).tobytes()
        assert dx.tobytes() == twin.backward(dy).tobytes()


def test_precise_stats_ignore_flags_and_restore_them(rng):
    layer = bn.BatchNorm1d(C, dtype=np.float64, use_batch_stats=False, update_running_stats=False)
    x = make_data(rng, (6, C))
    with bn.precise_stats(layer):
        layer(x)
    assert layer.use_batch_stats is False and layer.update_running_stats is False
    assert_close(layer.running_mean, x.mean(0), 1e-14)


def test_precise_stats_body_raising_restores_everything(rng):
    net = model(rng)
    net(rng.normal(0, 1, (4, 6)))
    net.eval()
    layers = [layer for layer in net.layers if isinstance(layer, bn.BatchNorm)]
    before = [layer_state(layer) for layer in layers]
    with pytest.raises(KeyError, match="boom"):
        with bn.precise_stats(net):
            net(rng.normal(0, 1, (4, 6)))
            layers[0].running_mean[...] = 7   # whatever the block did
            layers[1].weight[...] = -1
            layers[1].num_batches_tracked = 99
            layers[0].momentum = 0.5
            raise KeyError("boom")
    for layer, b in zip(layers, before):
        assert_state_equal(layer_state(layer), b)
    # and the layers work as before: no recorder left behind
    net(rng.normal(0, 1, (4, 6)))
    assert all(layer._precise is None for layer in layers)


def test_precise_stats_failed_forward_inside_keeps_earlier_batches(rng):
    layer = bn.BatchNorm1d(C, dtype=np.float64)
    x = make_data(rng, (5, C))
    with bn.precise_stats(layer):
        layer(x)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(np.ones((1, C)))
        with pytest.raises(ValueError):
            layer(np.ones((3, C + 1)))
    assert_close(layer.running_mean, x.mean(0), 1e-14)
    assert_close(layer.running_var, x.var(0, ddof=1), 1e-13)


def test_precise_stats_layer_that_saw_nothing_is_left_with_a_warning(rng):
    used, unused = bn.BatchNorm1d(C), bn.BatchNorm1d(C)
    unused.running_mean[...] = 3
    with pytest.warns(RuntimeWarning, match="layer 1.*saw no values"):
        with bn.precise_stats([used, unused]):
            used(make_data(rng, (3, C), np.float32))
    assert np.all(unused.running_mean == 3) and np.all(unused.running_var == 1)


def test_precise_stats_skip_layers_without_running_stats(rng):
    plain, untracked = bn.BatchNorm1d(C, dtype=np.float64), bn.BatchNorm1d(C, track_running_stats=False)
    x = make_data(rng, (4, C))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bn.precise_stats([plain, [untracked]]):
            plain(x)
            untracked(x)
    assert untracked.running_mean is None
    assert_close(plain.running_mean, x.mean(0), 1e-14)


def test_precise_stats_bad_arguments_and_nesting():
    with pytest.raises(ValueError, match="found no batchnorm layers"):
        bn.precise_stats([ReLU()])
    with pytest.raises(ValueError, match="found no batchnorm layers"):
        bn.precise_stats("layers")
    layer = bn.BatchNorm1d(C)
    with bn.precise_stats(layer):
        layer(np.arange(2.0 * C).reshape(2, C))
        with pytest.raises(ValueError, match="already inside"):
            with bn.precise_stats([layer, layer]):
                pass
    assert layer._precise is None
    # the same layer twice in a container is one layer
    assert len(bn.precise_stats([layer, Sequential(layer)]).layers) == 1


def test_precise_stats_sync_batchnorm_single_process(rng):
    """A SyncBatchNorm over a communicator of one process takes BatchNorm's path; the recorder works."""
    from batchnorm.distributed import SyncBatchNorm

    class OneProcess:
        def Get_size(self):
            return 1

        def Get_rank(self):
            return 0

        def Allgather(self, a, b):  # pragma: no cover - one process never gathers
            raise AssertionError

        allgather = Allgather

    layer = SyncBatchNorm(C, comm=OneProcess(), dtype=np.float64)
    xs = [make_data(rng, (n, C)) for n in (3, 4)]
    with bn.precise_stats(layer):
        for x in xs:
            layer(x)
    assert_close(layer.running_mean, np.concatenate(xs).mean(0), 1e-14)
    assert layer.num_batches_tracked == 0


class ThreadComm:
    """An in-process stand-in for an mpi4py communicator: one instance per thread ("rank"), collectives
    over a shared barrier. Enough for SyncBatchNorm's Allgather/allgather."""

    def __init__(self, rank, shared):
        self.rank, self.shared = rank, shared

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.shared["size"]

    def _exchange(self, value):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = value
        barrier.wait()
        gathered = list(slots)
        barrier.wait()
        return gathered

    def Allgather(self, send, recv):
        recv[...] = np.stack(self._exchange(np.array(send, copy=True)))

    def allgather(self, obj):
        return self._exchange(obj)


def run_ranks(size, work):
    """work(rank, comm) on `size` threads; their results in rank order (an exception is re-raised)."""
    import threading

    shared = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size, timeout=60)}
    results, errors = [None] * size, []

    def target(rank):
        try:
            results[rank] = work(rank, ThreadComm(rank, shared))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


def test_precise_stats_sync_batchnorm_over_processes(rng):
    """Three "processes" (threads with a stand-in communicator), uneven parts, one of them empty once:
    every process ends with the statistics of the union of all parts, identically."""
    from batchnorm.distributed import SyncBatchNorm

    parts = [[make_data(rng, (n, C, 2)) for n in sizes] for sizes in ((3, 0, 2), (1, 4, 2), (2, 2, 1))]

    def work(rank, comm):
        layer = SyncBatchNorm(C, comm=comm, dtype=np.float64).eval()
        with bn.precise_stats(layer):
            for x in parts[rank]:
                layer(x)
        return layer.running_mean.copy(), layer.running_var.copy(), layer.training, layer.num_batches_tracked

    results = run_ranks(3, work)
    allv = flat([x for p in parts for x in p], 1)
    for mean, var, training, count in results:
        assert mean.tobytes() == results[0][0].tobytes() and var.tobytes() == results[0][1].tobytes()
        assert training is False and count == 0
    assert_close(results[0][0], allv.mean(0), 1e-13)
    assert_close(results[0][1], allv.var(0, ddof=1), 1e-13)


def test_sync_batchnorm_flags_over_processes(rng):
    """use_batch_stats=True in eval mode takes the collective path (statistics of the whole batch) and,
    with update_running_stats None, updates nothing; frozen statistics with an update are refused."""
    from batchnorm.distributed import SyncBatchNorm

    parts = [make_data(rng, (n, C)) for n in (2, 3)]

    def work(rank, comm):
        layer = SyncBatchNorm(C, comm=comm, dtype=np.float64).eval()
        layer.use_batch_stats = True
        y = layer(parts[rank])
        layer.use_batch_stats, layer.update_running_stats = False, True
        with pytest.raises(ValueError, match="does not support"):
            layer(parts[rank])
        return y, layer.running_mean.copy(), layer.num_batches_tracked

    results = run_ranks(2, work)
    y_all = bn.reference.forward_train(np.concatenate(parts))[0]
    assert_close(np.concatenate([r[0] for r in results]), y_all, 1e-12)
    for _, running_mean, count in results:
        assert np.all(running_mean == 0) and count == 0
