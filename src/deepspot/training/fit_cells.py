"""Train the cell models.

- :func:`train_cell_model` — DeepCell on cells with their own counts (Xenium-like data).
- :func:`train_spot2cell_model` — DeepSpot2Cell on spot counts only: each spot is a bag of the
  cells inside it (with the spot's own tile and its neighbour spots' tiles for the published
  architecture, ``deepspot2cell``), aggregated to the spot, and the loss is on the spot. Cell counts, when known (pseudo-spots pooled from cells), are held back and used only
  to score the per-cell predictions on the held-out side of the image.

Held-out cells (or spots) are predicted here and scored in :mod:`deepspot.evaluation.holdout`.

Both share the Lightning loop of :func:`deepspot.training.fit.fit`: it asks its ``bags`` only for
``len()`` and ``batch(ix) -> model inputs``, so :class:`~deepspot.models.deepcell.CellBags` (cells
with their neighbours) and :class:`SpotCellBags` (spots as bags of cells) go through it unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import anndata as ad
import lightning as L
import numpy as np
import torch

from deepspot.config import TARGETS, CellGeometry, EncoderRef, GridSpec, ModelConfig, resolve_mpp
from deepspot.features.extract import extract_features
from deepspot.features.tiles import cell_crops
from deepspot.geometry.grid import pool_cells
from deepspot.geometry.neighbors import array_neighbors
from deepspot.io.slides import open_slide
from deepspot.io.segmentation import CELL_BOX_KEY
from deepspot.io.spatial import SpatialDataError, inside_image
from deepspot.models.deepcell import CellBags, DeepCell, PooledDeepSpot2Cell, cell_bags, predict_batches
from deepspot.models.spot2cell import DeepSpot2Cell, SpotContextBags, nearest_spot, pack_members
from deepspot.training.fit import fit
from deepspot.training.spots import spatial_split
from deepspot.training.targets import log_normalize, select_genes

log = logging.getLogger(__name__)


@dataclass
class SpotCellBags:
    """Spots as bags of cells, for PooledDeepSpot2Cell (``deepspot2cell-pooled``).

    cells: :class:`CellBags` over all cells (tile features + neighbour index); members (S,C) int64
    index of each spot's cells into ``cells`` (real cells first), member_mask (S,C) bool.
    """

    cells: CellBags
    members: torch.Tensor
    member_mask: torch.Tensor

    @classmethod
    def from_assignment(cls, cells: CellBags, cell_to_spot: np.ndarray, n_spots: int) -> "SpotCellBags":
        """cell_to_spot (N,): spot index of each cell or -1 (in no spot)."""
        members, mask = pack_members(cell_to_spot, n_spots)
        return cls(cells, torch.as_tensor(members), torch.as_tensor(mask))

    def __len__(self) -> int:
        return int(self.members.shape[0])

    def batch(self, ix: torch.Tensor) -> dict:
        """Indexed DeepSpot2Cell inputs for spots ``ix`` (B,): table (U,d), cell_index (B,C),
        cell_mask (B,C), neighbor_index (B,C,K), neighbor_mask (B,C,K); C = the largest cell count
        in the batch."""
        mask = self.member_mask[ix]
        c = max(int(mask.sum(dim=1).max()) if len(mask) else 0, 1)  # real cells come first in each row
        mask, members = mask[:, :c], self.members[ix][:, :c]
        inner = self.cells.gather(members.reshape(-1))
        b = len(ix)
        return {"table": inner["table"], "cell_index": inner["cell_index"].reshape(b, c), "cell_mask": mask,
                "neighbor_index": inner["neighbor_index"].reshape(b, c, -1),
                "neighbor_mask": inner["neighbor_mask"].reshape(b, c, -1) & mask.unsqueeze(-1)}


@dataclass
class CellTrainResult:
    """What a cell-model training run produced. ``cell_pred`` (N_cells, G) per-cell expression of every
    cell; ``split`` (train, val, test) indices (of cells for DeepCell, of spots for DeepSpot2Cell);
    ``test_cells`` the held-out cells; ``truth`` per-cell targets of every cell when known;
    DeepSpot2Cell adds its ``spots``, ``cell_to_spot``, ``spot_targets`` and ``spot_pred`` (S, G).
    ``scores`` is filled by :func:`deepspot.evaluation.holdout.score_holdout`."""

    model: torch.nn.Module
    config: ModelConfig
    features: np.ndarray
    genes: list[str]
    split: tuple[np.ndarray, np.ndarray, np.ndarray]
    test_cells: np.ndarray
    cell_pred: np.ndarray
    truth: np.ndarray | None
    fit_summary: dict
    spots: ad.AnnData | None = None
    cell_to_spot: np.ndarray | None = None
    spot_targets: np.ndarray | None = None
    spot_pred: np.ndarray | None = None
    scores: dict = field(default_factory=dict)


def _slide_size(image, mpp: float | None):
    """(width, height, µm per px or None) of the image; ``mpp`` overrides the file's."""
    with open_slide(image, mpp=mpp) as slide:
        w, h = slide.dimensions
        return int(w), int(h), resolve_mpp(slide, mpp)


def encode_cells(image, xy: np.ndarray, geometry: CellGeometry, encoder, mpp: float | None = None, cache_dir=None,
                 batch_size: int = 16, num_workers: int = 0, progress: bool = True,
                 boxes: np.ndarray | None = None) -> np.ndarray:
    """Crop features (N,d) of the cells at level-0 (x, y) px: one tile of side cell_diameter each (crop 'tile'),
    or each polygon's bounding box ``boxes`` (N,4) squared (crop 'bbox'; :func:`~deepspot.features.tiles.cell_crops`)."""
    centers, side = cell_crops(geometry, xy, boxes, mpp, f"{image}: cells")
    return extract_features(image, centers, side, encoder, n_sub=0, mpp=mpp, cache_dir=cache_dir,
                            batch_size=batch_size, num_workers=num_workers, progress=progress, what="cells").spot


def boxes_for_crop(cells: ad.AnnData, geometry: CellGeometry, source: str = "cells") -> np.ndarray | None:
    """The polygon bounding boxes (N,4) a 'bbox' cell crop needs (``obsm['cell_bbox']``, e.g. from
    :func:`deepspot.io.segmentation.attach_cell_boxes`); None for 'tile' crops. Refused before any encoding."""
    if geometry.crop != "bbox":
        return None
    if CELL_BOX_KEY not in cells.obsm:
        raise SpatialDataError(f"{source}: cell crop 'bbox' needs each cell's polygon bounding box "
                               f"(obsm['{CELL_BOX_KEY}']): train from a segmentation (a Xenium folder with "
                               f"cell_boundaries, or a GeoJSON of cell polygons)")
    return np.asarray(cells.obsm[CELL_BOX_KEY], dtype=np.float64)


def _cell_config(kind: str, model, encoder, genes, geometry: CellGeometry, mpp, training: dict,
                 **extra) -> ModelConfig:
    return ModelConfig(kind, model.config(), EncoderRef(encoder.name, int(encoder.dim)), list(genes), geometry,
                       None, TARGETS, mpp, training, extra=extra)


def _check_features(features: np.ndarray, n: int, encoder) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.shape != (n, int(encoder.dim)):
        raise ValueError(f"features have shape {features.shape}, expected ({n}, {encoder.dim})")
    return features


def train_cell_model(image, cells: ad.AnnData, encoder, geometry: CellGeometry = CellGeometry(),
                     mpp: float | None = None, genes: list[str] | None = None, n_top_genes: int | None = None,
                     neighbor_pool: str = "max", loss: str = "mse", max_epochs: int = 200, patience: int = 20,
                     batch_size: int = 64, lr: float = 1e-4, seed: int = 2024, dropout: float = 0.2,
                     n_ensemble: int = 10, hidden: int = 1024, test_fraction: float = 0.3, cache_dir=None,
                     batch_size_encoder: int = 16, num_workers: int = 0, progress: bool = True, log_dir=None,
                     features: np.ndarray | None = None) -> CellTrainResult:
    """Train DeepCell on the cells of one image with a spatial hold-out (right-most ``test_fraction`` of
    the cells); predicts every cell.

    cells: AnnData of raw counts per cell with obsm['spatial'] (x, y) level-0 px. ``features`` (N,d):
    precomputed tile features (skips encoding; ``encoder`` then only needs ``name`` and ``dim``).
    """
    w, h, mpp_used = _slide_size(image, mpp)
    xy = np.asarray(cells.obsm["spatial"], dtype=np.float64)
    inside_image(xy, w, h, f"{image}: cells")
    boxes = boxes_for_crop(cells, geometry, f"{image}: cells")
    feats = (_check_features(features, len(xy), encoder) if features is not None else
             encode_cells(image, xy, geometry, encoder, mpp_used, cache_dir, batch_size_encoder, num_workers, progress,
                          boxes=boxes))
    panel = select_genes(cells, n_top=n_top_genes, genes=genes)
    y = log_normalize(cells, genes=panel)
    bags = cell_bags(feats, xy, geometry, mpp_used)
    train, val, test = spatial_split(xy, test_fraction=test_fraction, seed=seed)
    L.seed_everything(seed, verbose=False)
    model = DeepCell(int(encoder.dim), len(panel), hidden=hidden, n_ensemble=n_ensemble, dropout=dropout,
                     context=geometry.context, neighbor_pool=neighbor_pool)
    summary = fit(model, bags, y, train, val, loss=loss, lr=lr, batch_size=batch_size, max_epochs=max_epochs,
                  patience=patience, seed=seed, progress=progress, log_dir=log_dir)
    pred = predict_batches(model, bags, batch_size=512)
    training = {"loss": loss, "lr": lr, "seed": seed, "batch_size": batch_size, "max_epochs": max_epochs,
                "patience": patience, "n_cells": int(len(xy)),
                "split": "spatial: right-most %.0f%% of cells held out" % (100 * test_fraction), **summary}
    config = _cell_config("deepcell", model, encoder, panel, geometry, mpp_used, training)
    return CellTrainResult(model, config, feats, panel, (train, val, test), test, pred, y, summary)


def pseudo_spots(image, cells: ad.AnnData, grid: GridSpec, mpp: float | None = None):
    """Pool cells into pseudo-spots on a grid over the image: (spots AnnData, cell_to_spot (N,))."""
    w, h, mpp_used = _slide_size(image, mpp)
    inside_image(np.asarray(cells.obsm["spatial"]), w, h, f"{image}: cells")
    spots, cell_to_spot = pool_cells(cells, w, h, grid.in_pixels(mpp_used))
    if spots.n_obs == 0:
        raise SpatialDataError(f"{image}: no cell falls inside any pseudo-spot of the grid "
                               f"(spot diameter {grid.spot_diameter:g} {grid.unit})")
    return spots, cell_to_spot


def drop_empty_spots(spots: ad.AnnData, cell_to_spot: np.ndarray, source: str = "spots"):
    """Spots without a cell have nothing to predict from: drop them (logged) and re-index cell_to_spot."""
    c2s = np.asarray(cell_to_spot, dtype=np.int64)
    if len(c2s) and c2s.max() >= spots.n_obs:
        raise ValueError(f"{source}: cell_to_spot refers to spot {int(c2s.max())} but there are {spots.n_obs} spots")
    n_cells = np.bincount(c2s[c2s >= 0], minlength=spots.n_obs)
    keep = n_cells > 0
    if not keep.any():
        raise SpatialDataError(f"{source}: no spot contains a cell")
    if not keep.all():
        log.warning("%s: dropping %d of %d spots that contain no cell", source, int((~keep).sum()), spots.n_obs)
        remap = np.cumsum(keep) - 1
        c2s = np.where(c2s >= 0, np.where(keep[np.maximum(c2s, 0)], remap[np.maximum(c2s, 0)], -1), -1)
        spots = spots[keep].copy()
    n_out = int((c2s < 0).sum())
    if n_out:
        log.info("%s: %d of %d cells lie in no spot (not trained on; still used as neighbours)", source, n_out,
                 len(c2s))
    return spots, c2s


SPOT2CELL_MODELS = ("deepspot2cell", "deepspot2cell-pooled")
# per-architecture defaults (the published DeepSpot2Cell: hidden 512, 10 heads, dropout 0.3)
_SPOT2CELL_DEFAULTS = {"deepspot2cell": dict(hidden=512, n_ensemble=10, dropout=0.3),
                       "deepspot2cell-pooled": dict(hidden=1024, n_ensemble=10, dropout=0.2)}


# training presets of the spot-to-cell models: ours (the defaults) and the original DeepSpot2Cell's
# (configs/training.example.yaml of the original code: batch 4, AdamW lr 1e-4 / weight decay 1e-6, 8 heads,
# at most 50 epochs, early stopping on the validation loss with patience 5 and min_delta 1e-3; its data
# loader drops cells without counts and spots without counts)
SPOT2CELL_PRESETS = {
    "deepspot": dict(batch_size=16, lr=1e-4, weight_decay=1e-6, max_epochs=200, patience=20, min_delta=0.0,
                     drop_zero=False),
    "original": dict(batch_size=4, lr=1e-4, weight_decay=1e-6, max_epochs=50, patience=5, min_delta=1e-3,
                     drop_zero=True),
}
_SPOT2CELL_PRESET_ARCH = {("original", "deepspot2cell"): dict(hidden=512, n_ensemble=8, dropout=0.3)}


def original_drops(spots: ad.AnnData, cell_to_spot: np.ndarray, cell_counts: ad.AnnData | None = None):
    """What the original DeepSpot2Cell's data loader leaves out of training: spots whose counts sum to 0
    and (when the cells' own counts are known) cells whose counts sum to 0. Returns (cell_to_spot with those
    cells and the cells of those spots set to -1, {counts of what was dropped})."""
    c2s = np.asarray(cell_to_spot, dtype=np.int64).copy()
    lib = np.asarray(spots.X.sum(axis=1)).ravel()
    zero_spot = np.flatnonzero(lib <= 0)
    c2s[np.isin(c2s, zero_spot)] = -1
    n_cells = 0
    if cell_counts is not None:
        if cell_counts.n_obs != len(c2s):
            raise ValueError(f"cell_counts has {cell_counts.n_obs} cells, cell_to_spot {len(c2s)}")
        empty = (np.asarray(cell_counts.X.sum(axis=1)).ravel() <= 0) & (c2s >= 0)
        n_cells = int(empty.sum())
        c2s[empty] = -1
    if len(zero_spot) or n_cells:
        log.info("as the original's data loader: %d spot(s) and %d cell(s) without counts left out of training",
                 len(zero_spot), n_cells)
    return c2s, {"dropped_zero_count_spots": int(len(zero_spot)), "dropped_zero_count_cells": n_cells}


def spot_context(spots: ad.AnnData, source: str = "spots"):
    """Each spot's neighbour spots (S,K) + mask (S,K): array row and column within 1 (the spot rule of
    :class:`~deepspot.config.SpotGeometry`)."""
    if "array_row" not in spots.obs or "array_col" not in spots.obs:
        raise SpatialDataError(f"{source}: obs needs array_row/array_col for the neighbour spots of deepspot2cell")
    return array_neighbors(spots.obs["array_row"].to_numpy(), spots.obs["array_col"].to_numpy(), 1)


def train_spot2cell_model(image, spots: ad.AnnData, cell_xy: np.ndarray, cell_to_spot: np.ndarray, encoder,
                          geometry: CellGeometry = CellGeometry(), mpp: float | None = None, aggregate: str = "sum",
                          genes: list[str] | None = None, n_top_genes: int | None = None,
                          neighbor_pool: str = "max", loss: str = "mse", max_epochs: int | None = None,
                          patience: int | None = None, batch_size: int | None = None, lr: float | None = None,
                          seed: int = 2024, dropout: float | None = None,
                          n_ensemble: int | None = None, hidden: int | None = None, test_fraction: float = 0.3,
                          cache_dir=None, batch_size_encoder: int = 16, num_workers: int = 0, progress: bool = True,
                          log_dir=None, features: np.ndarray | None = None, cell_counts: ad.AnnData | None = None,
                          spot_grid: GridSpec | None = None, model: str = "deepspot2cell",
                          spot_features: np.ndarray | None = None, preset: str | None = None,
                          dropout_out: float | None = None, weight_decay: float | None = None,
                          min_delta: float | None = None, cell_boxes: np.ndarray | None = None) -> CellTrainResult:
    """Train a DeepSpot2Cell on spot counts with a spatial hold-out of spots (right-most ``test_fraction``,
    the split of :func:`deepspot.training.spots.train_spot_model` on the same spots).

    spots: AnnData of raw spot counts with obsm['spatial']; cell_xy (N,2) level-0 px of the cells;
    cell_to_spot (N,) spot index of each cell or -1. With ``cell_counts`` (AnnData of the cells' true
    counts, rows as cell_xy) the cells of held-out spots are scored against their true
    log1p(normalize_total) expression, next to the baseline "each cell gets its spot's true value"
    (the spot's summed counts ÷ its cell count, which normalises to the spot's own profile).

    ``model``: 'deepspot2cell' (the published architecture, :mod:`deepspot.models.spot2cell`: needs the
    spots' ``spot_grid`` for the spot tile side and obs array_row/array_col for their neighbours; each cell is
    predicted with the context of the nearest spot) or 'deepspot2cell-pooled' (a DeepCell per cell, pooled
    into the spot by ``aggregate``). ``features`` (N,d) / ``spot_features`` (S,d): precomputed cell / spot tile
    features (skip encoding). hidden / n_ensemble / dropout default to the architecture's own.

    ``preset``: 'deepspot' (ours, the default) or 'original' (``deepspot2cell`` only: the original
    DeepSpot2Cell's training, :data:`SPOT2CELL_PRESETS`); options given here override the preset's.
    ``dropout_out``: rho's output dropout of ``deepspot2cell`` (published 0.1). ``cell_boxes`` (N,4): the
    cells' polygon bounding boxes, needed by a geometry whose crop is 'bbox'.
    """
    if model not in SPOT2CELL_MODELS:
        raise ValueError(f"unknown spot-to-cell model {model!r}; choose {' or '.join(SPOT2CELL_MODELS)}")
    preset = preset or "deepspot"
    if preset not in SPOT2CELL_PRESETS:
        raise ValueError(f"unknown spot-to-cell preset {preset!r}; choose {' or '.join(SPOT2CELL_PRESETS)}")
    if preset == "original" and model != "deepspot2cell":
        raise ValueError(f"preset 'original' is the published DeepSpot2Cell's training; {model} has no original")
    rec = {**SPOT2CELL_PRESETS[preset], **{k: v for k, v in dict(
        max_epochs=max_epochs, patience=patience, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        min_delta=min_delta).items() if v is not None}}
    arch = {**_SPOT2CELL_DEFAULTS[model], **_SPOT2CELL_PRESET_ARCH.get((preset, model), {}),
            **{k: v for k, v in dict(hidden=hidden, n_ensemble=n_ensemble, dropout=dropout).items() if v is not None}}
    if dropout_out is not None:
        if model != "deepspot2cell":
            raise ValueError("dropout_out is rho's output dropout of the published deepspot2cell")
        arch["dropout_out"] = float(dropout_out)
    w, h, mpp_used = _slide_size(image, mpp)
    cell_xy = np.asarray(cell_xy, dtype=np.float64).reshape(-1, 2)
    if len(cell_to_spot) != len(cell_xy):
        raise ValueError(f"cell_to_spot has {len(cell_to_spot)} entries for {len(cell_xy)} cells")
    inside_image(cell_xy, w, h, f"{image}: cells")
    drops = {}
    if rec["drop_zero"]:
        cell_to_spot, drops = original_drops(spots, cell_to_spot, cell_counts)
    spots, c2s = drop_empty_spots(spots, cell_to_spot, source=f"{image}: spots")
    original = model == "deepspot2cell"
    if original:
        if spot_grid is None:
            raise ValueError(f"{image}: a deepspot2cell model needs the spots' grid (spot_grid) for the spot tile side")
        nidx, nmask = spot_context(spots, f"{image}: spots")
    if features is None and geometry.crop == "bbox" and cell_boxes is None:
        raise SpatialDataError(f"{image}: cell crop 'bbox' needs each cell's polygon bounding box (cell_boxes)")
    feats = (_check_features(features, len(cell_xy), encoder) if features is not None else
             encode_cells(image, cell_xy, geometry, encoder, mpp_used, cache_dir, batch_size_encoder, num_workers,
                          progress, boxes=cell_boxes))
    panel = select_genes(spots, n_top=n_top_genes, genes=genes)
    y = log_normalize(spots, genes=panel)
    train, val, test = spatial_split(spots.obsm["spatial"], test_fraction=test_fraction, seed=seed)
    L.seed_everything(seed, verbose=False)
    if original:
        spot_xy = np.asarray(spots.obsm["spatial"], dtype=np.float64)
        spot_px = spot_grid.in_pixels(mpp_used).spot_diameter
        sfeats = (_check_features(spot_features, spots.n_obs, encoder) if spot_features is not None else
                  extract_features(image, spot_xy, spot_px, encoder, n_sub=0, mpp=mpp_used, cache_dir=cache_dir,
                                   batch_size=batch_size_encoder, num_workers=num_workers, progress=progress).spot)
        sbags = SpotContextBags.build(feats, sfeats, nidx, nmask, c2s, nearest_spot(cell_xy, spot_xy))
        net = DeepSpot2Cell(int(encoder.dim), len(panel), **arch)
        geometry = replace(geometry, neighbors="none")  # a cell's context is its spot's, not other cells'
        cell_bags_ = sbags.cells_view()
    else:
        cbags = cell_bags(feats, cell_xy, geometry, mpp_used)
        sbags = SpotCellBags.from_assignment(cbags, c2s, spots.n_obs)
        net = PooledDeepSpot2Cell(int(encoder.dim), len(panel), context=geometry.context, neighbor_pool=neighbor_pool,
                                  aggregate=aggregate, **arch)
        cell_bags_ = cbags
    summary = fit(net, sbags, y, train, val, loss=loss, lr=rec["lr"], weight_decay=rec["weight_decay"],
                  batch_size=rec["batch_size"], max_epochs=rec["max_epochs"], patience=rec["patience"],
                  min_delta=rec["min_delta"], seed=seed, progress=progress, log_dir=log_dir)
    cell_pred = predict_batches(net.cell_predictor(), cell_bags_, batch_size=512)
    spot_pred = predict_batches(net, sbags, batch_size=64)
    test_cells = np.flatnonzero(np.isin(c2s, test))
    truth = None
    if cell_counts is not None:
        if cell_counts.n_obs != len(cell_xy):
            raise ValueError(f"cell_counts has {cell_counts.n_obs} cells, cell_xy {len(cell_xy)}")
        truth = log_normalize(cell_counts, genes=panel)
    training = {"preset": preset, "loss": loss, "lr": rec["lr"], "weight_decay": rec["weight_decay"], "seed": seed,
                "batch_size": rec["batch_size"], "max_epochs": rec["max_epochs"], "patience": rec["patience"],
                "min_delta": rec["min_delta"], **drops, "n_spots": int(spots.n_obs), "n_cells": int(len(cell_xy)),
                "n_cells_in_spots": int((c2s >= 0).sum()),
                "split": "spatial: right-most %.0f%% of spots held out" % (100 * test_fraction), **summary}
    if not original:
        training["aggregate"] = aggregate
    extra = {"spot_grid": spot_grid.to_dict()} if spot_grid is not None else {}
    config = _cell_config(model, net, encoder, panel, geometry, mpp_used, training, **extra)
    return CellTrainResult(net, config, feats, panel, (train, val, test), test_cells, cell_pred, truth, summary,
                           spots=spots, cell_to_spot=c2s, spot_targets=y, spot_pred=spot_pred)


def train_spot2cell_from_cells(image, cells: ad.AnnData, encoder, grid: GridSpec, **kwargs) -> CellTrainResult:
    """DeepSpot2Cell on pseudo-spots pooled from cells with known counts; the cells' counts are held
    back as the truth for scoring."""
    boxes = boxes_for_crop(cells, kwargs.get("geometry", CellGeometry()), f"{image}: cells")
    spots, cell_to_spot = pseudo_spots(image, cells, grid, mpp=kwargs.get("mpp"))
    return train_spot2cell_model(image, spots, cells.obsm["spatial"], cell_to_spot, encoder, cell_counts=cells,
                                 spot_grid=grid, cell_boxes=boxes, **kwargs)
