"""What every spatial reader checks: counts are raw, positions lie inside the image, a file asked for exists;
the error they raise and the record of where the data came from (``uns['source']``)."""
from __future__ import annotations

import logging
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



def check_inside(xy: np.ndarray, width: int, height: int, source: str, what: str = "positions") -> None:
    """Refuse positions outside the image (the usual sign of a scale mismatch)."""
    xy = np.asarray(xy)
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= width) | (xy[:, 1] >= height)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise SpatialDataError(
            f"{source}: {int(out.sum())} of {len(xy)} {what} lie outside the {width}x{height} image "
            f"(e.g. x={xy[i, 0]:.0f}, y={xy[i, 1]:.0f}); wrong image or scale?")


# --------------------------------------------------------------------------- readers of real outputs
#
# Every reader returns an AnnData of raw counts (spots/cells × genes) with ``obsm['spatial']`` = (x, y)
# full-resolution pixels of the H&E the sample is paired with, ``obs['array_row'/'array_col']`` where the
# technology has an array, and ``uns['source']`` = {format, sample, mpp (µm/px or None), spot_diameter_um}.
# Joins between counts and positions are by barcode; every mismatch is either an error naming the sample
# or an intersection logged with how many barcodes were dropped.

log = logging.getLogger(__name__)

VISIUM_SPOT_UM = 55.0
ST_SPOT_UM, ST_PITCH_UM = 100.0, 200.0  # legacy Spatial Transcriptomics arrays (HER2ST)
XENIUM_PIXEL_UM = 0.2125  # Xenium morphology image pixel size (experiment.xenium 'pixel_size')


def inside_image(xy: np.ndarray, width: int, height: int, source: str, drop_outside: bool = False) -> np.ndarray:
    """Boolean keep-mask of cells inside the image. Outside cells raise SpatialDataError, or with
    ``drop_outside`` are dropped with a warning."""
    xy = np.asarray(xy)
    keep = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)
    if not drop_outside:
        check_inside(xy, width, height, source, what="cells")
    elif not keep.all():
        log.warning("%s: dropping %d of %d cells outside the %dx%d image", source, int((~keep).sum()), len(xy),
                    width, height)
        if not keep.any():
            raise SpatialDataError(f"{source}: all {len(xy)} cells lie outside the {width}x{height} image")
    return keep


def _source(adata: ad.AnnData, fmt: str, sample: str, mpp: float | None, spot_um: float | None, **extra) -> None:
    adata.uns["source"] = {"format": fmt, "sample": str(sample), "mpp": None if mpp is None else float(mpp),
                           "spot_diameter_um": None if spot_um is None else float(spot_um), **extra}


def _need(path: Path, sample: str, what: str) -> Path:
    if not path.exists():
        raise SpatialDataError(f"{sample}: {what} not found ({path})")
    return path



def check_image(adata: ad.AnnData, image: str | Path, sample: str, mpp: float | None = None) -> tuple[int, int]:
    """Positions must lie inside the image (a scale mismatch shows as positions outside). Returns (w, h)."""
    from deepspot.io.slides import open_slide

    with open_slide(image, mpp=mpp) as slide:
        w, h = slide.dimensions
    check_inside(adata.obsm["spatial"], w, h, f"{sample} ({Path(image).name})")
    return int(w), int(h)
