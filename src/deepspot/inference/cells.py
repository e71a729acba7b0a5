"""Cell-level prediction: a table of cell centroids + an H&E image + a cell model -> cells AnnData.

Each cell is one tile of side ``cell_diameter`` centred on its centroid, encoded once;
its context is the tiles of its neighbouring cells, found by the rule stored in the
checkpoint (k nearest or within a radius, KD-tree) — the same rule as in training. A
DeepSpot2Cell's context is instead the tile of the nearest spot of its grid and that spot's
neighbour spots (:func:`spot_context_bags`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.config import CELL_MODELS, CellGeometry, CheckpointError, GridSpec, ModelConfig, invert_scaler, resolve_mpp
from deepspot.features.extract import ExtractStats, extract_features
from deepspot.io.outputs import add_spatial_image
from deepspot.io.slides import open_slide
from deepspot.io.spatial import SpatialDataError, inside_image
from deepspot.geometry.grid import make_grid
from deepspot.geometry.neighbors import array_neighbors
from deepspot.models.cells import cell_bags, cell_predictor, predict_batches
from deepspot.models.spot2cell import SpotContextBags, nearest_spot

log = logging.getLogger(__name__)

def check_cell_model(config: ModelConfig, source: str | Path) -> None:
    if not config.is_cell_model:
        raise CheckpointError(f"{source}: a '{config.model}' checkpoint is not a cell model "
                              f"({' or '.join(CELL_MODELS)}); use `deepspot predict` for spot models")


def spot_context_bags(slide_path, cell_features: np.ndarray, xy: np.ndarray, config: ModelConfig, encoder, width: int,
                      height: int, mpp: float | None, **extract) -> tuple[SpotContextBags, float]:
    """DeepSpot2Cell inputs on a slide: the model's spot grid (``spot_grid`` of the checkpoint) laid over the
    slide; each cell takes the nearest grid spot's tile and that spot's neighbour spots (array row and column
    within 1). Only the spots used are encoded. Returns (bags, spot tile side in px)."""
    if "spot_grid" not in config.extra:
        raise CheckpointError("checkpoint: a deepspot2cell config needs 'spot_grid' (the spots it was trained on)")
    grid = GridSpec.from_dict(config.extra["spot_grid"], "config.json", "spot_grid.").in_pixels(mpp)
    spots = make_grid(width, height, grid)
    if len(spots) == 0:
        raise SpatialDataError(f"{slide_path}: smaller than one spot of the model's grid "
                               f"({grid.spot_diameter:g} px)")
    own = nearest_spot(xy, spots[["x", "y"]].to_numpy())
    nidx, nmask = array_neighbors(spots["array_row"].to_numpy(), spots["array_col"].to_numpy(), 1)
    used = np.unique(np.concatenate([own, nidx[own][nmask[own]]]))
    remap = np.full(len(spots), -1, np.int64)
    remap[used] = np.arange(len(used))
    sub_idx, sub_mask = nidx[used], nmask[used] & (remap[nidx[used]] >= 0)
    sfeats = extract_features(slide_path, spots[["x", "y"]].to_numpy()[used], grid.spot_diameter, encoder, n_sub=0,
                              mpp=mpp, **extract).spot
    bags = SpotContextBags.build(cell_features, sfeats, np.maximum(remap[sub_idx], 0), sub_mask,
                                 np.full(len(xy), -1, np.int64), remap[own])
    return bags, float(grid.spot_diameter)


def predict_cells(slide_path, xy: np.ndarray, model, config: ModelConfig | dict, encoder, cell_ids=None, mpp: float | None = None,
                  batch_size: int = 16, num_workers: int = 0, cache_dir=None, device="cpu", autocast_dtype=None,
                  progress: bool = True, library_id: str | None = None, thumbnail_size: int = 2000,
                  drop_outside: bool = False, predict_batch: int = 512,
                  stats: ExtractStats | None = None) -> ad.AnnData:
    """Predict every cell of a centroid table (N,2 level-0 px) on a slide with a DeepCell or
    DeepSpot2Cell checkpoint.

    Returns AnnData (cells × genes, log1p-normalised expression) with obsm['spatial'] (x, y) px,
    uns['spatial'][library_id] (thumbnail + scalefactors, spot_diameter_fullres = cell tile px) and
    uns['deepspot'] (provenance, neighbour rule).
    """
    config = ModelConfig.coerce(config)
    check_cell_model(config, "checkpoint")
    geom = config.geometry
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    ids = pd.Index(np.asarray(cell_ids).astype(str)) if cell_ids is not None else pd.Index(
        [f"cell_{i}" for i in range(len(xy))])
    if len(ids) != len(xy):
        raise ValueError(f"{len(ids)} cell ids for {len(xy)} centroids")
    if len(xy) == 0:
        raise SpatialDataError(f"{slide_path}: no cells to predict")
    with open_slide(slide_path, mpp=mpp) as slide:
        mpp_used = resolve_mpp(slide, mpp, needs_um=geom.unit == "um")
        w, h = slide.dimensions
        thumb = slide.get_thumbnail(thumbnail_size)
    keep = inside_image(xy, w, h, str(slide_path), drop_outside=drop_outside)
    xy, ids = xy[keep], ids[keep]
    tile = geom.tile_px(mpp_used)
    feats = extract_features(slide_path, xy, tile, encoder, n_sub=0, mpp=mpp, cache_dir=cache_dir,
                             batch_size=batch_size, num_workers=num_workers, device=device,
                             autocast_dtype=autocast_dtype, progress=progress, stats=stats, what="cells")
    if config.model == "deepspot2cell":
        bags, spot_px = spot_context_bags(slide_path, feats.spot, xy, config, encoder, w, h, mpp_used,
                                          batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                                          device=device, autocast_dtype=autocast_dtype, progress=progress, stats=stats)
        bags = bags.cells_view()
        context_note = f"spot tile {spot_px:g} px of the nearest grid spot + its neighbour spots"
    else:
        bags = cell_bags(feats.spot, xy, geom, mpp_used)
        context_note = geom.describe()
    X = invert_scaler(predict_batches(cell_predictor(model), bags, batch_size=predict_batch, device=device),
                      config.scaler)
    genes = list(config.genes)
    adata = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    lib = library_id or Path(slide_path).stem
    add_spatial_image(adata, lib, thumb, thumb.shape[1] / w, tile, source_image_path=str(slide_path))
    adata.uns["deepspot"] = {
        "model": config.model, "encoder": config.encoder.name, "cell_tile_px": float(tile),
        "neighbors": context_note, "mpp": float(mpp_used) if mpp_used else -1.0,
        "n_dropped_outside": int((~keep).sum()),
        "values": "predicted log1p(counts per 10k) per cell",
    }
    return adata
