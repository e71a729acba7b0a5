"""Read spatial expression into AnnData with scverse conventions: ``obsm['spatial']`` = (x, y)
level-0 pixels (x horizontal), raw counts in ``X``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
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


def read_counts(path: str | Path, image: str | Path | None = None, x_col: str | None = None,
                y_col: str | None = None, mpp: float | None = None) -> ad.AnnData:
    """Counts + positions to train on: a Xenium output folder (its cells registered to ``image``) or an
    h5ad (positions in obsm['spatial'], or obs columns ``x_col``/``y_col``), as AnnData of raw counts
    (``uns['source']['path']`` names the file, for error messages)."""
    path = Path(path)
    a = read_xenium(path, image=image, mpp=mpp) if path.is_dir() else read_cells_h5ad(path, x_col=x_col, y_col=y_col)
    a.uns["source"] = {**a.uns.get("source", {}), "path": str(path)}
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


def check_image(adata: ad.AnnData, image: str | Path, sample: str, mpp: float | None = None) -> tuple[int, int]:
    """Positions must lie inside the image (a scale mismatch shows as positions outside). Returns (w, h)."""
    from deepspot.io.slides import open_slide

    with open_slide(image, mpp=mpp) as slide:
        w, h = slide.dimensions
    check_inside(adata.obsm["spatial"], w, h, f"{sample} ({Path(image).name})")
    return int(w), int(h)


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
    if in_tissue_only:
        a = a[a.obs["in_tissue"].to_numpy() == 1].copy()
        if a.n_obs == 0:
            raise SpatialDataError(f"{sample}: no in-tissue spot has counts")
    for c in ("in_tissue", "array_row", "array_col"):
        a.obs[c] = a.obs[c].astype(int)
    a.obsm["spatial"] = a.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
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
