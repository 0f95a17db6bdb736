"""examples/quickstart.ipynb runs top to bottom without an error (executed with nbclient + ipykernel)."""

from __future__ import annotations

import os
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import batchnorm  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _package_parent():
    """The sys.path entry this process imported batchnorm from (in-place build or site-packages)."""
    origin = batchnorm.__spec__.origin if batchnorm.__spec__ is not None else batchnorm.__file__
    return os.path.dirname(os.path.dirname(os.path.abspath(origin)))


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel is a child process: make it import the same batchnorm as this test process, and
    draw with a non-interactive backend. 'python' in the python3 kernelspec resolves to this
    interpreter (jupyter_client substitutes sys.executable), so the kernel runs in this environment."""
    paths = [_package_parent()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the notebook's matrices are tiny: a multi-threaded BLAS only slows them down (badly, on a busy
    # machine); batchnorm's own kernels run such small batches on one thread anyway
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.delenv("PYTHONSTARTUP", raising=False)


def test_quickstart_notebook_runs(kernel_env, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(tmp_path)}},   # the kernel's working directory
    )
    t0 = time.perf_counter()
    client.execute()          # raises CellExecutionError if any cell raises
    elapsed = time.perf_counter() - t0

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count for c in code_cells), "a cell did not run"
    errors = [o for c in code_cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    # the curves are shown inline: at least one cell displays a PNG
    assert any("image/png" in o.get("data", {}) for c in code_cells for o in c.get("outputs", [])), \
        "no inline figure"
    # it imported this batchnorm, not another installed copy
    first = "".join(o.get("text", "") for o in code_cells[0].outputs if o.get("output_type") == "stream")
    assert f"batchnorm {batchnorm.__version__}" in first, first
    assert elapsed < 90, f"the notebook took {elapsed:.1f} s; keep it quick (a few seconds when idle)"


def test_notebook_is_valid_and_clean():
    """Valid nbformat, python3 kernel, and no error outputs stored in the file."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(o.get("output_type") == "error" for o in cell.get("outputs", []))
