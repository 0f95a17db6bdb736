"""The RSS probe: one (case, op) of ours in a fresh process; prints one JSON line.

    cd benchmarks && python -m bnbench.memory_child '{"path": ..., "threads": 1, "case": "...",
        "shape": [...], "dtype": "float32", "layout": "NCHW", "op": "train", "fused": false}'

It builds the data and the callable exactly as the benchmark does (``bnbench.ops``), calls it once to
warm up (OpenMP threads, malloc arenas, code pages), resets the resident high-water mark (VmHWM, via
/proc/self/clear_refs) and calls it again. Output: rss0 (RSS before the call), hwm0/hwm1 (high-water
mark before/after), out (bytes returned), exact (whether the high-water mark could be reset; if not,
hwm1 is the process-lifetime maximum and the result an upper bound).
"""

from __future__ import annotations

import json
import resource
import sys


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(argv):
    p = json.loads(argv[0])
    sys.path.insert(0, p["path"])  # the parent's batchnorm, not whichever Python would find first
    from bnbench import ops
    from bnbench.env import bn

    bn.set_num_threads(p["threads"])
    case = ops.Case(p["case"], tuple(p["shape"]), p["dtype"], p["layout"])
    op = ops.OPS_BY_NAME[p["op"]]
    d = ops.make_data(case)
    call = ops.Ours(case, d, ops.Shared(case, d, p["fused"])).call(op)
    r = call()
    del r
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
        exact = True
    except OSError:
        exact = False
    rss0, hwm0 = status("VmRSS"), status("VmHWM")
    r = call()
    hwm1 = status("VmHWM")
    if not exact:
        hwm1 = max(hwm1, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = sum(a.nbytes for a in r)
    print(json.dumps(dict(rss0=rss0, hwm0=hwm0, hwm1=hwm1, out=out, exact=exact or hwm1 > hwm0)))


if __name__ == "__main__":
    main(sys.argv[1:])
