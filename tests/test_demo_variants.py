"""The demo's second experiment, ``python -m batchnorm.demo variants`` (batchnorm.demo.variants): its quick
run through both command lines, its tables and verdicts, and that each arm really trains with its variant
(checked by recording what the BN layers saw and recomputing their outputs here)."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest

import batchnorm
from batchnorm.demo import cli, variants
from test_demo import _subprocess_env, _tidy, _without_seconds

pytest.importorskip("sklearn")

EPS = 1e-5   # the layers' default eps, which the demo keeps


# ------------------------------------------------------------------------------------------------
# the --quick run, end to end, through both command lines
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    runs = {}
    for name, command in (("demo", ["batchnorm.demo"]), ("package", ["batchnorm", "demo"])):
        png, js = out / f"{name}.png", out / f"{name}.json"
        proc = subprocess.run([sys.executable, "-m", *command, "variants", "--quick", "--out", str(png),
                               "--json", str(js)],
                              capture_output=True, text=True, env=_subprocess_env(), cwd=str(out), timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[name] = {"proc": proc, "png": png, "results": json.loads(js.read_text())}
    return runs


def test_quick_run_reports_every_arm(quick_runs):
    run = quick_runs["demo"]
    out, res = run["proc"].stdout, run["results"]
    s = res["settings"]
    assert s["quick"] and s["steps"] == variants.QUICK["steps"]
    assert s["seeds"] == list(range(variants.QUICK["seeds"]))
    assert s["n_train"] + s["n_test"] == 1797
    assert [a["key"] for a in res["arms"]] == [a["key"] for a in variants.ARMS]
    for arm in res["arms"]:
        assert [r["seed"] for r in arm["runs"]] == s["seeds"]
        assert arm["batch_size"] == variants.GROUPS[arm["group"]]["batch_size"]
        # the summary is the runs' numbers
        emas = [r["ema_acc"] for r in arm["runs"]]
        assert arm["summary"]["ema_acc"]["mean"] == pytest.approx(np.mean(emas))
        for r in arm["runs"]:
            assert r["ema_acc"] == r["curves"]["test_acc"][-1]
            assert (r["precise_acc"] is None) == (arm["bn"] == "none")
    # two tables, one row per arm in each, and one verdict per claim
    lines = out.splitlines()
    for arm in variants.ARMS:
        size = variants.GROUPS[arm["group"]]["batch_size"]
        row = f"| {size} | {arm['normalized_over'] or '-'} | {arm['label']} |"
        assert sum(line.startswith(row) for line in lines) == 1, row
        assert sum(line.startswith(f"| {size} | {arm['label']} |") for line in lines) == 1, arm["label"]
    assert "test acc, EMA stats" in out and "Per seed" in out
    assert out.count("\n- ") == len(variants.verdicts(res)) == 7
    assert "Measured:" in out and "paired t-test" in out


def test_quick_run_saves_its_png(quick_runs):
    pytest.importorskip("matplotlib")
    for run in quick_runs.values():
        assert run["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(run["png"]) in run["proc"].stdout


def test_both_command_lines_give_the_same_results(quick_runs):
    """Same seed, same numbers and printout, whichever command line runs it (and so: deterministic)."""
    a, b = quick_runs["demo"], quick_runs["package"]
    assert _without_seconds(a["results"]) == _without_seconds(b["results"])
    tidy = [_tidy(r["proc"].stdout.replace(str(r["png"]), "PNG").replace(str(r["png"])[:-4] + ".json", "JSON"))
            for r in (a, b)]
    assert tidy[0] == tidy[1]


def test_subcommand_is_registered_and_listed():
    assert cli.EXPERIMENTS["variants"] is variants and cli.DEFAULT == "fig1"
    assert variants.DEFAULT_OUT != cli.EXPERIMENTS["fig1"].DEFAULT_OUT
    proc = subprocess.run([sys.executable, "-m", "batchnorm.demo", "variants", "--help"], capture_output=True,
                          text=True, env=_subprocess_env(), timeout=120)
    assert proc.returncode == 0 and "usage: python -m batchnorm.demo variants" in proc.stdout
    for option in ("--quick", "--steps", "--seeds", "--eval-every", "--seed", "--out", "--json"):
        assert option in proc.stdout, option


def test_in_process_tiny_run_is_deterministic(tmp_path, capsys):
    argv = ["variants", "--steps", "12", "--eval-every", "6", "--seeds", "2", "--seed", "3", "--no-plot",
            "--no-progress"]
    results = []
    for i in range(2):
        js = tmp_path / f"r{i}.json"
        assert cli.main(argv + ["--json", str(js)]) == 0
        results.append(json.loads(js.read_text()))
    out = capsys.readouterr().out
    assert "12 steps per run" in out
    assert _without_seconds(results[0]) == _without_seconds(results[1])
    assert results[0]["settings"]["seeds"] == [3, 4]
    # another seed: other initial weights and batches, other numbers
    other = variants.run_variants(steps=12, eval_every=6, seeds=1, seed=5, progress=False)
    assert other["arms"][1]["runs"][0]["curves"]["train_loss"] != results[0]["arms"][1]["runs"][0]["curves"]["train_loss"]
    with pytest.raises(ValueError, match="seeds"):
        variants.run_variants(seeds=0, progress=False)


# ------------------------------------------------------------------------------------------------
# each arm trains with its variant: record what the BN layers saw and did
# ------------------------------------------------------------------------------------------------

def _spy_on(model):
    """Make every BN layer of ``model`` record each forward: input, output, running statistics and
    parameters before the call, rmax/dmax, mode. Returns the list the records go to."""
    records = []

    def spy(index, layer):
        base = type(layer)

        class Spy(base):
            def forward(self, x, residual=None):
                rec = {"layer": index, "x": np.array(x, np.float64), "training": self.training,
                       "running_mean": self.running_mean.astype(np.float64),
                       "running_var": self.running_var.astype(np.float64),
                       "gamma": self.weight.astype(np.float64), "beta": self.bias.astype(np.float64),
                       "rmax": self.rmax, "dmax": self.dmax}
                y = base.forward(self, x, residual)
                rec["y"] = np.array(y, np.float64)
                records.append(rec)
                return y

            __call__ = forward

        layer.__class__ = Spy

    for i, layer in enumerate(model.layers):
        if isinstance(layer, batchnorm.BatchNorm):
            spy(i, layer)
    return records


@pytest.fixture(scope="module")
def digits():
    from batchnorm.demo.data import load_data
    return load_data(0)


def _bn(model):
    return [layer for layer in model.layers if isinstance(layer, batchnorm.BatchNorm)]


def _train(arm, digits, steps=40, seed=0):
    model = variants.build_model(arm, 64, 10, seed)
    records = _spy_on(model)
    variants.train_arm(model, arm, digits, steps=steps, eval_every=steps, seed=seed)
    return model, [r for r in records if r["training"]]


def test_arms_build_their_variant():
    first_weights = None
    for arm in variants.ARMS:
        model = variants.build_model(arm, 64, 10, seed=4)
        layers = _bn(model)
        if first_weights is None:
            first_weights = model.layers[0].weight
        np.testing.assert_array_equal(model.layers[0].weight, first_weights)   # same start for every arm
        if arm["bn"] == "none":
            assert not layers
            continue
        assert len(layers) == 3
        for layer in layers:
            assert layer.renorm == (arm["key"] == "small_renorm")
            assert layer.ghost_batch_size == (4 if arm["key"] == "large_ghost" else None)
    assert variants.GROUPS["small"]["batch_size"] == 4 and variants.GROUPS["large"]["batch_size"] == 32


@pytest.mark.parametrize("key", [a["key"] for a in variants.ARMS if a["bn"] != "none"])
def test_steps_use_the_groups_batch_size(key, digits):
    arm = variants._arm(key)
    _, records = _train(arm, digits, steps=5)
    assert len(records) == 5 * 3
    assert {r["x"].shape[0] for r in records} == {variants.GROUPS[arm["group"]]["batch_size"]}


def _standardize(x):
    mean, var = x.mean(0), x.var(0)
    return (x - mean) / np.sqrt(var + EPS), mean, var


def test_plain_bn_arm_normalizes_over_its_batch(digits):
    _, records = _train("small_bn", digits, steps=10)
    for r in records:
        xhat, _, _ = _standardize(r["x"])
        np.testing.assert_allclose(r["y"], r["gamma"] * xhat + r["beta"], rtol=1e-4, atol=1e-4)


def test_renorm_arm_renormalizes_with_the_ramped_bounds(digits):
    """The renorm arm's layers compute y = gamma * (xhat * r + d) + beta with r and d recomputed here from
    the running statistics before each step; rmax/dmax follow the ramp (1 and 0 at first, so r = 1 and
    d = 0 there), and once it opens r and d are not 1 and 0."""
    steps = 40
    model, records = _train("small_renorm", digits, steps=steps)
    assert all(layer.renorm for layer in _bn(model))
    ramp_open = 0
    for k, r in enumerate(records):
        step = k // 3 + 1
        assert (r["rmax"], r["dmax"]) == pytest.approx(variants.renorm_schedule(step, steps))
        xhat, mean_b, var_b = _standardize(r["x"])
        sigma = np.sqrt(r["running_var"] + EPS)
        rr = np.clip(np.sqrt(var_b + EPS) / sigma, 1 / r["rmax"], r["rmax"])
        dd = np.clip((mean_b - r["running_mean"]) / sigma, -r["dmax"], r["dmax"])
        np.testing.assert_allclose(r["y"], r["gamma"] * (xhat * rr + dd) + r["beta"], rtol=1e-4, atol=1e-4)
        if r["rmax"] == 1.0 and r["dmax"] == 0.0:
            np.testing.assert_array_equal(rr, 1.0)
            np.testing.assert_array_equal(dd, 0.0)
        elif step > steps // 2:
            assert np.abs(rr - 1).max() > 0.05 and np.abs(dd).max() > 0.05
            # and that is not plain BN's output
            assert np.abs(r["y"] - (r["gamma"] * xhat + r["beta"])).max() > 0.05
            ramp_open += 1
    assert ramp_open >= 3 * (steps // 2 - 1)
    assert (_bn(model)[0].rmax, _bn(model)[0].dmax) == (variants.RMAX, variants.DMAX)


def test_ghost_arm_normalizes_each_ghost_batch(digits):
    model, records = _train("large_ghost", digits, steps=8)
    assert all(layer.ghost_batch_size == 4 for layer in _bn(model))
    for r in records:
        assert r["x"].shape[0] == 32
        for start in range(0, 32, 4):
            xhat, _, _ = _standardize(r["x"][start:start + 4])
            np.testing.assert_allclose(r["y"][start:start + 4], r["gamma"] * xhat + r["beta"],
                                       rtol=1e-4, atol=1e-4)
        whole, _, _ = _standardize(r["x"])
        assert np.abs(r["y"] - (r["gamma"] * whole + r["beta"])).max() > 0.05


def test_precise_statistics_are_the_exact_training_statistics(digits):
    """precise_copy: every BN layer's running mean and variance are the mean and unbiased variance of all
    the training activations it saw, in batches of the given size; they differ from the EMA ones;
    the trained model keeps its EMA statistics."""
    x_tr = digits[0]
    model = variants.build_model("small_bn", 64, 10, seed=0)
    variants.train_arm(model, "small_bn", digits, steps=60, eval_every=60, seed=0)
    ema = [(layer.running_mean.copy(), layer.running_var.copy()) for layer in _bn(model)]
    spied = copy.deepcopy(model)
    records = _spy_on(spied)
    precise = variants.precise_copy(spied, x_tr, 4)
    assert not precise.training
    for layer, (mean, var) in zip(_bn(model), ema):               # the model itself is unchanged
        np.testing.assert_array_equal(layer.running_mean, mean)
        np.testing.assert_array_equal(layer.running_var, var)
    sizes = [r["x"].shape[0] for r in records if r["layer"] == 1]
    assert sum(sizes) == len(x_tr) and set(sizes) <= {4, len(x_tr) % 4}
    for j, layer in enumerate(_bn(precise)):
        index = [i for i, lay in enumerate(precise.layers) if lay is layer][0]
        seen = np.concatenate([r["x"] for r in records if r["layer"] == index])
        assert len(seen) == len(x_tr)
        np.testing.assert_allclose(layer.running_mean, seen.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.running_var, seen.var(0, ddof=1), rtol=1e-5, atol=1e-6)
        assert np.abs(layer.running_mean - ema[j][0]).max() > 1e-3
        assert np.abs(layer.running_var - ema[j][1]).max() > 1e-3
    # the first BN layer's input does not depend on any normalization: recompute it from the weights
    lin = model.layers[0]
    h = np.concatenate([x_tr[s:s + 4].astype(np.float64) @ lin.weight.astype(np.float64)
                        for s in range(0, len(x_tr), 4)])
    np.testing.assert_allclose(_bn(precise)[0].running_mean, h.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_bn(precise)[0].running_var, h.var(0, ddof=1), rtol=1e-5, atol=1e-5)
    gaps = variants.stats_gap(model, precise)
    assert len(gaps) == 3 and all(g["mean"] > 0 and g["log_var"] > 0 for g in gaps)


def test_renorm_schedule_follows_the_ramp():
    steps = 1000
    start, rfull, dfull = (int(variants.RAMP[k] * steps) for k in ("start", "rmax_full", "dmax_full"))
    assert variants.renorm_schedule(1, steps) == (1.0, 0.0)
    assert variants.renorm_schedule(start, steps) == (1.0, 0.0)
    rm = [variants.renorm_schedule(s, steps)[0] for s in range(1, steps + 1)]
    dm = [variants.renorm_schedule(s, steps)[1] for s in range(1, steps + 1)]
    assert all(a <= b for a, b in zip(rm, rm[1:])) and all(a <= b for a, b in zip(dm, dm[1:]))
    assert rm[rfull - 1] == variants.RMAX and dm[dfull - 1] == variants.DMAX and rm[-1] == variants.RMAX
    assert 1.0 < rm[rfull - 2] < variants.RMAX and 0.0 < dm[dfull - 2] < variants.DMAX


# ------------------------------------------------------------------------------------------------
# verdicts follow the numbers
# ------------------------------------------------------------------------------------------------

def test_paired_difference():
    n = 450
    # the same shift on every seed: clear, whatever its size
    assert variants.paired_difference([0.9, 0.8, 0.95], [0.89, 0.79, 0.94], n)[2] is True
    assert variants.paired_difference([0.89, 0.79], [0.9, 0.8], n)[2] is False
    # differences 1, 2, 3 (x 0.01): mean 0.02, se 0.01/sqrt(3); Student's t(2) at 2.5% is 4.30 > 2 * sqrt(3)
    mean, se, held = variants.paired_difference([0.51, 0.52, 0.53], [0.5, 0.5, 0.5], n)
    assert mean == pytest.approx(0.02) and se == pytest.approx(0.01 / math.sqrt(3)) and held is None
    # with twice the seeds: t(5) = 2.57 < 0.02 / (0.00894 / sqrt(6)) = 5.5: clear
    assert variants.paired_difference([0.51, 0.52, 0.53] * 2, [0.5] * 6, n)[2] is True
    # no difference at all
    assert variants.paired_difference([0.9, 0.8], [0.9, 0.8], n)[2] is None
    # one seed: two binomial standard errors of the test set (about 6 images of 450 near 98%)
    assert variants.paired_difference([0.99], [0.97], n)[2] is True
    assert variants.paired_difference([0.98], [0.975], n)[2] is None


def _fake(accs):
    """Results with the given per-seed (ema, precise) accuracies per arm key."""
    arms = []
    for arm in variants.ARMS:
        ema, precise = accs[arm["key"]]
        runs = [{"seed": i, "ema_acc": e, "precise_acc": p, "diverged": False} for i, (e, p) in
                enumerate(zip(ema, precise if precise is not None else [None] * len(ema)))]
        arms.append({**arm, "runs": runs})
    return {"settings": {"n_test": 450}, "arms": arms}


def test_verdicts_follow_the_numbers():
    same = [0.95, 0.96, 0.97]
    up = [0.97, 0.98, 0.99]
    accs = {"small_none": (same, None), "small_bn": (up, up), "small_renorm": (up, same),
            "large_none": (same, None), "large_bn": (up, up), "large_ghost": (same, up)}
    v = variants.verdicts(_fake(accs))
    assert len(v) == 7
    assert [held for _, held, _ in v] == [True, None, False, None, False, None, True]
    assert "Batch Renorm" in v[1][0] and "Ghost BN" in v[2][0] and "precise" in v[3][0]
    assert "+9.0" in v[0][2] and "of 450 test images" in v[0][2]
    text = variants.format_verdicts(_fake(accs))
    assert text.count("NO CLEAR DIFFERENCE") == 3 and text.count("DID NOT HOLD") == 2
