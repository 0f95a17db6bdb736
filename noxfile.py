"""Every supported Python with the oldest and the newest NumPy it allows: ``nox`` (all ten sessions),
``nox -s "tests-3.9(numpy='oldest')"`` (one), ``nox -l`` (the list).

Each session builds a wheel from an sdist of the checkout, in an isolated build environment with NumPy 2
(pyproject.toml's build requirement: an extension built against NumPy 2 also runs on NumPy 1.x), installs it
with the test extras and the NumPy under test, and runs the suite from the checkout's tests/ against the
installed wheel (the source tree's package is not importable from there: it lives in python/).

The oldest NumPy per Python is pyproject.toml's lower bound for that Python: the oldest NumPy release with
wheels for it. torch (PyTorch parity tests) installs offline only for Python 3.11 (torch 2.13.0 CPU); the
other sessions skip those tests, as the suite does wherever torch is absent.

Interpreters are taken from pyenv (~/.pyenv/versions/X.Y.*) where it has them, else from PATH.
Extra arguments go to pytest: ``nox -- -x -k forward``, ``nox -- tests/test_functional.py`` (paths relative
to the checkout; without a path, the whole of tests/).
"""

from __future__ import annotations

import glob
import os
import re
import shutil

import nox

PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]
# Mirrors the environment markers of pyproject.toml's numpy requirement (test_release.py checks they agree).
OLDEST_NUMPY = {"3.9": "1.23.0", "3.10": "1.23.0", "3.11": "1.23.2", "3.12": "1.26.0", "3.13": "2.1.0"}
TORCH = {"3.11": "torch==2.13.0"}
ROOT = os.path.dirname(os.path.abspath(__file__))

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = False
nox.options.error_on_missing_interpreters = True

# pyenv's interpreters, newest patch release of each minor version, ahead of PATH
_pyenv = os.path.expanduser("~/.pyenv/versions")
for _v in PYTHONS:
    _dirs = sorted(glob.glob(os.path.join(_pyenv, _v + ".*", "bin")),
                   key=lambda d: [int(p) for p in re.findall(r"\d+", os.path.basename(os.path.dirname(d)))])
    if _dirs:  # (pyenv's shims on PATH name python3.9 too, but fail for a version that is not active)
        os.environ["PATH"] = _dirs[-1] + os.pathsep + os.environ["PATH"]

@nox.session(python=PYTHONS)
@nox.parametrize("numpy", ["oldest", "newest"])
def tests(session, numpy):
    py = session.python
    tmp = session.create_tmp()
    dist, run = os.path.join(tmp, "dist"), os.path.join(tmp, "run")
    for d in (dist, run):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    # an sdist of the checkout, then the wheel from it; the wheel's build runs in an isolated environment
    # with pyproject.toml's build requirements (NumPy 2)
    session.install("build")
    session.run("python", "-m", "build", "--sdist", "--outdir", dist, ROOT, silent=True)
    sdist = glob.glob(os.path.join(dist, "*.tar.gz"))[0]
    session.run("python", "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, sdist)
    wheel = glob.glob(os.path.join(dist, "batchnorm-*.whl"))[0]
    want = f"numpy=={OLDEST_NUMPY[py]}" if numpy == "oldest" else "numpy"
    extra = [TORCH[py]] if py in TORCH else []
    # one resolver call, wheels only: the test extras' versions must accept this NumPy
    session.install("--only-binary=:all:", "--upgrade", f"{wheel}[test]", want, *extra)
    version = session.run("python", "-c", "import numpy; print(numpy.__version__)", silent=True).strip()
    if numpy == "oldest" and version != OLDEST_NUMPY[py]:
        session.error(f"expected numpy {OLDEST_NUMPY[py]}, got {version}")
    session.log(f"python {py}, numpy {version} (built against NumPy 2), wheel {os.path.basename(wheel)}")
    session.run("python", "-c", "import batchnorm, sys; assert 'site-packages' in batchnorm.__file__, "
                "batchnorm.__file__; batchnorm.show_config()")
    session.chdir(run)  # away from the checkout: the installed wheel is imported
    # posargs: pytest's arguments, test paths included (absolute, or relative to the checkout)
    args = [a if a.startswith("-") or os.path.isabs(a) or not os.path.exists(os.path.join(ROOT, a.split("::")[0]))
            else os.path.join(ROOT, a) for a in session.posargs]
    if not any(os.path.exists(a.split("::")[0]) for a in args):
        args.append(os.path.join(ROOT, "tests"))
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *args)
