"""Running a plan: encode its spots and predict them in chunks (steps 2-3 of :mod:`deepspot.inference.predict`),
the AnnData skeleton the predictions go into and its reliability annotations."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.config import ModelConfig, invert_scaler
from deepspot.config.runtime import settings
from deepspot.reliability import annotate_var, head_spread, intervals_for, spread_to_expression
from deepspot.features.extract import ExtractStats, check_mode, extract_features, extract_to_store, store_path_for
from deepspot.features.views import N_VIEWS, view_tag
from deepspot.io.outputs import add_spatial_image
from deepspot.models.bags import iter_predictions
from deepspot.inference.plan import SlidePlan


def _obs(grid: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"array_row": grid["array_row"].to_numpy(), "array_col": grid["array_col"].to_numpy(),
                         "in_tissue": np.ones(len(grid), dtype=int)},
                        index=[f"{r}x{c}" for r, c in zip(grid["array_row"], grid["array_col"])])


def _skeleton(plan: SlidePlan, config: ModelConfig, library_id: str | None, mode: str) -> ad.AnnData:
    """The AnnData of a prediction without X: obs, var, obsm['spatial'], uns spatial + provenance."""
    a = ad.AnnData(obs=_obs(plan.grid), var=pd.DataFrame(index=list(config.genes)))
    a.obsm["spatial"] = plan.grid[["x", "y"]].to_numpy(dtype=np.float64)
    lib = library_id or plan.slide_path.stem
    add_spatial_image(a, lib, plan.thumbnail, plan.scale, plan.spec.spot_diameter,
                      source_image_path=str(plan.slide_path))
    g = plan.geometry
    a.uns["deepspot"] = {
        "model": config.model, "encoder": config.encoder.name, "context": config.context, "feature_mode": mode,
        "grid_unit": g.grid.unit, "grid_layout": plan.spec.layout, "spot_diameter_px": float(plan.spec.spot_diameter),
        "spacing_px": float(plan.spec.spacing), "mpp": float(plan.mpp) if plan.mpp else -1.0,
        "neighbors": f"array row and column within {g.neighbor_radius}",
        "geometry_preset": g.preset or "", "subspot_rule": g.subspot_rule,
        "tissue_method": plan.tissue, "grid_spots": int(plan.n_grid), "in_tissue_spots": int(len(plan.grid)),
        "geometry_notes": list(plan.notes),
        "values": "predicted log1p(counts per 10k)",  # the scaler, if any, is undone: one wording everywhere
    }
    return a


def predict_plan(plan: SlidePlan, model, config: ModelConfig, encoder, sink=None, *, mode: str = "standard",
                 mpp: float | None = None, batch_size: int = 16, store_dir=None, stats: ExtractStats | None = None,
                 predict_batch: int = 512, interval: float | None = None, bounds_sink=None, tta: bool = False,
                 **run) -> np.ndarray | None:
    """Encode the plan's spots (each crop once) and predict them chunk by chunk.

    With ``sink``, ``sink(start, predictions (B,G))`` receives each chunk in order and nothing is kept;
    without, the (N,G) predictions are returned. Features go to the store in ``settings.cache_dir`` (kept
    and reused), to ``store_dir/features.zarr`` (streamed), or, with neither, stay in memory.
    ``interval`` (a level the model is calibrated at) with ``bounds_sink``: ``bounds_sink(start, lower, upper)``
    receives each chunk's conformal interval (:mod:`deepspot.reliability`), in the units of the predictions.
    ``tta``: test-time augmentation, the mean of the predictions of the 8 dihedral views of every crop
    (:mod:`deepspot.features.views`; 8 encoder passes per crop, each view its own feature store); the
    interval is then drawn around that mean with the mean head spread of the views.
    The slide is read through ``plan.slide`` when the plan holds it open. Progress, device, reader workers,
    the feature cache and autocast are :data:`deepspot.settings`; ``run`` (``progress=False`` …) overrides
    them for this call.
    """
    with settings.override(**run):
        return _predict_plan(plan, model, config, encoder, sink, mode=mode, mpp=mpp, batch_size=batch_size,
                             store_dir=store_dir, stats=stats, predict_batch=predict_batch, interval=interval,
                             bounds_sink=bounds_sink, tta=tta)


def _predict_plan(plan, model, config, encoder, sink, *, mode, mpp, batch_size, store_dir, stats, predict_batch,
                  interval, bounds_sink, tta):
    cache_dir, device = settings.cache_dir, settings.device
    use_sub = bool(getattr(model, "use_subspots", True))
    n_sub = plan.geometry.n_sub if use_sub else 0
    mode = check_mode(mode) if n_sub else "standard"
    centers = plan.grid[["x", "y"]].to_numpy()
    tile = plan.spec.spot_diameter
    rule = plan.geometry.subspot_rule
    common = dict(n_sub=n_sub, mode=mode, mpp=mpp, batch_size=batch_size, num_workers=settings.num_workers,
                  device=device, autocast_dtype=settings.autocast_dtype, progress=settings.progress, stats=stats,
                  subspot_rule=rule)
    slide = plan.slide if plan.slide is not None else plan.slide_path  # the plan's open handle: no second open
    sources = []
    for view in (range(N_VIEWS) if tta else (0,)):
        if cache_dir is not None or store_dir is not None:
            path = (store_path_for(cache_dir, plan.slide_path, encoder, tile, n_sub, mode, rule, view)
                    if cache_dir is not None else Path(store_dir) / f"features{view_tag(view)}.zarr")
            sources.append(extract_to_store(slide, centers, tile, encoder, path, view=view, **common))
        else:
            sources.append(extract_features(slide, centers, tile, encoder, view=view, **common))
    idx, mask = plan.neighbors()
    scaler = config.scaler
    out = None if sink is not None else np.zeros((len(centers), len(config.genes)), dtype=np.float32)
    calib = intervals_for(config, interval)[0] if bounds_sink is not None else None
    with head_spread(model if calib is not None and calib.mode == "head_spread" else None) as spreads:
        streams = [iter_predictions(model, src, idx, mask, batch_size=predict_batch, device=device) for src in sources]
        for chunks in zip(*streams):
            start = chunks[0][0]
            pred = np.mean([invert_scaler(p, scaler) for _, p in chunks], axis=0, dtype=np.float64).astype(np.float32)
            if calib is not None:
                sp = None
                if spreads is not None:
                    sp = spread_to_expression(np.mean(spreads, axis=0), scaler)
                    spreads.clear()
                bounds_sink(start, *calib.bounds(pred, sp, interval))
            if sink is not None:
                sink(start, pred)
            else:
                out[start:start + len(pred)] = pred
    return out


class _Bounds:
    """Collects (lower, upper) chunks of a prediction in memory."""

    def __init__(self, n: int, g: int):
        self.lower, self.upper = np.zeros((n, g), np.float32), np.zeros((n, g), np.float32)

    def __call__(self, start: int, lo: np.ndarray, hi: np.ndarray) -> None:
        self.lower[start:start + len(lo)], self.upper[start:start + len(hi)] = lo, hi


def _annotate(adata: ad.AnnData, config: ModelConfig, interval: float | None, bounds: "_Bounds | None") -> None:
    """var val_pearson / reliable, and layers lower / upper when the model is calibrated (a note in
    uns['deepspot'] when intervals were asked for and the model has none)."""
    annotate_var(adata, config)
    calib, note = intervals_for(config, interval)
    if calib is not None and bounds is not None:
        adata.layers["lower"], adata.layers["upper"] = bounds.lower, bounds.upper
        adata.uns["deepspot"]["interval"] = float(interval)
    if note:
        adata.uns["deepspot"].setdefault("notes", []).append(note)



def _mode(config: ModelConfig, fast: bool | None) -> str:
    return config.check_feature_mode(config.feature_mode if fast is None else ("fast" if fast else "standard"))
