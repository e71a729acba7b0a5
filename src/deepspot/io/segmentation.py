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
- A centroid table (:func:`deepspot.io.spatial.read_cell_table`): no polygons, so no bounding boxes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from deepspot.io.spatial import SpatialDataError, read_cell_table


@dataclass
class Segmentation:
    """Cells of a segmentation: ids (N,), centroids xy (N,2) level-0 px, side (N,) px of the square around
    each polygon's bounding box (None for a centroid table)."""

    ids: pd.Index
    xy: np.ndarray
    side: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)


def polygon_geometry(vertices: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area centroids (P,2) and bounding-box square sides (P,) of P polygons whose vertices (V,2) are stored
    one polygon after the other, polygon p from ``starts[p]`` (a closing vertex equal to the first is
    allowed). A polygon of zero area gets the mean of its vertices."""
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
    lo = np.stack([np.minimum.reduceat(v[:, i], starts) for i in (0, 1)], 1) if len(starts) else np.zeros((0, 2))
    hi = np.stack([np.maximum.reduceat(v[:, i], starts) for i in (0, 1)], 1) if len(starts) else np.zeros((0, 2))
    return xy, (hi - lo).max(axis=1) if len(starts) else np.zeros(0)


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
    xy, side = polygon_geometry(np.concatenate(rings), starts)
    ids = pd.Index(names) if all(n is not None for n in names) and len(set(names)) == len(names) else \
        pd.Index([f"cell_{i}" for i in range(len(rings))])
    return Segmentation(ids.astype(str), xy, side)


def read_xenium_boundaries(path: str | Path, um_per_px: float) -> Segmentation:
    """Cells of a Xenium ``cell_boundaries.parquet`` / ``.csv(.gz)`` (µm vertices) in pixels of an image at
    ``um_per_px`` registered to the Xenium coordinates."""
    path = Path(path)
    if not um_per_px or um_per_px <= 0:
        raise ValueError(f"{path}: Xenium boundaries are in µm: give the image's µm per pixel")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read cell boundaries ({type(e).__name__})") from None
    missing = [c for c in ("cell_id", "vertex_x", "vertex_y") if c not in df.columns]
    if missing:
        raise SpatialDataError(f"{path}: cell boundaries lack columns {missing}")
    ids = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v)).to_numpy()
    new = np.r_[True, ids[1:] != ids[:-1]]
    starts = np.flatnonzero(new)
    order_ids = pd.Index(ids[starts])
    if not order_ids.is_unique:
        raise SpatialDataError(f"{path}: the vertices of a cell are not consecutive (e.g. {order_ids[order_ids.duplicated()][0]})")
    xy, side = polygon_geometry(df[["vertex_x", "vertex_y"]].to_numpy(dtype=np.float64) / float(um_per_px), starts)
    return Segmentation(order_ids, xy, side)


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
    return Segmentation(ids, xy, None)


__all__ = ["Segmentation", "polygon_geometry", "read_geojson_cells", "read_segmentation", "read_xenium_boundaries"]
