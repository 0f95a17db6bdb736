"""Command line: ``python benchmarks/bench.py [--quick] [--json PATH] ...`` (see bnbench/__init__.py)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from . import __doc__ as package_doc
from .env import available_cpus, bn, cpu_name, get_torch, last_level_cache_bytes, set_threads
from .ops import CASES, OPS, fused_api
from .report import findings, print_report, targets
from .runner import bench_case
from .timing import PROFILES


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench.py", description=package_doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="cases:\n" + "\n".join(f"  {c.name}" for c in CASES)
                                 + "\nops:\n" + "\n".join(f"  {o.name:18s} {o.doc}" for o in OPS))
    ap.add_argument("--quick", action="store_true", help="fewer rounds, same cases and ops (on a shared 2-core machine ~12 minutes; "
                    "--cases and --ops select fewer)")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON to PATH")
    ap.add_argument("--threads", type=int, nargs="+",
                    help="thread counts (default: 1, 2 and all available CPUs)")
    ap.add_argument("--cases", nargs="+", metavar="SUBSTR", help="only cases whose name contains one")
    ap.add_argument("--ops", nargs="+", metavar="NAME",
                    help="only these ops (exact names, see below; default: all)")
    ap.add_argument("--rss", dest="rss", action="store_true", default=None,
                    help="measure RSS growth in a subprocess per case and op (default: on, off with --quick)")
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the RSS subprocesses")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out even where installed")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    names = {o.name for o in OPS}
    if args.ops:
        unknown = [o for o in args.ops if o not in names]
        if unknown:
            ap.error(f"unknown op(s) {unknown}; choose from {sorted(names)}")
    if args.threads and any(t < 1 for t in args.threads):
        ap.error("--threads must be positive")
    return args


def run(args):
    """Run the benchmark; returns the results dict (what --json writes)."""
    ncpu = available_cpus()
    threads = args.threads or sorted({1, min(2, ncpu), ncpu})
    cases = [c for c in CASES if not args.cases or any(s in c.name for s in args.cases)]
    ops = [o for o in OPS if not args.ops or o.name in args.ops]
    prof = PROFILES["quick" if args.quick else "full"]
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    torch = None if args.no_torch else get_torch()
    fused, reason = fused_api()
    if not fused:
        log(f"fused kernels not in this build ({reason}): fused rows time our unfused composition and "
            f"PyTorch's only")
    llc = last_level_cache_bytes()
    want_rss = (not args.quick) if args.rss is None else args.rss
    t_start = time.perf_counter()
    out = dict(meta=dict(
        batchnorm=getattr(bn, "__version__", "?"), numpy=np.__version__,
        torch=torch.__version__ if torch is not None else None, python=platform.python_version(),
        cpu=cpu_name(), cpus=ncpu, llc_bytes=llc, threads=threads, quick=args.quick, profile=prof,
        fused=fused, fused_reason=reason,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        loadavg=os.getloadavg() if hasattr(os, "getloadavg") else None,
        traffic_units_of_x_bytes={o.name: dict(zip(("two_pass", "one_read"), o.traffic())) for o in ops},
        memory_note="tracemalloc: NumPy-level allocations only (C scratch via malloc is not traced); "
                    "rss: resident high-water mark growth in a fresh subprocess, net of outputs",
    ), cases=[])
    try:
        for case in cases:
            log(f"{case.name}: shape {case.shape} {case.dtype} {case.layout}")
            out["cases"].append(bench_case(case, ops, threads, prof, fused=fused, want_torch=torch is not None,
                                           want_rss=want_rss, llc=llc, log=log))
    finally:
        set_threads(ncpu)
    out["meta"]["elapsed_s"] = time.perf_counter() - t_start
    out["meta"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out["targets"] = targets(out)
    out["findings"] = findings(out)
    return out


def main(argv=None):
    args = parse_args(argv)
    out = run(args)
    print_report(out)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        if not args.quiet:
            print(f"wrote {args.json}", file=sys.stderr)
