"""Sphinx extension of the batchnorm docs: the API reference generated from ``__all__``, and the
quickstart notebook rendered from its stored outputs.

``.. public-api:: MODULE`` documents every name in ``MODULE.__all__``, grouped by kind (functions,
layers, other classes, exceptions, modules, data), with a summary table on top. A name added to
``__all__`` appears without editing the docs; a name ``__all__`` lists but the module lacks, a public
name or member without a docstring (numpydoc's GL08 check, see conf.py) and a data name without a
``#:`` doc comment are build warnings, which ``sphinx-build -W`` (tests/test_docs.py) turns into
failures. So are the docstrings numpydoc cannot parse (it reports those with ``warnings.warn``, which
``-W`` would not see; they are logged as Sphinx warnings here).

The page ``notebook`` gets ``examples/quickstart.ipynb`` converted to MyST Markdown when it is read:
markdown cells as they are, code cells as code blocks, text outputs as literal blocks and PNG outputs
as inline images, from the outputs stored in the notebook (nothing is executed; tests/test_notebook.py
executes it). This needs neither nbsphinx nor pandoc.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import warnings

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

# Public data whose meaning is a convention, described here instead of by a doc comment.
KNOWN_DATA = {"__version__": "The version of this copy of batchnorm, a string such as ``'0.1.0'``."}

# Section order on a module page.
KINDS = [
    ("functions", "Functions"),
    ("layers", "Layers"),
    ("classes", "Classes"),
    ("exceptions", "Exceptions"),
    ("modules", "Modules"),
    ("data", "Data"),
]


def classify(obj):
    """The kind of a public object, one of the keys of KINDS."""
    if inspect.ismodule(obj):
        return "modules"
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            return "exceptions"
        from batchnorm import BatchNorm

        return "layers" if issubclass(obj, BatchNorm) else "classes"
    if callable(obj):
        return "functions"
    return "data"


def public_names(modname):
    """(name, object) for every name in the module's ``__all__``, in that order; missing names are
    reported by the caller."""
    module = importlib.import_module(modname)
    names = getattr(module, "__all__", None)
    if names is None:
        raise ValueError(f"{modname} has no __all__: the API reference is generated from it")
    return module, [(name, getattr(module, name, None)) for name in names]


def _first_line(doc):
    doc = inspect.cleandoc(doc or "")
    return doc.split("\n\n")[0].replace("\n", " ").strip()


def _data_has_doc_comment(modname, name):
    from sphinx.pycode import ModuleAnalyzer

    try:
        attr_docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:  # no source (a compiled module): no doc comments either
        return False
    return ("", name) in attr_docs


class PublicAPI(SphinxDirective):
    """``.. public-api:: MODULE``: the module's docstring, then everything in its ``__all__``."""

    required_arguments = 1
    has_content = False

    def run(self):
        modname = self.arguments[0]
        try:
            module, members = public_names(modname)
        except Exception as exc:
            logger.warning(f"public-api: cannot document {modname}: {exc}", location=self.get_location())
            return []
        source = inspect.getsourcefile(module)
        if source:  # __all__ lives there: a name added to it rebuilds this page
            self.env.note_dependency(source)
        groups = {kind: [] for kind, _ in KINDS}
        for name, obj in members:
            if obj is None and not hasattr(module, name):
                logger.warning(f"public-api: {modname}.__all__ lists {name!r}, which {modname} does not define",
                               location=self.get_location())
                continue
            groups[classify(obj)].append((name, obj))

        lines = [f".. automodule:: {modname}", ""]
        summary = [name for kind, _ in KINDS if kind not in ("modules", "data") for name, _ in groups[kind]]
        if summary:
            lines += [".. rubric:: Summary", "", ".. autosummary::", "   :nosignatures:", ""]
            lines += [f"   {name}" for name in summary] + [""]
        for kind, title in KINDS:
            if not groups[kind]:
                continue
            lines += [title, "-" * len(title), ""]
            for name, obj in groups[kind]:
                lines += self._entry(modname, kind, name, obj)
        content = StringList()
        for i, line in enumerate(lines):
            content.append(line, f"<public-api {modname}>", i)
        node = nodes.section()
        node.document = self.state.document
        nested_parse_with_titles(self.state, content, node)
        return node.children

    def _entry(self, modname, kind, name, obj):
        full = f"{modname}.{name}"
        if kind == "functions":
            return [f".. autofunction:: {full}", ""]
        if kind in ("layers", "classes", "exceptions"):
            directive = "autoexception" if kind == "exceptions" else "autoclass"
            return [f".. {directive}:: {full}", "   :members:", "   :undoc-members:",
                    "   :show-inheritance:", "   :member-order: bysource", ""]
        if kind == "modules":
            return [f"* :mod:`{obj.__name__}`: {_first_line(obj.__doc__)}", ""]
        # data
        if name in KNOWN_DATA:
            return [f".. py:data:: {name}", f"   :module: {modname}", f"   :value: {obj!r}", "",
                    f"   {KNOWN_DATA[name]}", ""]
        if not _data_has_doc_comment(modname, name):
            logger.warning(f"public-api: {full} is public data without a '#:' doc comment",
                           location=self.get_location())
        return [f".. autodata:: {full}", ""]


# -- the notebook --------------------------------------------------------------------------------

NOTEBOOK_PAGE = "notebook"
NOTEBOOK = os.path.join("..", "examples", "quickstart.ipynb")  # relative to the docs folder


def _text(value):
    return "".join(value) if isinstance(value, list) else str(value)


def _fence(body, info=""):
    """A fenced block that no backtick run inside ``body`` can close."""
    ticks = "```"
    while ticks in body:
        ticks += "`"
    return f"{ticks}{info}\n{body.rstrip()}\n{ticks}\n"


def notebook_to_myst(path):
    """The notebook at ``path`` as MyST Markdown, with its stored outputs."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    language = nb.get("metadata", {}).get("kernelspec", {}).get("language", "python")
    parts = []
    for cell in nb["cells"]:
        source = _text(cell.get("source", ""))
        if cell["cell_type"] == "markdown":
            parts.append(source.rstrip() + "\n")
        elif cell["cell_type"] == "code":
            parts.append(_fence(source, language))
            for out in cell.get("outputs", []):
                kind = out.get("output_type")
                if kind == "stream":
                    parts.append(_fence(_text(out.get("text", "")), "text"))
                elif kind in ("display_data", "execute_result"):
                    data = out.get("data", {})
                    if "image/png" in data:
                        png = _text(data["image/png"]).replace("\n", "")
                        parts.append(f"![output of the cell above](data:image/png;base64,{png})\n")
                    elif "text/plain" in data:
                        parts.append(_fence(_text(data["text/plain"]), "text"))
                elif kind == "error":
                    parts.append(_fence("\n".join(out.get("traceback", [])), "text"))
    return "\n".join(parts)


def _insert_notebook(app, docname, source):
    if docname != NOTEBOOK_PAGE:
        return
    path = os.path.normpath(os.path.join(app.srcdir, NOTEBOOK))
    app.env.note_dependency(path)
    source[0] = notebook_to_myst(path) + "\n" + source[0]


def _drop_object_base(app, name, obj, options, bases):
    # "Bases: object" says nothing
    bases[:] = [b for b in bases if b is not object]


def _route_numpydoc_warnings():
    """numpydoc reports a docstring it cannot parse (an unknown section such as "Example") with
    warnings.warn, which sphinx-build -W does not see: log those as Sphinx warnings instead."""
    warnings.filterwarnings("always", category=UserWarning, module=r"numpydoc(\..*)?$")
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if f"{os.sep}numpydoc{os.sep}" in filename:
            logger.warning(f"numpydoc: {message}")
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def setup(app):
    _route_numpydoc_warnings()
    app.add_directive("public-api", PublicAPI)
    app.connect("autodoc-process-bases", _drop_object_base)
    app.connect("source-read", _insert_notebook)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
