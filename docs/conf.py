"""Sphinx configuration of the batchnorm documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (or ``make -C docs html``), with
``pip install ".[docs]"``. tests/test_docs.py runs that build; warnings are errors, so a broken
cross-reference, a missing docstring or a README section that the pages include and that was renamed
fails the test suite.

The prose pages include the README's sections (MyST ``{include}`` between its headings or its
``<!-- demo:start -->``-style markers) instead of copying them, so that the README and the site say the
same thing; the API reference is generated from each public module's ``__all__`` (docs/_ext/bn_docs.py).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

import batchnorm  # noqa: E402

project = "batchnorm"
author = "the batchnorm developers"
copyright = "the batchnorm developers"
release = batchnorm.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
    "bn_docs",
]

# The public modules, each with its page under api/. tests/test_docs.py checks that every name in
# their __all__ lands in the built reference.
PUBLIC_MODULES = ["batchnorm", "batchnorm.distributed", "batchnorm.reference", "batchnorm.examples"]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
templates_path = []

# Every reference must resolve. Objects of other projects are not linked (no intersphinx: the build
# must not need the network), so references to them are exempt.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(numpy|np|sklearn|mpi4py|torch|matplotlib)(\..*)?"),
                        # the demo's modules serve its command line: its page shows the package docstring
                        (r"py:mod", r"batchnorm\.demo\..*")]

# numpydoc: the docstrings are NumPy-style. GL08 ("the object does not have a docstring") turns a
# public function, class, method or property without a docstring into a warning, hence an error.
numpydoc_validation_checks = {"GL08"}
numpydoc_show_class_members = False  # autodoc's :members: lists them (see bn_docs.py)
numpydoc_xref_param_type = False

autodoc_typehints = "none"  # signatures as written; the docstrings give the types
autodoc_preserve_defaults = True  # dtype=np.float32, not dtype=<class 'numpy.float32'>
autodoc_inherit_docstrings = True
autosummary_generate = False  # the summary tables link to entries on the same page; no stub files

myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"batchnorm {release}"
html_static_path = []
html_theme_options = {"description": "Fast, exact Batch Normalization for NumPy", "fixed_sidebar": True}
