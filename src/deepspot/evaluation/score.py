"""Score a trained spot model on annotated samples it was not trained on: per-gene Pearson / Spearman
across each sample's spots, a per-sample summary, optionally ridge on the same features beside it."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from deepspot.config import ModelConfig, invert_scaler
from deepspot.evaluation.metrics import pearson_per_gene, spearman_per_gene
from deepspot.models.bags import predict_bags
from deepspot.reliability import DEFAULT_LEVEL, Reliability, coverage_per_gene, head_spread, intervals_for, \
    spread_to_expression
from deepspot.training.manifest import Sample
from deepspot.training.multi_sample import sample_features, stack_bags
from deepspot.training.targets import check_panel, log_normalize, rank_hvgs


def score_samples(network, config: ModelConfig, encoder, samples: Sequence[Sample], n_top: int = 50,
                  features: dict | None = None,
                  ridge_train: Sequence[Sample] | None = None,
                  interval: float | None = DEFAULT_LEVEL) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Predict at the annotated spots of each sample and compare with its counts.

    Returns (per_gene: sample_id, gene, pearson, spearman, n_spots, note — 'constant in truth' /
    'constant in prediction' where r is undefined; summary: one row per sample with the mean per-gene
    Pearson over the model's genes and over the top-``n_top`` HVGs of that sample's truth;
    predictions by sample id, (N, G) in the sample's spot order). ``ridge_train``: samples to fit the
    field's baseline on (PCA-256 + ridge on the same spot features, the model's genes); its per-gene
    Pearson and means are added as ``ridge_*`` columns. ``noise_band_model_genes``: the 95th percentile of
    the mean per-gene Pearson of the predictions with the spots shuffled (what no spot-to-spot signal
    scores by chance on that sample).

    Reliability (:mod:`deepspot.reliability`): per gene ``val_pearson`` (stored at training; NaN for a
    model without validation) and ``coverage`` (share of the sample's spots whose truth lies inside the
    ``interval`` conformal interval; NaN without a calibration); per sample their means, the Spearman
    rank correlation across genes of val_pearson vs the sample's Pearson (``reliability_spearman``), the
    number of reliable genes and their mean Pearson.

    The feature cache and the progress bar are :data:`deepspot.settings` (``cache_dir``, ``progress``)."""
    from deepspot.config.runtime import settings

    genes = list(config.genes)
    check_panel(genes, {s.sample_id: s.adata for s in samples})  # a missing panel gene: one clear error
    n_sub = config.geometry.n_sub if "subspot" in config.context else 0
    feats = features if features is not None else sample_features(samples, encoder, n_sub)
    ridge = None
    if ridge_train:
        from deepspot.evaluation.baseline import ridge_baseline

        check_panel(genes, {s.sample_id: s.adata for s in ridge_train})
        # the model's crop geometry: the training samples' feature stores are the ones training filled
        tf = (features if features is not None and all(s.sample_id in features for s in ridge_train)
              else sample_features(ridge_train, encoder, n_sub))
        x_tr = np.concatenate([tf[s.sample_id].spot for s in ridge_train])
        y_tr = np.concatenate([log_normalize(s.adata, genes=genes) for s in ridge_train])
        ridge = {s.sample_id: ridge_baseline(x_tr, y_tr, feats[s.sample_id].spot) for s in samples}
    per_gene, summary, preds = [], [], {}
    pos = {g: j for j, g in enumerate(genes)}
    rel = Reliability.of(config)
    calib, _ = intervals_for(config, interval)
    nan_g = np.full(len(genes), np.nan)
    val_r = nan_g if rel is None else rel.val_pearson
    from rich.progress import track

    from deepspot.evaluation.cv import noise_band

    for s in track(samples, description="scoring", disable=not settings.progress or len(samples) < 2):
        bags, _ = stack_bags([s], feats, config.geometry.neighbor_radius)
        with head_spread(network if calib is not None and calib.mode == "head_spread" else None) as spreads:
            pred = invert_scaler(predict_bags(network, bags), config.scaler)
        truth = log_normalize(s.adata, genes=genes)
        cov = nan_g
        if calib is not None:
            spread = spread_to_expression(np.concatenate(spreads), config.scaler) if spreads else None
            lo, hi = calib.bounds(pred, spread, interval)
            cov = coverage_per_gene(lo, hi, truth)
        preds[s.sample_id] = pred
        r, rho = pearson_per_gene(pred, truth), spearman_per_gene(pred, truth)
        rr = None if ridge is None else pearson_per_gene(ridge[s.sample_id], truth)
        const_t, const_p = truth.std(axis=0) <= 1e-12, pred.std(axis=0) <= 1e-12
        for j, g in enumerate(genes):
            note = "constant in truth" if const_t[j] else ("constant in prediction" if const_p[j] else "")
            per_gene.append({"sample_id": s.sample_id, "gene": g, "pearson": r[j], "spearman": rho[j],
                             "n_spots": s.adata.n_obs, "note": note, "val_pearson": val_r[j], "coverage": cov[j],
                             **({} if rr is None else {"ridge_pearson": rr[j]})})
        top = rank_hvgs({s.sample_id: s.adata[:, genes]}, min(n_top, len(genes)))
        ti = [pos[g] for g in top]
        rt = r[ti]
        summary.append({"sample_id": s.sample_id, "n_spots": s.adata.n_obs,
                        "pearson_mean_model_genes": float(np.nanmean(r)) if np.isfinite(r).any() else np.nan,
                        f"pearson_mean_top{n_top}_hvg": float(np.nanmean(rt)) if np.isfinite(rt).any() else np.nan,
                        "n_genes": len(genes), "n_genes_undefined": int((~np.isfinite(r)).sum()),
                        "noise_band_model_genes": noise_band(pred, truth, np.arange(len(genes))),
                        "val_pearson_mean": float(np.nanmean(val_r)) if np.isfinite(val_r).any() else np.nan,
                        "coverage_mean": float(np.mean(cov)) if calib is not None else np.nan,
                        "interval": float(interval) if calib is not None else np.nan,
                        "reliability_spearman": _rank_agreement(val_r, r),
                        "n_reliable": int(rel.reliable.sum()) if rel is not None else np.nan,
                        "pearson_mean_reliable": (float(np.nanmean(r[rel.reliable]))
                                                  if rel is not None and rel.reliable.any() else np.nan),
                        **({} if rr is None else {"ridge_pearson_mean_model_genes": float(np.nanmean(rr)),
                                                  f"ridge_pearson_mean_top{n_top}_hvg": float(np.nanmean(rr[ti]))})})
    return pd.DataFrame(per_gene), pd.DataFrame(summary), preds


def _rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two per-gene vectors over the genes where both are finite (NaN for < 3)."""
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else float("nan")


__all__ = ["score_samples"]
