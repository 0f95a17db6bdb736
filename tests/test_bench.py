"""benchmarks/bnbench (the package behind benchmarks/bench.py): its round robin's pause rule, the traffic
each op is measured against, that every op's callables compute what the op's name says (ours, our
unfused composition, torch, NumPy), the fused rows' plumbing (with a stand-in for the fused API where
this build lacks it), the memory probe, and one quick run whose report and JSON must be consistent.
No timing is asserted."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys

import numpy as np
import pytest

import batchnorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO, "benchmarks")
BENCH = os.path.join(BENCH_DIR, "bench.py")
sys.path.insert(0, BENCH_DIR)

from bnbench import cli, ops, timing  # noqa: E402
from bnbench.memory import rss_extra  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional
    torch = None

BUILD_HAS_FUSED = ops.fused_api()[0]


class FusedStandIn:
    """batchnorm with the fused API of issue 9 (``activation="relu"``, ``residual=``; backward with
    ``beta=`` or ``y=``, returning d_residual), built from its unfused calls and NumPy. It stands in for
    the fused kernels where this build lacks them, so that the benchmark's fused rows are exercised with
    the calls the API defines; everything else is batchnorm's own."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def _epilogue(y, activation, residual):
        if residual is not None:
            np.add(y, residual, out=y)
        if activation == "relu":
            np.maximum(y, 0, out=y)
        return y

    def forward_train(self, x, gamma=None, beta=None, *, activation=None, residual=None, **kw):
        y, mean, invstd = self._real.forward_train(x, gamma, beta, **kw)
        return self._epilogue(y, activation, residual), mean, invstd

    def forward_infer(self, x, running_mean, running_var, gamma=None, beta=None, *, activation=None,
                      residual=None, **kw):
        y = self._real.forward_infer(x, running_mean, running_var, gamma, beta, **kw)
        return self._epilogue(y, activation, residual)

    def backward(self, dy, x, mean, invstd, gamma=None, *, activation=None, beta=None, y=None,
                 residual=None, axis=1, **kw):
        if activation is None:
            return self._real.backward(dy, x, mean, invstd, gamma, axis=axis, **kw)
        if y is None:  # the mask recomputed from x (and the residual), as the forward computed it
            z = self._real.normalize(x, mean, invstd, gamma, beta, axis=axis)
            if isinstance(residual, np.ndarray):
                z += residual
            mask = z > 0
        else:
            mask = y > 0
        dz = dy * mask
        dx, dgamma, dbeta = self._real.backward(dz, x, mean, invstd, gamma, axis=axis, **kw)
        return (dx, dgamma, dbeta, dz) if residual is not None else (dx, dgamma, dbeta)


@pytest.fixture(params=["build", "stand-in"])
def fused_bn(request, monkeypatch):
    """The fused API: this build's where it has one, else (and always for the "stand-in" run) the
    stand-in. Yields whether the build's own kernels are under test."""
    if request.param == "build" and not BUILD_HAS_FUSED:
        pytest.skip("fused kernels not in this build")
    if request.param == "stand-in":
        monkeypatch.setattr(ops, "bn", FusedStandIn(batchnorm))
    assert ops.fused_api()[0]
    yield request.param


# ----------------------------------------------------------------------------------------------------
# the table


def test_family():
    assert timing.family("ours") == timing.family("ours out=") == timing.family("ours unfused") == "ours"
    assert timing.family("torch") == "torch"
    assert timing.family("numpy") == "numpy"
    assert timing.family("copy x2") == timing.family("copy x1") == "copy"


def test_traffic_is_the_issues_count():
    """Issue 9's stream counts, in units of x.nbytes: two-pass (training forward 3, inference 2,
    backward 5, fused forward with a residual 4) and one-read (each input once, each output once)."""
    t = {op.name: op.traffic() for op in ops.OPS}
    assert t["train"] == (3, 2)
    assert t["infer"] == (2, 2)
    assert t["backward"] == (5, 3)
    assert t["train+add+relu"] == (4, 3)
    assert t["train+relu"] == t["train"]          # ReLU in the same pass that writes y costs nothing
    assert t["backward+relu"] == t["backward"]    # mask from beta: recomputed from x, nothing extra
    # the mask from y: y read at both passes; with a residual, y at the first pass only, d_residual
    # written by it and read back by the second instead of dy and y
    assert ops.Op("b", None, True, relu=True, mask="y").traffic() == (5 + 2, 3 + 1)
    assert t["backward+add+relu"] == (5 + 1 + 1, 3 + 1 + 1)
    # a step is its forward and its backward
    for step in (o for o in ops.OPS if o.step):
        fwd = next(o for o in ops.OPS if o.forward == step.forward and not o.backward
                   and (o.relu, o.residual) == (step.relu, step.residual))
        bwd = next(o for o in ops.OPS if o.forward is None and (o.relu, o.residual, o.mask)
                   == (step.relu, step.residual, step.mask))
        assert step.traffic() == tuple(a + b for a, b in zip(fwd.traffic(), bwd.traffic()))


def test_fused_api_absent_is_detected(monkeypatch):
    """A batchnorm whose calls refuse the fused keywords is reported as lacking the fused kernels."""
    class Unfused:
        def __getattr__(self, name):
            return getattr(batchnorm, name)

        def forward_train(self, x, gamma=None, beta=None, **kw):
            if "activation" in kw or "residual" in kw:
                raise TypeError("'activation' is an invalid keyword argument for forward_train()")
            return batchnorm.forward_train(x, gamma, beta, **kw)

    monkeypatch.setattr(ops, "bn", Unfused())
    ok, reason = ops.fused_api()
    assert not ok and "TypeError" in reason and "activation" in reason
    # without the fused API, the fused rows have no "ours" but keep the compositions
    case = ops.Case("t", (4, 3), "float32", "NC")
    d = ops.make_data(case)
    fams = ops.families(case, d, ops.OPS_BY_NAME["step+relu"], fused=False)
    assert "ours" not in fams and "ours unfused" in fams and "numpy" in fams
    assert "ours" in ops.families(case, d, ops.OPS_BY_NAME["train"], fused=False)


# small versions of each layout and dtype of the benchmark's cases
SMALL_CASES = [
    ops.Case("nchw f32", (4, 3, 5, 6), "float32", "NCHW"),
    ops.Case("nhwc f32", (4, 5, 6, 3), "float32", "NHWC"),
    ops.Case("nc f32", (16, 7), "float32", "NC"),
    ops.Case("nchw f64", (3, 4, 5, 2), "float64", "NCHW"),
    ops.Case("nhwc f64", (3, 5, 2, 4), "float64", "NHWC"),
    ops.Case("nc f64", (9, 5), "float64", "NC"),
]


@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: c.name)
def test_every_op_computes_what_its_name_says(case, fused_bn):
    """Every family's callable for every op agrees with a float64 reference composition (check), and
    ours with torch's directly, output by output."""
    d = ops.make_data(case)
    for op in ops.OPS:
        res = ops.check(case, d, op, fused=True)
        fams = {k for k in res if k != "tolerance_scaled"}
        expect = {"ours", "numpy"} | ({"ours out="} if op.has_out else set()) \
            | ({"ours unfused"} if op.fused else set()) | ({"torch"} if torch is not None else set())
        assert fams == expect, (op.name, fams)
        for fam in fams:
            assert res[fam]["ok"], (op.name, fam, res[fam])
        if torch is None:
            continue
        shared = ops.Shared(case, d, True)
        got = {}
        for name in ("ours", "torch"):
            fam = ops.families(case, d, op, fused=True, shared=shared)[name]
            got[name] = ops.outputs_of(fam, op, fam.call(op)())
        assert set(got["ours"]) == set(got["torch"]) == set(op.output_names()) | (
            {"running_mean", "running_var"} if op.forward == "train" else set())
        tol = 1e-4 if case.dtype == "float32" else 1e-10
        for k, a in got["ours"].items():
            np.testing.assert_allclose(a, got["torch"][k], rtol=tol, atol=tol, err_msg=f"{op.name} {k}")


def test_check_catches_a_family_that_computes_something_else(monkeypatch):
    """The check is not vacuous: a torch composition that forgets the residual, and an unfused
    backward that forgets the ReLU mask, are reported as mismatches."""
    case = SMALL_CASES[0]
    d = ops.make_data(case)
    real_fwd, real_bwd = ops.Composition.forward, ops.Composition.backward

    def no_residual(self, op):
        return real_fwd(self, ops.Op(op.name, op.forward, op.backward, relu=op.relu))

    def no_mask(self, op):
        return real_bwd(self, ops.Op(op.name, op.forward, op.backward))

    monkeypatch.setattr(ops.Composition, "forward", no_residual)
    res = ops.check(case, d, ops.OPS_BY_NAME["train+add+relu"], fused=False, torch=False)
    assert not res["ours unfused"]["ok"] and not res["numpy"]["ok"]
    monkeypatch.setattr(ops.Composition, "forward", real_fwd)
    monkeypatch.setattr(ops.Composition, "backward", no_mask)
    res = ops.check(case, d, ops.OPS_BY_NAME["backward+relu"], fused=False, torch=False)
    assert not res["ours unfused"]["ok"]
    res = ops.check(case, d, ops.OPS_BY_NAME["backward"], fused=False, torch=False)
    assert res["ours"]["ok"] and res["numpy"]["ok"]


def test_check_reports_a_call_that_raises():
    """A family whose call fails (e.g. a fused API with other keywords) is an error in the check, not a
    crash of the benchmark."""
    case = SMALL_CASES[2]
    d = ops.make_data(case)
    res = ops.check(case, d, ops.OPS_BY_NAME["train+relu"], fused=True, torch=False)
    if BUILD_HAS_FUSED:
        assert res["ours"]["ok"]
    else:
        assert not res["ours"]["ok"] and "TypeError" in res["ours"]["error"]
    assert res["ours unfused"]["ok"]


# ----------------------------------------------------------------------------------------------------
# timing


@pytest.mark.parametrize("threads", [1, 2])
def test_round_robin_pauses_and_warms_up(monkeypatch, threads):
    """Each sleep is followed by exactly one untimed call of the batch that comes next. With one thread
    only a run of copies is preceded by a pause; with more, every change of family is."""
    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append("sleep"))

    def fn(name):
        return lambda: events.append(name)

    names = ["ours", "ours out=", "torch", "copy x2", "copy x1"]
    entries = [(n, fn(n), 2, 1e-4, False) for n in names]
    prof = dict(rmax=3, rmin=3, budget=1.0, np_budget=1.0, np_min=1)
    samples = timing.round_robin(entries, prof, threads)
    assert all(len(samples[n]) == 3 and None not in samples[n] for n in names)
    # every timed batch is 2 calls; after each sleep, one untimed call of the same batch precedes them
    for i, e in enumerate(events):
        if e == "sleep":
            assert events[i + 1] != "sleep" and events[i + 1] == events[i + 2] == events[i + 3]
    # rounds rotate the order: families o o t c c | o t c c o | t c c o o (o = ours, t = torch, c = copy).
    # One thread: a pause before each run of copies (3). Two: before every change of family (9).
    pauses_expected = {1: 3, 2: 9}[threads]
    assert events.count("sleep") == pauses_expected
    calls = sum(1 for e in events if e != "sleep")
    assert calls == 3 * len(names) * 2 + pauses_expected


def test_round_robin_caps_numpy_and_ratios_pair_rounds(monkeypatch):
    """NumPy stops after its own budget (None in the later rounds); per-round ratios pair only rounds
    where both were timed."""
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    entries = [("ours", lambda: None, 1, 1e-4, False), ("numpy", lambda: None, 1, 1e-2, True)]
    prof = dict(rmax=5, rmin=5, budget=1.0, np_budget=0.02, np_min=2)
    s = timing.round_robin(entries, prof, 1)
    assert len(s["numpy"]) == 5 and s["numpy"][2:] == [None] * 3 and None not in s["numpy"][:2]
    assert timing.per_round(lambda a, b: (a, b), [1, 2, 3], [4, None, 6]) == [(1, 4), (3, 6)]
    assert timing.copy_per_round({"copy x2": [3.0, None], "copy x1": [2.0, 5.0], "ours": [1, 1]}) == [2.0, 5.0]


# ----------------------------------------------------------------------------------------------------
# memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_child_measures_a_call():
    case = ops.Case("64x512 f32", (64, 512), "float32", "NC")
    r = rss_extra(case, ops.OPS_BY_NAME["backward"], 1, fused=False, timeout=120)
    assert r is not None
    # dx, dgamma, dbeta
    assert r["returned"] == 64 * 512 * 4 + 2 * 512 * 4
    assert r["extra"] >= 0


# ----------------------------------------------------------------------------------------------------
# whole runs


def _recomputed(row, x_bytes, copy_bytes):
    """The row's ratios recomputed from its stored rounds: medians of per-round ratios."""
    rounds = row["rounds"]
    ours = rounds["ours" if row["variant"] == "plain" else "ours out="]
    stream = [None if c is None else c / 2 * x_bytes / copy_bytes for c in rounds["copy"]]
    eff = statistics.median(row["streams"] * s / o for s, o in zip(stream, ours) if None not in (s, o))
    eff1 = statistics.median(row["one_read_streams"] * s / o for s, o in zip(stream, ours)
                             if None not in (s, o))
    return eff, eff1


def _check_json(d, case_names, op_names, threads):
    assert [c["case"] for c in d["cases"]] == case_names
    torch_there = d["meta"]["torch"] is not None
    fused = d["meta"]["fused"]
    for c in d["cases"]:
        assert set(c["check"]) == set(op_names)
        for op, k in c["check"].items():
            assert all(v["ok"] for f, v in k.items() if f != "tolerance_scaled"), (op, k)
        assert c["errors"] == {}
        seen = {(r["op"], r["variant"], r["threads"]) for r in c["rows"]}
        want = set()
        for name in op_names:
            op = ops.OPS_BY_NAME[name]
            for T in threads:
                want.add((name, "plain", T))
                if op.has_out and (fused or not op.fused):
                    want.add((name, "out=", T))
        assert seen == want
        copy_bytes = c["x_bytes"] // 4 * 4
        for r in c["rows"]:
            op = ops.OPS_BY_NAME[r["op"]]
            assert (r["streams"], r["one_read_streams"]) == op.traffic()
            assert r["bytes_moved"] == r["streams"] * c["x_bytes"]
            assert r["limit_s"] > 0 and r["copy_s"] > 0
            if op.fused and not fused:
                assert r["ours_s"] is None and r["efficiency"] is None
                assert r["unfused_s"] > 0
                continue
            assert r["ours_s"] > 0
            eff, eff1 = _recomputed(r, c["x_bytes"], copy_bytes)
            assert math.isclose(r["efficiency"], eff, rel_tol=1e-9)
            assert math.isclose(r["efficiency_one_read"], eff1, rel_tol=1e-9)
            # two passes move more than one read, so the two-pass efficiency is the larger
            assert r["efficiency"] >= r["efficiency_one_read"]
            if r["variant"] == "plain" and torch_there:
                rr = r["rounds"]
                ratio = statistics.median(a / b for a, b in zip(rr["ours"], rr["torch"]))
                assert math.isclose(r["ours_over_torch"], ratio, rel_tol=1e-9)
            if r["variant"] == "plain" and op.fused:
                rr = r["rounds"]
                ratio = statistics.median(a / b for a, b in zip(rr["ours"], rr["ours unfused"]))
                assert math.isclose(r["ours_over_unfused"], ratio, rel_tol=1e-9)


TARGET_LINE = re.compile(r"^    (.{32}) (\S+)\s+((?:T=\d+\s+(?:-|\d+\.\d\d)\s+(?:PASS|MISS|n/a)\s*)+)$")


def _check_report(text, d):
    assert "eff2" in text and "eff1" in text and "ours/torch" in text
    assert ("fused kernels not in this build" in text) == (not d["meta"]["fused"])
    # the small-tensor targets, one line per (case, op), a value and PASS/MISS/n/a per thread count
    block = text.split("  [small]", 1)[1].split("\n  [", 1)[0].split("\n")[1:]
    parsed = {}
    for line in filter(None, block):
        if line.endswith("omitted)"):
            continue
        m = TARGET_LINE.match(line)
        assert m, line
        cells = re.findall(r"T=(\d+)\s+(-|\d+\.\d\d)\s+(PASS|MISS|n/a)", m.group(3))
        parsed[(m.group(1).strip(), m.group(2))] = {int(t): (v, s) for t, v, s in cells}
    small = [t for t in d["targets"] if t["target"] == "small"]
    shown = [t for t in small if any(u["status"] != "n/a" for u in small
                                     if (u["case"], u["op"]) == (t["case"], t["op"]))]
    assert len(parsed) * len(d["meta"]["threads"]) == len(shown)
    # without torch every small-tensor target is n/a (nothing to compare with): no lines to check
    assert shown or not small or d["meta"]["torch"] is None
    for t in shown:
        v, s = parsed[(t["case"], t["op"])][t["threads"]]
        assert s == t["status"]
        if t["value"] is None:
            assert (v, s) == ("-", "n/a")
        else:
            assert float(v) == pytest.approx(t["value"], abs=0.006)
            assert s == ("PASS" if t["value"] <= 0.5 else "MISS")


def test_quick_run_small_cases(tmp_path):
    """bench.py --quick as a user runs it: exit 0, a report that parses, a JSON whose ratios are the
    medians of its own per-round samples."""
    out = tmp_path / "b.json"
    # the batchnorm these tests import (installed, or the source tree on PYTHONPATH), not another one
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    op_names = ["train", "infer", "backward", "step+relu", "backward+add+relu"]
    r = subprocess.run([sys.executable, BENCH, "--quick", "--quiet", "--no-rss", "--threads", "1", "2",
                        "--cases", "64x512", "8x16x16x16", "--ops", *op_names, "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    _check_json(d, ["64x512 f32 (in cache)", "8x16x16x16 f32 NCHW (in cache)"], op_names, [1, 2])
    _check_report(r.stdout, d)


def test_fused_rows_run(monkeypatch, capsys):
    """With the fused API present (this build's, or the stand-in), the fused rows time ours, and the
    report's fused targets have values."""
    if not BUILD_HAS_FUSED:
        monkeypatch.setattr(ops, "bn", FusedStandIn(batchnorm))
    args = cli.parse_args(["--quick", "--quiet", "--no-rss", "--threads", "1", "--cases", "256x64",
                           "--ops", "step+relu", "infer+add+relu", "backward+add+relu"])
    monkeypatch.setitem(timing.PROFILES, "quick", dict(timing.PROFILES["quick"], budget=0.02, rmin=2,
                                                         rmax=2))
    d = cli.run(args)
    assert d["meta"]["fused"]
    _check_json(d, ["256x64 f32 (in cache)"], ["step+relu", "infer+add+relu", "backward+add+relu"], [1])
    for t in d["targets"]:
        if t["target"] in ("small", "fused_vs_torch") and torch is not None:
            assert t["status"] in ("PASS", "MISS") and t["value"] > 0


def test_cli_rejects_unknown_ops():
    with pytest.raises(SystemExit):
        cli.parse_args(["--ops", "train", "no-such-op"])
    assert isinstance(cli.parse_args(["--quick"]), argparse.Namespace)


# ----------------------------------------------------------------------------------------------------
# benchmarks/train_step.py


import train_step  # noqa: E402  (benchmarks/ is on sys.path above)


class FusedLayerStandIn(batchnorm.BatchNorm1d):
    """BatchNorm1d(..., activation="relu") of issue 9, built from the layer and a NumPy ReLU: stands in
    for the fused layer where this build lacks it, so that the "ours fused" model is exercised."""

    def __init__(self, *args, activation=None, **kw):
        super().__init__(*args, **kw)
        self._activation = activation

    def __call__(self, x, residual=None):
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        if self._activation == "relu":
            self._mask = y > 0
            y = y * self._mask
        return y

    def backward(self, dy):
        if self._activation == "relu":
            dy = dy * self._mask
        return super().backward(dy)


class _WithFusedLayer:
    def __init__(self, real):
        self._real = real
        self.BatchNorm1d = FusedLayerStandIn

    def __getattr__(self, name):
        return getattr(self._real, name)


def _tiny_args(*extra):
    return train_step.parse_args(["--quick", "--quiet", "--threads", "1", "--batch", "16", "--width", "24",
                                  "--in-features", "12", "--classes", "5", *extra])


def test_numpy_batchnorm_layer_matches_the_reference():
    """The plain-NumPy BN layer of train_step computes BN and its backward (against batchnorm.reference)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 6)) * 3 + 1
    dy = rng.standard_normal((32, 6))
    layer = train_step.NumpyBatchNorm1d(6, dtype=np.float64)
    layer.weight[...] = rng.uniform(0.5, 1.5, 6)
    layer.bias[...] = rng.uniform(-1, 1, 6)
    rm, rv = np.zeros(6), np.ones(6)
    y_ref, mean, invstd = batchnorm.reference.forward_train(x, layer.weight, layer.bias, running_mean=rm,
                                                            running_var=rv)
    np.testing.assert_allclose(layer(x), y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, rv, rtol=1e-12)
    dx_ref, dg_ref, db_ref = batchnorm.reference.backward(dy, x, mean, invstd, layer.weight)
    np.testing.assert_allclose(layer.backward(dy), dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grad_weight, dg_ref, rtol=1e-10)
    np.testing.assert_allclose(layer.grad_bias, db_ref, rtol=1e-10)


@pytest.mark.parametrize("fused", ["build", "stand-in"])
def test_train_step_models_take_the_same_step(monkeypatch, fused):
    """Every model (ours fused, ours unfused, NumPy BN, torch) starts from the same weights and takes the
    same first step: same loss, same updated weights, and each has a timed row."""
    build_has = train_step.fused_layers()[0]
    if fused == "build" and not build_has:
        pytest.skip("fused layers not in this build")
    if fused == "stand-in":
        monkeypatch.setattr(train_step, "bn", _WithFusedLayer(batchnorm))
    assert train_step.fused_layers()[0]
    out = train_step.run(_tiny_args())
    (res,) = out["results"]
    names = {"ours fused", "ours unfused", "numpy BN"} | ({"torch"} if torch is not None else set())
    assert set(res["check"]) == set(res["impls"]) == names
    for name, c in res["check"].items():
        assert c["ok"], (name, c)
        assert c["weight_diff_scaled"] < 1e-5 and c["loss_diff"] < 1e-5
    for name, r in res["impls"].items():
        assert r["steps_per_s"] > 0 and math.isclose(r["steps_per_s"], 1 / r["step_s"])
        full = res["rounds"][name]
        assert math.isclose(r["step_s"], statistics.median(full))


def test_train_step_check_catches_a_different_model(monkeypatch):
    """The first-step check is not vacuous: a NumPy BN layer that forgets its shift is a mismatch."""
    real = train_step.NumpyBatchNorm1d.__call__

    def no_shift(self, x):
        return real(self, x) - self.bias + 0.5

    monkeypatch.setattr(train_step.NumpyBatchNorm1d, "__call__", no_shift)
    out = train_step.run(_tiny_args("--no-torch"))
    assert not out["results"][0]["check"]["numpy BN"]["ok"]
    assert out["results"][0]["check"]["ours unfused"]["ok"]


def test_train_step_script_runs(tmp_path):
    """train_step.py as a user runs it: exit 0, the report's rows, a JSON with every model's speed."""
    out = tmp_path / "s.json"
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    script = os.path.join(BENCH_DIR, "train_step.py")
    r = subprocess.run([sys.executable, script, "--quick", "--quiet", "--threads", "1", "2", "--batch", "32",
                        "--width", "64", "--in-features", "16", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert [res["threads"] for res in d["results"]] == [1, 2]
    assert ("fused layers not in this build" in r.stdout) == (not d["meta"]["fused"])
    for res in d["results"]:
        assert all(c["ok"] for c in res["check"].values())
        for name in res["impls"]:
            assert re.search(re.escape(train_step.LABELS[name]) + r"\s+%d\s+\d+\.\d" % res["threads"], r.stdout)
    assert "MISMATCH" not in r.stdout


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"),
                    reason="the probe's Makefile flags are x86-64 GCC/clang ones")
def test_arith_probe_builds_runs_and_its_sums_agree(tmp_path):
    """benchmarks/arith_probe.c (README, "Small tensors"): it builds as the Makefile says, prints a line per
    shape with the three normalize ways' errors in the order of their accuracy, and its one-loop sums
    (vector extensions) give the two-loop sums' bits."""
    import shutil
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip("no C compiler")
    exe = str(tmp_path / "arith_probe")
    subprocess.run([cc, "-std=gnu11", "-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off",
                    "-o", exe, os.path.join(BENCH_DIR, "arith_probe.c"), "-lm"], check=True, timeout=120)
    out = subprocess.run([exe, "3"], check=True, capture_output=True, text=True, timeout=120).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 4, out
    for line in lines:
        ulps = [float(u) for u in re.findall(r"\(([0-9.]+) ulp\)", line)]
        assert len(ulps) == 3, line
        assert ulps[0] <= 0.5 + 1e-3 and ulps[1] <= 1.0 + 1e-2 and ulps[2] >= ulps[1], line
    rows = [line for line in lines if " row " in line]
    assert len(rows) == 2 and all("bits same" in line for line in rows), out


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"),
                    reason="the probe's Makefile flags are x86-64 GCC/clang ones")
def test_colstats_probe_builds_runs_and_its_patterns_agree(tmp_path):
    """benchmarks/colstats_probe.c (README, "How far column mode's statistics can go at one thread"): it
    builds as the Makefile says, prints a row per width with a positive time for every pattern, and in its
    backward table every sums pattern and every dx pattern give the same bits as the one-row loop."""
    import shutil
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip("no C compiler")
    exe = str(tmp_path / "colstats_probe")
    subprocess.run([cc, "-std=gnu11", "-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off",
                    "-o", exe, os.path.join(BENCH_DIR, "colstats_probe.c")], check=True, timeout=120)
    env = dict(os.environ, REPS="1")
    for args, cols in ((["1"], 9), (["1", "bwd"], 22)):
        out = subprocess.run([exe] + args, check=True, capture_output=True, text=True, timeout=120, env=env).stdout
        rows = [line.split() for line in out.strip().splitlines()[2:]]
        assert [int(r[0]) for r in rows] == [256, 512, 1024, 2048, 4096], out
        for r in rows:
            ratios = [float(v) for v in r[2:2 + cols]]
            assert float(r[1]) > 0 and len(ratios) == cols and all(v > 0 for v in ratios), r
            if "bwd" in args:
                assert float(r[2 + cols]) > 0 and r[3 + cols:] == ["bits", "same"], r  # best sum+dx, the check
            else:
                assert len(r) == 2 + cols, r
    bad = subprocess.run([exe, "1", "fwd"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_wide_step_script_runs_an_a_b():
    """wide_step.py as a user runs it, this build against itself loaded as the base: exit 0, one row per
    shape with a time and a fault count for each build and their ratio."""
    import batchnorm._core as core
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "wide_step.py"), "--shapes", "2x64,3x500",
                        "-r", "1", "-n", "2", "--base", core.__file__],
                       capture_output=True, text=True, env=env, timeout=300, cwd=BENCH_DIR)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("(")]
    assert [row.split(")")[0] + ")" for row in rows] == ["(2, 64)", "(3, 500)"]
    for row in rows:
        assert len(row.split(")")[1].split()) == 5  # new us, new faults, base us, base faults, ratio


def test_phase_ab_script_runs_an_a_b():
    """phase_ab.py as a user runs it, this build against itself loaded as the base: exit 0, a row per
    shape and op, and every op of the two builds reported as the same bits."""
    import batchnorm._core as core
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "phase_ab.py"), "--shapes", "5x700,2x3x4x9",
                        "-r", "1", "-n", "1", "--dtype", "float64", "--base", core.__file__],
                       capture_output=True, text=True, env=env, timeout=300, cwd=BENCH_DIR)
    assert r.returncode == 0, r.stderr[-3000:]
    from phase_ab import OPS
    rows = [line.split() for line in r.stdout.splitlines() if line[:1].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [(s, op) for s in ("5x700", "2x3x4x9") for op in OPS]
    for row in rows:
        if row[1] == "copy":
            assert len(row) == 3
        else:
            assert len(row) == 6 and row[-1] == "same", row  # new ms, base ms, ratio, bits


def test_phase_ab_bits_tell_outputs_apart():
    """The A/B's "bits" column compares what each call returned and what it wrote to out=."""
    from phase_ab import make_data, result_bits
    d = make_data((3, 5), np.dtype(np.float64))
    x = d["x"]
    assert result_bits(lambda: np.copyto(d["y"], x), d) == result_bits(lambda: np.copyto(d["y"], x), d)
    assert result_bits(lambda: np.copyto(d["y"], x), d) != result_bits(lambda: np.copyto(d["y"], -x), d)
    assert result_bits(lambda: (x.sum(0), None), d) != result_bits(lambda: (x.sum(0) + 1, None), d)
