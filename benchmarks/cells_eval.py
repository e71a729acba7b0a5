"""Cell-level predictions on the bundled Xenium lung H&E (NCBI858, 200 cells × 338 genes), held-out side.

1. DeepCell trained on true cells (right-most 30 % of cells held out) next to ridge on the same cell-tile
   features.
2. DeepSpot2Cell (the published architecture, and the deepspot2cell-pooled variant) trained on pseudo-spots only (cells pooled on a hex grid; right-most 30 % of spots held
   out; the cells' own counts held back), scored per cell against the true cell counts, next to
   "each cell gets its spot's predicted value" (DeepSpot trained on the same pseudo-spots and split) and
   "each cell gets its spot's true value ÷ its cell count".
3. A planted-signal check of DeepSpot2Cell: the same cells, features and pseudo-spots, but per-cell
   counts drawn from a known function of each cell's own features — can spot-only training recover
   variation *within* spots?

Scores: per-gene Pearson across held-out cells (log1p normalize_total 1e4 per cell), mean over genes
(genes constant on the held-out cells skipped) and over the 50 genes most expressed in training; "noise"
is the 95th percentile of |mean Pearson| when the held-out cells' predictions are shuffled among them.

    python benchmarks/cells_eval.py --out cells_eval_out

Prints the table, writes scores.csv and cells_pred_vs_true.png into --out (features cached there).
"""
from __future__ import annotations

import argparse
import time
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.evaluation.metrics import pearson_per_gene, summarize
from deepspot.features.extract import extract_features
from deepspot.features.encoders import load_encoder
from deepspot.geometry.grid import GridSpec
from deepspot.config import CellGeometry
from deepspot.config import SpotGeometry
from deepspot.config.runtime import settings
from deepspot.io.datasets import ncbi858
from deepspot.io.outputs import write_csv
from deepspot.io.slides import open_slide
from deepspot.models.bags import predict_bags
from deepspot.plotting import cell_predictions
from deepspot.training.fit_cells import train_cell_model, train_spot2cell_from_cells, train_spot2cell_model
from deepspot.training.spots import bags_for, train_spot_model


def noise_level(pred: np.ndarray, true: np.ndarray, n_perm: int = 200, seed: int = 0) -> float:
    """95th percentile of |mean per-gene Pearson| with the predictions shuffled across cells."""
    rng = np.random.default_rng(seed)
    null = [summarize(pred[rng.permutation(len(pred))], true)["pearson_mean"] for _ in range(n_perm)]
    return float(np.nanpercentile(np.abs(null), 95))


def row(item: str, method: str, supervision: str, pred: np.ndarray, true: np.ndarray, top: np.ndarray,
        n_perm: int) -> dict:
    s = summarize(pred, true, top_genes=top)
    return {"item": item, "method": method, "trained on": supervision, "held-out cells": s["n_spots"],
            "genes scored": s["n_genes_scored"], "pearson (all genes)": s["pearson_mean"],
            "pearson (top-50)": s["pearson_top"], "spearman": s["spearman_mean"],
            "noise ±": noise_level(pred, true, n_perm)}


def top_genes(genes: list[str], mean_expr: np.ndarray, n: int = 50) -> np.ndarray:
    return np.argsort(-mean_expr)[:min(n, len(genes))]


def planted_cells(cells: ad.AnnData, feats: np.ndarray, n_genes: int = 20, seed: int = 0) -> ad.AnnData:
    """Counts drawn from each cell's own features: Poisson(exp(top-5 PCs of the features @ W))."""
    rng = np.random.default_rng(seed)
    z = feats - feats.mean(0)
    u, s_, _ = np.linalg.svd(z, full_matrices=False)
    pcs = u[:, :5] * np.sqrt(len(z))  # unit-variance principal components
    rate = 10 * np.exp(pcs @ (rng.normal(size=(5, n_genes)) * 0.7) - 1)
    out = ad.AnnData(rng.poisson(rate).astype(np.float32),
                     var=pd.DataFrame(index=[f"planted{i}" for i in range(n_genes)]))
    out.obsm["spatial"] = np.asarray(cells.obsm["spatial"])
    return out


def label(kind: str, aggregate: str) -> str:
    return "DeepSpot2Cell (published)" if kind == "deepspot2cell" else f"DeepSpot2Cell-pooled ({aggregate})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("cells_eval_out"))
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--spot-px", type=float, default=120.0, help="pseudo-spot diameter = spacing (px)")
    ap.add_argument("--k", type=int, default=45, help="neighbour cells (kNN)")
    ap.add_argument("--aggregate", default="sum", choices=["sum", "mean"], help="deepspot2cell-pooled's aggregation")
    ap.add_argument("--models", nargs="+", default=["deepspot2cell", "deepspot2cell-pooled"],
                    choices=["deepspot2cell", "deepspot2cell-pooled"], help="DeepSpot2Cell architectures to train")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--n-perm", type=int, default=200)
    ap.add_argument("--no-planted", action="store_true", help="skip the planted-signal check")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "features"
    cells, image, meta = ncbi858(args.data_dir)
    enc = load_encoder(args.encoder)
    geo = CellGeometry(float(meta.get("cell_diameter", 20)), unit="px", neighbors="knn", k=args.k)
    train_kw = dict(lr=args.lr, max_epochs=args.max_epochs, patience=args.patience, seed=args.seed, progress=False)
    print(f"NCBI858: {cells.n_obs} cells × {cells.n_vars} genes; {geo.describe()}; encoder {enc.name}; "
          f"lr {args.lr:g}, ≤{args.max_epochs} epochs, early stop {args.patience}")

    # 1. DeepCell on true cells
    t = time.perf_counter()
    dc = train_cell_model(image, cells, enc, geo, cache_dir=cache, **train_kw)
    tr_c, va_c, te_c = dc.split
    y_c = dc.truth
    top_c = top_genes(dc.genes, y_c[np.r_[tr_c, va_c]].mean(0))
    from deepspot.evaluation.baseline import ridge_baseline

    ridge = ridge_baseline(dc.features[np.r_[tr_c, va_c]], y_c[np.r_[tr_c, va_c]], dc.features[te_c], seed=args.seed)
    rows = [row("1", "DeepCell", "cells", dc.cell_pred[te_c], y_c[te_c], top_c, args.n_perm),
            row("1", "ridge (cell tile features)", "cells", ridge, y_c[te_c], top_c, args.n_perm)]
    print(f"[1] DeepCell: {dc.fit_summary['epochs']} epochs (best {dc.fit_summary['best_epoch']}), "
          f"{time.perf_counter() - t:.0f} s")

    # 2. DeepSpot2Cell on pseudo-spots (each architecture asked for); DeepSpot on the same pseudo-spots and split
    grid = GridSpec(args.spot_px, args.spot_px, layout="hex", unit="px")
    fits = {}
    for kind in args.models:
        t = time.perf_counter()
        fits[kind] = train_spot2cell_from_cells(image, cells, enc, grid, geometry=geo, aggregate=args.aggregate,
                                                cache_dir=cache, model=kind, **train_kw)
        print(f"[2] {kind}: {fits[kind].fit_summary['epochs']} epochs, {time.perf_counter() - t:.0f} s")
    s2c = fits[args.models[0]]
    spots, c2s, test_cells = s2c.spots, s2c.cell_to_spot, s2c.test_cells
    print(f"[2] {spots.n_obs} pseudo-spots ({args.spot_px:g} px) hold {int((c2s >= 0).sum())} cells "
          f"(cells per spot: {np.bincount(np.bincount(c2s[c2s >= 0])).tolist()}); held out: "
          f"{len(s2c.split[2])} spots, {len(test_cells)} cells")
    t = time.perf_counter()
    sgeo = SpotGeometry(grid, n_sub=3, neighbor_radius=1)
    with settings.override(cache_dir=cache, progress=False):  # train_spot_model reads them from ds.settings
        ds = train_spot_model(image, spots, enc, sgeo, genes=s2c.genes,
                              **{k: v for k, v in train_kw.items() if k != "progress"})
    assert np.array_equal(ds.split[2], s2c.split[2]), "held-out spots differ"  # (validation: its own blocks)
    spot_pred = predict_bags(ds.model, bags_for(spots, ds.features, sgeo.neighbor_radius))
    print(f"[2] DeepSpot baseline: {ds.fit_summary['epochs']} epochs, {time.perf_counter() - t:.0f} s")
    y_s = s2c.truth
    top_s = top_genes(s2c.genes, s2c.spot_targets[np.r_[s2c.split[0], s2c.split[1]]].mean(0))
    sp = c2s[test_cells]
    for kind, res in fits.items():
        assert res.genes == s2c.genes and np.array_equal(res.test_cells, test_cells)
        rows.append(row("2", label(kind, args.aggregate), "pseudo-spots", res.cell_pred[test_cells], y_s[test_cells],
                        top_s, args.n_perm))
    rows += [row("2", "spot's DeepSpot prediction", "pseudo-spots", spot_pred[sp], y_s[test_cells], top_s, args.n_perm),
             row("2", "spot's true value ÷ n cells", "(test spots' truth)", s2c.spot_targets[sp], y_s[test_cells],
                 top_s, args.n_perm)]

    # 3. planted signal: same cells, features, pseudo-spots and split; counts from each cell's own features
    if not args.no_planted:
        planted = planted_cells(cells, s2c.features)
        member = c2s >= 0
        assign = np.zeros((spots.n_obs, cells.n_obs), np.float32)
        assign[c2s[member], np.flatnonzero(member)] = 1.0
        p_spots = ad.AnnData(assign @ np.asarray(planted.X), var=planted.var.copy())
        p_spots.obsm["spatial"] = np.asarray(spots.obsm["spatial"])
        p_spots.obs = spots.obs.copy()
        spot_feats = extract_features(image, np.asarray(spots.obsm["spatial"]), args.spot_px, enc, n_sub=0,
                                      cache_dir=cache, progress=False).spot
        stand_in = types.SimpleNamespace(name=enc.name, dim=enc.dim)
        for kind in args.models:
            t = time.perf_counter()
            pl = train_spot2cell_model(image, p_spots, cells.obsm["spatial"], c2s, stand_in, geo, features=s2c.features,
                                       spot_features=spot_feats, spot_grid=grid, aggregate=args.aggregate,
                                       cell_counts=planted, model=kind, **train_kw)
            top_p = np.arange(len(pl.genes))
            rows.append(row("3 planted", label(kind, args.aggregate), "pseudo-spots", pl.cell_pred[pl.test_cells],
                            pl.truth[pl.test_cells], top_p, args.n_perm))
            print(f"[3] planted signal, {kind}: {pl.fit_summary['epochs']} epochs, {time.perf_counter() - t:.0f} s")
        rows.append(row("3 planted", "spot's true value ÷ n cells", "(test spots' truth)",
                        pl.spot_targets[c2s[pl.test_cells]], pl.truth[pl.test_cells], top_p, args.n_perm))

    table = pd.DataFrame(rows).set_index(["item", "method"])
    write_csv(table, out / "scores.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))

    # figure: held-out cells of item 2; DeepCell shown on those of its own held-out cells
    genes = [s2c.genes[i] for i in np.argsort(-s2c.spot_targets[s2c.split[0]].var(0))[:4]]
    n = cells.n_obs

    def cells_only(values, which, panel):
        full = np.full((n, len(s2c.genes)), np.nan)
        cols = [panel.index(g) for g in s2c.genes]
        full[which] = np.asarray(values)[:, cols]
        return full

    sp_pred = np.full((n, len(s2c.genes)), np.nan)
    sp_pred[test_cells] = spot_pred[sp]
    panels = {"true (held back)": cells_only(y_s[test_cells], test_cells, s2c.genes),
              **{label(k, args.aggregate): cells_only(r.cell_pred[test_cells], test_cells, s2c.genes)
                 for k, r in fits.items()},
              "spot's DeepSpot value": sp_pred,
              "DeepCell": cells_only(dc.cell_pred[np.intersect1d(te_c, test_cells)],
                                     np.intersect1d(te_c, test_cells), dc.genes)}
    with open_slide(image) as slide:
        thumb = slide.get_thumbnail(2000)
        scale = thumb.shape[1] / slide.dimensions[0]
    png = out / "cells_pred_vs_true.png"
    cell_predictions(cells.obsm["spatial"], panels, genes, s2c.genes, image=thumb, scale=scale,
                     cell_px=geo.cell_diameter, pearson=pearson_per_gene, path=png,
                     title="NCBI858 held-out cells: log1p-normalised expression (grey rings: not scored)")
    print(f"wrote {out / 'scores.csv'}, {png} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
