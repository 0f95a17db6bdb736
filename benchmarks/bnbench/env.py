"""The environment a benchmark runs in: which batchnorm and torch, threads, CPU and cache sizes."""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH_DIR)


def _import_batchnorm():
    """Import batchnorm: the one Python finds (installed, or PYTHONPATH=python), else the source tree's,
    retrying for a while there: its extension may be being rebuilt right now. (Putting the source tree
    first would shadow an installed package with a tree that has no built extension.)"""
    try:
        import batchnorm
        return batchnorm
    except ImportError:
        for name in [m for m in sys.modules if m == "batchnorm" or m.startswith("batchnorm.")]:
            del sys.modules[name]
    src = os.path.join(REPO, "python")
    if os.path.isdir(os.path.join(src, "batchnorm")) and src not in sys.path:
        sys.path.insert(0, src)
    last = None
    for _ in range(30):
        try:
            import batchnorm
            return batchnorm
        except ImportError as e:  # pragma: no cover - only while the .so is being replaced
            last = e
            for name in [m for m in sys.modules if m == "batchnorm" or m.startswith("batchnorm.")]:
                del sys.modules[name]
            time.sleep(1.0)
    raise last


bn = _import_batchnorm()

_torch = None
_torch_tried = False


def get_torch():
    """torch, imported on first use (the memory child never imports it), or None when not installed."""
    global _torch, _torch_tried
    if not _torch_tried:
        _torch_tried = True
        try:
            _torch = importlib.import_module("torch")
        except ImportError:
            _torch = None
    return _torch


def set_threads(T):
    """T threads for our kernels and for torch's (when torch is loaded)."""
    bn.set_num_threads(T)
    if _torch is not None:
        _torch.set_num_threads(T)
    # batchnorm and torch may share one OpenMP runtime, so either call can set both: make sure of ours
    # (a build without OpenMP runs on one thread whatever is asked)
    want = T if bn._core._build_info()["openmp"] else 1
    assert bn.get_num_threads() == want, (bn.get_num_threads(), want)


def available_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(default=32 << 20):
    """Size of the largest CPU cache (Linux sysfs), or ``default`` where it cannot be read."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
            digits = s[:-1] if mult != 1 else s
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or default
