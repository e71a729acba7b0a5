"""Whole-image prediction on a virtual spot grid: slide -> AnnData (batched, masked bags)."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.features.extract import ExtractStats, extract_features
from deepspot.geometry.grid import GridSpec, make_grid
from deepspot.geometry.neighbors import array_neighbors
from deepspot.io.outputs import add_spatial_image
from deepspot.models.bags import Bags, predict_bags

log = logging.getLogger(__name__)


@dataclass
class SpotGeometry:
    """How crops and context are cut, stored in every checkpoint: the grid (µm or px), sub-spot
    grid size n (n×n) and neighbour radius in array coordinates."""

    grid: GridSpec = field(default_factory=GridSpec)
    n_sub: int = 3
    neighbor_radius: int = 1

    def to_dict(self) -> dict:
        return {"grid": self.grid.to_dict(), "n_sub": self.n_sub, "neighbor_radius": self.neighbor_radius}

    @classmethod
    def from_dict(cls, d: dict) -> "SpotGeometry":
        return cls(GridSpec(**d["grid"]), int(d["n_sub"]), int(d["neighbor_radius"]))


def invert_scaler(pred: np.ndarray, scaler: dict | None) -> np.ndarray:
    """Undo a target scaler stored in the checkpoint ({'kind', 'a', 'b'}: y_scaled = (y - a) / b)."""
    if not scaler:
        return pred
    return pred * np.asarray(scaler["b"], dtype=np.float32) + np.asarray(scaler["a"], dtype=np.float32)


def tissue_spots(slide, grid: pd.DataFrame, spot_px: float, method: str = "otsu", min_fraction: float = 0.1):
    """Boolean (N,) keep-mask: spots whose disc is mostly tissue at a low pyramid level."""
    if method == "none" or len(grid) == 0:
        return np.ones(len(grid), dtype=bool)
    from deepspot.geometry.tissue import tissue_mask

    mask = tissue_mask(slide, method=method)
    frac = mask.fraction_at(grid["x"].to_numpy(), grid["y"].to_numpy(), spot_px / 2.0)
    return np.asarray(frac) >= min_fraction


def predict_image(slide_path, model, config: dict, encoder, mpp: float | None = None, tissue: str = "otsu",
                  batch_size: int = 16, num_workers: int = 0, cache_dir=None, device="cpu", autocast_dtype=None,
                  progress: bool = True, library_id: str | None = None, thumbnail_size: int = 2000,
                  stats: ExtractStats | None = None, min_tissue_fraction: float = 0.1) -> ad.AnnData:
    """Predict every in-tissue spot of a virtual grid over the slide.

    Returns AnnData (spots × genes) with obs array_row, array_col, in_tissue; obsm['spatial'] (x, y)
    level-0 px; uns['spatial'][library_id] (thumbnail + scalefactors); uns['deepspot'] (provenance).
    """
    from deepspot.io.slides import open_slide, require_mpp

    geom = SpotGeometry.from_dict(config["geometry"])
    slide = open_slide(slide_path, mpp=mpp)
    with slide:
        if geom.grid.unit == "um":
            mpp_used = require_mpp(slide, mpp)
        else:
            mpp_used = slide.mpp
        spec = geom.grid.in_pixels(mpp_used)
        w, h = slide.dimensions
        grid = make_grid(w, h, spec)
        keep = tissue_spots(slide, grid, spec.spot_diameter, method=tissue, min_fraction=min_tissue_fraction)
        thumb = slide.get_thumbnail(thumbnail_size)
    scale = thumb.shape[1] / w
    grid = grid[keep].reset_index(drop=True)
    lib = library_id or Path(slide_path).stem
    genes = list(config["genes"])
    if len(grid) == 0:
        warnings.warn(f"{slide_path}: no tissue found; the prediction is empty", stacklevel=2)
        X = np.zeros((0, len(genes)), dtype=np.float32)
    else:
        feats = extract_features(slide_path, grid[["x", "y"]].to_numpy(), spec.spot_diameter, encoder,
                                 n_sub=geom.n_sub if getattr(model, "use_subspots", True) else 0, mpp=mpp,
                                 cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                                 device=device, autocast_dtype=autocast_dtype, progress=progress, stats=stats)
        idx, nmask = array_neighbors(grid["array_row"].to_numpy(), grid["array_col"].to_numpy(),
                                     geom.neighbor_radius)
        bags = Bags.from_numpy(feats.spot, feats.subspot, idx, nmask)
        X = invert_scaler(predict_bags(model, bags, device=device), config.get("scaler"))
    obs = pd.DataFrame({"array_row": grid["array_row"].to_numpy(), "array_col": grid["array_col"].to_numpy(),
                        "in_tissue": np.ones(len(grid), dtype=int)},
                       index=[f"{r}x{c}" for r, c in zip(grid["array_row"], grid["array_col"])])
    adata = ad.AnnData(X=X.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = grid[["x", "y"]].to_numpy(dtype=np.float64)
    add_spatial_image(adata, lib, thumb, scale, spec.spot_diameter, source_image_path=str(slide_path))
    adata.uns["deepspot"] = {
        "model": config["model"], "encoder": config["encoder"]["name"], "context": config["model_args"].get("context", ""),
        "grid_unit": geom.grid.unit, "spot_diameter_px": float(spec.spot_diameter), "spacing_px": float(spec.spacing),
        "mpp": float(mpp_used) if mpp_used else -1.0, "tissue_method": tissue,
        "values": "log1p(normalize_total 1e4) expression" if not config.get("scaler") else "log1p expression (scaler inverted)",
    }
    return adata


def spot_table(adata: ad.AnnData) -> pd.DataFrame:
    """The metadata CSV: barcode, array row/col, pixel x/y, in-tissue."""
    xy = np.asarray(adata.obsm["spatial"])
    return pd.DataFrame({"array_row": adata.obs["array_row"].to_numpy(), "array_col": adata.obs["array_col"].to_numpy(),
                         "pxl_x": xy[:, 0] if len(xy) else [], "pxl_y": xy[:, 1] if len(xy) else [],
                         "in_tissue": adata.obs["in_tissue"].to_numpy()},
                        index=pd.Index(adata.obs_names, name="barcode"))
