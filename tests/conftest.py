"""Shared pytest configuration for the batchnorm test-suite.

Run from the repository root with the in-place build on the path::

    PYTHONPATH=python python -m pytest tests -q

The one test that allocates more than ~50 MB is marked ``large``; deselect it with ``-m "not large"``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # make ``import helpers`` work whatever the rootdir/import mode
    sys.path.insert(0, HERE)


def pytest_configure(config):
    config.addinivalue_line("markers", "large: allocates a few hundred MB (deselect with -m 'not large')")


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: every test sees the same data on every run."""
    return np.random.default_rng(20240611)


@pytest.fixture
def restore_threads():
    """Put the library's thread count back after a test that changes it."""
    import batchnorm as bn

    before = bn.get_num_threads()
    yield before
    bn.set_num_threads(before)
