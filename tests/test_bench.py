"""benchmarks/bench.py: the pause rule of its round robin, and one quick run on the small cases whose JSON
must be internally consistent (efficiency = limit / ours, ratios = quotients of the times)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks", "bench.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bn_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_family(bench):
    assert bench.family("ours") == bench.family("ours out=") == "ours"
    assert bench.family("torch") == "torch"
    assert bench.family("copy copyto x2") == bench.family("copy ufunc x1") == "copy"


@pytest.mark.parametrize("threads", [1, 2])
def test_round_robin_pauses_and_warms_up(bench, monkeypatch, threads):
    """Each sleep is followed by exactly one untimed call of the batch that comes next. With one thread
    only a run of copies is preceded by a pause; with more, every change of family is."""
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append("sleep"))

    def fn(name):
        return lambda: events.append(name)

    names = ["ours", "ours out=", "torch", "copy copyto x1", "copy ufunc x1"]
    entries = [(n, fn(n), 2, 1e-4, False) for n in names]
    prof = dict(rmax=3, rmin=3, budget=1.0, np_budget=1.0, np_min=1)
    samples = bench.round_robin(entries, prof, threads)
    assert all(len(samples[n]) == 3 for n in names)
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


def test_quick_run_small_cases(tmp_path):
    out = tmp_path / "b.json"
    # the batchnorm these tests import (installed, or the source tree on PYTHONPATH), not another one
    import batchnorm
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(batchnorm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
    threads = ["1", "2"] if batchnorm._core._build_info()["openmp"] else ["1"]  # a serial build has one
    r = subprocess.run([sys.executable, BENCH, "--quick", "--quiet", "--no-rss", "--threads", *threads,
                        "--cases", "in cache", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ours/torch" in r.stdout and "eff" in r.stdout
    d = json.loads(out.read_text())
    assert [c["case"] for c in d["cases"]] == ["32x64x8x8 f32 NCHW (in cache)", "64x512 f32 (in cache)"]
    torch_there = d["meta"]["torch"] is not None
    for c in d["cases"]:
        assert all(v["ok"] for v in c["check"].values()), c["check"]
        seen = {(row["op"], row["variant"], row["threads"]) for row in c["rows"]}
        assert seen == {(op, v, t) for op in ("train", "infer", "backward") for v in ("plain", "out=")
                        for t in map(int, threads)}
        for row in c["rows"]:
            assert row["ours_s"] > 0 and row["limit_s"] > 0
            assert math.isclose(row["efficiency"], row["limit_s"] / row["ours_s"], rel_tol=1e-9)
            traffic = 3 if row["op"] == "backward" else 2
            assert row["bytes_moved"] == traffic * c["x_bytes"]
            if row["variant"] == "plain":
                assert math.isclose(row["ours_over_numpy"], row["ours_s"] / row["numpy_s"], rel_tol=1e-9)
                if torch_there:
                    assert math.isclose(row["ours_over_torch"], row["ours_s"] / row["torch_s"], rel_tol=1e-9)
