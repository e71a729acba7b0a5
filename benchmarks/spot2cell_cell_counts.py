"""Both DeepSpot2Cell architectures on a planted signal, with the same cell count in every spot and with
varying counts: does the per-cell prediction follow each cell's own expression?

Planted data (no image is read; the bundled NCBI858 image only gives the frame): 80 spots on a square grid;
each cell's counts are Poisson(20·exp(f·W − 1)) of its own 6-d features f; a spot's counts are its cells'
sum; the spot tile's features are the mean of its cells'. Trained on the spot sums only (right-most 30 % of
spots held out), scored per cell (per-gene Pearson, mean over genes) against the cells' own
log1p-normalised counts, next to "each cell gets its spot's true profile". Three seeds (each draws the
planted data and seeds the training), 200 epochs, lr 1e-2, hidden 32, 2 heads, no dropout in phi/rho
(the published output dropout 0.1 of ``deepspot2cell`` stays unless ``--dropout-out`` says otherwise).

    python benchmarks/spot2cell_cell_counts.py [--seeds 0,1,2] [--counts '3;1,2,3,8']
"""
from __future__ import annotations

import argparse
import types

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.config import CellGeometry, GridSpec
from deepspot.evaluation.holdout import score_holdout
from deepspot.io.datasets import ncbi858
from deepspot.training.fit_cells import train_spot2cell_model


def planted(sizes: list[int], n_spots: int = 80, d: int = 6, g: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    c2s = np.repeat(np.arange(n_spots), [sizes[i % len(sizes)] for i in range(n_spots)])
    f = rng.normal(size=(len(c2s), d)).astype(np.float32)
    counts = rng.poisson(20 * np.exp(f @ (rng.normal(size=(d, g)) * 0.9) - 1)).astype(np.float32)
    rows, cols = np.divmod(np.arange(n_spots), 10)
    spot_xy = np.c_[60 + 120 * cols, 60 + 120 * rows].astype(float)
    xy = spot_xy[c2s] + rng.uniform(-30, 30, size=(len(c2s), 2))
    var = pd.DataFrame(index=[f"g{i}" for i in range(g)])
    spots = ad.AnnData(np.stack([counts[c2s == s].sum(0) for s in range(n_spots)]), var=var,
                       obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(n_spots)]))
    spots.obsm["spatial"] = spot_xy
    spot_f = np.stack([f[c2s == s].mean(0) for s in range(n_spots)])
    return spots, xy, c2s, f, spot_f, ad.AnnData(counts, var=var.copy())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated: each seed draws the planted data and "
                    "seeds the training")
    ap.add_argument("--counts", default="3;1,2,3,8", help="';'-separated cell-count patterns")
    ap.add_argument("--models", default="deepspot2cell,deepspot2cell-pooled")
    ap.add_argument("--dropout-out", type=float, default=None,
                    help="deepspot2cell: rho's output dropout (default: the published 0.1)")
    args = ap.parse_args(argv)
    image = ncbi858(args.data_dir)[1]
    rows = []
    for pattern in args.counts.split(";"):
        sizes = [int(v) for v in pattern.split(",")]
        for seed in [int(v) for v in args.seeds.split(",")]:
            spots, xy, c2s, f, spot_f, cells = planted(sizes, seed=seed)
            for kind in args.models.split(","):
                extra = {"dropout_out": args.dropout_out} if kind == "deepspot2cell" and args.dropout_out is not None else {}
                res = train_spot2cell_model(image, spots, xy, c2s, types.SimpleNamespace(name="planted", dim=f.shape[1]),
                                            CellGeometry(neighbors="none"), features=f, spot_features=spot_f,
                                            spot_grid=GridSpec(120, 120, "square", "px"), cell_counts=cells, hidden=32,
                                            n_ensemble=2, dropout=0.0, lr=args.lr, max_epochs=args.max_epochs,
                                            patience=args.max_epochs, batch_size=16, progress=False, model=kind,
                                            seed=seed, **extra)
                s = score_holdout(res)
                rows.append({"cells per spot": pattern, "seed": seed, "model": kind,
                             "best epoch": res.fit_summary["best_epoch"],
                             "spots": s["deepspot2cell (spots)"]["pearson_mean"],
                             "cells": s["deepspot2cell"]["pearson_mean"],
                             "cells given their spot's truth": s["spot truth ÷ n cells"]["pearson_mean"]})
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1,
                                                        float_format=lambda v: f"{v:.3f}"), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    summary = table.groupby(["cells per spot", "model"], sort=False)[["spots", "cells", "cells given their spot's truth"]]
    print(summary.agg(["min", "max"]).to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
