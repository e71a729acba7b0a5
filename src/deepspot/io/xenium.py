"""Xenium outputs: the cells table and the cell-feature matrix, registered to an H&E."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.io.spaceranger import join_positions, read_10x_counts
from deepspot.io.spatial_checks import XENIUM_PIXEL_UM, SpatialDataError, _source, check_counts, check_image


def read_xenium_table(path: str | Path, what: str, numeric: tuple[str, ...], source: str | None = None) -> pd.DataFrame:
    """A Xenium table (``.parquet``, ``.csv`` or ``.csv.gz``) of ``cell_id`` (as str; parquet's bytes decoded)
    and the ``numeric`` columns (as floats, every value finite). Each fault is a SpatialDataError in one
    wording, ``[<source>: ]<what> <path> …``, naming the file and, for a missing column, the column.
    Read by the cells table (:func:`read_xenium_cells`) and the cell boundaries
    (:func:`deepspot.io.segmentation.read_xenium_boundaries`)."""
    path = Path(path)
    at = f"{source}: " if source else ""
    if not path.exists():
        raise SpatialDataError(f"{at}{what} {path} not found")
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as e:
        raise SpatialDataError(f"{at}{what} {path} cannot be read ({type(e).__name__})") from None
    missing = [c for c in ("cell_id", *numeric) if c not in df.columns]
    if missing:
        raise SpatialDataError(f"{at}{what} {path} lacks columns {missing}")
    df["cell_id"] = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    for c in numeric:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
        if not np.isfinite(df[c].to_numpy()).all():
            raise SpatialDataError(f"{at}{what} {path} has missing or non-numeric values in column {c!r}")
    return df


def read_xenium_cells(path: str | Path, sample: str) -> pd.DataFrame:
    """Xenium ``cells.csv(.gz)`` or ``cells.parquet``: index cell_id; needs x_centroid, y_centroid (µm)."""
    return read_xenium_table(path, "cells table", ("x_centroid", "y_centroid"), sample).set_index("cell_id")


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
