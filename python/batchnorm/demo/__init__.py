"""Batch normalization in practice: small experiments with batchnorm's layers on scikit-learn's digits.

Run them with::

    python -m batchnorm.demo            # the default experiment (fig1), about a minute or two on 2 cores
    python -m batchnorm.demo --quick    # shorter run, well under 20 s
    python -m batchnorm.demo --out curves.png --json results.json
    python -m batchnorm.demo fig1 --quick   # the same, naming the experiment
    python -m batchnorm.demo --help     # the experiments, and the default one's options
    python -m batchnorm demo --quick    # the same, through the package's command line

The experiments train small fully connected networks in plain NumPy (the layers are in
:mod:`batchnorm.examples`) on the 8x8 digits of :func:`sklearn.datasets.load_digits` (ships with
scikit-learn, nothing is downloaded), with a fixed seed and a stratified held-out test split. Each prints
a table, a verdict per claim computed from the measured numbers, and saves a PNG of its curves.

``fig1`` (:mod:`batchnorm.demo.fig1`) redoes Ioffe & Szegedy (2015), Figure 1: faster convergence and
higher learning rates with BN, and BN before vs after the nonlinearity.

The package's modules:

- :mod:`~batchnorm.demo.data`: loading the digits and the held-out split;
- :mod:`~batchnorm.demo.training`: model building, the SGD loop, evaluation, progress display;
- :mod:`~batchnorm.demo.claims`: how a claim's verdict is decided and phrased;
- :mod:`~batchnorm.demo.plots`: matplotlib without a display, small PNGs;
- :mod:`~batchnorm.demo.cli`: the command line and the registry of experiments;
- one module per experiment (:mod:`~batchnorm.demo.fig1`): its runs, tables, verdicts and figure.

The names importable from here are those of the demo from before it was a package (the demo
was ``fig1`` alone then): the first experiment's, and the parts it is built from.

Needs scikit-learn (for the data); matplotlib (the figure), tqdm (progress bars) and threadpoolctl
(to keep NumPy's BLAS on one thread for these tiny matrix products) are optional:
``pip install "batchnorm[demo]"`` installs them all.
"""

from __future__ import annotations

from .claims import CHANCE
from .cli import main
from .data import load_data
from .fig1 import (
    BASE_LR, FULL, PCT_LR, QUICK, RELU_LRS, RELU_YMIN, SIGMOID_LRS, TARGET, experiment_plan, format_tables,
    format_verdicts, plot, run_demo, verdicts,
)
from .training import BATCH_SIZE, HIDDEN, evaluate, evaluation_steps, make_model, train

__all__ = ["main", "run_demo", "make_model", "load_data", "train", "format_tables", "verdicts"]
