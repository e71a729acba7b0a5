"""Per-gene scores across held-out spots (never per spot across genes)."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r of each gene across spots: (N,G),(N,G) -> (G,); NaN where a side is constant."""
    p = np.asarray(pred, np.float64)
    t = np.asarray(true, np.float64)
    p = p - p.mean(axis=0)
    t = t - t.mean(axis=0)
    den = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(axis=0) / den
    r[den <= 1e-12] = np.nan
    return r


def spearman_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return pearson_per_gene(rankdata(pred, axis=0), rankdata(true, axis=0))


def mse_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return ((np.asarray(pred, np.float64) - np.asarray(true, np.float64)) ** 2).mean(axis=0)


def summarize(pred: np.ndarray, true: np.ndarray, top_genes: np.ndarray | None = None) -> dict:
    """Mean per-gene Pearson (NaN genes skipped, their count reported), Spearman, MSE."""
    r = pearson_per_gene(pred, true)
    out = {
        "pearson_mean": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
        "spearman_mean": float(np.nanmean(spearman_per_gene(pred, true))) if np.isfinite(r).any() else float("nan"),
        "mse": float(mse_per_gene(pred, true).mean()),
        "n_genes_scored": int(np.isfinite(r).sum()),
        "n_spots": int(len(true)),
    }
    if top_genes is not None and len(top_genes):
        rt = r[np.asarray(top_genes)]
        out["pearson_top"] = float(np.nanmean(rt)) if np.isfinite(rt).any() else float("nan")
    return out
