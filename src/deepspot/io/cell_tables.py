"""Cells (or spots) with positions from an h5ad or a table."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.io.spatial_checks import SpatialDataError, check_counts


def read_cells_h5ad(path: str | Path, x_col: str | None = None, y_col: str | None = None) -> ad.AnnData:
    """An h5ad of cells or spots with positions: ``obsm['spatial']`` or obs columns (x_col, y_col)."""
    path = Path(path)
    if not path.exists():
        raise SpatialDataError(f"{path}: file not found")
    try:
        a = ad.read_h5ad(path)
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read h5ad ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if x_col is not None and y_col is not None:
        missing = [c for c in (x_col, y_col) if c not in a.obs]
        if missing:
            raise SpatialDataError(f"{path}: position columns {missing} not in obs (has {list(a.obs.columns)[:10]})")
        a.obsm["spatial"] = a.obs[[x_col, y_col]].to_numpy(dtype=np.float64)
    if "spatial" not in a.obsm:
        raise SpatialDataError(f"{path}: no positions (obsm['spatial'] or x/y obs columns)")
    xy = np.asarray(a.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2 or not np.isfinite(xy[:, :2]).all():
        raise SpatialDataError(f"{path}: obsm['spatial'] must be finite (N, 2) positions")
    a.obsm["spatial"] = xy[:, :2]
    a.var_names_make_unique()
    check_counts(a, path)
    return a


def read_cell_table(path: str | Path, x_col: str = "x", y_col: str = "y", id_col: str | None = None):
    """Cell centroids from CSV/TSV/parquet (columns ``x_col``, ``y_col``: level-0 px, x horizontal),
    an h5ad (obs columns or obsm['spatial']) or a GeoJSON of cell polygons (:mod:`deepspot.io.segmentation`). Returns (ids pd.Index of str, xy (N,2) float64)."""
    path = Path(path)
    if not path.exists():
        raise SpatialDataError(f"{path}: cell table not found")
    name = path.name.lower()
    if name.endswith(".geojson"):  # cell polygons (HEST / CellViT): their area centroids
        from deepspot.io.segmentation import read_geojson_cells

        seg = read_geojson_cells(path)
        return seg.ids, seg.xy
    if name.endswith(".h5ad"):
        a = read_cells_h5ad(path, *((x_col, y_col) if x_col in _obs_columns(path) else (None, None)))
        return pd.Index(a.obs_names.astype(str)), np.asarray(a.obsm["spatial"], dtype=np.float64)
    try:
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        else:
            sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
            df = pd.read_csv(path, sep=sep)
    except ImportError as e:
        raise SpatialDataError(f"{path}: reading parquet needs pyarrow ({e}); install it or pass a CSV") from None
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read cell table ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    missing = [c for c in (x_col, y_col) if c not in df.columns]
    if missing:
        raise SpatialDataError(f"{path}: cell table needs centroid columns {missing} (level-0 px, x horizontal); "
                               f"found {list(map(str, df.columns))[:10]}; choose them with --x-col/--y-col")
    if len(df) == 0:
        raise SpatialDataError(f"{path}: cell table has no rows")
    try:
        xy = df[[x_col, y_col]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise SpatialDataError(f"{path}: columns {x_col!r}/{y_col!r} are not numeric") from None
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise SpatialDataError(f"{path}: {int(bad.sum())} cells have missing or non-finite centroids "
                               f"(first at row {int(np.flatnonzero(bad)[0])})")
    if id_col is not None and id_col not in df.columns:
        raise SpatialDataError(f"{path}: id column {id_col!r} not in the table")
    id_col = id_col or ("cell_id" if "cell_id" in df.columns else None)
    ids = pd.Index(df[id_col].astype(str) if id_col else df.index.astype(str))
    if not ids.is_unique:
        raise SpatialDataError(f"{path}: duplicated cell ids, e.g. {ids[ids.duplicated()][:3].tolist()}")
    return ids, xy


def _obs_columns(path: Path) -> list[str]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return list(f["obs"].keys()) if "obs" in f else []
    except OSError:
        return []
