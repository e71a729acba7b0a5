"""Cell segmentations as cell inputs: each cell's polygon gives its centroid and the side of the square around
its bounding box (the cell crop of the original DeepSpot2Cell's ``dataset_creation.py``: a square centred
on the polygon's centroid, side = the larger of the bounding box's width and height).

Layouts read (no shapely needed: area centroids by the shoelace formula, bounding boxes by min/max):

- GeoJSON (HEST, CellViT, QuPath exports): a FeatureCollection whose features are ``Polygon`` (one cell
  each) or ``MultiPolygon`` (CellViT groups the cells of one type in one feature: each polygon is a cell);
  coordinates in level-0 px; ids from ``properties`` ``cell_id`` / ``id`` / ``name`` where unique, else
  ``cell_<n>``.
- Xenium ``cell_boundaries.parquet`` / ``.csv.gz`` (cell_id, vertex_x, vertex_y in µm; each polygon's
  vertices in order): pixel = µm / ``um_per_px`` (the image registered to the Xenium coordinates, as
  :func:`deepspot.io.spatial.read_xenium` assumes without an alignment).
- A centroid table (:func:`deepspot.io.spatial.read_cell_table`): no polygons, so no bounding boxes (an h5ad
  of cells may carry them in ``obsm['cell_bbox']``).

Each cell's bounding box (x0, y0, x1, y1 level-0 px) is what a ``bbox`` cell crop
(:class:`~deepspot.config.CellGeometry`) cuts, squared around the box centre (the original centres its
square on the centroid; around the box centre the square always holds the whole box).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from deepspot.io.spatial import SpatialDataError, read_cell_table
from deepspot.io.xenium import read_xenium_table


CELL_BOX_KEY = "cell_bbox"  # obsm key of the cells' polygon bounding boxes (x0, y0, x1, y1) level-0 px


@dataclass
class Segmentation:
    """Cells of a segmentation: ids (N,), centroids xy (N,2) level-0 px, side (N,) px of the square around
    each polygon's bounding box and boxes (N,4) the bounding boxes (x0, y0, x1, y1) level-0 px (both None for a
    centroid table)."""

    ids: pd.Index
    xy: np.ndarray
    side: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)


def polygon_boxes(vertices: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Bounding boxes (P,4: x0, y0, x1, y1) of P polygons stored as in :func:`polygon_geometry`."""
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    starts = np.asarray(starts, dtype=np.int64)
    if not len(starts):
        return np.zeros((0, 4))
    return np.stack([np.minimum.reduceat(v[:, 0], starts), np.minimum.reduceat(v[:, 1], starts),
                     np.maximum.reduceat(v[:, 0], starts), np.maximum.reduceat(v[:, 1], starts)], axis=1)


def polygon_geometry(vertices: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area centroids (P,2) and bounding-box square sides (P,) of P polygons whose vertices (V,2) are stored
    one polygon after the other, polygon p from ``starts[p]`` (a closing vertex equal to the first is
    allowed). A polygon of zero area gets the mean of its vertices. Their boxes: :func:`polygon_boxes`."""
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.diff(np.append(starts, len(v)))
    if len(starts) and counts.min() < 1:
        raise ValueError("a polygon without vertices")
    poly = np.repeat(np.arange(len(starts)), counts)
    nxt = np.arange(len(v)) + 1
    last = starts + counts - 1
    nxt[last] = starts  # each polygon closes on its first vertex
    x0, y0, x1, y1 = v[:, 0], v[:, 1], v[nxt, 0], v[nxt, 1]
    cross = x0 * y1 - x1 * y0
    area2 = np.bincount(poly, cross, minlength=len(starts))
    cx = np.bincount(poly, (x0 + x1) * cross, minlength=len(starts))
    cy = np.bincount(poly, (y0 + y1) * cross, minlength=len(starts))
    mean = np.stack([np.bincount(poly, v[:, 0], minlength=len(starts)),
                     np.bincount(poly, v[:, 1], minlength=len(starts))], 1) / np.maximum(counts, 1)[:, None]
    ok = np.abs(area2) > 1e-12 * np.maximum(1.0, np.abs(v).max() ** 2 if len(v) else 1.0)
    safe = np.where(ok, area2, 1.0)
    xy = np.where(ok[:, None], np.stack([cx, cy], 1) / (3.0 * safe[:, None]), mean)
    box = polygon_boxes(v, starts)
    return xy, np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])


def _ring(coords, path) -> np.ndarray:
    ring = np.asarray(coords, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3:
        raise SpatialDataError(f"{path}: a polygon ring is not a list of at least 3 [x, y] points")
    return ring[:, :2]


def read_geojson_cells(path: str | Path) -> Segmentation:
    """Cells of a GeoJSON FeatureCollection (or a list of features) of Polygon / MultiPolygon geometries."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpatialDataError(f"{path}: cannot read GeoJSON ({type(e).__name__})") from None
    feats = doc.get("features") if isinstance(doc, dict) else doc
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    if not isinstance(feats, list):
        raise SpatialDataError(f"{path}: not a GeoJSON FeatureCollection")
    rings, names = [], []
    for i, f in enumerate(feats):
        geom = (f or {}).get("geometry") or {}
        props = (f or {}).get("properties") or {}
        name = next((props[k] for k in ("cell_id", "id", "name") if k in props), f.get("id") if f else None)
        if geom.get("type") == "Polygon":
            rings.append(_ring(geom["coordinates"][0], path))  # the outer ring; holes do not move a crop
            names.append(None if name is None else str(name))
        elif geom.get("type") == "MultiPolygon":
            for j, poly in enumerate(geom["coordinates"]):
                rings.append(_ring(poly[0], path))
                names.append(None if name is None else f"{name}_{j}")
        else:
            raise SpatialDataError(f"{path}: feature {i} is a {geom.get('type')!r}, not a Polygon or MultiPolygon")
    if not rings:
        raise SpatialDataError(f"{path}: no cell polygons")
    starts = np.cumsum([0] + [len(r) for r in rings[:-1]])
    vertices = np.concatenate(rings)
    xy, side = polygon_geometry(vertices, starts)
    ids = pd.Index(names) if all(n is not None for n in names) and len(set(names)) == len(names) else \
        pd.Index([f"cell_{i}" for i in range(len(rings))])
    return Segmentation(ids.astype(str), xy, side, polygon_boxes(vertices, starts))


def read_xenium_boundaries(path: str | Path, um_per_px: float | None = None,
                           affine: np.ndarray | None = None) -> Segmentation:
    """Cells of a Xenium ``cell_boundaries.parquet`` / ``.csv(.gz)`` (µm vertices) in pixels of an image at
    ``um_per_px`` registered to the Xenium coordinates, or mapped by ``affine`` (2×3: px = A @ [x_um, y_um, 1],
    e.g. :func:`um_to_px_affine` of the cells' µm and pixel centroids). The vertices are mapped first, then
    each polygon's box is taken (a box of a rotated polygon is not a rotated box)."""
    path = Path(path)
    if affine is None and (not um_per_px or um_per_px <= 0):
        raise ValueError(f"{path}: Xenium boundaries are in µm: give the image's µm per pixel")
    df = read_xenium_table(path, "cell boundaries", ("vertex_x", "vertex_y"))
    ids = df["cell_id"].to_numpy()
    new = np.r_[True, ids[1:] != ids[:-1]]
    starts = np.flatnonzero(new)
    order_ids = pd.Index(ids[starts])
    if not order_ids.is_unique:
        raise SpatialDataError(f"{path}: the vertices of a cell are not consecutive (e.g. {order_ids[order_ids.duplicated()][0]})")
    um = df[["vertex_x", "vertex_y"]].to_numpy(dtype=np.float64)
    vertices = um / float(um_per_px) if affine is None else um @ np.asarray(affine)[:, :2].T + np.asarray(affine)[:, 2]
    xy, side = polygon_geometry(vertices, starts)
    return Segmentation(order_ids, xy, side, polygon_boxes(vertices, starts))


def um_to_px_affine(um: np.ndarray, px: np.ndarray, source: str = "cells") -> np.ndarray:
    """The affine map (2×3) from µm to pixel positions that a reader applied to the cells (least squares over
    their centroids; a reader's map is affine, so the fit is exact up to rounding): what maps their
    boundaries' µm vertices into the same image."""
    um, px = np.asarray(um, np.float64).reshape(-1, 2), np.asarray(px, np.float64).reshape(-1, 2)
    a = np.c_[um, np.ones(len(um))]
    if len(um) < 3 or np.linalg.matrix_rank(a) < 3:
        raise SpatialDataError(f"{source}: 3 cells not on one line are needed to map µm boundaries into the image")
    coef, *_ = np.linalg.lstsq(a, px, rcond=None)
    err = np.abs(a @ coef - px).max()
    if err > 0.5:
        raise SpatialDataError(f"{source}: the cells' µm and pixel positions are not related by one affine map "
                               f"(off by up to {err:.1f} px); cannot place their boundaries")
    return coef.T


BOUNDARY_FILES = ("cell_boundaries.parquet", "cell_boundaries.csv.gz", "cell_boundaries.csv")


def attach_cell_boxes(cells, segmentation: str | Path | None, source: str = "cells"):
    """Put each cell's polygon bounding box (level-0 px) in ``cells.obsm['cell_bbox']`` (x0, y0, x1, y1),
    matched by cell id (``obs_names``), and return ``cells``.

    ``segmentation``: a GeoJSON of cell polygons (px), a Xenium ``cell_boundaries`` file (µm, mapped by the
    map the reader applied to the cells' centroids: ``obsm['spatial_um']`` → ``obsm['spatial']``), or a Xenium
    output folder holding one; None: the boxes the cells carry already. Every cell needs a polygon (the ones
    without are named)."""
    path = Path(segmentation) if segmentation is not None else None
    if path is None and CELL_BOX_KEY in cells.obsm:  # the cells carry their boxes already
        return cells
    if path is not None and path.is_dir():
        found = next((path / n for n in BOUNDARY_FILES if (path / n).exists()), None)
        if found is None:
            raise SpatialDataError(f"{path}: no cell polygons ({' / '.join(BOUNDARY_FILES)}) to crop cells by "
                                   f"their bounding box; give --segmentation (a GeoJSON of cell polygons)")
        path = found
    if path is None or not path.exists():
        raise SpatialDataError(f"{source}: cells are cropped by their polygon's bounding box: give their "
                               f"segmentation (a GeoJSON of cell polygons or a Xenium cell_boundaries file)"
                               + (f"; {path} not found" if path is not None else ""))
    name = path.name.lower()
    if name.endswith((".geojson", ".json")):
        seg = read_geojson_cells(path)
    elif "cell_boundaries" in name:
        if "spatial_um" not in cells.obsm:
            raise SpatialDataError(f"{path}: Xenium boundaries are in µm, but {source} carries no µm positions "
                                   f"(obsm['spatial_um']) to place them; read the cells with the Xenium reader")
        seg = read_xenium_boundaries(path, affine=um_to_px_affine(cells.obsm["spatial_um"], cells.obsm["spatial"],
                                                                  source))
    else:
        raise SpatialDataError(f"{path}: not a cell segmentation (a .geojson of polygons or a Xenium "
                               f"cell_boundaries file)")
    pos = seg.ids.get_indexer(pd.Index(cells.obs_names.astype(str)))
    if (pos < 0).any():
        missing = cells.obs_names[pos < 0]
        raise SpatialDataError(f"{path}: {len(missing)} of {cells.n_obs} cells of {source} have no polygon "
                               f"(e.g. {list(missing[:3])})")
    cells.obsm[CELL_BOX_KEY] = seg.boxes[pos]
    return cells


def read_segmentation(path: str | Path, um_per_px: float | None = None, x_col: str = "x", y_col: str = "y",
                      id_col: str | None = None) -> Segmentation:
    """Cells from a segmentation file, by its name: ``*.geojson`` / ``*.json`` (polygons, px),
    ``*cell_boundaries*`` (Xenium polygons, µm: needs ``um_per_px``), else a centroid table."""
    path = Path(path)
    name = path.name.lower()
    if not path.exists():
        raise SpatialDataError(f"{path}: segmentation not found")
    if name.endswith((".geojson", ".json")):
        return read_geojson_cells(path)
    if "cell_boundaries" in name:
        return read_xenium_boundaries(path, um_per_px)
    ids, xy = read_cell_table(path, x_col=x_col, y_col=y_col, id_col=id_col)
    boxes = None
    if name.endswith(".h5ad"):  # an h5ad of cells may carry their boxes (obsm['cell_bbox'])
        boxes = _h5ad_boxes(path, len(xy))
    return Segmentation(ids, xy, None, boxes)


def _h5ad_boxes(path: Path, n: int) -> np.ndarray | None:
    import h5py

    with h5py.File(path, "r") as f:
        key = f"obsm/{CELL_BOX_KEY}"
        if key not in f:
            return None
        boxes = np.asarray(f[key][:], dtype=np.float64)
    if boxes.shape != (n, 4):
        raise SpatialDataError(f"{path}: obsm['{CELL_BOX_KEY}'] must be (cells, 4) boxes, has shape {boxes.shape}")
    return boxes


__all__ = ["BOUNDARY_FILES", "CELL_BOX_KEY", "Segmentation", "attach_cell_boxes", "polygon_boxes", "polygon_geometry",
           "read_geojson_cells", "read_segmentation", "read_xenium_boundaries", "um_to_px_affine"]
