"""The demo's command line: ``python -m batchnorm.demo [EXPERIMENT] [options]``.

Each experiment is a module registered in :data:`EXPERIMENTS`; the command line gives it an ``argparse``
subcommand with its own options plus the shared ones (figure, JSON, seed, threads, progress), runs it,
prints its report, writes the JSON and saves its figure. With no experiment named, :data:`DEFAULT` runs,
so ``python -m batchnorm.demo --quick`` is ``python -m batchnorm.demo fig1 --quick``.

An experiment module provides:

``NAME``, ``HELP``, ``DESCRIPTION``
    Its subcommand, a one-line summary for the listing, and the description of its ``--help``.
``DEFAULT_OUT``
    Default path of its figure (``--out``).
``add_arguments(parser)``
    Adds its own options to its subparser.
``run(args)``
    Runs it with the parsed options; returns JSON-able results.
``report(results)``
    The text printed after the run (tables, verdicts).
``plot(results, path)``
    Saves its figure to ``path``; returns the path, or None without matplotlib.

Adding an experiment is writing such a module and adding it to :data:`EXPERIMENTS`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

import batchnorm

from . import fig1

__all__ = ["EXPERIMENTS", "DEFAULT", "build_parser", "main"]

#: The experiments by subcommand name, in the order ``--help`` lists them.
EXPERIMENTS = {fig1.NAME: fig1}

#: The experiment that runs when none is named (the demo's original and only one, before subcommands).
DEFAULT = fig1.NAME

_PROG = "python -m batchnorm.demo"


def _add_shared_arguments(parser, experiment):
    """The options every experiment takes: where its outputs go and how the run uses the machine."""
    parser.add_argument("--out", default=experiment.DEFAULT_OUT, metavar="PNG",
                        help="where to save the training curves (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="do not save a figure")
    parser.add_argument("--json", metavar="PATH", help="also write all settings, results and curves as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, init and batches (default 0)")
    parser.add_argument("--threads", type=int, help="batchnorm.set_num_threads(N) before training")
    parser.add_argument("--blas-threads", type=int, default=1, metavar="N",
                        help="threads for NumPy's matrix products, through threadpoolctl when installed "
                             "(default 1: these matrices are tiny; 0 leaves the BLAS default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or lines")


def build_parser(experiments=None, default=None):
    """The ``argparse`` parser: one subcommand per experiment, in ``args.experiment``.

    Parameters
    ----------
    experiments : dict, optional
        Name -> experiment module; :data:`EXPERIMENTS` by default.
    default : str, optional
        The experiment run when none is named; :data:`DEFAULT` by default. Its options are listed in the
        top-level ``--help``.

    Returns
    -------
    argparse.ArgumentParser
    """
    experiments = EXPERIMENTS if experiments is None else experiments
    default = DEFAULT if default is None else default
    parser = argparse.ArgumentParser(
        prog=_PROG, usage=f"{_PROG} [EXPERIMENT] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Small experiments with batchnorm's layers in a plain NumPy training loop on\n"
                    f"scikit-learn's digits. Without an EXPERIMENT, runs {default!r}.")
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", title="experiments")
    for name, experiment in experiments.items():
        summary = experiment.HELP + (" (the default)" if name == default else "")
        p = sub.add_parser(name, help=summary, description=experiment.DESCRIPTION,
                           prog=f"{_PROG} {name}")
        experiment.add_arguments(p)
        _add_shared_arguments(p, experiment)
        if name == default:
            parser.epilog = (f"{name!r}, the default, takes these options (as '{_PROG} {name} --help' "
                             "shows):\n\n" + p.format_help())
    return parser


def _limit_blas_threads(n):
    """A context that limits the BLAS (NumPy matmul) thread pool to n threads, and a description.

    The demo's matrices are tiny (60 x 100 x 100): a multi-threaded BLAS only adds synchronization,
    and on a busy machine its spinning threads can make a run many times slower. batchnorm's own
    threads are not affected (its kernels run these small batches on one thread anyway).
    """
    if not n:
        return contextlib.nullcontext(), "BLAS default"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext(), "BLAS default (install threadpoolctl to limit it)"
    return threadpool_limits(limits=n, user_api="blas"), f"{n} BLAS thread(s)"


def main(argv=None):
    """Run the experiment named on the command line (or the default one).

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``python -m batchnorm.demo``; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        The exit status: 0, or 2 when scikit-learn is missing. Bad options exit through ``argparse``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # No experiment named (nothing, or an option first): the default one, so that every command line of
    # the demo from before it had experiments still works. '-h' alone stays the top-level help, and an
    # unknown word is left for argparse to refuse with the list of experiments.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = [DEFAULT] + argv
    args = build_parser().parse_args(argv)
    experiment = EXPERIMENTS[args.experiment]
    if args.threads is not None:
        batchnorm.set_num_threads(args.threads)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("batchnorm.demo needs scikit-learn for its data set (load_digits): "
              "pip install scikit-learn", file=sys.stderr)
        return 2
    limit, blas = _limit_blas_threads(args.blas_threads)
    print(f"batchnorm {batchnorm.__version__} (numpy {np.__version__}), "
          f"{batchnorm.get_num_threads()} batchnorm thread(s), {blas}")
    with limit:
        results = experiment.run(args)
    print(experiment.report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, allow_nan=True)
        print(f"\nResults written to {os.path.abspath(args.json)}")
    if not args.no_plot:
        path = experiment.plot(results, args.out)
        if path is None:
            print("\nmatplotlib is not installed: no figure (pip install matplotlib)")
        else:
            print(f"\nTraining curves saved to {os.path.abspath(path)}")
    return 0
