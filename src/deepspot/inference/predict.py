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
import os
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

from deepspot import plotting
from deepspot.config import (TISSUE_RULES, GridSpec, ModelConfig, SpotGeometry, geometry_preset, invert_scaler,
                             resolve_mpp)
from deepspot.reliability import (DEFAULT_LEVEL, annotate_var, head_spread, intervals_for, spread_to_expression,
                                  trusted_genes)
from deepspot.features.extract import ExtractStats, check_mode, extract_features, extract_to_store, store_path_for
from deepspot.features.views import N_VIEWS, view_tag
from deepspot.geometry.grid import make_grid
from deepspot.geometry.neighbors import array_neighbors
from deepspot.features.tiles import spot_boxes
from deepspot.geometry.tissue import BACKGROUND_MEAN_RGB, tile_mean_rgb, tissue_spots
from deepspot.io.outputs import add_spatial_image, atomic_dir, atomic_path, write_h5ad_chunked
from deepspot.io.slides import open_slide
from deepspot.models.bags import iter_predictions

FORMATS = ("h5ad", "spatialdata")

log = logging.getLogger(__name__)


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


MAX_GRID_SPOTS = 5e7  # a whole-slide Visium grid is ~1e5; beyond this the grid alone would not fit in memory


def plan_slide(slide_path, geometry: SpotGeometry, mpp: float | None = None, tissue: str | None = None,
               min_tissue_fraction: float = 0.1, thumbnail_size: int = 2000, layout: str | None = None,
               spacing: float | None = None, meta: dict | None = None) -> SlidePlan:
    """Grid + tissue filter + thumbnail of a slide. ``layout`` ('hex'/'square') and ``spacing`` (grid unit)
    override the checkpoint's grid; the spot diameter (crop size) always stays the model's. ``tissue``:
    None = the geometry's rule (``tile_mean_rgb`` for the original's presets), else 'otsu'.
    Raises SlideError (corrupt/unsupported file, no mpp for a µm model: pass ``mpp``)."""
    from deepspot.inference.preflight import check_options

    tissue = tissue or geometry.tissue or "otsu"
    if tissue not in TISSUE_RULES:
        raise ValueError(f"unknown tissue method {tissue!r}; use {', '.join(TISSUE_RULES)}")
    check_options(spacing=spacing, min_tissue=min_tissue_fraction)
    grid_spec = geometry.grid
    if layout is not None or spacing is not None:
        grid_spec = replace(grid_spec, layout=layout or grid_spec.layout,
                            spacing=spacing if spacing is not None else grid_spec.spacing)
    geometry = replace(geometry, grid=grid_spec)
    with open_slide(slide_path, mpp=mpp) as slide:
        mpp_used = resolve_mpp(slide, mpp, needs_um=grid_spec.needs_mpp)
        spec = grid_spec.in_pixels(mpp_used)
        notes = []
        if grid_spec.unit == "um":
            notes = geometry_report(grid_spec.spot_diameter, grid_spec.spacing, mpp_used, meta)[1]
        for n in notes:
            log.info("%s: %s", slide_path, n)
        if spec.spot_diameter < 8:
            raise ValueError(f"{slide_path}: a spot is {spec.spot_diameter:.1f} px at {mpp_used} µm/px; is the mpp right?")
        w, h = slide.dimensions
        at = f" at {mpp_used:g} µm/px" if mpp_used else ""
        n_est = (w / max(spec.spacing, 1e-9) + 1) * (h / max(spec.spacing, 1e-9) + 1)
        if n_est > MAX_GRID_SPOTS:
            raise ValueError(f"{slide_path}: a grid of about {n_est:.3g} spots (spacing {spec.spacing:.3g} px{at}) "
                             f"is over {MAX_GRID_SPOTS:.0e}; check --spacing and the mpp")
        grid = make_grid(w, h, spec)
        if len(grid) == 0:
            raise ValueError(f"{slide_path}: the grid is empty: the image ({w}×{h} px) is smaller than one spot "
                             f"({spec.spot_diameter:.0f} px{at}); is the mpp right?")
        thumb = slide.get_thumbnail(thumbnail_size)
        if tissue == "tile_mean_rgb":  # the original's filter: each full-resolution tile's mean RGB
            boxes = spot_boxes(grid[["x", "y"]].to_numpy(), spec.spot_diameter)
            keep = tile_mean_rgb(slide, boxes) <= BACKGROUND_MEAN_RGB
        else:
            keep = tissue_spots(slide, grid, spec.spot_diameter, method=tissue, min_fraction=min_tissue_fraction,
                                view=thumb)
    return SlidePlan(Path(slide_path), geometry, spec, mpp_used, grid[keep].reset_index(drop=True), len(grid),
                     (int(w), int(h)), thumb, tissue, notes)


def _obs(grid: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"array_row": grid["array_row"].to_numpy(), "array_col": grid["array_col"].to_numpy(),
                         "in_tissue": np.ones(len(grid), dtype=int)},
                        index=[f"{r}x{c}" for r, c in zip(grid["array_row"], grid["array_col"])])


def _skeleton(plan: SlidePlan, config: ModelConfig, library_id: str | None, mode: str) -> ad.AnnData:
    """The AnnData of a prediction without X: obs, var, obsm['spatial'], uns spatial + provenance."""
    a = ad.AnnData(obs=_obs(plan.grid), var=pd.DataFrame(index=list(config.genes)))
    a.obsm["spatial"] = plan.grid[["x", "y"]].to_numpy(dtype=np.float64)
    lib = library_id or plan.slide_path.stem
    add_spatial_image(a, lib, plan.thumbnail, plan.scale, plan.spec.spot_diameter,
                      source_image_path=str(plan.slide_path))
    g = plan.geometry
    a.uns["deepspot"] = {
        "model": config.model, "encoder": config.encoder.name, "context": config.context, "feature_mode": mode,
        "grid_unit": g.grid.unit, "grid_layout": plan.spec.layout, "spot_diameter_px": float(plan.spec.spot_diameter),
        "spacing_px": float(plan.spec.spacing), "mpp": float(plan.mpp) if plan.mpp else -1.0,
        "neighbors": f"array row and column within {g.neighbor_radius}",
        "geometry_preset": g.preset or "", "subspot_rule": g.subspot_rule,
        "tissue_method": plan.tissue, "grid_spots": int(plan.n_grid), "in_tissue_spots": int(len(plan.grid)),
        "geometry_notes": list(plan.notes),
        "values": "predicted log1p(counts per 10k)",  # the scaler, if any, is undone: one wording everywhere
    }
    return a


def predict_plan(plan: SlidePlan, model, config: ModelConfig, encoder, sink=None, *, mode: str = "standard",
                 mpp: float | None = None, batch_size: int = 16, num_workers: int | None = None, cache_dir=None,
                 store_dir=None, device="cpu", autocast_dtype=None, progress: bool = True,
                 stats: ExtractStats | None = None, predict_batch: int = 512, interval: float | None = None,
                 bounds_sink=None, tta: bool = False) -> np.ndarray | None:
    """Encode the plan's spots (each crop once) and predict them chunk by chunk.

    With ``sink``, ``sink(start, predictions (B,G))`` receives each chunk in order and nothing is kept;
    without, the (N,G) predictions are returned. Features go to the store in ``cache_dir`` (kept and
    reused), to ``store_dir/features.zarr`` (streamed), or, with neither, stay in memory.
    ``interval`` (a level the model is calibrated at) with ``bounds_sink``: ``bounds_sink(start, lower, upper)``
    receives each chunk's conformal interval (:mod:`deepspot.reliability`), in the units of the predictions.
    ``tta``: test-time augmentation, the mean of the predictions of the 8 dihedral views of every crop
    (:mod:`deepspot.features.views`; 8 encoder passes per crop, each view its own feature store); the
    interval is then drawn around that mean with the mean head spread of the views.
    """
    use_sub = bool(getattr(model, "use_subspots", True))
    n_sub = plan.geometry.n_sub if use_sub else 0
    mode = check_mode(mode) if n_sub else "standard"
    centers = plan.grid[["x", "y"]].to_numpy()
    tile = plan.spec.spot_diameter
    rule = plan.geometry.subspot_rule
    common = dict(n_sub=n_sub, mode=mode, mpp=mpp, batch_size=batch_size, num_workers=num_workers, device=device,
                  autocast_dtype=autocast_dtype, progress=progress, stats=stats, subspot_rule=rule)
    sources = []
    for view in (range(N_VIEWS) if tta else (0,)):
        if cache_dir is not None or store_dir is not None:
            path = (store_path_for(cache_dir, plan.slide_path, encoder, tile, n_sub, mode, rule, view)
                    if cache_dir is not None else Path(store_dir) / f"features{view_tag(view)}.zarr")
            sources.append(extract_to_store(plan.slide_path, centers, tile, encoder, path, view=view, **common))
        else:
            sources.append(extract_features(plan.slide_path, centers, tile, encoder, view=view, **common))
    idx, mask = plan.neighbors()
    scaler = config.scaler
    out = None if sink is not None else np.zeros((len(centers), len(config.genes)), dtype=np.float32)
    calib = intervals_for(config, interval)[0] if bounds_sink is not None else None
    with head_spread(model if calib is not None and calib.mode == "head_spread" else None) as spreads:
        streams = [iter_predictions(model, src, idx, mask, batch_size=predict_batch, device=device) for src in sources]
        for chunks in zip(*streams):
            start = chunks[0][0]
            pred = np.mean([invert_scaler(p, scaler) for _, p in chunks], axis=0, dtype=np.float64).astype(np.float32)
            if calib is not None:
                sp = None
                if spreads is not None:
                    sp = spread_to_expression(np.mean(spreads, axis=0), scaler)
                    spreads.clear()
                bounds_sink(start, *calib.bounds(pred, sp, interval))
            if sink is not None:
                sink(start, pred)
            else:
                out[start:start + len(pred)] = pred
    return out


class _Bounds:
    """Collects (lower, upper) chunks of a prediction in memory."""

    def __init__(self, n: int, g: int):
        self.lower, self.upper = np.zeros((n, g), np.float32), np.zeros((n, g), np.float32)

    def __call__(self, start: int, lo: np.ndarray, hi: np.ndarray) -> None:
        self.lower[start:start + len(lo)], self.upper[start:start + len(hi)] = lo, hi


def _annotate(adata: ad.AnnData, config: ModelConfig, interval: float | None, bounds: "_Bounds | None") -> None:
    """var val_pearson / reliable, and layers lower / upper when the model is calibrated (a note in
    uns['deepspot'] when intervals were asked for and the model has none)."""
    annotate_var(adata, config)
    calib, note = intervals_for(config, interval)
    if calib is not None and bounds is not None:
        adata.layers["lower"], adata.layers["upper"] = bounds.lower, bounds.upper
        adata.uns["deepspot"]["interval"] = float(interval)
    if note:
        adata.uns["deepspot"].setdefault("notes", []).append(note)


def with_geometry(config: ModelConfig, geometry: SpotGeometry | str | None) -> ModelConfig:
    """``config`` predicting on another spot geometry: a :class:`SpotGeometry`, or a preset name
    (:func:`~deepspot.config.geometry_preset`; the model's n_sub, neighbour radius and feature mode are
    kept). None: the checkpoint's own."""
    if geometry is None:
        return config
    if isinstance(geometry, str):
        geometry = geometry_preset(geometry, like=config.geometry)
    if not isinstance(geometry, SpotGeometry):
        raise ValueError(f"geometry must be a preset name or a SpotGeometry, got {type(geometry).__name__}")
    return config.replace(geometry=geometry)


def _mode(config: ModelConfig, fast: bool | None) -> str:
    return config.check_feature_mode(config.feature_mode if fast is None else ("fast" if fast else "standard"))


def predict_image(slide_path, model, config: ModelConfig | dict, encoder, mpp: float | None = None,
                  tissue: str | None = None,
                  batch_size: int = 16, num_workers: int | None = 0, cache_dir=None, device="cpu",
                  autocast_dtype=None, progress: bool = True, library_id: str | None = None,
                  thumbnail_size: int = 2000, stats: ExtractStats | None = None, min_tissue_fraction: float = 0.1,
                  fast: bool | None = None, layout: str | None = None, spacing: float | None = None,
                  predict_batch: int = 512, geometry: SpotGeometry | str | None = None,
                  interval: float | None = DEFAULT_LEVEL, tta: bool = False) -> ad.AnnData:
    """Predict every in-tissue spot of a virtual grid over the slide, in memory (small images).

    Returns AnnData (spots × genes) with obs array_row, array_col, in_tissue; obsm['spatial'] (x, y)
    level-0 px; uns['spatial'][library_id] (thumbnail + scalefactors); uns['deepspot'] (provenance).
    ``fast``: None = the checkpoint's feature mode; True/False must match it. For whole slides use
    :func:`predict_slide` (streams to disk). ``geometry``: predict on another grid (:func:`with_geometry`).
    ``interval``: the nominal level of layers['lower'] / ['upper'] (None: none), for models that carry a
    calibration; var['val_pearson'] / ['reliable'] always (NaN / False without validation).
    """
    config = with_geometry(ModelConfig.coerce(config), geometry)
    mode = _mode(config, fast)
    intervals_for(config, interval)
    plan = plan_slide(slide_path, config.geometry, mpp=mpp, tissue=tissue, min_tissue_fraction=min_tissue_fraction,
                      thumbnail_size=thumbnail_size, layout=layout, spacing=spacing)
    adata = _skeleton(plan, config, library_id, mode)
    bounds = _Bounds(*adata.shape)
    if len(plan.grid) == 0:
        warnings.warn(f"{slide_path}: no tissue found; the prediction is empty", stacklevel=2)
        adata.X = np.zeros(adata.shape, dtype=np.float32)
    else:
        adata.X = predict_plan(plan, model, config, encoder, mode=mode, mpp=mpp, batch_size=batch_size,
                               num_workers=num_workers, cache_dir=cache_dir, device=device,
                               autocast_dtype=autocast_dtype, progress=progress, stats=stats,
                               predict_batch=predict_batch, interval=interval, bounds_sink=bounds, tta=tta)
    _annotate(adata, config, interval, bounds)
    adata.uns["deepspot"]["tta"] = f"mean over the {N_VIEWS} dihedral views" if tta else "none"
    return adata


def plan_spots(slide_path, adata: ad.AnnData, geometry: SpotGeometry, mpp: float | None = None,
               thumbnail_size: int = 2000) -> SlidePlan:
    """The plan of the spots of an existing AnnData (obsm['spatial'] (x, y) level-0 px of ``slide_path``;
    obs array_row/array_col for the neighbour context), in their order; crops as the model's geometry."""
    from deepspot.io.spatial import SpatialDataError, check_inside

    if "spatial" not in adata.obsm:
        raise SpatialDataError(f"{slide_path}: the AnnData has no obsm['spatial'] (x, y) spot positions")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    has_array = "array_row" in adata.obs and "array_col" in adata.obs
    if not has_array and geometry.neighbor_radius > 0:
        raise SpatialDataError(f"{slide_path}: obs needs array_row/array_col for the model's neighbour context")
    with open_slide(slide_path, mpp=mpp) as slide:
        mpp_used = resolve_mpp(slide, mpp, needs_um=geometry.grid.needs_mpp)
        spec = geometry.grid.in_pixels(mpp_used)
        w, h = slide.dimensions
        check_inside(xy, w, h, f"{slide_path}: spots")
        thumb = slide.get_thumbnail(thumbnail_size)
    zeros = np.zeros(len(xy), dtype=np.int64)
    grid = pd.DataFrame({"array_row": adata.obs["array_row"].to_numpy() if has_array else zeros,
                         "array_col": adata.obs["array_col"].to_numpy() if has_array else zeros,
                         "x": xy[:, 0], "y": xy[:, 1]})
    return SlidePlan(Path(slide_path), geometry, spec, mpp_used, grid, len(grid), (int(w), int(h)), thumb, "none")


def predict_spots(slide_path, adata: ad.AnnData, model, config: ModelConfig | dict, encoder, mpp: float | None = None,
                  batch_size: int = 16, num_workers: int | None = 0, cache_dir=None, device="cpu",
                  autocast_dtype=None, progress: bool = True, library_id: str | None = None,
                  thumbnail_size: int = 2000, predict_batch: int = 512,
                  interval: float | None = DEFAULT_LEVEL, tta: bool = False) -> ad.AnnData:
    """Predict at the spots of ``adata`` (e.g. a Visium sample read by scanpy or deepspot's readers):
    AnnData with the same obs (names, order, columns), obsm['spatial'], X = predictions (spots × the
    model's genes), uns['spatial'] (the slide's thumbnail) and uns['deepspot'] (provenance)."""
    config = ModelConfig.coerce(config)
    mode = _mode(config, None)
    intervals_for(config, interval)
    plan = plan_spots(slide_path, adata, config.geometry, mpp=mpp, thumbnail_size=thumbnail_size)
    out = _skeleton(plan, config, library_id, mode)
    out.obs = adata.obs.copy()
    out.uns["deepspot"]["tissue_method"] = "positions given"
    bounds = _Bounds(*out.shape)
    out.X = (predict_plan(plan, model, config, encoder, mode=mode, mpp=mpp, batch_size=batch_size,
                          num_workers=num_workers, cache_dir=cache_dir, device=device, autocast_dtype=autocast_dtype,
                          progress=progress, predict_batch=predict_batch, interval=interval, bounds_sink=bounds,
                          tta=tta)
             if len(plan.grid) else np.zeros(out.shape, dtype=np.float32))
    _annotate(out, config, interval, bounds)
    return out


def spot_table(adata: ad.AnnData) -> pd.DataFrame:
    """The metadata CSV: barcode, array row/col, pixel x/y, in-tissue."""
    xy = np.asarray(adata.obsm["spatial"])
    return pd.DataFrame({"array_row": adata.obs["array_row"].to_numpy(), "array_col": adata.obs["array_col"].to_numpy(),
                         "pxl_x": xy[:, 0] if len(xy) else [], "pxl_y": xy[:, 1] if len(xy) else [],
                         "in_tissue": adata.obs["in_tissue"].to_numpy()},
                        index=pd.Index(adata.obs_names, name="barcode"))


@dataclass
class PredictResult:
    h5ad: Path  # the predictions: <name>.h5ad, or <name>.zarr (SpatialData) for fmt='spatialdata'
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


def _ident(p: Path):
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _remove_path(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_stale_work(out_dir: Path, name: str) -> list[Path]:
    """Remove what a killed run of slide ``name`` left in ``out_dir``: its work folders no live run holds,
    and, when no run of ``name`` is alive, its temp outputs (``.<file>.<random>.partial<ext>``)."""
    from deepspot.io.owner import is_alive, remove_stale

    removed = remove_stale(out_dir, f".{glob_escape(name)}.work-*")
    if not any(is_alive(w) for w in out_dir.glob(f".{glob_escape(name)}.work-*")):
        for f in (f"{name}.h5ad", f"{name}.zarr", f"{name}_spots.csv", f"{name}_genes.png"):
            for t in out_dir.glob(f".{glob_escape(f)}.*.partial{Path(f).suffix}"):
                _remove_path(t)
                removed.append(t)
    return removed


def glob_escape(s: str) -> str:
    import glob

    return glob.escape(s)


def _check_space(plan, config, encoder, cache_dir, out_dir: Path, target: Path, thumbnail_size: int) -> None:
    """The outputs' size (predictions twice: the work array and the h5ad; features when not cached
    elsewhere; the thumbnail) against the disk's free space, before any compute."""
    from deepspot.io.outputs import check_space

    n, g = len(plan.grid), len(config.genes)
    n_sub = getattr(config.geometry, "n_sub", 0) or 0
    feat = 0 if cache_dir is not None else n * (1 + n_sub) * int(getattr(encoder, "dim", 0) or 0) * 4
    base = out_dir.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    check_space(base, 2 * 4 * n * g + feat + 3 * thumbnail_size ** 2 + 256 * n, str(target))


def predict_slide(slide_path, model, config: ModelConfig | dict, encoder, out_dir, genes: list[str] | None = None,
                  n_plot: int = 4, mpp: float | None = None, tissue: str | None = None,
                  min_tissue_fraction: float = 0.1,
                  fast: bool | None = None, layout: str | None = None, spacing: float | None = None,
                  batch_size: int = 16, num_workers: int | None = None, cache_dir=None, device="cpu",
                  autocast_dtype=None, progress: bool = True, library_id: str | None = None,
                  thumbnail_size: int = 2000, predict_batch: int = 512, name: str | None = None,
                  meta: dict | None = None, stats: ExtractStats | None = None,
                  max_spots: int | None = None, geometry: SpotGeometry | str | None = None,
                  fmt: str = "h5ad", command: str = "predict", interval: float | None = DEFAULT_LEVEL,
                  keep_genes: list[str] | None = None, tta: bool = False) -> PredictResult:
    """Predict a whole slide with flat memory and write ``<name>.h5ad``, ``<name>_spots.csv`` and
    ``<name>_genes.png`` (``genes`` or the ``n_plot`` most variable) into ``out_dir``. ``fmt='spatialdata'``
    writes ``<name>.zarr`` (SpatialData: slide image, spot circles, prediction table; see
    :func:`deepspot.io.outputs.spatialdata_from_predictions`) instead of the h5ad.

    Features go to ``cache_dir`` (kept, reused next time) or to a work folder inside ``out_dir`` (removed);
    predictions stream into a zarr array there and are copied into the h5ad in chunks. The three outputs
    are written under temporary names and renamed together at the end: on any error nothing is left
    behind (a folder this call created is removed again). A slide without tissue gives an empty AnnData
    and a warning (no PNG). ``max_spots`` keeps only the first in-tissue spots in grid order (benchmarks).
    ``geometry``: predict on another grid than the checkpoint's (a preset name or a SpotGeometry).
    ``interval``: nominal level of the conformal interval written as layers 'lower' / 'upper' when the
    model carries a calibration (None: none); var 'val_pearson' / 'reliable' are always written.
    ``keep_genes``: write only these of the model's genes (e.g. its reliable ones), in this order.
    """
    import zarr

    from deepspot.features.store import RowWriter

    from deepspot.inference.preflight import check_options

    t0 = time.perf_counter()
    check_options(batch_size=batch_size, num_workers=num_workers)
    stats = stats if stats is not None else ExtractStats()
    config = with_geometry(ModelConfig.coerce(config), geometry)
    mode = _mode(config, fast)
    all_genes = list(config.genes)
    config.check_genes(genes)
    calib, interval_note = intervals_for(config, interval)
    config.check_genes(keep_genes)
    cols = None if keep_genes is None else np.array([all_genes.index(x) for x in keep_genes], dtype=np.int64)
    if cols is not None:
        if len(cols) == 0:
            raise ValueError("no genes to keep")
        all_genes = list(keep_genes)
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; use {' or '.join(FORMATS)}")
    if fmt == "spatialdata":
        from deepspot.extras import require

        require("spatialdata", "spatialdata", "--format spatialdata")  # before any compute
    plan = plan_slide(slide_path, config.geometry, mpp=mpp, tissue=tissue, min_tissue_fraction=min_tissue_fraction,
                      thumbnail_size=thumbnail_size, layout=layout, spacing=spacing, meta=meta)
    if max_spots is not None and len(plan.grid) > max_spots:
        plan.notes.append(f"capped at the first {max_spots} of {len(plan.grid)} in-tissue spots")
        plan = replace(plan, grid=plan.grid.iloc[:max_spots].reset_index(drop=True))
    from deepspot.inference.preflight import prediction_files, prediction_folder
    from deepspot.io.owner import hold, new_temp_dir, safe_name

    out_dir = Path(out_dir)
    name = safe_name(name or Path(slide_path).stem, "slide name", slide_path)
    owner = prediction_folder(out_dir, command).check()
    _check_space(plan, config, encoder, cache_dir, out_dir, out_dir / prediction_files(name, fmt)[0], thumbnail_size)
    owner.open()
    remove_stale_work(out_dir, name)
    work = new_temp_dir(out_dir, f".{name}.work-")
    lock = hold(work)  # a later run sees this work folder is alive
    names = prediction_files(name, fmt)
    paths = tuple(out_dir / n for n in names)
    try:
        skel = _skeleton(plan, config, library_id, mode)
        if cols is not None:
            skel = skel[:, list(keep_genes)].copy()
        n, g = skel.shape
        store = zarr.open_group(str(work / "predictions.zarr"), mode="w")
        pred = RowWriter(store, "X", (max(n, 0), g))
        moments = _GeneMoments(g)
        bound_rows = {k: RowWriter(store, k, (max(n, 0), g)) for k in ("lower", "upper")} if calib else {}

        def bounds_sink(start, lo, hi):
            bound_rows["lower"].append(lo if cols is None else lo[:, cols])
            bound_rows["upper"].append(hi if cols is None else hi[:, cols])

        def sink(start, p):
            p = p if cols is None else p[:, cols]
            pred.append(p)
            moments.add(p)

        if n == 0:
            warnings.warn(f"{slide_path}: no tissue found; the prediction is empty", stacklevel=2)
        else:
            predict_plan(plan, model, config, encoder, sink, mode=mode, mpp=mpp, batch_size=batch_size,
                         num_workers=num_workers, cache_dir=cache_dir, store_dir=work, device=device,
                         autocast_dtype=autocast_dtype, progress=progress, stats=stats, predict_batch=predict_batch,
                         interval=interval, bounds_sink=bounds_sink if calib else None, tta=tta)
        skel.uns["deepspot"]["tta"] = f"mean over the {N_VIEWS} dihedral views" if tta else "none"
        pred.flush()
        for w in bound_rows.values():
            w.flush()
        annotate_var(skel, config)
        if calib:
            skel.uns["deepspot"]["interval"] = float(interval)
        if interval_note:
            skel.uns["deepspot"].setdefault("notes", []).append(interval_note)
        layers = {k: w.array for k, w in bound_rows.items()}
        plot = list(genes) if genes else (trusted_genes(config, all_genes)[:n_plot]
                                          or [all_genes[i] for i in moments.top(n_plot)]) if n else []
        targets = paths[:2 if not (n and plot) else 3]
        before = {p: _ident(p) for p in targets}
        with contextlib.ExitStack() as stack:
            tmp = [stack.enter_context(atomic_dir(p) if p.suffix == ".zarr" else atomic_path(p)) for p in targets]
            if fmt == "spatialdata":
                from deepspot.io.outputs import spatialdata_from_predictions, write_spatialdata

                write_spatialdata(spatialdata_from_predictions(skel, slide_path, X=pred.array, mpp=plan.mpp,
                                                               layers=layers), tmp[0], atomic=False)
            else:
                write_h5ad_chunked(skel, pred.array, tmp[0], target=paths[0], layers=layers)
            spot_table(skel).to_csv(tmp[1], index=True)
            if len(tmp) == 3:
                plotting.spatial_columns(skel, pred.array, plot, tmp[2])
        owner.record(*(p.name for p in targets))
    except BaseException:
        # this run's own outputs (renamed before the error) go; the folder only if this run made it and
        # nothing else is in it; a writer thread may still add a file while the work folder is removed
        for p in locals().get("targets", ()):
            if p.exists() and _ident(p) != before.get(p):
                _remove_path(p)
        lock.close()
        for _ in range(5):
            shutil.rmtree(work, ignore_errors=True)
            if not work.exists():
                break
            time.sleep(0.1)
        owner.abort()
        raise
    lock.close()
    shutil.rmtree(work, ignore_errors=True)
    return PredictResult(paths[0], paths[1], paths[2] if n and plot else None, n, plan.n_grid, plot, stats,
                         time.perf_counter() - t0, list(plan.notes))
