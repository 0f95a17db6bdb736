"""What the demo's figures share: matplotlib without a display, and small PNG files.

Each experiment draws its own figure (e.g. :func:`batchnorm.demo.fig1.plot`) with these helpers.
"""

from __future__ import annotations

import sys

__all__ = ["pyplot", "save", "shrink_png"]


def pyplot():
    """``matplotlib.pyplot``, or None when matplotlib is not installed.

    The non-interactive Agg backend is chosen unless pyplot was already imported (in a notebook, whose
    inline backend must stay), so that the demo runs on a machine without a display.
    """
    try:
        import matplotlib
        if "matplotlib.pyplot" not in sys.modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(fig, path):
    """Save ``fig`` to ``path``, close it, and shrink the file when it is a PNG; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.savefig(path)
    plt.close(fig)
    shrink_png(path)
    return path


def shrink_png(path):
    """Re-save a PNG with a 256-colour palette (about 3x smaller, same look); best effort."""
    if not str(path).lower().endswith(".png"):
        return
    try:
        from PIL import Image  # matplotlib depends on Pillow
        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    except Exception:  # noqa: BLE001 - the full-colour PNG is fine too
        pass
