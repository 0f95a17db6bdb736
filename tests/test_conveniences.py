"""Conveniences around the kernels: threadpoolctl, pickling/copying layers, signatures and docstrings,
show_config and ``python -m batchnorm info``, reprs, type information."""

from __future__ import annotations

import copy
import inspect
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import batchnorm
from batchnorm import _core

HAS_OPENMP = bool(_core._build_info()["openmp"])


def _subprocess_env():
    """The environment for a child interpreter that must import this very batchnorm."""
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    return env


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_OPENMP, reason="batchnorm was built without OpenMP")
def test_threadpoolctl_limits_and_restores(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    batchnorm.set_num_threads(2)
    assert batchnorm.get_num_threads() == 2
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert batchnorm.get_num_threads() == 1
        x = np.random.default_rng(0).normal(size=(64, 8, 32)).astype(np.float32)
        batchnorm.forward_train(x)                      # runs fine under the limit
    assert batchnorm.get_num_threads() == 2


@pytest.mark.skipif(not HAS_OPENMP, reason="batchnorm was built without OpenMP")
def test_threadpoolctl_sees_our_openmp_runtime():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    info = threadpoolctl.threadpool_info()
    assert any(d.get("user_api") == "openmp" for d in info), info


def test_set_get_num_threads_roundtrip(restore_threads):
    batchnorm.set_num_threads(1)
    assert batchnorm.get_num_threads() == 1
    batchnorm.set_num_threads(restore_threads)
    assert batchnorm.get_num_threads() == restore_threads


# ------------------------------------------------------------------------------------------------
# pickling and copying layers
# ------------------------------------------------------------------------------------------------

LAYERS = [
    lambda: batchnorm.BatchNorm1d(5),
    lambda: batchnorm.BatchNorm2d(3, momentum=None, dtype=np.float64),
    lambda: batchnorm.BatchNorm2d(3, affine=False),
    lambda: batchnorm.BatchNorm1d(5, track_running_stats=False),
    lambda: batchnorm.BatchNorm3d(2, eps=1e-3),
    lambda: batchnorm.BatchNorm(4, axis=-1, momentum=0.3),
]
IDS = ["1d", "2d-cma-f64", "2d-nonaffine", "1d-nostats", "3d", "channels-last"]


def _input_for(layer, rng, n=6):
    nd = {"BatchNorm1d": 2, "BatchNorm2d": 4, "BatchNorm3d": 5}.get(type(layer).__name__, 3)
    shape = [n] + [3] * (nd - 1)
    shape[layer.axis] = layer.num_features
    return rng.normal(1.0, 2.0, shape).astype(np.float32)


def _used_layer(make, rng):
    layer = make()
    for _ in range(3):                     # non-default running statistics and counters
        layer(_input_for(layer, rng))
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 2, layer.num_features)
        layer.bias[...] = rng.normal(0, 1, layer.num_features)
        layer.backward(np.ones_like(_input_for(layer, rng)))   # non-zero grad_weight/grad_bias
    return layer


ARRAYS = ("weight", "bias", "grad_weight", "grad_bias", "running_mean", "running_var")
SCALARS = ("training", "num_batches_tracked", "eps", "momentum", "num_features", "axis", "affine",
           "track_running_stats")


def assert_same_layer(a, b):
    assert type(a) is type(b)
    for name in SCALARS:
        assert getattr(a, name) == getattr(b, name), name
    for name in ARRAYS:
        va, vb = getattr(a, name), getattr(b, name)
        if va is None:
            assert vb is None, name
        else:
            assert va.dtype == vb.dtype, name
            np.testing.assert_array_equal(va, vb, err_msg=name)
            assert not np.shares_memory(va, vb), f"{name} is shared with the original"


def assert_same_future(a, b, rng):
    """Forward (training and eval) and backward produce identical results on both layers."""
    for mode in (True, False):
        a.train(mode)
        b.train(mode)
        x = _input_for(a, rng)
        np.testing.assert_array_equal(a(x), b(x))
        dy = rng.normal(0, 1, x.shape).astype(np.float32)
        np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
        assert_same_layer(a, b)


@pytest.mark.parametrize("make", LAYERS, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_pickle_roundtrip(make, training, rng):
    layer = _used_layer(make, rng).train(training)
    for protocol in (2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL):
        clone = pickle.loads(pickle.dumps(layer, protocol=protocol))
        assert_same_layer(layer, clone)
    assert_same_future(layer, clone, rng)


@pytest.mark.parametrize("make", LAYERS, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_deepcopy_roundtrip(make, training, rng):
    layer = _used_layer(make, rng).train(training)
    clone = copy.deepcopy(layer)
    assert_same_layer(layer, clone)
    # independent: training the copy leaves the original alone
    before = {k: (None if getattr(layer, k) is None else getattr(layer, k).copy()) for k in ARRAYS}
    count = layer.num_batches_tracked
    clone.train()
    clone(_input_for(clone, rng))
    for k, v in before.items():
        if v is not None:
            np.testing.assert_array_equal(getattr(layer, k), v)
    assert layer.num_batches_tracked == count
    clone = copy.deepcopy(layer)
    assert_same_future(layer, clone, rng)


def test_pickled_layer_state_dict_equal(rng):
    layer = _used_layer(LAYERS[0], rng)
    clone = pickle.loads(pickle.dumps(layer))
    sa, sb = layer.state_dict(), clone.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])


# ------------------------------------------------------------------------------------------------
# signatures and docstrings of the C functions
# ------------------------------------------------------------------------------------------------

P = inspect.Parameter
EPILOGUE = [("activation", P.KEYWORD_ONLY, None), ("residual", P.KEYWORD_ONLY, None)]
SIGNATURES = {
    "forward_train": [("x", P.POSITIONAL_OR_KEYWORD, P.empty), ("gamma", P.POSITIONAL_OR_KEYWORD, None),
                      ("beta", P.POSITIONAL_OR_KEYWORD, None), ("running_mean", P.KEYWORD_ONLY, None),
                      ("running_var", P.KEYWORD_ONLY, None), ("momentum", P.KEYWORD_ONLY, 0.1),
                      ("eps", P.KEYWORD_ONLY, 1e-5), ("axis", P.KEYWORD_ONLY, 1), ("out", P.KEYWORD_ONLY, None),
                      ("stats_dtype", P.KEYWORD_ONLY, None)] + EPILOGUE + [("ghost_batch_size", P.KEYWORD_ONLY, None),
                                                               ("mask", P.KEYWORD_ONLY, None)],
    "forward_infer": [("x", P.POSITIONAL_OR_KEYWORD, P.empty),
                      ("running_mean", P.POSITIONAL_OR_KEYWORD, P.empty),
                      ("running_var", P.POSITIONAL_OR_KEYWORD, P.empty),
                      ("gamma", P.POSITIONAL_OR_KEYWORD, None), ("beta", P.POSITIONAL_OR_KEYWORD, None),
                      ("eps", P.KEYWORD_ONLY, 1e-5), ("axis", P.KEYWORD_ONLY, 1), ("out", P.KEYWORD_ONLY, None)]
                     + EPILOGUE,
    "backward": [("dy", P.POSITIONAL_OR_KEYWORD, P.empty), ("x", P.POSITIONAL_OR_KEYWORD, P.empty),
                 ("mean", P.POSITIONAL_OR_KEYWORD, P.empty), ("invstd", P.POSITIONAL_OR_KEYWORD, P.empty),
                 ("gamma", P.POSITIONAL_OR_KEYWORD, None), ("training", P.KEYWORD_ONLY, True),
                 ("axis", P.KEYWORD_ONLY, 1), ("out", P.KEYWORD_ONLY, None)] + EPILOGUE
                + [("y", P.KEYWORD_ONLY, None), ("beta", P.KEYWORD_ONLY, None), ("ghost_batch_size", P.KEYWORD_ONLY, None),
                   ("mask", P.KEYWORD_ONLY, None)],
    "batch_stats": [("x", P.POSITIONAL_OR_KEYWORD, P.empty), ("axis", P.KEYWORD_ONLY, 1),
                    ("mask", P.KEYWORD_ONLY, None)],
    "merge_stats": [("counts", P.POSITIONAL_OR_KEYWORD, P.empty), ("means", P.POSITIONAL_OR_KEYWORD, P.empty),
                    ("m2s", P.POSITIONAL_OR_KEYWORD, P.empty)],
    "normalize": [("x", P.POSITIONAL_OR_KEYWORD, P.empty), ("mean", P.POSITIONAL_OR_KEYWORD, P.empty),
                  ("invstd", P.POSITIONAL_OR_KEYWORD, P.empty), ("gamma", P.POSITIONAL_OR_KEYWORD, None),
                  ("beta", P.POSITIONAL_OR_KEYWORD, None), ("axis", P.KEYWORD_ONLY, 1),
                  ("out", P.KEYWORD_ONLY, None)] + EPILOGUE,
    "backward_reduce": [("dy", P.POSITIONAL_OR_KEYWORD, P.empty), ("x", P.POSITIONAL_OR_KEYWORD, P.empty),
                        ("mean", P.POSITIONAL_OR_KEYWORD, P.empty), ("axis", P.KEYWORD_ONLY, 1)],
    "backward_apply": [(n, P.POSITIONAL_OR_KEYWORD, P.empty)
                       for n in ("dy", "x", "mean", "invstd", "gamma", "sum_dy", "sum_dy_xmu", "count")]
                      + [("axis", P.KEYWORD_ONLY, 1), ("out", P.KEYWORD_ONLY, None)],
    "update_running_stats": [(n, P.POSITIONAL_OR_KEYWORD, P.empty)
                             for n in ("running_mean", "running_var", "mean", "m2", "count")]
                            + [("momentum", P.KEYWORD_ONLY, 0.1)],
    "set_num_threads": [("n", None, P.empty)],
    "get_num_threads": [],
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    func = getattr(batchnorm, name)
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    assert [p.name for p in params] == [n for n, _, _ in SIGNATURES[name]], str(sig)
    for p, (pname, kind, default) in zip(params, SIGNATURES[name]):
        if kind is not None:
            assert p.kind == kind, f"{name}: {pname} is {p.kind.description}, expected {kind.description}"
        assert p.default == default, f"{name}: default of {pname} is {p.default!r}, expected {default!r}"


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_numpy_style_docstring(name):
    doc = getattr(batchnorm, name).__doc__
    assert doc and len(doc) > 40
    assert "Returns\n-------" in doc, doc
    if SIGNATURES[name]:
        assert "Parameters\n----------" in doc, doc
        for pname, _, _ in SIGNATURES[name]:
            assert pname in doc.split("Returns")[0], f"{name}: parameter {pname} is not documented"


def test_help_renders():
    text = io.StringIO()
    import pydoc
    text.write(pydoc.render_doc(batchnorm.forward_train, renderer=pydoc.plaintext))
    assert "running_mean" in text.getvalue()


# ------------------------------------------------------------------------------------------------
# show_config and the command line
# ------------------------------------------------------------------------------------------------

def test_show_config_prints(capsys):
    assert batchnorm.show_config() is None
    out = capsys.readouterr().out
    assert "OpenMP" in out
    assert batchnorm.__version__ in out
    assert np.__version__ in out
    assert "threads" in out and "SIMD" in out and "compiler" in out and "python" in out
    info = _core._build_info()
    assert info["simd"] in out
    assert ("yes" if info["openmp"] else "no") in out.split("OpenMP")[1].splitlines()[0]


def test_show_config_file_and_dict():
    buf = io.StringIO()
    batchnorm.show_config(file=buf)
    assert "OpenMP" in buf.getvalue()
    cfg = batchnorm.show_config(return_dict=True)
    assert cfg["batchnorm"]["version"] == batchnorm.__version__
    assert cfg["runtime"]["numpy"] == np.__version__
    assert cfg["runtime"]["num_threads"] == batchnorm.get_num_threads()
    info = _core._build_info()
    assert cfg["build"]["openmp"] == info["openmp"]
    assert cfg["build"]["openmp_version"] == info["openmp_version"]
    assert cfg["build"]["simd"] == info["simd"]
    assert cfg["build"]["compiler"] == info["compiler"]


def test_build_info_keys():
    info = _core._build_info()
    assert set(info) >= {"openmp", "openmp_version", "simd", "compiler", "max_threads"}
    assert isinstance(info["openmp"], bool)
    assert (info["openmp_version"] is None) == (not info["openmp"])
    assert isinstance(info["simd"], str) and info["simd"]
    assert isinstance(info["max_threads"], int) and info["max_threads"] >= 1


def test_openmp_spec_names():
    from batchnorm._config import openmp_spec_version

    assert openmp_spec_version(201511) == "4.5"
    assert openmp_spec_version(201811) == "5.0"
    assert openmp_spec_version(None) is None


def test_cli_info():
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "info"], capture_output=True, text=True,
                          env=_subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OpenMP" in proc.stdout and batchnorm.__version__ in proc.stdout


def test_cli_main_in_process(capsys):
    from batchnorm.__main__ import main

    assert main(["info"]) == 0
    assert "OpenMP" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == batchnorm.__version__
    assert main([]) == 0
    assert "info" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:          # 'demo' hands its arguments to the demo's parser
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# repr and type information
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", LAYERS, ids=IDS)
def test_repr_is_readable(make):
    layer = make()
    r = repr(layer)
    assert r.startswith(type(layer).__name__ + "(")
    assert str(layer.num_features) in r
    assert "object at 0x" not in r
    assert "\n" not in r and len(r) < 200


def test_repr_mentions_options():
    r = repr(batchnorm.BatchNorm2d(16, eps=1e-3, momentum=0.2, affine=False, track_running_stats=False))
    for piece in ("16", "0.001", "0.2", "affine=False", "track_running_stats=False"):
        assert piece in r, r


def test_type_information_is_shipped():
    pkg = os.path.dirname(os.path.abspath(batchnorm.__file__))
    assert os.path.isfile(os.path.join(pkg, "py.typed"))
    stub = os.path.join(pkg, "_core.pyi")
    assert os.path.isfile(stub)
    text = open(stub).read()
    for name in SIGNATURES:
        assert f"def {name}(" in text
    # the stub's parameters match the runtime's
    ns: dict = {}
    exec(compile(text, stub, "exec"), ns)
    for name, params in SIGNATURES.items():
        assert [p for p in inspect.signature(ns[name]).parameters] == [n for n, _, _ in params], name


@pytest.mark.parametrize("name", ["forward_train", "batch_stats", "merge_stats", "normalize"])
def test_docstring_examples_run(name):
    """The Examples sections of the C functions' docstrings are true (run as doctests)."""
    import doctest

    func = getattr(batchnorm, name)
    assert ">>>" in func.__doc__
    test = doctest.DocTestParser().get_doctest(func.__doc__, {}, name, None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
