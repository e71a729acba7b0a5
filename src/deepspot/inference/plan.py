"""Planning a slide: open it, resolve its mpp, lay the spot grid (or take given spots), keep the spots on tissue,
take a thumbnail (step 1 of :mod:`deepspot.inference.predict`)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.config import TISSUE_RULES, GridSpec, SpotGeometry, resolve_mpp
from deepspot.geometry.grid import make_grid
from deepspot.geometry.neighbors import array_neighbors
from deepspot.features.tiles import spot_boxes
from deepspot.geometry.tissue import BACKGROUND_MEAN_RGB, tile_mean_rgb, tissue_spots
from deepspot.io.slides import open_slide

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
    slide: object = field(default=None, repr=False)  # the open Slide to read pixels from (None: open slide_path)

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
    Raises SlideError (corrupt/unsupported file, no mpp for a µm model: pass ``mpp``). Opens the slide and
    closes it again; a prediction plan lays its grid on the slide it holds open (:func:`plan_grid`)."""
    with open_slide(slide_path, mpp=mpp) as slide:
        mpp_used = resolve_mpp(slide, mpp, needs_um=_grid(geometry, layout, spacing).needs_mpp)
        plan = lay_grid(slide, slide_path, geometry, mpp_used, tissue=tissue, min_tissue_fraction=min_tissue_fraction,
                        thumbnail_size=thumbnail_size, layout=layout, spacing=spacing, meta=meta)
    plan.slide = None
    return plan


def plan_grid(plan) -> SlidePlan:
    """The grid of a :class:`~deepspot.inference.predict_plan.PredictPlan`, laid on the slide it holds open
    at the mpp it resolved (no second open); the returned plan reads pixels through that handle."""
    r = plan.request
    return lay_grid(plan.slide, r.slide, plan.config.geometry, plan.mpp, tissue=r.tissue,
                    min_tissue_fraction=r.min_tissue, thumbnail_size=r.thumbnail_size, layout=r.layout,
                    spacing=r.spacing, meta=r.meta)


def _grid(geometry: SpotGeometry, layout, spacing) -> GridSpec:
    grid_spec = geometry.grid
    if layout is not None or spacing is not None:
        grid_spec = replace(grid_spec, layout=layout or grid_spec.layout,
                            spacing=spacing if spacing is not None else grid_spec.spacing)
    return grid_spec


def lay_grid(slide, slide_path, geometry: SpotGeometry, mpp_used: float | None, tissue: str | None = None,
             min_tissue_fraction: float = 0.1, thumbnail_size: int = 2000, layout: str | None = None,
             spacing: float | None = None, meta: dict | None = None) -> SlidePlan:
    """:func:`plan_slide` on an open ``slide`` whose mpp is resolved (``mpp_used``)."""
    from deepspot.inference.preflight import check_options

    tissue = tissue or geometry.tissue or "otsu"
    if tissue not in TISSUE_RULES:
        raise ValueError(f"unknown tissue method {tissue!r}; use {', '.join(TISSUE_RULES)}")
    check_options(spacing=spacing, min_tissue=min_tissue_fraction)
    grid_spec = _grid(geometry, layout, spacing)
    geometry = replace(geometry, grid=grid_spec)
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
                     (int(w), int(h)), thumb, tissue, notes, slide=slide)


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
