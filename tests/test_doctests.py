"""The examples in the docstrings run and give what they show.

Every public object counts: the docstrings of the public modules, of each name in their ``__all__`` and
of those classes' methods, including the C functions of ``batchnorm._core`` that batchnorm re-exports
(pytest's --doctest-modules does not look into builtins, so each object's docstring is handed to
doctest here). Each example runs in a fresh namespace: it must import what it uses, as a user's copy
would.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import runpy

import pytest

import batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLIC_MODULES = runpy.run_path(os.path.join(ROOT, "docs", "conf.py"))["PUBLIC_MODULES"]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Objects whose docstrings have examples today; if the search below stops finding them (the C
# functions' docstrings, say), this test says so instead of running fewer examples.
KNOWN = {
    "batchnorm", "batchnorm.forward_train", "batchnorm.batch_stats", "batchnorm.merge_stats",
    "batchnorm.normalize", "batchnorm.backward_reduce", "batchnorm.backward_apply",
    "batchnorm.update_running_stats", "batchnorm.set_num_threads", "batchnorm.get_num_threads",
    "batchnorm.fold_into", "batchnorm.BatchNorm", "batchnorm.distributed.SyncBatchNorm",
}


def _modules():
    """The public modules, then every other public submodule (their examples run too)."""
    names = list(PUBLIC_MODULES)
    names += [f"batchnorm.{m.name}" for m in pkgutil.iter_modules(batchnorm.__path__)
              if not m.name.startswith("_") and f"batchnorm.{m.name}" not in names]
    return names


def _doctests():
    # module=False: no check of where an object was defined (the C functions live in batchnorm._core,
    # the layers in batchnorm.layers); recurse only into classes, whose members are all their own.
    finders = {r: doctest.DocTestFinder(recurse=r, exclude_empty=True) for r in (False, True)}
    seen, tests = set(), []

    def add(obj, name, recurse):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        tests.extend(t for t in finders[recurse].find(obj, name, module=False, globs={}) if t.examples)

    for modname in _modules():
        module = importlib.import_module(modname)
        add(module, modname, False)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                continue
            add(obj, f"{modname}.{name}", inspect.isclass(obj))
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


def _run(test):
    """Run one DocTest; (number failed, report)."""
    lines = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(test, out=lines.append, clear_globs=True)
    return result.failed, "".join(lines)


def test_examples_are_found():
    found = {t.name for t in DOCTESTS}
    assert KNOWN <= found, f"no examples found for {sorted(KNOWN - found)}"


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples(test, restore_threads):
    failed, report = _run(test)
    assert failed == 0, f"{test.name}: {failed} of {len(test.examples)} examples failed\n{report}"


def test_a_wrong_example_fails():
    """The harness reports a wrong output (so the tests above can fail)."""

    def f():
        """
        >>> import numpy as np
        >>> np.arange(3)
        array([0, 1, 3])
        """

    (test,) = doctest.DocTestFinder().find(f, "f", module=False, globs={})
    failed, report = _run(test)
    assert failed == 1 and "array([0, 1, 2])" in report
