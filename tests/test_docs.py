"""The documentation site: every public name has a docstring and a place in the API reference, and
the Sphinx site builds with warnings as errors (a broken cross-reference, a public object without a
docstring, a README section the pages include that is gone, ... fail here).

The build needs the docs extra (Sphinx, numpydoc, MyST-Parser; the test extra brings them). Where they
are missing on purpose, ``BATCHNORM_SKIP_DOCS=1`` skips the build tests; otherwise a missing package
fails them, so that CI cannot pass without building the docs. The docstring tests need none of it.
"""

from __future__ import annotations

import html as html_module
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import runpy
import subprocess
import sys
import zlib

import pytest

import batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
CONF = runpy.run_path(os.path.join(DOCS, "conf.py"))
PUBLIC_MODULES = CONF["PUBLIC_MODULES"]

# Public submodules (no leading underscore) without a reference page of their own, and why.
NOT_IN_REFERENCE = {
    # its __all__ is batchnorm's layers (re-exported there) and the result type of load_state_dict
    "batchnorm.layers": {"IncompatibleKeys"},
    # a command line (python -m batchnorm.demo): its page shows the module docstring only
    "batchnorm.demo": None,
    # the variants' functions and the Moments accumulator, all re-exported by batchnorm
    "batchnorm.variants": set(),
    "batchnorm.moments": set(),
}

DOCS_PACKAGES = ("sphinx", "numpydoc", "myst_parser")


def _public(modname):
    module = importlib.import_module(modname)
    return module, [(name, getattr(module, name)) for name in module.__all__]


def _public_members(cls):
    """Public methods, properties and class/static methods defined by cls itself."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod, property)) or inspect.isfunction(value):
            yield name, value


def _attributes_section(doc):
    """Names listed in a NumPy-style docstring's Attributes section."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names = set()
    underline = [i + 1 < len(lines) and re.fullmatch(r"-{3,}", lines[i + 1].strip()) is not None
                 for i in range(len(lines))]
    for i, line in enumerate(lines):
        if line.strip() == "Attributes" and underline[i]:
            for j in range(i + 2, len(lines)):
                if underline[j]:  # the next section
                    break
                entry = lines[j]
                if entry and not entry.startswith(" "):
                    names.update(n.strip() for n in entry.split(" : ")[0].split(","))
            break
    return names


# -- docstrings (no Sphinx needed) -----------------------------------------------------------------


def test_public_modules_are_documented():
    """Every public submodule has a reference page, or is listed above with a reason; every module
    named in an __all__ has a page."""
    for info in pkgutil.iter_modules(batchnorm.__path__):
        modname = f"batchnorm.{info.name}"
        if info.name.startswith("_"):
            continue
        assert modname in PUBLIC_MODULES or modname in NOT_IN_REFERENCE, (
            f"{modname} is a public module without a page in docs/api: add it to PUBLIC_MODULES in "
            "docs/conf.py and a page docs/api/<name>.rst with '.. public-api:: {modname}'")
    pages = {}
    for fn in os.listdir(os.path.join(DOCS, "api")):
        with open(os.path.join(DOCS, "api", fn), encoding="utf-8") as f:
            for m in re.finditer(r"^\.\. public-api:: (\S+)$", f.read(), re.M):
                pages[m.group(1)] = fn
    assert set(pages) == set(PUBLIC_MODULES), pages
    for modname in PUBLIC_MODULES:
        _, members = _public(modname)
        for name, obj in members:
            if inspect.ismodule(obj):
                assert obj.__name__ in PUBLIC_MODULES, f"{modname}.__all__ has {name}, which has no page"
    # the modules without a page export nothing that the reference does not show
    for modname, exempt in NOT_IN_REFERENCE.items():
        module = importlib.import_module(modname)
        if exempt is None:
            continue
        for name in module.__all__:
            assert name in batchnorm.__all__ or name in exempt, (
                f"{modname}.{name} is public but not in batchnorm.__all__, so not in the reference")


@pytest.mark.parametrize("modname", PUBLIC_MODULES)
def test_public_names_have_docstrings(modname):
    module, members = _public(modname)
    assert (module.__doc__ or "").strip(), f"{modname} has no module docstring"
    missing = []
    for name, obj in members:
        if inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
            continue  # modules have their own page; data is checked by the Sphinx build (bn_docs.py)
        if not (obj.__doc__ or "").strip():  # a class's own docstring, not its base's
            missing.append(f"{modname}.{name}")
        if inspect.isclass(obj):
            for member, value in _public_members(obj):
                target = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if not (inspect.getdoc(target) or "").strip():
                    missing.append(f"{modname}.{name}.{member}")
    assert not missing, f"public objects without a docstring: {missing}"


def _layer_classes():
    for modname in PUBLIC_MODULES:
        for name, obj in _public(modname)[1]:
            if inspect.isclass(obj) and issubclass(obj, batchnorm.BatchNorm):
                yield f"{modname}.{name}", obj


@pytest.mark.parametrize("name,cls", list(_layer_classes()), ids=lambda v: v if isinstance(v, str) else "")
def test_layer_attributes_are_documented(name, cls):
    """A layer's public instance attributes are named in an Attributes section of its class or a base
    (the reference shows those sections; autodoc cannot see attributes set in __init__)."""
    documented = set()
    for klass in cls.__mro__:
        documented |= _attributes_section(klass.__doc__)
    for kwargs in ({}, {"affine": False, "track_running_stats": False}):
        layer = cls(3, **kwargs)
        public = {a for a in vars(layer) if not a.startswith("_")}
        undocumented = sorted(public - documented)
        assert not undocumented, f"{name}: attributes {undocumented} are not in an Attributes section"
    assert {"weight", "running_mean"} <= documented  # the parser found the section


# -- the Sphinx build -----------------------------------------------------------------------------


def _package_parent():
    origin = batchnorm.__spec__.origin if batchnorm.__spec__ is not None else batchnorm.__file__
    return os.path.dirname(os.path.dirname(os.path.abspath(origin)))


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The site, built once: ``sphinx-build -W --keep-going -b html docs <tmp>``."""
    if os.environ.get("BATCHNORM_SKIP_DOCS") == "1":
        pytest.skip("BATCHNORM_SKIP_DOCS=1: the documentation build is skipped on purpose")
    absent = [p for p in DOCS_PACKAGES if importlib.util.find_spec(p) is None]
    if absent:
        pytest.fail(f"the docs build needs {', '.join(absent)}: pip install '.[docs]' (the test extra has "
                    "them), or set BATCHNORM_SKIP_DOCS=1 to skip the build on purpose")
    out = tmp_path_factory.mktemp("docs")
    env = dict(os.environ)
    # the build imports the batchnorm this process tests (in-place build or installed)
    env["PYTHONPATH"] = os.pathsep.join([_package_parent()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
           "-d", str(out / "doctrees"), DOCS, str(out / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out / "html"


def test_sphinx_build_has_no_warnings(built_site):
    proc, _ = built_site
    warnings = list(dict.fromkeys(line for line in (proc.stdout + proc.stderr).splitlines()
                                  if "WARNING" in line or "ERROR" in line))
    assert proc.returncode == 0 and not warnings, (
        f"sphinx-build -W failed (exit {proc.returncode}):\n" + "\n".join(warnings) + "\n" + proc.stderr[-3000:])


def _inventory(path):
    """{name: role} from Sphinx's objects.inv (format version 2: four header lines, zlib body)."""
    with open(path, "rb") as f:
        for _ in range(4):
            f.readline()
        body = zlib.decompress(f.read()).decode("utf-8")
    entries = {}
    for line in body.splitlines():
        m = re.match(r"(.+?)\s+(\S+:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)", line.rstrip())
        if m:
            entries[m.group(1)] = m.group(2)
    return entries


def test_reference_lists_every_public_name(built_site):
    proc, html = built_site
    assert proc.returncode == 0, "the build failed: see test_sphinx_build_has_no_warnings"
    inv = _inventory(html / "objects.inv")
    missing = []
    for modname in PUBLIC_MODULES:
        if inv.get(modname) != "py:module":
            missing.append(modname)
        for name, obj in _public(modname)[1]:
            full = obj.__name__ if inspect.ismodule(obj) else f"{modname}.{name}"
            if full not in inv:
                missing.append(full)
            if inspect.isclass(obj):
                missing += [f"{full}.{m}" for m, _ in _public_members(obj) if f"{full}.{m}" not in inv]
    assert not missing, f"public names missing from the API reference: {missing}"
    # the C kernels are documented as functions of batchnorm, with their signatures
    assert inv["batchnorm.forward_train"] == "py:function"
    with open(html / "api" / "batchnorm.html", encoding="utf-8") as f:
        page = f.read()
    assert "stats_dtype" in page and "running_mean" in page


def _readme_between(start, end):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return readme.split(start, 1)[1].split(end, 1)[0]


def test_pages_include_readme_and_notebook(built_site):
    """The guide pages carry the README's sections with their figures and tables, the quick start its
    two commands, the notebook page the notebook's cells and plot."""
    _, html = built_site

    def page(name):
        with open(html / name, encoding="utf-8") as f:
            return f.read()

    def text(name):
        return html_module.unescape(re.sub(r"<[^>]+>", "", page(name)))

    quick = _readme_between("## Quick start", "## Documentation")
    commands = [line for line in re.search(r"```bash\n(.*?)```", quick, re.S).group(1).splitlines()
                if line and not line.startswith("#")]
    assert len(commands) == 2
    for command in commands:
        assert command in text("getting-started.html"), command
    for name, start, end in [("user-guide.html", "<!-- demo:start -->", "<!-- demo:end -->"),
                             ("performance.html", "<!-- bench:start -->", "<!-- bench:end -->")]:
        section = _readme_between(start, end)
        images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
        assert images, f"no figure between {start} and {end}"
        for image in images:
            base = os.path.basename(image)
            assert f"_images/{base}" in page(name) and (html / "_images" / base).exists(), base
        tables = len(re.findall(r"^\|[-:| ]+\|$", section, re.M))
        assert page(name).count("<table") >= tables > 0, name
    assert "SyncBatchNorm" in text("scaling-out.html") and "mpiexec -n 4" in text("scaling-out.html")
    notebook = page("notebook.html")
    assert "batchnorm quickstart" in notebook and "data:image/png;base64," in notebook
    assert "fold_into" in notebook
