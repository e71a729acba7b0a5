"""Cell-level prediction: a table of cell centroids + an H&E image + a cell model -> cells AnnData.

Each cell is one crop, encoded once: a tile of side ``cell_diameter`` centred on its centroid, or (cell crop
'bbox' in the checkpoint) its polygon's bounding box squared around the box centre;
its context is the tiles of its neighbouring cells, found by the rule stored in the
checkpoint (k nearest or within a radius, KD-tree) — the same rule as in training. A
DeepSpot2Cell's context is instead the tile of the nearest spot of its grid and that spot's
neighbour spots (:func:`spot_context_bags`).

Memory: cells are predicted in blocks (``block_size``). Tile features go to a feature store on disk
(``cache_dir``, else a temporary folder removed afterwards) and each block, cells consecutive along a Z curve
over the slide (:func:`spatial_order`), reads only the rows it needs:
its cells, their neighbour cells (found per block with one KD-tree over all centroids, the same rule as
:func:`deepspot.models.deepcell.cell_neighbors`) or, for a DeepSpot2Cell, its spots and their neighbour spots.
What stays in memory grows only with the output (N x genes) and the centroids, not with the encoder's
feature size (docs/scaling.md).
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from deepspot.config import CELL_MODELS, CellGeometry, CheckpointError, GridSpec, ModelConfig, invert_scaler, resolve_mpp
from deepspot.features.extract import ExtractStats, extract_to_store, store_path_for
from deepspot.features.tiles import cell_crops
from deepspot.io.cells_h5ad import BlockedRows
from deepspot.io.outputs import add_spatial_image
from deepspot.io.slides import open_slide
from deepspot.io.spatial import SpatialDataError, inside_image
from deepspot.geometry.grid import make_grid
from deepspot.geometry.neighbors import array_neighbors
from deepspot.models.deepcell import CellBags, cell_predictor, predict_batches
from deepspot.models.spot2cell import SpotContextBags, nearest_spot

log = logging.getLogger(__name__)

def check_cell_model(config: ModelConfig, source: str | Path) -> None:
    if not config.is_cell_model:
        raise CheckpointError(f"{source}: a '{config.model}' checkpoint is not a cell model "
                              f"({' or '.join(CELL_MODELS)}); use `deepspot predict` for spot models")


def check_cell_boxes(config: ModelConfig, boxes, source: str | Path | None) -> None:
    """A checkpoint trained on polygon bounding-box crops (cell crop 'bbox') is used with them only."""
    if config.geometry.crop == "bbox" and boxes is None:
        raise SpatialDataError(f"{source or 'cells'}: this model crops each cell by its polygon's bounding box "
                               f"(cell crop 'bbox' in its checkpoint), but the cell file carries no polygons; give "
                               f"the cells as a GeoJSON of polygons or a Xenium cell_boundaries file")


def block_neighbors(tree, n: int, xy_block: np.ndarray, rows: np.ndarray, geometry: CellGeometry,
                    mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour cells (B,K) + mask (B,K) of the cells ``rows`` (at ``xy_block``) among all ``n`` cells of
    ``tree`` (a cKDTree of every centroid): per cell the same neighbours, nearest first, as
    :func:`deepspot.models.deepcell.cell_neighbors` on all cells (only the padding width K may differ)."""
    b = len(rows)
    if geometry.neighbors == "knn":
        k = max(0, min(geometry.k, n - 1))
        if k == 0:
            return np.zeros((b, 0), np.int64), np.zeros((b, 0), bool)
        _, idx = tree.query(xy_block, k=k + 1)
        idx = idx.reshape(b, -1)
        is_self = idx == rows[:, None]
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(idx, dtype=bool)
        keep[np.arange(b), drop] = False
        return idx[keep].reshape(b, k).astype(np.int64), np.ones((b, k), bool)
    if geometry.neighbors == "radius":
        r = geometry.radius_px(mpp)
        hits = tree.query_ball_point(xy_block, r * (1 + 1e-9) + 1e-12)
        lrow = np.repeat(np.arange(b), [len(h) for h in hits])
        col = np.fromiter((j for h in hits for j in h), np.int64, count=len(lrow))
        keep = col != rows[lrow]
        lrow, col = lrow[keep], col[keep]
        dist = np.linalg.norm(tree.data[col] - xy_block[lrow], axis=1)
        order = np.lexsort((col, dist, lrow))
        lrow, col = lrow[order], col[order]
        counts = np.bincount(lrow, minlength=b)
        k = int(counts.max()) if b else 0
        if geometry.max_neighbors is not None:
            k = min(k, int(geometry.max_neighbors))
        rank = np.arange(len(lrow)) - np.repeat(np.cumsum(counts) - counts, counts)
        sel = rank < k
        idx, mask = np.zeros((b, k), np.int64), np.zeros((b, k), bool)
        idx[lrow[sel], rank[sel]], mask[lrow[sel], rank[sel]] = col[sel], True
        return idx, mask
    return np.zeros((b, 0), np.int64), np.zeros((b, 0), bool)


def spatial_order(xy: np.ndarray) -> np.ndarray:
    """An order of the cells along a Z (Morton) curve over the slide: consecutive cells are near each other, so
    a block of them needs few feature rows beyond its own (its neighbours are mostly in it), whatever the
    order of the input table."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return np.zeros(0, np.int64)
    span = np.maximum(np.ptp(xy, axis=0), 1e-9)
    q = ((xy - xy.min(axis=0)) / span * 65535).astype(np.uint64)

    def spread(v):
        v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF)
        v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F)
        v = (v | (v << np.uint64(2))) & np.uint64(0x33333333)
        return (v | (v << np.uint64(1))) & np.uint64(0x55555555)

    return np.argsort(spread(q[:, 0]) | (spread(q[:, 1]) << np.uint64(1)), kind="stable")


class _Reordered:
    """Features stored in ``order`` (row i of ``inner`` is cell ``order[i]``), read by cell index."""

    def __init__(self, inner, order: np.ndarray):
        self.inner = inner
        self.pos = np.empty(len(order), np.int64)
        self.pos[order] = np.arange(len(order))

    def spot_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.inner.spot_rows(self.pos[np.asarray(rows, dtype=np.int64)])


class _Rows:
    """Bags restricted to some of their rows: ``batch(ix)`` = ``bags.gather(rows[ix])``."""

    def __init__(self, bags, rows: np.ndarray):
        self.bags, self.rows = bags, torch.as_tensor(np.asarray(rows, dtype=np.int64))

    def __len__(self) -> int:
        return int(len(self.rows))

    def batch(self, ix):
        return self.bags.gather(self.rows[torch.as_tensor(ix, dtype=torch.long)])


def cell_block_bags(store, tree, n: int, xy: np.ndarray, rows: np.ndarray, geometry: CellGeometry,
                    mpp: float | None):
    """DeepCell inputs of the cells ``rows``: a table of only the features they and their neighbours need,
    read from ``store`` (``spot_rows``)."""
    nidx, nmask = block_neighbors(tree, n, xy[rows], rows, geometry, mpp)
    uniq, inv = np.unique(np.concatenate([rows, nidx.reshape(-1)]), return_inverse=True)
    b = len(rows)
    local_idx = np.zeros((len(uniq), nidx.shape[1]), np.int64)
    local_mask = np.zeros((len(uniq), nidx.shape[1]), bool)
    local_idx[inv[:b]] = inv[b:].reshape(nidx.shape)
    local_mask[inv[:b]] = nmask
    return _Rows(CellBags.from_numpy(store.spot_rows(uniq), local_idx, local_mask), inv[:b])


class SpotContext:
    """The spot context of a DeepSpot2Cell on a slide: the model's spot grid (``spot_grid`` of the checkpoint)
    laid over the slide; each cell takes the nearest grid spot's tile and that spot's neighbour spots (array
    row and column within 1). Only the spots used are encoded, into a feature store read per block."""

    def __init__(self, slide_path, xy: np.ndarray, config: ModelConfig, encoder, width: int, height: int,
                 mpp: float | None, store_dir, **extract):
        if "spot_grid" not in config.extra:
            raise CheckpointError("checkpoint: a deepspot2cell config needs 'spot_grid' (the spots it was trained on)")
        grid = GridSpec.from_dict(config.extra["spot_grid"], "config.json", "spot_grid.").in_pixels(mpp)
        spots = make_grid(width, height, grid)
        if len(spots) == 0:
            raise SpatialDataError(f"{slide_path}: smaller than one spot of the model's grid "
                                   f"({grid.spot_diameter:g} px)")
        spot_xy = spots[["x", "y"]].to_numpy()
        self.own = nearest_spot(xy, spot_xy)
        self.nidx, self.nmask = array_neighbors(spots["array_row"].to_numpy(), spots["array_col"].to_numpy(), 1)
        used = np.unique(np.concatenate([self.own, self.nidx[self.own][self.nmask[self.own]]]))
        self.remap = np.full(len(spots), -1, np.int64)
        self.remap[used] = np.arange(len(used))
        self.spot_px = float(grid.spot_diameter)
        # a folder of its own: a spot tile as large as the cell tile must not extend (and so replace) the cells'
        # store while the cells' features are being read from it
        path = store_path_for(Path(store_dir) / "spots", slide_path, encoder, grid.spot_diameter, 0)
        self.store = extract_to_store(slide_path, spot_xy[used], grid.spot_diameter, encoder, path, n_sub=0,
                                      mpp=mpp, **extract)

    def bags(self, cell_features: np.ndarray, rows: np.ndarray):
        """Per-cell DeepSpot2Cell inputs of the cells ``rows`` (features ``cell_features``, in that order)."""
        own = self.own[rows]
        need = np.unique(np.concatenate([own, self.nidx[own][self.nmask[own]]]))
        local = np.full(len(self.remap), -1, np.int64)
        local[need] = np.arange(len(need))
        nb = local[self.nidx[need]]
        sfeats = self.store.spot_rows(self.remap[need])
        bags = SpotContextBags.build(cell_features, sfeats, np.maximum(nb, 0), self.nmask[need] & (nb >= 0),
                                     np.full(len(rows), -1, np.int64), local[own])
        return bags.cells_view()


def predict_cells(slide_path, xy: np.ndarray, model, config: ModelConfig | dict, encoder, cell_ids=None, mpp: float | None = None,
                  batch_size: int = 16, num_workers: int = 0, cache_dir=None, device="cpu", autocast_dtype=None,
                  progress: bool = True, library_id: str | None = None, thumbnail_size: int = 2000,
                  drop_outside: bool = False, predict_batch: int = 512,
                  stats: ExtractStats | None = None, block_size: int = 16384, boxes: np.ndarray | None = None,
                  source: str | None = None, out: str | Path | None = None,
                  target: str | Path | None = None) -> ad.AnnData:
    """Predict every cell of a centroid table (N,2 level-0 px) on a slide with a DeepCell or
    DeepSpot2Cell checkpoint.

    Returns AnnData (cells × genes, log1p-normalised expression) with obsm['spatial'] (x, y) px,
    uns['spatial'][library_id] (thumbnail + scalefactors, spot_diameter_fullres = cell tile px) and
    uns['deepspot'] (provenance, neighbour rule). Cells go through in blocks of ``block_size``: features
    are written to the feature store (``cache_dir``, else a temporary one) and read back per block.

    ``boxes`` (N,4: x0, y0, x1, y1 level-0 px): the cells' polygon bounding boxes, needed when the checkpoint's
    cell crop is 'bbox' (the crop it was trained with); ``source`` names the cell file in errors.

    ``out``: write the h5ad there block by block (:class:`deepspot.io.cells_h5ad.BlockedRows`; the path is
    written as it is: pass a temp path to make it atomic, ``target`` the final name for messages), never holding
    every prediction; the AnnData returned then has no X, and its ``var`` holds each gene's ``mean`` and
    ``variance`` over the cells (not written to the file, which reads back as the in-memory result).
    """
    config = ModelConfig.coerce(config)
    check_cell_model(config, "checkpoint")
    geom = config.geometry
    check_cell_boxes(config, boxes, source)
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
    centers, side = cell_crops(geom, xy, None if boxes is None else np.asarray(boxes)[keep], mpp_used,
                               source or "cells")
    tile = float(np.median(side)) if np.ndim(side) else float(side)  # the crop side (bbox: the median one)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    extract = dict(batch_size=batch_size, num_workers=num_workers, device=device, autocast_dtype=autocast_dtype,
                   progress=progress, stats=stats)
    predictor = cell_predictor(model)
    genes = list(config.genes)
    with contextlib.ExitStack() as stack:
        if out is not None:
            sink = BlockedRows(len(xy), len(genes), Path(out).parent)
            stack.callback(sink.close)
            write = sink.write
        else:
            X = np.zeros((len(xy), len(genes)), np.float32)
            write = X.__setitem__
        store_dir = cache_dir if cache_dir is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="deepspot-cells-"))
        # encoded (and stored) in the Z order the blocks follow: a block's rows then lie in a few chunks of the
        # store, whatever the order of the input table
        order = spatial_order(xy)
        side_o = side[order] if np.ndim(side) else side
        store = _Reordered(extract_to_store(slide_path, centers[order], side_o, encoder,
                                            store_path_for(store_dir, slide_path, encoder, side_o, 0), n_sub=0,
                                            mpp=mpp, what="cells", **extract), order)
        if config.model == "deepspot2cell":
            ctx = SpotContext(slide_path, xy, config, encoder, w, h, mpp_used, store_dir, **extract)
            context_note = f"spot tile {ctx.spot_px:g} px of the nearest grid spot + its neighbour spots"
            make = lambda rows: ctx.bags(store.spot_rows(rows), rows)  # noqa: E731
        else:
            from scipy.spatial import cKDTree

            tree = cKDTree(xy)
            context_note = geom.describe()
            make = lambda rows: cell_block_bags(store, tree, len(xy), xy, rows, geom, mpp_used)  # noqa: E731
        for a in range(0, len(xy), block_size):
            rows = order[a:a + block_size]
            pred = predict_batches(predictor, make(rows), batch_size=predict_batch, device=device)
            write(rows, invert_scaler(pred, config.scaler).astype(np.float32, copy=False))
        adata = ad.AnnData(X=None if out is not None else X, obs=pd.DataFrame(index=ids),
                           var=pd.DataFrame(index=genes))
        adata.obsm["spatial"] = xy
        _describe(adata, slide_path, library_id, thumb, w, tile, config, geom, context_note, mpp_used, keep)
        if out is not None:
            sink.finish(out, adata, target)
            adata.var["mean"], adata.var["variance"] = sink.mean, sink.variance
    return adata


def _describe(adata, slide_path, library_id, thumb, w, tile, config, geom, context_note, mpp_used, keep) -> None:
    """uns of a cells AnnData: the thumbnail with its scale factors, and the provenance of the predictions."""
    lib = library_id or Path(slide_path).stem
    add_spatial_image(adata, lib, thumb, thumb.shape[1] / w, tile, source_image_path=str(slide_path))
    adata.uns["deepspot"] = {
        "model": config.model, "encoder": config.encoder.name, "cell_crop": geom.crop, "cell_tile_px": float(tile),
        "neighbors": context_note, "mpp": float(mpp_used) if mpp_used else -1.0,
        "n_dropped_outside": int((~keep).sum()),
        "values": "predicted log1p(counts per 10k) per cell",
    }
