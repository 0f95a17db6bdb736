"""Release checks: one version number, the build's floating-point promises, the build without a compiler.

The cross-compiler check (GCC's build against clang's, bit for bit) needs two builds and runs as a CI step
(.ci/compilers.sh); here every SIMD path and thread count of the build under test is compared with each
other through the same script, tools/bit_identity.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import batchnorm

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIT_IDENTITY = os.path.join(REPO, "tools", "bit_identity.py")


def test_version_is_the_installed_distributions():
    from importlib import metadata

    try:
        dist_version = metadata.version("batchnorm")
    except metadata.PackageNotFoundError:
        pytest.skip("batchnorm is imported from a path, not installed: it has no distribution metadata")
    assert batchnorm.__version__ == dist_version
    from batchnorm._version import __version__

    assert __version__ is batchnorm.__version__


def test_version_is_written_once():
    """pyproject.toml takes the version from batchnorm/_version.py and names none of its own."""
    pyproject = os.path.join(REPO, "pyproject.toml")
    if not os.path.exists(pyproject):
        pytest.skip("the tests run outside the source tree (no pyproject.toml beside them)")
    text = open(pyproject, encoding="utf-8").read()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \["version"\]', project, re.M)
    assert not re.search(r"^version\s*=", project, re.M)
    assert 'attr = "batchnorm._version.__version__"' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev|\.post)?\d*", batchnorm.__version__)


def test_simd_paths_and_thread_counts_bit_identical(tmp_path):
    """tools/bit_identity.py on this build: baseline, AVX2 and the default path, 1-3 threads, all agree."""
    if not os.path.exists(BIT_IDENTITY):
        pytest.skip("tools/bit_identity.py is not beside the tests")
    r = subprocess.run([sys.executable, BIT_IDENTITY, "write", str(tmp_path / "out.npz")],
                       env=helpers.subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "every output bit-identical" in r.stdout


def test_bit_identity_detects_a_difference(tmp_path):
    """The comparison fails when one output differs by one ulp (so a pass above means something)."""
    if not os.path.exists(BIT_IDENTITY):
        pytest.skip("tools/bit_identity.py is not beside the tests")
    import numpy as np

    ref = tmp_path / "ref.npz"
    r = subprocess.run([sys.executable, BIT_IDENTITY, "write", str(ref)], env=helpers.subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    with np.load(ref) as f:
        arrays = {k: f[k] for k in f.files}
    key = next(k for k in sorted(arrays) if k.startswith("default/") and k.endswith("forward_train.y"))
    y = arrays[key].copy()
    y.flat[0] = np.nextafter(y.flat[0], np.inf, dtype=y.dtype)
    arrays[key] = y
    np.savez(ref, **arrays)
    r = subprocess.run([sys.executable, BIT_IDENTITY, "compare", str(ref)], env=helpers.subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert key in r.stdout and "1 outputs differ" in r.stdout


def test_build_flags_forbid_contraction():
    """The extension was compiled with -ffp-contract=off (GCC, clang) or /fp:precise (MSVC): setup.py says
    so for every compiler; a build without it fuses multiply-adds in the AVX-512 path (clang)."""
    setup_py = os.path.join(REPO, "setup.py")
    if not os.path.exists(setup_py):
        pytest.skip("the tests run outside the source tree (no setup.py beside them)")
    text = open(setup_py, encoding="utf-8").read()
    assert '"-ffp-contract=off"' in text and '"/fp:precise"' in text
    makefile = open(os.path.join(REPO, "csrc", "Makefile"), encoding="utf-8").read()
    assert makefile.count("-ffp-contract=off") >= 2


def test_numpy_bounds_agree_with_noxfile():
    """pyproject.toml's per-Python NumPy lower bounds are the 'oldest' versions noxfile.py tests."""
    pyproject, noxfile = os.path.join(REPO, "pyproject.toml"), os.path.join(REPO, "noxfile.py")
    if not (os.path.exists(pyproject) and os.path.exists(noxfile)):
        pytest.skip("the tests run outside the source tree")
    try:
        import tomllib
    except ImportError:  # Python < 3.11: pytest brings tomli there
        tomllib = pytest.importorskip("tomli")
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads(open(pyproject, encoding="utf-8").read())["project"]["dependencies"]
    numpy_reqs = [Requirement(d) for d in deps if d.startswith("numpy")]
    text = open(noxfile, encoding="utf-8").read()
    oldest = eval(re.search(r"^OLDEST_NUMPY = (\{.*\})$", text, re.M).group(1))  # a literal dict
    pythons = eval(re.search(r"^PYTHONS = (\[.*\])$", text, re.M).group(1))
    assert set(oldest) == set(pythons) == {"3.9", "3.10", "3.11", "3.12", "3.13"}
    for py, version in oldest.items():
        env = {"python_version": py, "python_full_version": py + ".0"}
        active = [r for r in numpy_reqs if r.marker is None or r.marker.evaluate(env)]
        assert len(active) == 1, (py, active)
        spec = active[0].specifier
        lower = [Version(s.version) for s in spec if s.operator == ">="]
        assert lower == [Version(version)], (py, str(spec))


def test_error_message_numbers_are_formatted():
    """The binding formats numbers itself: PyErr_Format has no %g (left verbatim before Python 3.12, a
    SystemError since), so the count must appear in the message as digits."""
    import numpy as np

    with pytest.raises(ValueError, match=r"\(27000000000000000\)"):
        batchnorm.merge_stats([9e15] * 3, np.zeros((3, 1)), np.zeros((3, 1)))
