"""``batchnorm.show_config()``: how this copy of batchnorm was built and what it runs with."""

from __future__ import annotations

import os
import platform
import sys
import warnings

__all__ = ["show_config", "openmp_spec_version", "check_simd_env"]

# Values of BATCHNORM_SIMD the kernels understand (csrc/bn_dispatch.c): a cap on the instruction set.
SIMD_CHOICES = ("baseline", "avx2", "avx512")


def check_simd_env(value=None):
    """Warn (once, at import) when BATCHNORM_SIMD holds a value the kernels ignore."""
    value = os.environ.get("BATCHNORM_SIMD") if value is None else value
    if value and value not in SIMD_CHOICES:
        warnings.warn(f"BATCHNORM_SIMD={value!r} is not one of {', '.join(map(repr, SIMD_CHOICES))} and is "
                      "ignored: the best instruction set the CPU has is used", RuntimeWarning, stacklevel=3)
        return False
    return True

# The _OPENMP macro is the date (yyyymm) of the specification the compiler implements.
_OPENMP_SPECS = {
    199810: "1.0", 200203: "2.0", 200505: "2.5", 200805: "3.0", 201107: "3.1", 201307: "4.0",
    201511: "4.5", 201811: "5.0", 202011: "5.1", 202111: "5.2", 202411: "6.0",
}


def openmp_spec_version(date):
    """The OpenMP specification version for an ``_OPENMP`` date, e.g. 201511 -> '4.5' (None -> None)."""
    if date is None:
        return None
    return _OPENMP_SPECS.get(int(date), f"{int(date)}")


def _config():
    import numpy as np

    from . import __version__, _core, get_num_threads

    try:
        build = dict(_core._build_info())
    except AttributeError:  # an older build without _build_info
        build = {}
    date = build.get("openmp_version")
    return {
        "batchnorm": {"version": __version__, "path": getattr(sys.modules.get("batchnorm"), "__file__", None)},
        "build": {
            "openmp": build.get("openmp"),
            "openmp_version": date,
            "openmp_spec": openmp_spec_version(date),
            "simd": build.get("simd"),
            "compiler": build.get("compiler"),
            "extension": getattr(_core, "__file__", None),
        },
        "runtime": {
            "num_threads": get_num_threads(),
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "python_implementation": platform.python_implementation(),
            "executable": sys.executable,
            "platform": platform.platform(),
            "machine": platform.machine(),
        },
    }


def show_config(return_dict=False, file=None):
    """Print (or return) batchnorm's build and runtime configuration.

    Shows the versions of batchnorm, NumPy and Python, the platform, whether the C kernels were built
    with OpenMP (and which version), how many threads they use now, the SIMD code path and the
    compiler. Include it in bug reports.

    Parameters
    ----------
    return_dict : bool, default False
        Return the information as a nested dict (keys ``'batchnorm'``, ``'build'``, ``'runtime'``)
        instead of printing it.
    file : file-like, optional
        Where to print; default ``sys.stdout``.

    Returns
    -------
    dict or None
        The configuration when ``return_dict`` is True, else None.

    Examples
    --------
    >>> import batchnorm
    >>> batchnorm.show_config()                                    # doctest: +SKIP
    >>> batchnorm.show_config(return_dict=True)["build"]["openmp"]  # doctest: +SKIP
    True
    """
    cfg = _config()
    if return_dict:
        return cfg
    b, r = cfg["build"], cfg["runtime"]
    if b["openmp"] is None:
        omp = "unknown"
    elif b["openmp"]:
        omp = "yes"
        if b["openmp_version"] is not None:
            omp += f" (OpenMP {b['openmp_spec']}, _OPENMP={b['openmp_version']})"
    else:
        omp = "no (serial build)"
    rows = [
        ("batchnorm", cfg["batchnorm"]["version"]),
        ("  location", cfg["batchnorm"]["path"]),
        ("numpy", r["numpy"]),
        ("python", f"{r['python']} ({r['python_implementation']}) {r['executable']}"),
        ("platform", r["platform"]),
        ("OpenMP", omp),
        ("threads", f"{r['num_threads']} (batchnorm.get_num_threads())"),
        ("SIMD", b["simd"] or "unknown"),
        ("compiler", b["compiler"] or "unknown"),
    ]
    width = max(len(k) for k, _ in rows)
    out = sys.stdout if file is None else file
    for key, value in rows:
        print(f"{key:<{width}} : {value}", file=out)
    return None
