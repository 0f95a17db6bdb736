"""The demo's data: scikit-learn's 8x8 digits, scaled to [0, 1], with a stratified held-out split."""

from __future__ import annotations

import numpy as np

__all__ = ["load_data"]


def load_data(seed=0, test_size=0.25):
    """Digits scaled to [0, 1], float32, stratified split: ``(x_train, y_train, x_test, y_test)``.

    Parameters
    ----------
    seed : int, optional
        ``random_state`` of the split.
    test_size : float, optional
        Fraction of the 1797 images held out for testing.

    Returns
    -------
    x_train, y_train, x_test, y_test : numpy.ndarray
        Images as float32 rows of 64 pixels, labels as integers 0..9.

    Raises
    ------
    ImportError
        When scikit-learn (which ships the data set, nothing is downloaded) is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ImportError(
            "batchnorm.demo needs scikit-learn for its data set (sklearn.datasets.load_digits); "
            "install it with:  pip install scikit-learn") from exc
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te
