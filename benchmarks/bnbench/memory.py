"""Memory: the peak extra bytes one call allocates beyond what it returns.

Two measures, both net of the returned outputs:

tracemalloc  in this process: NumPy-level allocations (array data is traced by tracemalloc); the
             kernels' C scratch, allocated with malloc, is not.
RSS          the growth of the resident high-water mark during one call, in a fresh process per
             (case, op) (``memory_child.py``), which sees every allocation, C scratch included; it is
             page-granular, so noise for small cases.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc

from .env import BENCH_DIR, bn


def traced_extra(fn):
    """(peak extra bytes during fn() beyond what it returns, bytes returned), as tracemalloc sees them."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return max(0, peak - cur), max(0, cur - base)


def rss_extra(case, op, T, fused, timeout=300):
    """Peak RSS growth during one call of ours beyond its outputs, in a fresh process; None on failure.

    The child (``python -m bnbench.memory_child``) builds the same data and the same callable from the
    op table, and imports the same batchnorm as this process."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(bn.__file__)))
    arg = json.dumps(dict(path=pkg_parent, threads=T, case=case.name, shape=list(case.shape),
                          dtype=case.dtype, layout=case.layout, op=op.name, fused=fused))
    try:
        cp = subprocess.run([sys.executable, "-m", "bnbench.memory_child", arg], capture_output=True,
                            text=True, timeout=timeout, cwd=BENCH_DIR)
        r = json.loads(cp.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - optional measurement
        return None
    # an output may reuse memory freed by the warm-up call (small cases): clamp at 0
    return dict(extra=max(0, r["hwm1"] - r["rss0"] - r["out"]), growth=r["hwm1"] - r["rss0"],
                returned=r["out"], exact=r["exact"])
