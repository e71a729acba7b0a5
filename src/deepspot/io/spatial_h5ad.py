"""Spatial h5ad files (HEST, any h5ad with positions) and the legacy Spatial Transcriptomics tables (HER2ST)."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from deepspot.io.cell_tables import read_cells_h5ad
from deepspot.io.spaceranger import join_positions
from deepspot.io.spatial_checks import (ST_PITCH_UM, ST_SPOT_UM, VISIUM_SPOT_UM, SpatialDataError, _need, _source,
                                        check_counts, check_image)

def read_hest(h5ad: str | Path, image: str | Path | None = None, metadata: str | Path | None = None,
              sample: str | None = None, mpp: float | None = None) -> ad.AnnData:
    """A HEST-1k sample: ``st/<id>.h5ad`` (raw counts, ``obsm['spatial']`` in full-res px of the WSI,
    obs array_row/array_col for Visium) + ``wsis/<id>.tif`` + optional ``metadata/<id>.json``
    (``pixel_size_um_estimated``, ``spot_diameter``). The metadata's mpp is used unless ``mpp`` is given."""
    h5ad = Path(h5ad)
    sample = sample or h5ad.stem
    a = read_cells_h5ad(h5ad)
    meta = {}
    if metadata is not None:
        try:
            meta = json.loads(_need(Path(metadata), sample, "metadata json").read_text())
        except json.JSONDecodeError as e:
            raise SpatialDataError(f"{sample}: invalid metadata {metadata} ({e.msg})") from None
    if mpp is None:
        v = meta.get("pixel_size_um_estimated", meta.get("pixel_size_um_embedded"))
        mpp = float(v) if v not in (None, "") else None
    spot = meta.get("spot_diameter")
    if spot in (None, ""):
        spot = VISIUM_SPOT_UM if "array_row" in a.obs else None
    if image is not None:
        check_image(a, image, sample, mpp)
    _source(a, "hest", sample, mpp, None if spot is None else float(spot), st_technology=str(meta.get("st_technology", "")))
    return a


def read_spatial_h5ad(h5ad: str | Path, image: str | Path | None = None, sample: str | None = None,
                      mpp: float | None = None, spot_diameter_um: float | None = None) -> ad.AnnData:
    """Any h5ad with raw counts and ``obsm['spatial']`` (x, y) px of ``image``. ``mpp`` and
    ``spot_diameter_um`` default to those the h5ad's own reader recorded in ``uns['source']`` (an h5ad
    written from ``ds.read.her2st`` keeps its 100 µm spots)."""
    h5ad = Path(h5ad)
    sample = sample or h5ad.stem
    a = read_cells_h5ad(h5ad)
    recorded = a.uns.get("source", {}) or {}
    mpp = mpp if mpp is not None else recorded.get("mpp")
    spot_diameter_um = spot_diameter_um if spot_diameter_um is not None else recorded.get("spot_diameter_um")
    if image is not None:
        check_image(a, image, sample, mpp)
    _source(a, "h5ad", sample, mpp, spot_diameter_um)
    return a


def st_pitch_px(array_xy: np.ndarray, pixel_xy: np.ndarray) -> float:
    """Pixels per array step of a legacy ST array: least-squares fit of pixel vs array coordinates
    (one affine per axis), mean of the two axes' slopes."""
    A = np.c_[array_xy, np.ones(len(array_xy))]
    coef, *_ = np.linalg.lstsq(A, pixel_xy, rcond=None)  # (3, 2)
    return float((abs(coef[0, 0]) + abs(coef[1, 1])) / 2.0)


def read_her2st(counts: str | Path, spots: str | Path | None = None, image: str | Path | None = None,
                sample: str | None = None, mpp: float | None = None, selected_only: bool = True) -> ad.AnnData:
    """A legacy Spatial Transcriptomics section as published for HER2ST (``{S}_counts.tsv.gz`` spots × genes,
    row names ``"{x}x{y}"``; ``{S}_spots.tsv`` with x, y, pixel_x, pixel_y, selected).

    Array coordinates: ``array_row = y`` and ``array_col = x`` (x runs with pixel_x, horizontally), so on
    the square ST grid the radius-1 neighbours of a spot are its 8 adjacent spots. Positions are
    (pixel_x, pixel_y) full-res px. Without ``mpp`` it is estimated from the 200 µm spot pitch
    (fit of pixel vs array coordinates; ≈ 0.686 µm/px for HER2ST). Spot diameter: 100 µm.
    """
    counts = Path(counts)
    sample = sample or counts.name.split("_counts")[0]
    spots = Path(spots) if spots is not None else counts.with_name(f"{sample}_spots.tsv")
    _need(counts, sample, "counts table")
    _need(spots, sample, "spots table")
    try:
        df = pd.read_csv(counts, sep="\t", index_col=0)
    except Exception as e:
        raise SpatialDataError(f"{sample}: cannot read counts {counts} ({type(e).__name__})") from None
    try:
        pos = pd.read_csv(spots, sep="\t")
    except Exception as e:
        raise SpatialDataError(f"{sample}: cannot read spots {spots} ({type(e).__name__})") from None
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in pos.columns]
    if missing:
        raise SpatialDataError(f"{sample}: spots table {spots.name} lacks columns {missing}")
    if selected_only and "selected" in pos.columns:
        pos = pos[pos["selected"] == 1]
    pos.index = [f"{int(x)}x{int(y)}" for x, y in zip(pos["x"], pos["y"])]
    bad = [c for c, k in zip(df.columns, df.dtypes) if k.kind not in "iufb"]
    if bad:
        raise SpatialDataError(f"{sample}: counts contain non-numeric values ({counts.name}, e.g. gene {bad[0]})")
    vals = df.to_numpy(dtype=np.float32)
    if np.isnan(vals).any():
        raise SpatialDataError(f"{sample}: counts contain NaN or non-numeric values ({counts.name})")
    X = sp.csr_matrix(vals)
    c = ad.AnnData(X=X, obs=pd.DataFrame(index=df.index.astype(str)), var=pd.DataFrame(index=df.columns.astype(str)))
    c.var_names_make_unique()
    a = join_positions(c, pos[["x", "y", "pixel_x", "pixel_y"]], sample, what="spots")
    a.obs["array_row"] = a.obs["y"].astype(int)
    a.obs["array_col"] = a.obs["x"].astype(int)
    a.obsm["spatial"] = a.obs[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    check_counts(a, sample)
    if mpp is None:
        if a.n_obs < 3:
            raise SpatialDataError(f"{sample}: too few spots to estimate the pixel size; pass mpp")
        pitch = st_pitch_px(a.obs[["x", "y"]].to_numpy(float), a.obsm["spatial"])
        mpp = ST_PITCH_UM / pitch
    if image is not None:
        check_image(a, image, sample, mpp)
    _source(a, "her2st", sample, mpp, ST_SPOT_UM)
    return a
