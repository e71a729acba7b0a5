"""Spot grids: Visium-like hexagonal (and square) virtual grids, and pooling of cells into spots.

Geometry is given in µm and converted with the slide's mpp; without an mpp the
numbers are taken as pixels, and :class:`GridSpec` records which.
Coordinates: ``x`` horizontal, ``y`` vertical, level-0 pixels (scverse ``obsm["spatial"]``).
"""
from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from deepspot.config import GridSpec

SQRT3_2 = np.sqrt(3.0) / 2.0


def make_grid(width: float, height: float, spec: GridSpec) -> pd.DataFrame:
    """Spot centres covering a width × height pixel image (spec in px).

    Hex layout follows Visium's array coordinates: ``array_col`` steps by 2 along a
    row (one step = spacing/2 horizontally), odd rows are shifted by one column,
    rows are spacing·√3/2 apart. Origin 'original' (square only): the original DeepSpot's pixel grid,
    centres at whole pixels ``D + 1 + k·spacing`` below ``size - D - 1`` in each axis (D and spacing
    rounded to whole pixels), array_row / array_col the row / column numbers.
    Returns columns array_row, array_col, x, y.
    """
    if spec.unit != "px":
        raise ValueError("make_grid needs a grid in pixels; call spec.in_pixels(mpp) first")
    if spec.origin == "original":
        d, step = int(round(spec.spot_diameter)), max(1, int(round(spec.spacing)))
        ys = np.arange(d + 1, int(height) - d - 1, step) + spec.offset_y
        xs = np.arange(d + 1, int(width) - d - 1, step) + spec.offset_x
        rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
        return pd.DataFrame({"array_row": rows.astype(int), "array_col": cols.astype(int),
                             "x": xs[cols].astype(float), "y": ys[rows].astype(float)})
    r = spec.spot_diameter / 2.0
    x0, y0 = spec.offset_x + r, spec.offset_y + r
    if spec.layout == "hex":
        dy = spec.spacing * SQRT3_2
        dx = spec.spacing / 2.0
        n_rows = int(np.floor((height - y0 - r) / dy)) + 1 if height - y0 - r >= 0 else 0
        n_cols = int(np.floor((width - x0 - r) / dx)) + 1 if width - x0 - r >= 0 else 0
        rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        keep = (rows % 2) == (cols % 2)
        rows, cols = rows[keep], cols[keep]
        x, y = x0 + cols * dx, y0 + rows * dy
    else:
        d = spec.spacing
        n_rows = int(np.floor((height - y0 - r) / d)) + 1 if height - y0 - r >= 0 else 0
        n_cols = int(np.floor((width - x0 - r) / d)) + 1 if width - x0 - r >= 0 else 0
        rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
        x, y = x0 + cols * d, y0 + rows * d
    return pd.DataFrame({"array_row": rows.astype(int), "array_col": cols.astype(int),
                         "x": x.astype(float), "y": y.astype(float)})


def pool_cells(cells: ad.AnnData, width: float, height: float, spec: GridSpec, min_cells: int = 1):
    """Pool cells into pseudo-spots on a grid (spec in px): counts are summed over the cells
    whose centre lies in a spot's disc.

    cells: AnnData with raw counts and ``obsm["spatial"]`` (x, y) in px.
    Returns (spots AnnData with obs array_row, array_col, n_cells and obsm["spatial"],
    cell_to_spot (n_cells,) int index into spots or -1).
    """
    grid = make_grid(width, height, spec)
    xy = np.asarray(cells.obsm["spatial"], dtype=float)
    tree = cKDTree(grid[["x", "y"]].to_numpy())
    dist, nearest = tree.query(xy, k=1)
    inside = dist <= spec.spot_diameter / 2.0
    cell_to_grid = np.where(inside, nearest, -1)
    counts_per_spot = np.bincount(cell_to_grid[inside], minlength=len(grid))
    keep = np.flatnonzero(counts_per_spot >= min_cells)
    remap = -np.ones(len(grid), dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    cell_to_spot = np.where(cell_to_grid >= 0, remap[np.maximum(cell_to_grid, 0)], -1)
    # sum counts with a sparse (spots × cells) assignment matrix
    member = np.flatnonzero(cell_to_spot >= 0)
    assign = sp.csr_matrix((np.ones(len(member)), (cell_to_spot[member], member)),
                           shape=(len(keep), cells.n_obs))
    X = cells.X
    summed = assign @ (X if sp.issparse(X) else np.asarray(X, dtype=np.float64))
    summed = np.asarray(summed.todense() if sp.issparse(summed) else summed, dtype=np.float32)
    g = grid.iloc[keep].reset_index(drop=True)
    obs = pd.DataFrame({
        "array_row": g["array_row"].to_numpy(), "array_col": g["array_col"].to_numpy(),
        "n_cells": counts_per_spot[keep],
    }, index=[f"spot_{r}x{c}" for r, c in zip(g["array_row"], g["array_col"])])
    spots = ad.AnnData(X=summed, obs=obs, var=cells.var.copy())
    spots.obsm["spatial"] = g[["x", "y"]].to_numpy()
    spots.uns["grid"] = spec.to_dict()
    return spots, cell_to_spot
