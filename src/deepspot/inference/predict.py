"""Whole-slide prediction on a virtual spot grid: slide -> AnnData (batched, masked bags, flat memory).

The way a slide goes (:func:`predict_slide`, the ``deepspot predict`` command):

1. :func:`plan_slide`: open the slide (SVS, pyramidal/OME-TIFF, JPG…), take its mpp (``mpp`` overrides;
   a µm-geometry model refuses a slide without one), lay a virtual grid in µm (Visium hex by default,
   or square bins), keep the spots on tissue found at a low pyramid level, take a thumbnail.
2. Encode every in-tissue spot once (:func:`~deepspot.features.extract.extract_to_store`): DataLoader
   workers read each spot box once from the level nearest the target resolution and cut the spot and
   sub-spot crops in memory; features stream into a zarr store.
3. Predict in chunks (:func:`~deepspot.models.bags.iter_predictions`): a chunk reads its spots' and
   their neighbours' spot features and its own sub-spot features from the store; predictions stream
   into a zarr array.
4. Assemble the ``.h5ad`` (``X`` copied chunk by chunk), the spot CSV and a PNG of chosen genes, all
   written under temporary names and renamed only when everything succeeded.

Peak memory depends on the chunk sizes, not on the number of spots (beyond O(N) index arrays).
:func:`predict_image` is the in-memory variant returning an AnnData (small images, the demo).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.features.extract import (FEATURE_MODES, ExtractStats, check_mode, extract_features, extract_to_store,
                                       store_path_for)
from deepspot.geometry.grid import GridSpec, make_grid
from deepspot.geometry.neighbors import array_neighbors
from deepspot.io.outputs import add_spatial_image, atomic_path
from deepspot.models.bags import iter_predictions

log = logging.getLogger(__name__)


@dataclass
class SpotGeometry:
    """How crops and context are cut, stored in every checkpoint.

    grid: spot diameter and spacing (µm or px, converted with the slide's mpp) and layout; n_sub:
    sub-spot grid (n×n); neighbours: spots whose array row and column differ by at most
    ``neighbor_radius`` (the same rule in training and prediction: the 4 diagonal neighbours on a
    Visium hex grid, the 8-neighbourhood on a square grid; in µm that is one grid spacing, since the
    array coordinates come from the µm grid); feature_mode: 'standard' or 'fast' (sub-spots from
    the spot's patch tokens) — a model is used in the mode it was trained in.
    """

    grid: GridSpec = field(default_factory=GridSpec)
    n_sub: int = 3
    neighbor_radius: int = 1
    feature_mode: str = "standard"

    def __post_init__(self):
        if self.feature_mode not in FEATURE_MODES:
            raise ValueError(f"unknown feature mode {self.feature_mode!r}; use 'standard' or 'fast'")

    def to_dict(self) -> dict:
        return {"grid": self.grid.to_dict(), "n_sub": self.n_sub, "neighbor_radius": self.neighbor_radius,
                "feature_mode": self.feature_mode}

    @classmethod
    def from_dict(cls, d: dict) -> "SpotGeometry":
        return cls(GridSpec(**d["grid"]), int(d["n_sub"]), int(d["neighbor_radius"]),
                   str(d.get("feature_mode", "standard")))


def feature_mode_of(config: dict) -> str:
    """The feature mode a checkpoint was trained in ('standard' for checkpoints that predate the field)."""
    return str(config.get("feature_mode") or config.get("geometry", {}).get("feature_mode") or "standard")


def check_feature_mode(config: dict, mode: str, source="model") -> str:
    """Refuse to use a model with features made another way than in its training."""
    trained = feature_mode_of(config)
    if mode != trained:
        hint = "pass --fast" if trained == "fast" else "drop --fast"
        from deepspot.models.checkpoint import CheckpointError

        raise CheckpointError(f"{source}: model was trained on {trained!r} features, asked for {mode!r} ({hint})")
    return mode


def invert_scaler(pred: np.ndarray, scaler: dict | None) -> np.ndarray:
    """Undo a target scaler stored in the checkpoint ({'kind', 'a', 'b'}: y_scaled = (y - a) / b)."""
    if not scaler:
        return pred
    return pred * np.asarray(scaler["b"], dtype=np.float32) + np.asarray(scaler["a"], dtype=np.float32)


def geometry_report(spot_diameter_um: float, spacing_um: float, mpp: float, meta: dict | None = None,
                    tolerance: float = 0.05) -> tuple[dict, list[str]]:
    """Spot geometry in pixels from µm and mpp, and every disagreement with declared metadata.

    ``meta`` may hold Space Ranger / HEST keys: ``spot_diameter_fullres`` (px), ``pixel_size_um_embedded``
    / ``pixel_size_um_estimated`` (µm/px), ``spot_diameter`` / ``inter_spot_dist`` (µm). The geometry
    always comes from µm and ``mpp``; the declared values are only checked (relative ``tolerance``).
    Returns ({'spot_px', 'spacing_px', 'mpp'}, [mismatch messages]).
    """
    geo = {"spot_px": spot_diameter_um / mpp, "spacing_px": spacing_um / mpp, "mpp": mpp}
    notes: list[str] = []
    meta = meta or {}

    def off(a, b):
        return abs(a / b - 1.0) > tolerance

    fr = meta.get("spot_diameter_fullres")
    if fr is not None and off(float(fr), geo["spot_px"]):
        notes.append(f"declared spot_diameter_fullres {float(fr):.1f} px disagrees with {spot_diameter_um:g} µm at "
                     f"{mpp:.4f} µm/px = {geo['spot_px']:.1f} px ({float(fr) / geo['spot_px']:.2f}x); "
                     f"using {geo['spot_px']:.1f} px")
    for key in ("pixel_size_um_embedded", "pixel_size_um_estimated"):
        v = meta.get(key)
        if v is not None and off(float(v), mpp):
            notes.append(f"declared {key} {float(v):.4f} µm/px disagrees with the mpp used ({mpp:.4f})")
    for key, want in (("spot_diameter", spot_diameter_um), ("inter_spot_dist", spacing_um)):
        v = meta.get(key)
        if v is not None and off(float(v), want):
            notes.append(f"declared {key} {float(v):g} µm differs from the model's {want:g} µm")
    return geo, notes


def spot_mean_rgb(view: np.ndarray, level0_size: tuple[int, int], x, y, spot_px: float) -> np.ndarray:
    """Mean RGB of each spot's square tile (side ``spot_px`` level-0 px around (x, y)) on a low-resolution
    view of the slide, by an integral image (a block-mean thumbnail preserves tile means)."""
    h, w = view.shape[:2]
    sx, sy = w / level0_size[0], h / level0_size[1]
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = view[:, :, :3].mean(axis=2, dtype=np.float64).cumsum(0).cumsum(1)
    x, y, r = np.asarray(x, float), np.asarray(y, float), spot_px / 2.0
    x0 = np.clip(np.floor((x - r) * sx), 0, w - 1).astype(int)
    y0 = np.clip(np.floor((y - r) * sy), 0, h - 1).astype(int)
    x1 = np.clip(np.ceil((x + r) * sx), x0 + 1, w).astype(int)
    y1 = np.clip(np.ceil((y + r) * sy), y0 + 1, h).astype(int)
    return (ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) / ((x1 - x0) * (y1 - y0))


def tissue_spots(slide, grid: pd.DataFrame, spot_px: float, method: str = "otsu", min_fraction: float = 0.1,
                 view: np.ndarray | None = None) -> np.ndarray:
    """Boolean (N,) keep-mask of grid spots on tissue, decided on a low-resolution view (``view``, else a
    ≤2048-px thumbnail read from a coarse pyramid level).

    'otsu' (default): the tissue module's per-pixel Otsu-on-saturation classification; a spot is kept
    when at least ``min_fraction`` of its disc is tissue (the spot-level fraction is the clean-up).
    'mean_rgb': the reference rule — a spot is background when the mean RGB of its tile exceeds 200.
    'none': every spot.
    """
    if method == "none" or len(grid) == 0:
        return np.ones(len(grid), dtype=bool)
    from deepspot.geometry.tissue import TissueMask, mask_from_rgb

    view = slide.get_thumbnail(2048) if view is None else view
    size = tuple(int(v) for v in slide.dimensions)
    x, y = grid["x"].to_numpy(), grid["y"].to_numpy()
    if method == "mean_rgb":
        return spot_mean_rgb(view, size, x, y, spot_px) <= 200.0
    mask, t = mask_from_rgb(view, method, clean=False)
    return TissueMask(mask, size, method, t).fraction_at(x, y, spot_px / 2.0) >= min_fraction


@dataclass
class SlidePlan:
    """A slide's virtual grid: in-tissue spots (array_row, array_col, x, y level-0 px) and its geometry."""

    slide_path: Path
    geometry: SpotGeometry
    spec: GridSpec  # in level-0 pixels
    mpp: float | None  # µm per level-0 px used (None: pixel geometry on a slide without mpp)
    grid: pd.DataFrame
    n_grid: int  # spots on the whole grid before the tissue filter
    dimensions: tuple[int, int]
    thumbnail: np.ndarray
    tissue: str
    notes: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.thumbnail.shape[1] / self.dimensions[0]

    def neighbors(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,K) neighbour index + mask into ``grid`` (KD-tree over array coordinates)."""
        return array_neighbors(self.grid["array_row"].to_numpy(), self.grid["array_col"].to_numpy(),
                               self.geometry.neighbor_radius)


def plan_slide(slide_path, geometry: SpotGeometry, mpp: float | None = None, tissue: str = "otsu",
               min_tissue_fraction: float = 0.1, thumbnail_size: int = 2000, layout: str | None = None,
               spacing: float | None = None, meta: dict | None = None) -> SlidePlan:
    """Grid + tissue filter + thumbnail of a slide. ``layout`` ('hex'/'square') and ``spacing`` (grid unit)
    override the checkpoint's grid; the spot diameter (crop size) always stays the model's.
    Raises SlideError (corrupt/unsupported file, no mpp for a µm model: pass ``mpp``)."""
    from deepspot.io.slides import open_slide, require_mpp

    if tissue not in ("otsu", "mean_rgb", "none"):
        raise ValueError(f"unknown tissue method {tissue!r}; use otsu, mean_rgb or none")
    grid_spec = geometry.grid
    if layout is not None or spacing is not None:
        grid_spec = replace(grid_spec, layout=layout or grid_spec.layout, spacing=spacing or grid_spec.spacing)
    geometry = replace(geometry, grid=grid_spec)
    with open_slide(slide_path, mpp=mpp) as slide:
        mpp_used = require_mpp(slide, mpp) if grid_spec.unit == "um" else slide.mpp
        spec = grid_spec.in_pixels(mpp_used)
        notes = []
        if grid_spec.unit == "um":
            notes = geometry_report(grid_spec.spot_diameter, grid_spec.spacing, mpp_used, meta)[1]
        for n in notes:
            log.info("%s: %s", slide_path, n)
        if spec.spot_diameter < 8:
            raise ValueError(f"{slide_path}: a spot is {spec.spot_diameter:.1f} px at {mpp_used} µm/px; is the mpp right?")
        w, h = slide.dimensions
        grid = make_grid(w, h, spec)
        thumb = slide.get_thumbnail(thumbnail_size)
        keep = tissue_spots(slide, grid, spec.spot_diameter, method=tissue, min_fraction=min_tissue_fraction,
                            view=thumb)
    return SlidePlan(Path(slide_path), geometry, spec, mpp_used, grid[keep].reset_index(drop=True), len(grid),
                     (int(w), int(h)), thumb, tissue, notes)


def _obs(grid: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"array_row": grid["array_row"].to_numpy(), "array_col": grid["array_col"].to_numpy(),
                         "in_tissue": np.ones(len(grid), dtype=int)},
                        index=[f"{r}x{c}" for r, c in zip(grid["array_row"], grid["array_col"])])


def _skeleton(plan: SlidePlan, config: dict, library_id: str | None, mode: str) -> ad.AnnData:
    """The AnnData of a prediction without X: obs, var, obsm['spatial'], uns spatial + provenance."""
    a = ad.AnnData(obs=_obs(plan.grid), var=pd.DataFrame(index=list(config["genes"])))
    a.obsm["spatial"] = plan.grid[["x", "y"]].to_numpy(dtype=np.float64)
    lib = library_id or plan.slide_path.stem
    add_spatial_image(a, lib, plan.thumbnail, plan.scale, plan.spec.spot_diameter,
                      source_image_path=str(plan.slide_path))
    g = plan.geometry
    a.uns["deepspot"] = {
        "model": config["model"], "encoder": config["encoder"]["name"],
        "context": config["model_args"].get("context", ""), "feature_mode": mode,
        "grid_unit": g.grid.unit, "grid_layout": plan.spec.layout, "spot_diameter_px": float(plan.spec.spot_diameter),
        "spacing_px": float(plan.spec.spacing), "mpp": float(plan.mpp) if plan.mpp else -1.0,
        "neighbors": f"array row and column within {g.neighbor_radius}",
        "tissue_method": plan.tissue, "grid_spots": int(plan.n_grid), "in_tissue_spots": int(len(plan.grid)),
        "geometry_notes": list(plan.notes),
        "values": ("log1p(normalize_total 1e4) expression" if not config.get("scaler")
                   else "log1p expression (scaler inverted)"),
    }
    return a


def predict_plan(plan: SlidePlan, model, config: dict, encoder, sink=None, *, mode: str = "standard",
                 mpp: float | None = None, batch_size: int = 16, num_workers: int | None = None, cache_dir=None,
                 store_dir=None, device="cpu", autocast_dtype=None, progress: bool = True,
                 stats: ExtractStats | None = None, predict_batch: int = 512) -> np.ndarray | None:
    """Encode the plan's spots (each crop once) and predict them chunk by chunk.

    With ``sink``, ``sink(start, predictions (B,G))`` receives each chunk in order and nothing is kept;
    without, the (N,G) predictions are returned. Features go to the store in ``cache_dir`` (kept and
    reused), to ``store_dir/features.zarr`` (streamed), or, with neither, stay in memory.
    """
    use_sub = bool(getattr(model, "use_subspots", True))
    n_sub = plan.geometry.n_sub if use_sub else 0
    mode = check_mode(mode) if n_sub else "standard"
    centers = plan.grid[["x", "y"]].to_numpy()
    tile = plan.spec.spot_diameter
    common = dict(n_sub=n_sub, mode=mode, mpp=mpp, batch_size=batch_size, num_workers=num_workers, device=device,
                  autocast_dtype=autocast_dtype, progress=progress, stats=stats)
    if cache_dir is not None or store_dir is not None:
        path = (store_path_for(cache_dir, plan.slide_path, encoder, tile, n_sub, mode) if cache_dir is not None
                else Path(store_dir) / "features.zarr")
        source = extract_to_store(plan.slide_path, centers, tile, encoder, path, **common)
    else:
        source = extract_features(plan.slide_path, centers, tile, encoder, **common)
    idx, mask = plan.neighbors()
    scaler = config.get("scaler")
    out = None if sink is not None else np.zeros((len(centers), len(config["genes"])), dtype=np.float32)
    for start, pred in iter_predictions(model, source, idx, mask, batch_size=predict_batch, device=device):
        pred = invert_scaler(pred, scaler)
        if sink is not None:
            sink(start, pred)
        else:
            out[start:start + len(pred)] = pred
    return out


def _mode(config: dict, fast: bool | None) -> str:
    return feature_mode_of(config) if fast is None else ("fast" if fast else "standard")


def predict_image(slide_path, model, config: dict, encoder, mpp: float | None = None, tissue: str = "otsu",
                  batch_size: int = 16, num_workers: int | None = 0, cache_dir=None, device="cpu",
                  autocast_dtype=None, progress: bool = True, library_id: str | None = None,
                  thumbnail_size: int = 2000, stats: ExtractStats | None = None, min_tissue_fraction: float = 0.1,
                  fast: bool | None = None, layout: str | None = None, spacing: float | None = None,
                  predict_batch: int = 512) -> ad.AnnData:
    """Predict every in-tissue spot of a virtual grid over the slide, in memory (small images).

    Returns AnnData (spots × genes) with obs array_row, array_col, in_tissue; obsm['spatial'] (x, y)
    level-0 px; uns['spatial'][library_id] (thumbnail + scalefactors); uns['deepspot'] (provenance).
    ``fast``: None = the checkpoint's feature mode; True/False must match it. For whole slides use
    :func:`predict_slide` (streams to disk).
    """
    mode = check_feature_mode(config, _mode(config, fast))
    geom = SpotGeometry.from_dict(config["geometry"])
    plan = plan_slide(slide_path, geom, mpp=mpp, tissue=tissue, min_tissue_fraction=min_tissue_fraction,
                      thumbnail_size=thumbnail_size, layout=layout, spacing=spacing)
    adata = _skeleton(plan, config, library_id, mode)
    if len(plan.grid) == 0:
        warnings.warn(f"{slide_path}: no tissue found; the prediction is empty", stacklevel=2)
        adata.X = np.zeros(adata.shape, dtype=np.float32)
    else:
        adata.X = predict_plan(plan, model, config, encoder, mode=mode, mpp=mpp, batch_size=batch_size,
                               num_workers=num_workers, cache_dir=cache_dir, device=device,
                               autocast_dtype=autocast_dtype, progress=progress, stats=stats,
                               predict_batch=predict_batch)
    return adata


def spot_table(adata: ad.AnnData) -> pd.DataFrame:
    """The metadata CSV: barcode, array row/col, pixel x/y, in-tissue."""
    xy = np.asarray(adata.obsm["spatial"])
    return pd.DataFrame({"array_row": adata.obs["array_row"].to_numpy(), "array_col": adata.obs["array_col"].to_numpy(),
                         "pxl_x": xy[:, 0] if len(xy) else [], "pxl_y": xy[:, 1] if len(xy) else [],
                         "in_tissue": adata.obs["in_tissue"].to_numpy()},
                        index=pd.Index(adata.obs_names, name="barcode"))


def write_h5ad_chunked(skeleton: ad.AnnData, X, path, rows: int = 4096) -> None:
    """Write ``skeleton`` (an AnnData without X) to ``path`` and add ``X`` (N,G) copied ``rows`` at a time from
    any sliceable array (zarr, h5py, numpy), so the full matrix is never in memory."""
    import h5py

    skeleton.write_h5ad(path, compression="gzip")
    n, g = skeleton.shape
    with h5py.File(path, "a") as f:
        chunks = (max(1, min(rows, n, (8 << 20) // max(1, 4 * g))), g) if n and g else None
        ds = f.create_dataset("X", shape=(n, g), dtype="float32", chunks=chunks,
                              compression="gzip" if chunks else None)
        ds.attrs["encoding-type"] = "array"
        ds.attrs["encoding-version"] = "0.2.0"
        for a in range(0, n, rows):
            ds[a:min(a + rows, n)] = np.asarray(X[a:min(a + rows, n)], dtype=np.float32)


@dataclass
class PredictResult:
    h5ad: Path
    csv: Path
    png: Path | None
    n_spots: int
    n_grid: int
    genes_plotted: list[str]
    stats: ExtractStats
    seconds: float
    notes: list[str]


class _GeneMoments:
    """Running per-gene mean/variance (to pick the most variable genes to plot without a second pass)."""

    def __init__(self, g: int):
        self.n, self.s, self.ss = 0, np.zeros(g), np.zeros(g)

    def add(self, x: np.ndarray) -> None:
        self.n += len(x)
        self.s += x.sum(axis=0, dtype=np.float64)
        self.ss += np.square(x, dtype=np.float64).sum(axis=0)

    def top(self, k: int) -> np.ndarray:
        var = self.ss / max(self.n, 1) - (self.s / max(self.n, 1)) ** 2
        return np.argsort(-var, kind="stable")[:k]


def predict_slide(slide_path, model, config: dict, encoder, out_dir, genes: list[str] | None = None,
                  n_plot: int = 4, mpp: float | None = None, tissue: str = "otsu", min_tissue_fraction: float = 0.1,
                  fast: bool | None = None, layout: str | None = None, spacing: float | None = None,
                  batch_size: int = 16, num_workers: int | None = None, cache_dir=None, device="cpu",
                  autocast_dtype=None, progress: bool = True, library_id: str | None = None,
                  thumbnail_size: int = 2000, predict_batch: int = 512, name: str | None = None,
                  meta: dict | None = None, stats: ExtractStats | None = None,
                  max_spots: int | None = None) -> PredictResult:
    """Predict a whole slide with flat memory and write ``<name>.h5ad``, ``<name>_spots.csv`` and
    ``<name>_genes.png`` (``genes`` or the ``n_plot`` most variable) into ``out_dir``.

    Features go to ``cache_dir`` (kept, reused next time) or to a work folder inside ``out_dir`` (removed);
    predictions stream into a zarr array there and are copied into the h5ad in chunks. The three outputs
    are written under temporary names and renamed together at the end: on any error nothing is left
    behind (a folder this call created is removed again). A slide without tissue gives an empty AnnData
    and a warning (no PNG). ``max_spots`` keeps only the first in-tissue spots in grid order (benchmarks).
    """
    import zarr

    from deepspot.features.store import RowWriter

    t0 = time.perf_counter()
    stats = stats if stats is not None else ExtractStats()
    mode = check_feature_mode(config, _mode(config, fast))
    all_genes = list(config["genes"])
    if genes:
        missing = [g for g in genes if g not in set(all_genes)]
        if missing:
            raise ValueError(f"genes not predicted by the model: {', '.join(missing[:5])}")
    geom = SpotGeometry.from_dict(config["geometry"])
    plan = plan_slide(slide_path, geom, mpp=mpp, tissue=tissue, min_tissue_fraction=min_tissue_fraction,
                      thumbnail_size=thumbnail_size, layout=layout, spacing=spacing, meta=meta)
    if max_spots is not None and len(plan.grid) > max_spots:
        plan.notes.append(f"capped at the first {max_spots} of {len(plan.grid)} in-tissue spots")
        plan = replace(plan, grid=plan.grid.iloc[:max_spots].reset_index(drop=True))
    out_dir = Path(out_dir)
    name = name or Path(slide_path).stem
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.work-", dir=out_dir))
    paths = (out_dir / f"{name}.h5ad", out_dir / f"{name}_spots.csv", out_dir / f"{name}_genes.png")
    try:
        skel = _skeleton(plan, config, library_id, mode)
        n, g = skel.shape
        store = zarr.open_group(str(work / "predictions.zarr"), mode="w")
        pred = RowWriter(store, "X", (max(n, 0), g))
        moments = _GeneMoments(g)

        def sink(start, p):
            pred.append(p)
            moments.add(p)

        if n == 0:
            warnings.warn(f"{slide_path}: no tissue found; the prediction is empty", stacklevel=2)
        else:
            predict_plan(plan, model, config, encoder, sink, mode=mode, mpp=mpp, batch_size=batch_size,
                         num_workers=num_workers, cache_dir=cache_dir, store_dir=work, device=device,
                         autocast_dtype=autocast_dtype, progress=progress, stats=stats, predict_batch=predict_batch)
        pred.flush()
        plot = list(genes) if genes else [all_genes[i] for i in moments.top(n_plot)] if n else []
        with contextlib.ExitStack() as stack:
            tmp = [stack.enter_context(atomic_path(p)) for p in paths[:2 if not (n and plot) else 3]]
            write_h5ad_chunked(skel, pred.array, tmp[0])
            spot_table(skel).to_csv(tmp[1], index=True)
            if len(tmp) == 3:
                _plot_columns(skel, pred.array, plot, tmp[2])
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    shutil.rmtree(work, ignore_errors=True)
    return PredictResult(paths[0], paths[1], paths[2] if n and plot else None, n, plan.n_grid, plot, stats,
                         time.perf_counter() - t0, list(plan.notes))


def _plot_columns(skel: ad.AnnData, X, genes: list[str], path, max_side: int = 1000) -> None:
    """PNG of ``genes`` over the thumbnail, reading only those columns of ``X``."""
    import matplotlib.pyplot as plt

    from deepspot.plotting import plot_genes

    names = list(skel.var_names)
    cols = [names.index(g) for g in genes]
    vals = np.concatenate([np.asarray(X[a:a + 8192])[:, cols] for a in range(0, skel.n_obs, 8192)])
    lib, info = next(iter(skel.uns["spatial"].items()))
    img = info["images"]["hires"]
    k = max(1, int(np.ceil(max(img.shape[:2]) / max_side)))  # panels need no more than ~max_side px
    sf = dict(info["scalefactors"], tissue_hires_scalef=info["scalefactors"]["tissue_hires_scalef"] / k)
    small = ad.AnnData(X=vals.astype(np.float32), obs=skel.obs[[]].copy(), var=pd.DataFrame(index=genes),
                       obsm={"spatial": skel.obsm["spatial"]},
                       uns={"spatial": {lib: {"images": {"hires": img[::k, ::k]}, "scalefactors": sf}}})
    fig = plot_genes(small, genes=genes, title="DeepSpot predictions (log1p normalised expression)")
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
