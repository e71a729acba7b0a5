"""Xenium outputs: the cells table and the cell-feature matrix, registered to an H&E."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.io.spaceranger import join_positions, read_10x_counts
from deepspot.io.spatial_checks import XENIUM_PIXEL_UM, SpatialDataError, _need, _source, check_counts, check_image


def read_xenium_cells(path: str | Path, sample: str) -> pd.DataFrame:
    """Xenium ``cells.csv(.gz)`` or ``cells.parquet``: index cell_id; needs x_centroid, y_centroid (µm)."""
    path = Path(path)
    _need(path, sample, "cells table")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:
        raise SpatialDataError(f"{sample}: cannot read cells table {path} ({type(e).__name__})") from None
    missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in df.columns]
    if missing:
        raise SpatialDataError(f"{sample}: cells table {path.name} lacks columns {missing}")
    df["cell_id"] = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    df = df.set_index("cell_id")
    xy = df[["x_centroid", "y_centroid"]].apply(pd.to_numeric, errors="coerce")
    if not np.isfinite(xy.to_numpy()).all():
        raise SpatialDataError(f"{sample}: cells table {path.name} has missing or non-numeric centroids")
    return df


def read_xenium(folder: str | Path, image: str | Path | None = None, sample: str | None = None,
                mpp: float | None = None, alignment: str | Path | None = None) -> ad.AnnData:
    """A Xenium output folder: ``cell_feature_matrix.h5`` + ``cells.parquet`` or ``cells.csv.gz``.

    Centroids are in µm. Without ``alignment`` the image is taken to be registered to the Xenium
    coordinates (as the morphology image, or an H&E already aligned, e.g. HEST): pixel = µm / mpp, with
    ``mpp`` defaulting to ``pixel_size`` from ``experiment.xenium`` (0.2125). With ``alignment`` (the 3×3
    affine of Xenium Explorer's ``*_imagealignment.csv``, mapping H&E pixels to Xenium morphology pixels)
    the centroids are mapped back into the H&E with its inverse, and ``mpp`` is the H&E's (from the slide
    when not given). ``obsm['spatial_um']`` keeps the µm centroids.
    """
    folder = Path(folder)
    sample = sample or folder.name
    if not folder.is_dir():
        raise SpatialDataError(f"{sample}: Xenium folder not found ({folder})")
    table = next((folder / n for n in ("cells.parquet", "cells.csv.gz", "cells.csv") if (folder / n).exists()), None)
    if table is None:
        raise SpatialDataError(f"{sample}: no cells.parquet / cells.csv.gz in {folder}")
    cells = read_xenium_cells(table, sample)
    counts = read_10x_counts(folder / "cell_feature_matrix.h5", sample)
    a = join_positions(counts, cells, sample, what="cell ids")
    um = a.obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    px_um = XENIUM_PIXEL_UM
    exp = folder / "experiment.xenium"
    if exp.exists():
        try:
            px_um = float(json.loads(exp.read_text()).get("pixel_size", XENIUM_PIXEL_UM))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise SpatialDataError(f"{sample}: invalid experiment.xenium") from None
    if alignment is not None:
        try:
            m = np.loadtxt(alignment, delimiter=",", dtype=np.float64).reshape(3, 3)
            inv = np.linalg.inv(m)
        except Exception as e:
            raise SpatialDataError(f"{sample}: alignment {alignment} is not an invertible 3x3 matrix "
                                   f"({type(e).__name__})") from None
        h = np.c_[um / px_um, np.ones(len(um))] @ inv.T
        xy = h[:, :2] / h[:, 2:3]
        if mpp is None and image is not None:
            from deepspot.io.slides import open_slide

            with open_slide(image) as s:
                mpp = s.mpp
    else:
        mpp = px_um if mpp is None else float(mpp)
        xy = um / mpp
    a.obsm["spatial"] = xy
    a.obsm["spatial_um"] = um
    check_counts(a, sample)
    if image is not None:
        check_image(a, image, sample, mpp)
    _source(a, "xenium", sample, mpp, None)
    return a
