"""Read spatial expression into AnnData with scverse conventions: ``obsm['spatial']`` = (x, y)
level-0 pixels (x horizontal), raw counts in ``X``.
The readers live by format (``spatial_checks``, ``cell_tables``, ``spaceranger``, ``xenium``, ``spatial_h5ad``);
this module keeps their import path."""
from __future__ import annotations

from pathlib import Path

import anndata as ad

from deepspot.io.cell_tables import _obs_columns, read_cell_table, read_cells_h5ad
from deepspot.io.spaceranger import (_image_size, check_scalefactors, join_positions, read_10x_counts,
                                     read_scalefactors, read_spaceranger, read_spaceranger_positions)
from deepspot.io.spatial_checks import (ST_PITCH_UM, ST_SPOT_UM, VISIUM_SPOT_UM, XENIUM_PIXEL_UM, SpatialDataError,
                                        _need, _source, check_counts, check_image, check_inside, inside_image, log)
from deepspot.io.spatial_h5ad import read_her2st, read_hest, read_spatial_h5ad, st_pitch_px
from deepspot.io.xenium import read_xenium, read_xenium_cells

__all__ = ["SpatialDataError", "check_counts", "check_image", "check_inside", "check_scalefactors", "inside_image",
           "join_positions", "read_10x_counts", "read_cell_table", "read_cells_h5ad", "read_counts", "read_her2st",
           "read_hest", "read_scalefactors", "read_spaceranger", "read_spaceranger_positions", "read_spatial_h5ad",
           "read_xenium", "read_xenium_cells", "st_pitch_px", "ST_PITCH_UM", "ST_SPOT_UM", "VISIUM_SPOT_UM",
           "XENIUM_PIXEL_UM", "_image_size", "_need", "_obs_columns", "_source", "log"]


def read_counts(path: str | Path, image: str | Path | None = None, x_col: str | None = None,
                y_col: str | None = None, mpp: float | None = None) -> ad.AnnData:
    """Counts + positions to train on: a Xenium output folder (its cells registered to ``image``) or an
    h5ad (positions in obsm['spatial'], or obs columns ``x_col``/``y_col``), as AnnData of raw counts
    (``uns['source']['path']`` names the file, for error messages)."""
    path = Path(path)
    a = read_xenium(path, image=image, mpp=mpp) if path.is_dir() else read_cells_h5ad(path, x_col=x_col, y_col=y_col)
    a.uns["source"] = {**a.uns.get("source", {}), "path": str(path)}
    return a


