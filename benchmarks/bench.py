#!/usr/bin/env python
"""Benchmark of batchnorm's kernels against PyTorch (CPU), the NumPy reference and the bandwidth limit.

    python benchmarks/bench.py                  # full run
    python benchmarks/bench.py --quick          # fewer rounds, same cases
    python benchmarks/bench.py --json out.json  # also write every number for tools (see plot.py)
    python benchmarks/bench.py --help           # every option, case and op

The benchmark itself is the package next to this file, benchmarks/bnbench/ (its __init__ describes
it); this script is its entry point. _import_batchnorm and cpu_name stay importable from here for
sync_bench.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bnbench.cli import main  # noqa: E402
from bnbench.env import _import_batchnorm, cpu_name  # noqa: E402,F401  (used by sync_bench.py)

if __name__ == "__main__":
    main()
