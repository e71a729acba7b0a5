"""Scores of a single-image training run on its held-out side (the spatial split of
:func:`deepspot.training.spots.spatial_split`), next to baselines on the same features.

- DeepSpot: per-gene Pearson/Spearman/MSE on the test spots, and PCA + ridge on the spot features.
- DeepCell: the same on the test cells, ridge on the cell tile features.
- DeepSpot2Cell: the spot predictions on the test spots; with the cells' own counts, the cells of the
  test spots against their true expression, next to "each cell gets its spot's true value".
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from deepspot.evaluation.baseline import ridge_baseline
from deepspot.evaluation.metrics import summarize
from deepspot.training.fit_cells import CellTrainResult
from deepspot.training.spots import SpotTrainResult


def score_holdout(res: SpotTrainResult | CellTrainResult) -> dict:
    """Score ``res`` on its test split: {name: summary}. Also stored in ``res.scores`` and in its config
    (so the checkpoint records them)."""
    train, val, test = res.split
    seed = int(res.config.training.get("seed", 2024))
    if isinstance(res, SpotTrainResult):
        seen = np.concatenate([train, val])
        y, x = res.targets, res.features.spot
        ridge = ridge_baseline(x[seen], y[seen], x[test], seed=seed)
        scores = {"deepspot": summarize(res.pred[test], y[test]), "ridge": summarize(ridge, y[test])}
    elif res.config.model == "deepcell":
        seen = np.concatenate([train, val])
        y, x = res.truth, res.features
        ridge = ridge_baseline(x[seen], y[seen], x[test], seed=seed)
        # clipped to each gene's training range, as DeepCell's own predictions are (unclipped, a few cells
        # far outside it gave ridge an MSE of 20 against DeepCell's 2)
        ridge = np.clip(ridge, y[seen].min(axis=0), y[seen].max(axis=0))
        scores = {"deepcell": summarize(res.cell_pred[test], y[test]), "ridge": summarize(ridge, y[test])}
    else:
        y, cells = res.spot_targets, res.test_cells
        scores = {"deepspot2cell (spots)": summarize(res.spot_pred[test], y[test])}
        if res.truth is not None:
            scores["deepspot2cell"] = summarize(res.cell_pred[cells], res.truth[cells])
            scores["spot truth ÷ n cells"] = summarize(y[res.cell_to_spot[cells]], res.truth[cells])
    res.scores = scores
    res.config = res.config.replace(scores=scores)
    return scores


def score_table(scores: dict) -> pd.DataFrame:
    """One row per scored model: mean Pearson and Spearman over genes, MSE, genes and spots (or cells:
    DeepCell, DeepSpot2Cell's cell rows) scored."""
    cell_rows = {"deepcell", "deepspot2cell", "spot truth ÷ n cells"}
    kinds = {"cells" if name in cell_rows or (name == "ridge" and "deepcell" in scores) else "spots"
             for name in scores}
    unit = kinds.pop() if len(kinds) == 1 else "spots or cells"  # DeepSpot2Cell: a spot row and cell rows
    rows = {name: {"pearson (mean over genes)": s["pearson_mean"], "spearman": s["spearman_mean"],
                   "mse": s["mse"], "genes scored": s["n_genes_scored"], f"held-out {unit}": s["n_spots"]}
            for name, s in scores.items()}
    return pd.DataFrame.from_dict(rows, orient="index")
