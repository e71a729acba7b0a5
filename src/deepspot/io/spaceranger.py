"""Space Ranger (Visium) outputs: the 10x count matrix, tissue positions, scalefactors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.io.spatial_checks import VISIUM_SPOT_UM, SpatialDataError, _need, _source, check_counts, check_image

log = logging.getLogger(__name__)


def read_10x_counts(path: str | Path, sample: str | None = None) -> ad.AnnData:
    """A 10x feature-barcode matrix (``*.h5``: Space Ranger, Xenium) via scanpy, gene-expression features only."""
    import scanpy as sc

    path = Path(path)
    sample = sample or path.parent.name
    _need(path, sample, "count matrix")
    try:
        a = sc.read_10x_h5(str(path), gex_only=True)
    except Exception as e:
        raise SpatialDataError(f"{sample}: cannot read 10x h5 {path} ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    a.var_names_make_unique()
    return a


def join_positions(counts: ad.AnnData, pos: pd.DataFrame, sample: str, what: str = "barcodes",
                   expected_extra: pd.Series | None = None) -> ad.AnnData:
    """Keep the barcodes present in both the counts and the position table ``pos`` (index = barcode).

    Duplicated barcodes on either side are an error. Counts without a position are dropped with a
    logged warning (how many); positions without counts are dropped too, silently where
    ``expected_extra`` (bool per position) marks them as expected (e.g. Visium spots outside tissue).
    An empty join is an error.
    """
    counts.obs_names = counts.obs_names.astype(str)
    pos.index = pos.index.astype(str)
    for side, names in (("count matrix", counts.obs_names), ("positions", pos.index)):
        if not pd.Index(names).is_unique:
            dup = pd.Index(names)[pd.Index(names).duplicated()][:3].tolist()
            raise SpatialDataError(f"{sample}: duplicated {what} in the {side}, e.g. {dup}")
    in_pos = counts.obs_names.isin(pos.index)
    if not in_pos.any():
        raise SpatialDataError(f"{sample}: no {what} in common between the count matrix and the positions "
                               f"(counts e.g. {counts.obs_names[:2].tolist()}, positions e.g. {pos.index[:2].tolist()})")
    if not in_pos.all():
        log.warning("%s: %d of %d %s in the count matrix have no position; dropped", sample,
                    int((~in_pos).sum()), counts.n_obs, what)
    no_counts = ~pos.index.isin(counts.obs_names)
    if expected_extra is not None:
        no_counts &= ~np.asarray(expected_extra, dtype=bool)
    if no_counts.any():
        log.warning("%s: %d %s in the positions have no counts; dropped", sample, int(no_counts.sum()), what)
    out = counts[in_pos].copy()
    p = pos.loc[out.obs_names]
    for c in p.columns:
        out.obs[c] = p[c].to_numpy()
    return out


def read_spaceranger_positions(folder: str | Path, sample: str | None = None) -> pd.DataFrame:
    """``spatial/tissue_positions.csv`` (header, Space Ranger ≥ 2) or ``tissue_positions_list.csv``
    (no header): index barcode; columns in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres."""
    folder = Path(folder)
    sample = sample or folder.name
    cols = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    cands = [folder / "spatial" / "tissue_positions.csv", folder / "spatial" / "tissue_positions_list.csv",
             folder / "tissue_positions.csv", folder / "tissue_positions_list.csv"]
    path = next((p for p in cands if p.exists()), None)
    if path is None:
        raise SpatialDataError(f"{sample}: no spatial/tissue_positions.csv or tissue_positions_list.csv in {folder}")
    first = path.open().readline().strip().split(",")
    has_header = len(first) > 1 and not first[1].strip().lstrip("-").isdigit()
    try:
        df = pd.read_csv(path, header=0 if has_header else None)
    except Exception as e:
        raise SpatialDataError(f"{sample}: cannot read {path} ({type(e).__name__})") from None
    if df.shape[1] != 6:
        raise SpatialDataError(f"{sample}: {path} has {df.shape[1]} columns, expected 6 ({', '.join(cols)})")
    df.columns = cols
    df = df.set_index("barcode")
    num = df[cols[1:]].apply(pd.to_numeric, errors="coerce")
    if num.isna().any().any():
        raise SpatialDataError(f"{sample}: {path} has non-numeric or missing positions")
    return num


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        return im.size


def read_scalefactors(folder: Path, sample: str) -> dict:
    """``folder/spatial/scalefactors_json.json`` of a Space Ranger output (Visium or Visium HD bins) as a
    dict; ``{}`` when the file is absent, a one-line error naming the sample when it is not JSON."""
    sf_path = Path(folder) / "spatial" / "scalefactors_json.json"
    if not sf_path.exists():
        return {}
    try:
        return json.loads(sf_path.read_text())
    except json.JSONDecodeError as e:
        raise SpatialDataError(f"{sample}: invalid {sf_path.name} ({e.msg})") from None


def check_scalefactors(scalef: dict, folder: Path, full_size: tuple[int, int], sample: str, tol: float = 0.05) -> None:
    """The hires/lowres PNGs divided by their scale factors must give the full-res image size; a mismatch
    means the image and the positions are not at the same scale (wrong image, or a downscaled one)."""
    for kind in ("hires", "lowres"):
        png, f = folder / "spatial" / f"tissue_{kind}_image.png", scalef.get(f"tissue_{kind}_scalef")
        if not png.exists() or not f:
            continue
        w, h = _image_size(png)
        ew, eh = w / float(f), h / float(f)
        # the PNG is the full-res image scaled down so its long side fits; compare the long side
        exp, got = max(ew, eh), float(max(full_size))
        if abs(exp - got) / got > tol:
            raise SpatialDataError(
                f"{sample}: scalefactors mismatch: {png.name} ({w}x{h}) / tissue_{kind}_scalef {f:g} implies a "
                f"full-res image of ~{ew:.0f}x{eh:.0f} px, but the image is {full_size[0]}x{full_size[1]} px")



def tissue_positions(a, sample: str, in_tissue_only: bool = True, what: str = "spot"):
    """Counts joined to Space Ranger positions: the in-tissue rows (if ``in_tissue_only``), integer
    ``in_tissue`` / ``array_row`` / ``array_col``, ``obsm['spatial']`` = full-resolution (x, y) px."""
    if in_tissue_only:
        a = a[a.obs["in_tissue"].to_numpy() == 1].copy()
        if a.n_obs == 0:
            raise SpatialDataError(f"{sample}: no in-tissue {what} has counts")
    for c in ("in_tissue", "array_row", "array_col"):
        a.obs[c] = a.obs[c].astype(int)
    a.obsm["spatial"] = a.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    return a


def read_spaceranger(folder: str | Path, image: str | Path | None = None, sample: str | None = None,
                     mpp: float | None = None, in_tissue_only: bool = True) -> ad.AnnData:
    """A Space Ranger ``outs`` folder: ``filtered_feature_bc_matrix.h5`` (scanpy ``read_10x_h5``),
    ``spatial/tissue_positions[_list].csv`` and ``spatial/scalefactors_json.json``.

    ``image`` is the full-resolution H&E given to Space Ranger: positions are checked to lie inside it and the
    scale factors to match its size. ``mpp`` (µm/px) of that image, when known, is recorded.
    """
    folder = Path(folder)
    sample = sample or folder.name
    if not folder.is_dir():
        raise SpatialDataError(f"{sample}: Space Ranger folder not found ({folder})")
    h5 = next((p for p in (folder / "filtered_feature_bc_matrix.h5", folder / "raw_feature_bc_matrix.h5")
               if p.exists()), folder / "filtered_feature_bc_matrix.h5")
    counts = read_10x_counts(h5, sample)
    pos = read_spaceranger_positions(folder, sample)
    a = join_positions(counts, pos, sample, expected_extra=pos["in_tissue"] == 0)
    a = tissue_positions(a, sample, in_tissue_only)
    scalef = read_scalefactors(folder, sample)
    check_counts(a, sample)
    if image is not None:
        size = check_image(a, image, sample, mpp)
        check_scalefactors(scalef, folder, size, sample)
    spatial = {"scalefactors": {k: float(v) for k, v in scalef.items() if isinstance(v, (int, float))},
               "images": {}, "metadata": {"source_image_path": str(image) if image else ""}}
    hires = folder / "spatial" / "tissue_hires_image.png"
    if hires.exists():
        from PIL import Image

        with Image.open(hires) as im:
            spatial["images"]["hires"] = np.asarray(im.convert("RGB"))
    a.uns["spatial"] = {sample: spatial}
    _source(a, "spaceranger", sample, mpp, VISIUM_SPOT_UM)
    return a
