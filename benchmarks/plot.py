#!/usr/bin/env python
"""Draw the JSON written by ``bench.py --json`` as one picture.

    python benchmarks/plot.py results.json [out.png] [--threads T]

One panel per op (train forward, inference forward, backward); in each, one group of bars per case:
the time of ours, torch and the NumPy reference divided by the case's bandwidth limit (the row's
``limit_s``: the time the copy timed in the same rounds needs to move the op's least two-pass traffic,
the report's eff2), on a log scale. 1 is the limit, lower is better; the number above each bar is that
ratio. Default output: docs/bench.png.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

OPS = [("train", "training forward"), ("infer", "inference forward"), ("backward", "backward (training)")]
SERIES = [("ours", "ours_s", "#1f77b4"), ("torch", "torch_s", "#ff7f0e"), ("NumPy reference", "numpy_s", "#7f7f7f")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", help="file written by bench.py --json")
    ap.add_argument("out", nargs="?", default=os.path.join("docs", "bench.png"), help="PNG to write")
    ap.add_argument("--threads", type=int, help="thread count to show (default: the largest measured)")
    args = ap.parse_args(argv)

    with open(args.json) as f:
        data = json.load(f)
    meta, cases = data["meta"], data["cases"]
    T = args.threads or max(meta["threads"])
    names = [c["case"] for c in cases]
    series = [s for s in SERIES if any(r.get(s[1]) for c in cases for r in c["rows"])]

    fig, axes = plt.subplots(1, len(OPS), figsize=(5.2 * len(OPS), 5.6), sharey=True)
    width = 0.8 / len(series)
    x = np.arange(len(cases))
    ymax = 1.0
    for ax, (op, title) in zip(axes, OPS):
        for j, (label, key, color) in enumerate(series):
            vals = []
            for c in cases:
                row = next((r for r in c["rows"] if r["op"] == op and r["variant"] == "plain"
                            and r["threads"] == T), None)
                vals.append(row[key] / row["limit_s"] if row and row.get(key) else np.nan)
            vals = np.array(vals, float)
            xs = x + (j - (len(series) - 1) / 2) * width
            ax.bar(xs, vals, width, label=label, color=color, zorder=2)
            for xi, v in zip(xs, vals):
                if np.isfinite(v):
                    ax.text(xi, v * 1.06, f"{v:.2g}" if v < 10 else f"{v:.0f}", ha="center", va="bottom",
                            fontsize=7, rotation=90)
            if np.isfinite(vals).any():
                ymax = max(ymax, np.nanmax(vals))
        ax.axhline(1.0, color="k", lw=1.2, ls="--", zorder=3)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3, zorder=0)
    axes[0].set_ylim(0.5, ymax * 12)  # head room for the labels above the bars
    axes[0].set_ylabel("time / bandwidth limit  (log; 1 = limit, lower is better)")
    axes[0].text(-0.45, 1.03, "bandwidth limit", fontsize=8, va="bottom")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(series), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 0.95))
    torch_v = meta.get("torch") or "not installed"
    fig.suptitle(f"Batch Normalization on {meta['cpu']}, {T} thread{'s' if T > 1 else ''}: batchnorm "
                 f"{meta['batchnorm']} vs torch {torch_v} vs NumPy {meta['numpy']} (reference, 1 thread)"
                 + ("  [--quick]" if meta.get("quick") else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
