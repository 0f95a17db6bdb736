"""Benchmark of batchnorm against PyTorch (CPU), the NumPy reference and the memory-bandwidth limit.

    python benchmarks/bench.py                  # full run: every case and op at 1, 2 and all CPUs' threads
    python benchmarks/bench.py --quick          # fewer rounds, same cases and ops
    python benchmarks/bench.py --json out.json  # also write every number for tools (see plot.py)
    python benchmarks/bench.py --cases "in cache" --ops train backward step+relu --threads 1 2

The package:

ops.py            the table of operations (OPS: training forward, inference, backward, and the fused
                  ReLU / add+ReLU forwards, backwards and steps), the cases (CASES), and the families
                  that implement every op: ours, ours out=, ours unfused, torch, numpy; ``check``
                  compares what each computes with a float64 reference
timing.py         calibration, the interleaved round robin, the copy bound, per-round ratios
memory.py         tracemalloc and the RSS probe (memory_child.py, run in a fresh process)
runner.py         one case: check, timed rounds at every thread count, memory
report.py         the printed report, the issue's targets (PASS/MISS), findings
cli.py            the command line

Efficiency columns: eff2 compares with the least traffic an op can do on tensors larger than the
last-level cache (two passes where the statistics must be known before normalizing: training forward 3
streams of x.nbytes, inference 2, backward 5, fused rows likewise counted, see ``Op.traffic``); eff1
with the one-read ideal (each input read once, each output written once), which is what tensors that
fit in cache can approach. A stream's time is half that of np.copyto of x.nbytes timed in the same
rounds (the fastest of a T-thread and a one-thread copy).
"""
