"""What a long-running process does to the kernels: fork after a parallel call, absurd thread counts, and
memory (the extra memory of a call is a constant per thread plus O(C), so huge tensors work in place).

Each scenario runs in a child Python started in its own process group, killed whole on timeout: a hang
(the failure these tests exist for) fails the test instead of blocking the suite."""

from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest

import batchnorm as bn
from helpers import run_killable

HAS_OPENMP = bn._core._build_info()["openmp"]
posix_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def run_child(code, timeout=120, env=None):
    """Run `code` in a fresh Python in its own session; return its output; fail on error or timeout."""
    returncode, out = run_killable([sys.executable, "-c", textwrap.dedent(code)], timeout,
                                   dict(os.environ, **(env or {})))
    assert returncode == 0, out[-3000:]
    return out


PARALLEL_CALL = """
    import os, sys
    import numpy as np
    import batchnorm as bn
    bn.set_num_threads(2)
    x = np.random.default_rng(0).random((64, 16, 1024)).astype(np.float32)   # 1 Mi elements: parallel
    want = bn.forward_train(x)[0]
"""


@posix_only
def test_os_fork_after_a_parallel_call_runs_single_threaded_in_the_child():
    out = run_child(PARALLEL_CALL + """
    pid = os.fork()
    if pid == 0:
        ok = np.array_equal(bn.forward_train(x)[0], want) and bn.get_num_threads() == 1
        bn.set_num_threads(3)   # the user's own choice counts again (a serial build stays at 1)
        ok = ok and bn.get_num_threads() == (3 if bn._core._build_info()["openmp"] else 1)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    print("child", os.WEXITSTATUS(status), "parent threads", bn.get_num_threads())
    """, timeout=60)
    assert "child 0" in out
    if HAS_OPENMP:
        assert "parent threads 2" in out


@posix_only
def test_multiprocessing_fork_pool_after_a_parallel_call():
    out = run_child(PARALLEL_CALL + """
    import multiprocessing as mp

    def work(i):
        return float(bn.forward_train(x * (i + 1))[1].sum()), bn.get_num_threads()

    if __name__ == "__main__":
        with mp.get_context("fork").Pool(2) as pool:
            results = pool.map(work, range(4))
        print("threads in children", sorted({t for _, t in results}))
    """, timeout=90)
    assert "threads in children [1]" in out


@pytest.mark.skipif(not HAS_OPENMP, reason="serial build: one thread everywhere")
def test_spawned_processes_keep_full_parallelism():
    out = run_child(PARALLEL_CALL + """
    import multiprocessing as mp

    if __name__ == "__main__":
        with mp.get_context("spawn").Pool(1) as pool:
            print("spawned child threads", pool.apply(bn.get_num_threads))
    """, timeout=120, env={"OMP_NUM_THREADS": "2"})
    assert "spawned child threads 2" in out


@pytest.mark.skipif(not HAS_OPENMP, reason="serial build")
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_absurd_thread_counts_are_capped():
    out = run_child("""
    import os
    import numpy as np
    import batchnorm as bn
    bn.set_num_threads(100000)
    x = np.random.default_rng(0).random((32, 128, 256)).astype(np.float32)   # 1024 work items
    y, mean, invstd = bn.forward_train(x)
    dx = bn.backward(x, x, mean, invstd)[0]
    print("threads", len(os.listdir("/proc/self/task")), "cpus", os.cpu_count())
    """, timeout=120)
    threads, cpus = (int(w) for w in out.split()[1::2])
    assert threads <= 2 * cpus + 8, out  # the cap (2 x the processors) plus Python's own threads


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS semantics are Linux's")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer reserves terabytes of address space for its shadow memory")
def test_huge_row_in_place_under_an_address_space_limit():
    """(1, 1, 2**27) float32 (512 MiB) in place under a 3 GiB address-space limit: every kernel's extra
    memory must not grow with the row (it once took 4 * S doubles, 4 GiB, of scratch per thread)."""
    out = run_child("""
    import resource
    import numpy as np
    import batchnorm as bn
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    S = 1 << 27
    x = np.empty((1, 1, S), np.float32)
    x[..., 0::2] = 1.0
    x[..., 1::2] = 3.0
    dy = np.ones((1, 1, S), np.float32)
    count, mean, m2 = bn.batch_stats(x)
    s1, s2 = bn.backward_reduce(dy, x, mean)
    dx = bn.backward_apply(dy, x, mean, np.ones(1), None, s1, s2, count, out=dy)
    y, mean_t, invstd = bn.forward_train(x, out=x, eps=0.0)
    assert mean[0] == 2.0 and m2[0] == S and mean_t[0] == 2.0, (mean, m2, mean_t)
    assert x[0, 0, 0] == -1.0 and x[0, 0, 1] == 1.0 and np.all(dy == 0.0)
    bn.normalize(x, [0.0], [2.0], out=x)
    bn.forward_infer(x, [0.0], [0.25], eps=0.0, out=x)
    assert x[0, 0, 0] == -4.0, x[0, 0, :2]
    print("ok")
    """, timeout=300)
    assert "ok" in out


@pytest.mark.skipif(_mem_available() < (14 << 30), reason="needs ~9 GiB for a > 2**31-element array")
def test_more_than_2_31_elements_in_place():
    out = run_child("""
    import numpy as np
    import batchnorm as bn
    S = (1 << 30) + 3
    x = np.empty((2, 1, S), np.float32)      # 2**31 + 6 elements, 8 GiB
    x[:, :, 0::2] = 1.0
    x[:, :, 1::2] = 3.0
    x[1, 0, -1] = 2.0
    y, mean, invstd = bn.forward_train(x, out=x, eps=0.0, stats_dtype=np.float64)
    assert y is x
    # rows sum to 2S - 1 and 2S. float64 statistics: float32 ones round this mean to 2.0, which NumPy 2
    # compares with the Python float in float32 (NEP 50) and NumPy 1.x in float64, so only float64 tests
    # anything. Within 1e-12: 2**19 chunk means merged pairwise, each merge rounding at 2**-53.
    assert abs(mean[0] - (4 * S - 1) / (2 * S)) < 1e-12, mean
    assert x[0, 0, 0] < -0.99 and x[0, 0, 1] > 0.99 and abs(x[1, 0, -1]) < 1e-6 and x[1, 0, -2] > 0.99, (
        x[0, 0, :2], x[1, 0, -2:])
    print("ok")
    """, timeout=600)
    assert "ok" in out


def test_unknown_simd_setting_warns_once_naming_the_choices():
    out = run_child("""
    import warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import batchnorm
        import batchnorm.layers
    msgs = [str(w.message) for w in caught if "BATCHNORM_SIMD" in str(w.message)]
    print(len(msgs), msgs[0] if msgs else "")
    """, env={"BATCHNORM_SIMD": "sse9"})
    assert out.startswith("1 ") and "'baseline'" in out and "'avx2'" in out and "sse9" in out, out
    quiet = run_child("""
    import warnings
    warnings.simplefilter("error")
    import batchnorm
    print("ok")
    """, env={"BATCHNORM_SIMD": "avx2"})
    assert "ok" in quiet


class _Boom:
    def __array__(self, dtype=None, copy=None):
        raise KeyError("no array here")


class _BadValue:
    def __array__(self, dtype=None, copy=None):
        raise ValueError("my own message")


def test_an_exception_inside_array_keeps_its_type_and_message():
    with pytest.raises(KeyError, match="no array here"):
        bn.forward_train(_Boom())
    with pytest.raises(ValueError, match="my own message"):
        bn.batch_stats(_BadValue())
    with pytest.raises(ValueError, match="my own message"):
        bn.forward_train(np.ones((3, 2)), gamma=_BadValue())


def test_a_ragged_list_names_the_argument_and_chains_numpys_reason():
    with pytest.raises(TypeError, match=r"\bx\b") as info:
        bn.forward_train([[1.0, 2.0], [3.0]])
    if np.lib.NumpyVersion(np.__version__) >= "1.24.0":  # before 1.24 NumPy made an object array, no error
        assert isinstance(info.value.__cause__, ValueError)


# ---- the binding's pooled arrays (mid-sized outputs and per-channel vectors) ---------------------------

def _handler_name(arr=None):
    try:
        from numpy._core.multiarray import get_handler_name
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import get_handler_name
    return get_handler_name() if arr is None else get_handler_name(arr)


@pytest.mark.parametrize("shape, axis", [((2, 16384), 1), ((4, 8, 8, 256), -1), ((64, 512), 1),
                                         ((3, 7, 2000), 1), ((300, 1200), 1), ((2, 16, 16, 1100), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_mid_sized_outputs_are_ordinary_arrays(rng, shape, axis, dtype):
    """Outputs whose memory comes from the block pool behave as any NumPy array: they own it (or their
    base does, for a channels-last result), can be resized, pickled and written, share nothing with each
    other, and NumPy's own arrays made afterwards use its default allocator again."""
    import pickle

    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    dy = rng.standard_normal(shape).astype(dtype)
    g, b = rng.uniform(0.5, 2, C), rng.uniform(-1, 1, C)
    y, mean, invstd = bn.forward_train(x, g, b, axis=axis, stats_dtype=np.float64)
    dx, dg, db = bn.backward(dy, x, mean, invstd, g, axis=axis)
    yi = bn.forward_infer(x, mean, 1 / invstd**2, g, b, axis=axis, eps=0.0)
    outs = [y, mean, invstd, dx, dg, db, yi]
    for a in outs:
        owner = a if a.base is None else a.base
        assert owner.flags.owndata and owner.base is None
        assert a.flags.writeable and a.flags.aligned
        assert not any(np.shares_memory(a, o) for o in outs if o is not a)
        back = pickle.loads(pickle.dumps(a))
        np.testing.assert_array_equal(back, a)
        assert back.dtype == a.dtype and back.shape == a.shape
    assert _handler_name() == "default_allocator"
    assert _handler_name(np.empty(shape, dtype)) == "default_allocator"
    # the results are the unpooled ones: the same call on a copy that the pool is not asked for (out=)
    y2 = np.empty_like(y)
    bn.forward_train(x, g, b, axis=axis, out=y2)
    np.testing.assert_array_equal(y, y2)
    # growing and shrinking a pooled array in place keeps its values (NumPy resizes through the pool)
    pooled = [a for a in outs if _handler_name(a if a.base is None else a.base) != "default_allocator"]
    assert pooled or max(a.nbytes for a in outs) < 32 << 10  # the pools take 32 KiB and more
    flat = dg
    want = flat.copy()
    flat.resize(3 * flat.size, refcheck=False)
    np.testing.assert_array_equal(flat[:want.size], want)
    assert not flat[want.size:].any()
    flat.resize(want.size // 2 + 1, refcheck=False)
    np.testing.assert_array_equal(flat, want[:want.size // 2 + 1])
    # outputs freed in any order, then the same calls again, give the same bits
    del outs, y, mean, invstd, dx, dg, db, yi
    y3, m3, s3 = bn.forward_train(x, g, b, axis=axis, stats_dtype=np.float64)
    np.testing.assert_array_equal(y3, y2)


def _same_results_from_many_threads(xs, calls):
    """Each of len(xs) Python threads calls forward_train and backward on its own x `calls` times; every
    y must be the one a single thread got, and no thread may hang."""
    import threading

    want = [bn.forward_train(x)[0] for x in xs]
    errors = []

    def work(k):
        try:
            for _ in range(calls):
                y, mean, invstd = bn.forward_train(xs[k])
                dx = bn.backward(y, xs[k], mean, invstd)[0]
                if not np.array_equal(y, want[k]) or dx.shape != xs[k].shape:
                    errors.append(k)
                    return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not errors, errors


def test_pooled_arrays_from_many_threads(rng):
    """Python threads calling at once (the kernels run without the GIL; arrays are freed in whichever
    thread drops them) get the results of a single thread."""
    _same_results_from_many_threads([rng.standard_normal((2, 8192 + 512 * k)).astype(np.float32)
                                     for k in range(6)], 200)


# ---- large outputs (over 1 MiB): kept for reuse up to set_cache_limit, handed back by empty_cache --------

@pytest.fixture
def cache_limit():
    """Restores the default limit and leaves nothing kept, whatever the test did."""
    old = bn.set_cache_limit(256 << 20)
    bn.empty_cache()
    yield
    bn.set_cache_limit(old)
    bn.empty_cache()


_LARGE = (600, 1024)  # float32: 2.3 MiB


def test_a_large_outputs_memory_is_reused_and_handed_back(rng, cache_limit):
    x = rng.standard_normal(_LARGE).astype(np.float32)
    y, mean, invstd = bn.forward_train(x)
    assert _handler_name(y) == "batchnorm_block_pool"
    want, at = y.copy(), y.ctypes.data
    del y
    y2 = bn.forward_train(x)[0]
    assert y2.ctypes.data == at  # the freed block, not fresh pages
    np.testing.assert_array_equal(y2, want)
    live = bn.forward_infer(x, mean, 1 / invstd**2, eps=0.0)  # while y2 lives: another block
    assert not np.shares_memory(live, y2)
    del y2, live
    released = bn.empty_cache()
    assert released >= 2 * x.nbytes
    assert bn.empty_cache() == 0
    # a zero-filled or small result is not affected; NumPy's own arrays keep NumPy's allocator
    assert _handler_name(np.empty(_LARGE, np.float32)) == "default_allocator"


def test_the_cache_limit_bounds_what_is_kept(rng, cache_limit):
    x = rng.standard_normal(_LARGE).astype(np.float32)
    ys = [bn.forward_train(x)[0] for _ in range(3)]
    assert bn.set_cache_limit(x.nbytes * 3 // 2) == 256 << 20  # room for one of the three
    del ys
    released = bn.empty_cache()
    assert x.nbytes <= released < 2 * x.nbytes
    ys = [bn.forward_train(x)[0] for _ in range(2)]
    del ys
    assert bn.set_cache_limit(0) == x.nbytes * 3 // 2  # a lower limit hands back what it no longer allows
    assert bn.empty_cache() < x.nbytes
    y = bn.forward_train(x)[0]
    del y
    assert bn.empty_cache() < x.nbytes  # a limit of 0 keeps none
    assert bn.set_cache_limit(2**80) == 0  # beyond the address space: no limit


def test_blocks_of_sizes_no_longer_used_make_room_for_the_new_one(rng, cache_limit):
    """Over the limit, kept blocks go in turn: a run of smaller tensors before must not keep the size a
    program uses now out of the pool (it made every plain call of the next large case fault in fresh
    pages)."""
    small = rng.standard_normal(_LARGE).astype(np.float32)
    big = rng.standard_normal((_LARGE[0] * 2, _LARGE[1])).astype(np.float32)  # not served by small's blocks
    bn.set_cache_limit(small.nbytes * 2 + big.nbytes // 2)
    ys = [bn.forward_train(small)[0] for _ in range(2)]
    del ys  # the pool is full of small blocks
    y = bn.forward_train(big)[0]
    at = y.ctypes.data
    del y  # kept, in place of a small block
    y = bn.forward_train(big)[0]
    assert y.ctypes.data == at
    del y
    released = bn.empty_cache()  # big and one small block (and the kernels' scratch, well under 1 MiB)
    assert big.nbytes + small.nbytes <= released < big.nbytes + small.nbytes + (1 << 20)


@pytest.mark.parametrize("bad, err", [(-1, ValueError), (-2**70, ValueError), (1.5, TypeError),
                                      (True, TypeError), ("1", TypeError), (None, TypeError)])
def test_set_cache_limit_rejects_what_is_not_a_size(bad, err, cache_limit):
    with pytest.raises(err, match="max_bytes"):
        bn.set_cache_limit(bad)
    assert bn.set_cache_limit(256 << 20) == 256 << 20  # unchanged


def test_large_outputs_from_many_threads(rng, cache_limit):
    """Python threads allocating and freeing large results at once (freed in whichever thread drops them),
    with a limit that keeps fewer blocks than are live, get the results of a single thread."""
    xs = [rng.standard_normal((300 + 40 * k, 1024)).astype(np.float32) for k in range(4)]
    bn.set_cache_limit(5 << 20)
    _same_results_from_many_threads(xs, 25)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="minor faults as Linux counts them")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""), reason="AddressSanitizer's own allocator")
def test_a_wide_layers_steps_touch_no_fresh_memory():
    """A training loop's fused BN+ReLU step on a wide layer (2, 16384) reuses its memory: glibc hands
    mid-sized blocks back to the system at every free, and this step took ~250 minor page faults (most of
    its time) before the binding's arrays came from a pool. Fresh process: glibc's state is the loop's."""
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks")
    out = run_child(f"""
    import sys
    sys.path.insert(0, {bench!r})
    import batchnorm._core as core
    from wide_step import make_step, measure   # the step benchmarks/wide_step.py times
    core.set_num_threads(1)
    step = make_step(core, (2, 16384))
    measure(step, 20)
    print("faults", measure(step, 100)[1])
    """, timeout=120)
    faults = float(out.split("faults")[-1])
    assert faults < 16, out
