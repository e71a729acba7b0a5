"""Visium HD: Space Ranger's binned outputs read as spots, and the square-bin geometry to train on them.

A Space Ranger HD ``outs`` folder holds ``binned_outputs/square_002um``, ``square_008um`` and
``square_016um``; each has ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.parquet``
(barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres) and
``spatial/scalefactors_json.json`` (``bin_size_um``, ``microns_per_pixel``, ``spot_diameter_fullres``: the
bin side in full-resolution px). :func:`read_visium_hd` returns one bin size as an AnnData of raw counts
with ``obsm['spatial']`` (x, y) full-resolution px and the bin's array row / column, so every spot
model path (train, score, predict_spots) takes it as it takes Visium spots.

:func:`visium_hd_geometry` is the spot geometry of a bin size: square bins on a square grid, crops of
one bin, sub-spots and neighbours set in µm (sub-spots of about ``sub_um``; neighbours the bins within
``neighbor_um`` along each axis).
"""
from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import pandas as pd

from deepspot.config import GridSpec, SpotGeometry
from deepspot.io.spaceranger import tissue_positions
from deepspot.io.spatial import (SpatialDataError, check_counts, check_image, join_positions, read_10x_counts,
                                 read_scalefactors)

log = logging.getLogger(__name__)

BIN_SIZES_UM = (2, 8, 16)
POSITION_COLUMNS = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def bin_folder(outs: str | Path, bin_um: int = 16) -> Path:
    """``outs/binned_outputs/square_0XXum`` (or ``outs`` itself when it already is a bin folder)."""
    outs = Path(outs)
    if (outs / "filtered_feature_bc_matrix.h5").exists() and (outs / "spatial").is_dir():
        return outs
    if int(bin_um) not in BIN_SIZES_UM:
        raise SpatialDataError(f"Visium HD bin size {bin_um} µm: Space Ranger writes {', '.join(map(str, BIN_SIZES_UM))}")
    folder = outs / "binned_outputs" / f"square_{int(bin_um):03d}um"
    if not folder.is_dir():
        have = sorted(p.name for p in (outs / "binned_outputs").glob("square_*")) if (outs / "binned_outputs").is_dir() else []
        raise SpatialDataError(f"{outs}: no {folder.relative_to(outs)} (Visium HD binned outputs"
                               f"{': found ' + ', '.join(have) if have else ' missing'})")
    return folder


def read_hd_positions(folder: Path, sample: str) -> pd.DataFrame:
    """``spatial/tissue_positions.parquet`` (or the .csv some exports write): index barcode."""
    pq, csv = folder / "spatial" / "tissue_positions.parquet", folder / "spatial" / "tissue_positions.csv"
    if pq.exists():
        try:
            df = pd.read_parquet(pq)
        except Exception as e:
            raise SpatialDataError(f"{sample}: cannot read {pq} ({type(e).__name__})") from None
    elif csv.exists():
        df = pd.read_csv(csv)
    else:
        raise SpatialDataError(f"{sample}: no spatial/tissue_positions.parquet in {folder}")
    missing = [c for c in ["barcode", *POSITION_COLUMNS] if c not in df.columns]
    if missing:
        raise SpatialDataError(f"{sample}: {pq.name} lacks columns {missing} (has {list(df.columns)})")
    df = df.set_index("barcode")[POSITION_COLUMNS]
    num = df.apply(pd.to_numeric, errors="coerce")
    if num.isna().any().any():
        raise SpatialDataError(f"{sample}: {pq.name} has non-numeric or missing positions")
    return num


def read_visium_hd(outs: str | Path, bin_um: int = 16, image: str | Path | None = None, sample: str | None = None,
                   mpp: float | None = None, in_tissue_only: bool = True) -> ad.AnnData:
    """One bin size of a Space Ranger HD ``outs`` folder -> AnnData of raw counts (bins × genes).

    ``obsm['spatial']``: bin centres (x, y) in px of the full-resolution H&E given to Space Ranger
    (``image``: checked to contain them); obs ``array_row`` / ``array_col``: the bin grid. ``mpp``:
    µm/px of that image; default the scalefactors' ``microns_per_pixel``. ``uns['source']`` records the
    format, bin size (as the spot diameter) and mpp."""
    folder = bin_folder(outs, bin_um)
    sample = sample or Path(outs).name
    sf_path = folder / "spatial" / "scalefactors_json.json"
    scalef = read_scalefactors(folder, sample)
    size_um = float(scalef.get("bin_size_um", bin_um))
    if folder != Path(outs) and abs(size_um - bin_um) > 1e-6:
        raise SpatialDataError(f"{sample}: {sf_path} says bin_size_um {size_um:g}, the folder {folder.name}")
    file_mpp = scalef.get("microns_per_pixel")
    if mpp is None and file_mpp:
        mpp = float(file_mpp)
    elif mpp is not None and file_mpp and abs(float(mpp) - float(file_mpp)) > 0.05 * float(file_mpp):
        log.warning("%s: --mpp %g differs from the scalefactors' microns_per_pixel %g; using %g", sample, mpp,
                    float(file_mpp), mpp)
    counts = read_10x_counts(folder / "filtered_feature_bc_matrix.h5", sample)
    pos = read_hd_positions(folder, sample)
    a = join_positions(counts, pos, sample, what="bins", expected_extra=pos["in_tissue"] == 0)
    a = tissue_positions(a, sample, in_tissue_only, what="bin")
    check_counts(a, sample)
    if image is not None:
        check_image(a, image, sample, mpp)
    diam_px = scalef.get("spot_diameter_fullres")
    if mpp and diam_px and abs(float(diam_px) * mpp - size_um) > 0.1 * size_um:
        log.warning("%s: spot_diameter_fullres %g px × %g µm/px = %.1f µm, not the %g µm bin", sample,
                    float(diam_px), mpp, float(diam_px) * mpp, size_um)
    a.uns["spatial"] = {sample: {"scalefactors": {k: float(v) for k, v in scalef.items()
                                                  if isinstance(v, (int, float))},
                                 "images": {}, "metadata": {"source_image_path": str(image) if image else ""}}}
    a.uns["source"] = {"format": "visium_hd", "sample": str(sample), "mpp": None if mpp is None else float(mpp),
                       "spot_diameter_um": size_um, "bin_size_um": size_um, "path": str(folder)}
    return a


def visium_hd_geometry(bin_um: float = 16.0, sub_um: float = 8.0, neighbor_um: float = 32.0,
                       feature_mode: str = "standard") -> SpotGeometry:
    """The spot geometry of Visium HD bins of ``bin_um`` µm: a square grid of ``bin_um`` crops ``bin_um``
    apart; sub-spots: an n×n split of the bin with n = round(bin / ``sub_um``) (at least 1); neighbours:
    the bins whose row and column are within round(``neighbor_um`` / bin) steps (at least 1)."""
    if not bin_um > 0:
        raise ValueError(f"bin size must be positive, got {bin_um}")
    n_sub = max(1, int(round(bin_um / sub_um)))
    radius = max(1, int(round(neighbor_um / bin_um)))
    return SpotGeometry(GridSpec(float(bin_um), float(bin_um), "square", "um"), n_sub=n_sub,
                        neighbor_radius=radius, feature_mode=feature_mode)


__all__ = ["BIN_SIZES_UM", "bin_folder", "read_hd_positions", "read_visium_hd", "visium_hd_geometry"]
