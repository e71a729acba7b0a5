"""Whole-slide prediction on a virtual spot grid: slide -> AnnData (batched, masked bags, flat memory).

The way a slide goes (:func:`run_prediction` of a :class:`~deepspot.inference.predict_plan.PredictPlan`, made
from a :class:`~deepspot.config.requests.PredictRequest` by ``deepspot predict``, ``Model.predict_slide`` or
:func:`predict_slide`):

0. the plan: the request checked against the model once, the slide opened once (SVS, pyramidal/OME-TIFF,
   JPG…) and its mpp taken once (``mpp`` overrides; a µm-geometry model refuses a slide without one);
1. :func:`~deepspot.inference.plan.plan_grid`: on that open slide, lay a virtual grid in µm (Visium hex by
   default, or square bins), keep the spots on tissue found at a low pyramid level, take a thumbnail.
2. Encode every in-tissue spot once (:func:`~deepspot.features.extract.extract_to_store`): DataLoader
   workers read each spot box once from the level nearest the target resolution and cut the spot and
   sub-spot crops in memory; features stream into a zarr store.
3. Predict in chunks (:func:`~deepspot.models.bags.iter_predictions`): a chunk reads its spots' and
   their neighbours' spot features and its own sub-spot features from the store; predictions stream
   into a zarr array.
4. Assemble the ``.h5ad`` (``X`` copied chunk by chunk), the spot CSV and a PNG of chosen genes, all
   written under temporary names and renamed only when everything succeeded.

Peak memory depends on the chunk sizes, not on the number of spots (beyond O(N) index arrays).
Step 0 lives in :mod:`deepspot.inference.predict_plan`, step 1 in :mod:`deepspot.inference.plan`, steps 2-3 in
:mod:`deepspot.inference.run_plan`; this module assembles and writes the outputs. Progress, device, reader
workers and the feature cache are :data:`deepspot.settings`.
:func:`predict_image` is the in-memory variant returning an AnnData (small images, the demo).
"""
from __future__ import annotations

import contextlib
import os
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot import plotting
from deepspot.config import ModelConfig, SpotGeometry
from deepspot.config.output_names import PREDICTION_FORMATS as FORMATS, all_prediction_files
from deepspot.config.requests import PredictRequest
from deepspot.config.runtime import settings
from deepspot.reliability import DEFAULT_LEVEL, annotate_var, intervals_for, trusted_genes
from deepspot.features.extract import ExtractStats
from deepspot.features.views import N_VIEWS
from deepspot.io.outputs import atomic_dir, atomic_path, write_h5ad_chunked
# planning (step 1) and running the plan (steps 2-3) live beside this module; their names keep this import path
from deepspot.inference.plan import MAX_GRID_SPOTS, SlidePlan, geometry_report, plan_grid, plan_slide, plan_spots
from deepspot.inference.predict_plan import PredictPlan, plan_prediction, with_geometry
from deepspot.inference.run_plan import _annotate, _Bounds, _mode, _obs, _skeleton, predict_plan


log = logging.getLogger(__name__)


def predict_image(slide_path, model, config: ModelConfig | dict, encoder, mpp: float | None = None,
                  tissue: str | None = None, library_id: str | None = None, thumbnail_size: int = 2000,
                  stats: ExtractStats | None = None, min_tissue_fraction: float = 0.1,
                  fast: bool | None = None, layout: str | None = None, spacing: float | None = None,
                  predict_batch: int = 512, geometry: SpotGeometry | str | None = None,
                  interval: float | None = DEFAULT_LEVEL, tta: bool = False, batch_size: int = 16,
                  **run) -> ad.AnnData:
    """Predict every in-tissue spot of a virtual grid over the slide, in memory (small images).

    Returns AnnData (spots × genes) with obs array_row, array_col, in_tissue; obsm['spatial'] (x, y)
    level-0 px; uns['spatial'][library_id] (thumbnail + scalefactors); uns['deepspot'] (provenance).
    ``fast``: None = the checkpoint's feature mode; True/False must match it. For whole slides use
    :func:`predict_slide` (streams to disk). ``geometry``: predict on another grid (:func:`with_geometry`).
    ``interval``: the nominal level of layers['lower'] / ['upper'] (None: none), for models that carry a
    calibration; var['val_pearson'] / ['reliable'] always (NaN / False without validation).
    ``run``: :data:`deepspot.settings` for this call (``progress``, ``num_workers`` (default here 0: read
    in this process), ``cache_dir``, ``device``, ``autocast_dtype``).
    """
    request = PredictRequest(slide_path, mpp=mpp, tissue=tissue, library_id=library_id, thumbnail_size=thumbnail_size,
                             min_tissue=min_tissue_fraction, fast=fast, layout=layout, spacing=spacing,
                             predict_batch=predict_batch, geometry=geometry, interval=interval, tta=tta,
                             batch_size=batch_size)
    with settings.override(**run), settings.unless_set(num_workers=0), plan_prediction(request, config) as plan:
        return run_prediction(plan, model, encoder, stats=stats)


def predict_spots(slide_path, adata: ad.AnnData, model, config: ModelConfig | dict, encoder, mpp: float | None = None,
                  batch_size: int = 16, library_id: str | None = None, thumbnail_size: int = 2000,
                  predict_batch: int = 512, interval: float | None = DEFAULT_LEVEL, tta: bool = False,
                  **run) -> ad.AnnData:
    """Predict at the spots of ``adata`` (e.g. a Visium sample read by scanpy or deepspot's readers):
    AnnData with the same obs (names, order, columns), obsm['spatial'], X = predictions (spots × the
    model's genes), uns['spatial'] (the slide's thumbnail) and uns['deepspot'] (provenance). ``run``:
    :data:`deepspot.settings` for this call (``num_workers`` default here 0)."""
    config = ModelConfig.coerce(config)
    mode = _mode(config, None)
    intervals_for(config, interval)
    with settings.override(**run), settings.unless_set(num_workers=0):
        plan = plan_spots(slide_path, adata, config.geometry, mpp=mpp, thumbnail_size=thumbnail_size)
        out = _skeleton(plan, config, library_id, mode)
        out.obs = adata.obs.copy()
        out.uns["deepspot"]["tissue_method"] = "positions given"
        bounds = _Bounds(*out.shape)
        out.X = (predict_plan(plan, model, config, encoder, mode=mode, mpp=mpp, batch_size=batch_size,
                              predict_batch=predict_batch, interval=interval, bounds_sink=bounds, tta=tta)
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
        for f in all_prediction_files(name):
            for t in out_dir.glob(f".{glob_escape(f)}.*.partial{Path(f).suffix}"):
                _remove_path(t)
                removed.append(t)
    return removed


def glob_escape(s: str) -> str:
    import glob

    return glob.escape(s)


def _check_space(plan, config, encoder, out_dir: Path, target: Path, thumbnail_size: int) -> None:
    """The outputs' size (predictions twice: the work array and the h5ad; features when not cached
    elsewhere; the thumbnail) against the disk's free space, before any compute."""
    from deepspot.io.outputs import check_space

    n, g = len(plan.grid), len(config.genes)
    n_sub = getattr(config.geometry, "n_sub", 0) or 0
    feat = 0 if settings.cache_dir is not None else n * (1 + n_sub) * int(getattr(encoder, "dim", 0) or 0) * 4
    base = out_dir.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    check_space(base, 2 * 4 * n * g + feat + 3 * thumbnail_size ** 2 + 256 * n, str(target))


_RUN = frozenset({"progress", "num_workers", "cache_dir", "device", "autocast_dtype"})
_RENAMED = {"min_tissue_fraction": "min_tissue", "out_dir": "out"}


def predict_slide(slide_path, model, config: ModelConfig | dict, encoder, out_dir, stats: ExtractStats | None = None,
                  **options) -> PredictResult:
    """Predict a whole slide with flat memory and write ``<name>.h5ad``, ``<name>_spots.csv`` and
    ``<name>_genes.png`` (``genes`` or the ``n_plot`` most variable) into ``out_dir``: a
    :class:`~deepspot.config.requests.PredictRequest` of ``options`` (its fields: ``genes``, ``n_plot``,
    ``mpp``, ``tissue``, ``min_tissue`` (or ``min_tissue_fraction``), ``fast``, ``layout``, ``spacing``,
    ``batch_size``, ``library_id``, ``thumbnail_size``, ``predict_batch``, ``name``, ``meta``,
    ``max_spots``, ``geometry``, ``fmt``, ``command``, ``interval``, ``keep_genes``, ``tta`` …), planned
    (:func:`~deepspot.inference.predict_plan.plan_prediction`: the slide opened once) and run
    (:func:`run_prediction`). The settings among ``options`` (``progress``, ``num_workers``, ``cache_dir``,
    ``device``, ``autocast_dtype``) override :data:`deepspot.settings` for this call. Unlike ``deepspot
    predict``, a previous result of this slide is replaced unless ``overwrite=False`` is given.
    """
    run = {k: options.pop(k) for k in list(options) if k in _RUN}
    options.setdefault("overwrite", None)  # this function replaces the slide's own outputs (a cohort's policy)
    for old, new in _RENAMED.items():
        if old in options:
            options[new] = options.pop(old)
    request = PredictRequest(slide_path, out=out_dir, **options)
    with settings.override(**run), plan_prediction(request, config) as plan:
        return run_prediction(plan, model, encoder, stats=stats)


def run_prediction(plan: PredictPlan, model, encoder, stats: ExtractStats | None = None):
    """Run a checked :class:`~deepspot.inference.predict_plan.PredictPlan`: lay its grid on the slide it holds
    open, encode, predict, and either return the AnnData (``plan.out`` None: in memory) or stream it into
    the plan's output folder (a :class:`PredictResult`). How it runs (progress, device, workers, feature
    cache) is :data:`deepspot.settings`."""
    if plan.out is None:
        return _predict_in_memory(plan, model, encoder, stats)
    return _predict_to_folder(plan, model, encoder, stats)


def _predict_in_memory(plan: PredictPlan, model, encoder, stats) -> ad.AnnData:
    r, config = plan.request, plan.config
    grid = plan_grid(plan)
    adata = _skeleton(grid, config, r.library_id, plan.mode)
    bounds = _Bounds(*adata.shape)
    if len(grid.grid) == 0:
        warnings.warn(f"{r.slide}: no tissue found; the prediction is empty", stacklevel=3)
        adata.X = np.zeros(adata.shape, dtype=np.float32)
    else:
        adata.X = predict_plan(grid, model, config, encoder, mode=plan.mode, mpp=r.mpp, batch_size=r.batch_size,
                               stats=stats, predict_batch=r.predict_batch, interval=r.interval, bounds_sink=bounds,
                               tta=r.tta)
    _annotate(adata, config, r.interval, bounds)
    adata.uns["deepspot"]["tta"] = f"mean over the {N_VIEWS} dihedral views" if r.tta else "none"
    if plan.keep_genes is not None:
        adata = adata[:, list(plan.keep_genes)].copy()
    return adata


def _predict_to_folder(plan: PredictPlan, model, encoder, stats) -> PredictResult:
    """Features go to ``settings.cache_dir`` (kept, reused next time) or to a work folder inside the output
    folder (removed); predictions stream into a zarr array there and are copied into the h5ad in chunks.
    The three outputs are written under temporary names and renamed together at the end: on any error
    nothing is left behind (a folder this call created is removed again). A slide without tissue gives an
    empty AnnData and a warning (no PNG). ``max_spots`` keeps only the first in-tissue spots in grid order
    (benchmarks)."""
    import zarr

    from deepspot.features.store import RowWriter
    from deepspot.io.owner import hold, new_temp_dir

    t0 = time.perf_counter()
    r, config, owner, name = plan.request, plan.config, plan.owner, plan.name
    stats = stats if stats is not None else ExtractStats()
    calib, interval_note, fmt = plan.calibration, plan.interval_note, r.fmt
    all_genes = plan.genes
    keep_genes = plan.keep_genes
    cols = None if keep_genes is None else np.array([list(config.genes).index(x) for x in keep_genes],
                                                    dtype=np.int64)
    slide_path = r.slide
    grid = plan_grid(plan)
    if r.max_spots is not None and len(grid.grid) > r.max_spots:
        grid.notes.append(f"capped at the first {r.max_spots} of {len(grid.grid)} in-tissue spots")
        grid = replace(grid, grid=grid.grid.iloc[:r.max_spots].reset_index(drop=True))
    out_dir = Path(r.out)
    names = plan.files
    _check_space(grid, config, encoder, out_dir, out_dir / names[0], r.thumbnail_size)
    owner.open()
    remove_stale_work(out_dir, name)
    work = new_temp_dir(out_dir, f".{name}.work-")
    lock = hold(work)  # a later run sees this work folder is alive
    paths = tuple(out_dir / n for n in names)
    try:
        skel = _skeleton(grid, config, r.library_id, plan.mode)
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
            warnings.warn(f"{slide_path}: no tissue found; the prediction is empty", stacklevel=4)
        else:
            predict_plan(grid, model, config, encoder, sink, mode=plan.mode, mpp=r.mpp, batch_size=r.batch_size,
                         store_dir=work, stats=stats, predict_batch=r.predict_batch, interval=r.interval,
                         bounds_sink=bounds_sink if calib else None, tta=r.tta)
        skel.uns["deepspot"]["tta"] = f"mean over the {N_VIEWS} dihedral views" if r.tta else "none"
        pred.flush()
        for w in bound_rows.values():
            w.flush()
        annotate_var(skel, config)
        if calib:
            skel.uns["deepspot"]["interval"] = float(r.interval)
        if interval_note:
            skel.uns["deepspot"].setdefault("notes", []).append(interval_note)
        layers = {k: w.array for k, w in bound_rows.items()}
        genes, n_plot = plan.genes_plot, r.n_plot
        plot = list(genes) if genes else (trusted_genes(config, all_genes)[:n_plot]
                                          or [all_genes[i] for i in moments.top(n_plot)]) if n else []
        targets = paths[:2 if not (n and plot) else 3]
        before = {p: _ident(p) for p in targets}
        with contextlib.ExitStack() as stack:
            tmp = [stack.enter_context(atomic_dir(p) if p.suffix == ".zarr" else atomic_path(p)) for p in targets]
            if fmt == "spatialdata":
                from deepspot.io.outputs import spatialdata_from_predictions, write_spatialdata

                write_spatialdata(spatialdata_from_predictions(skel, slide_path, X=pred.array, mpp=grid.mpp,
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
    return PredictResult(paths[0], paths[1], paths[2] if n and plot else None, n, grid.n_grid, plot, stats,
                         time.perf_counter() - t0, list(grid.notes))
