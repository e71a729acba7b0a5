"""Read spatial expression into AnnData with scverse conventions: ``obsm['spatial']`` = (x, y)
level-0 pixels (x horizontal), raw counts in ``X``."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp


class SpatialDataError(Exception):
    """Bad expression/position input; the message names the file and the problem."""


def check_counts(adata: ad.AnnData, source: str | Path) -> None:
    """Counts must be finite and non-negative."""
    X = adata.X
    data = X.data if sp.issparse(X) else np.asarray(X)
    if data.size and not np.isfinite(data).all():
        raise SpatialDataError(f"{source}: counts contain NaN or infinite values")
    if data.size and (data < 0).any():
        raise SpatialDataError(f"{source}: counts contain negative values")
    if not adata.obs_names.is_unique:
        dup = adata.obs_names[adata.obs_names.duplicated()][:3].tolist()
        raise SpatialDataError(f"{source}: duplicated barcodes/cell ids, e.g. {dup}")


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


def check_inside(xy: np.ndarray, width: int, height: int, source: str, what: str = "positions") -> None:
    """Refuse positions outside the image (the usual sign of a scale mismatch)."""
    xy = np.asarray(xy)
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise SpatialDataError(
            f"{source}: {int(out.sum())} of {len(xy)} {what} lie outside the {width}x{height} image "
            f"(e.g. x={xy[i, 0]:.0f}, y={xy[i, 1]:.0f}); wrong image or scale?")
