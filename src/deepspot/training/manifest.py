"""A training manifest: one row per sample -> list of samples (AnnData of counts + image + scale).

CSV columns: ``sample_id``, ``patient_id``, ``image``, ``expression`` (required); ``mpp``, ``format``,
``positions``, ``spot_diameter_um``, ``alignment``, ``features_h5`` (optional). Relative paths are relative to
the manifest's folder. ``features_h5``: the sample's TRIDENT / HEST patch-feature file (``coords`` in level-0
px of ``image`` + ``features``; :mod:`deepspot.features.external`), trained on instead of encoding the
image's crops; given on every row or on none (:func:`features_files`). ``format`` is one of:

- ``spaceranger``: ``expression`` is a Space Ranger ``outs`` folder;
- ``xenium``: a Xenium output folder (cells are pooled into Visium-like pseudo-spots for spot models);
- ``hest``: a HEST-1k ``st/<id>.h5ad`` (metadata json from ``positions`` or ``../metadata/<id>.json``);
- ``h5ad``: any h5ad with raw counts and ``obsm['spatial']`` in pixels of ``image``; spots without
  ``array_row`` / ``array_col`` get them from the lattice of their positions (cells: ``--cells``);
- ``her2st``: a legacy ST ``{S}_counts.tsv.gz`` (spots table from ``positions`` or ``{S}_spots.tsv``).

Left empty, it is detected from ``expression``. Patients, not samples, are the unit of evaluation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.io import spatial as S
from deepspot.io.owner import UnsafeNameError, safe_name
from deepspot.io.spatial import SpatialDataError

log = logging.getLogger(__name__)

FORMATS = ("spaceranger", "xenium", "hest", "h5ad", "her2st")
REQUIRED = ("sample_id", "patient_id", "image", "expression")


@dataclass
class SampleSpec:
    sample_id: str
    patient_id: str
    image: Path
    expression: Path
    format: str
    mpp: float | None = None
    positions: Path | None = None
    spot_diameter_um: float | None = None
    alignment: Path | None = None
    features_h5: Path | None = None


@dataclass
class Sample:
    """A loaded sample: raw counts with obs array_row/array_col and obsm['spatial'] (x, y) px of ``image``."""

    spec: SampleSpec
    adata: ad.AnnData
    mpp: float | None
    spot_diameter_um: float | None
    extra: dict = field(default_factory=dict)

    @property
    def sample_id(self) -> str:
        return self.spec.sample_id

    @property
    def patient_id(self) -> str:
        return self.spec.patient_id

    @property
    def image(self) -> Path:
        return self.spec.image

    @property
    def spot_px(self) -> float:
        """Spot side in image pixels (µm / mpp)."""
        if self.spot_diameter_um is None:
            raise SpatialDataError(f"{self.sample_id}: spot diameter unknown; set spot_diameter_um in the manifest")
        if not self.mpp:
            raise SpatialDataError(f"{self.sample_id}: no µm per pixel for {self.image.name}; set mpp in the manifest")
        return float(self.spot_diameter_um) / float(self.mpp)


def detect_format(expression: Path) -> str:
    if expression.is_dir():
        if (expression / "cell_feature_matrix.h5").exists():
            return "xenium"
        if any((expression / n).exists() for n in ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")):
            return "spaceranger"
    name = expression.name.lower()
    if name.endswith((".tsv", ".tsv.gz")) and "_counts" in name:
        return "her2st"
    if name.endswith(".h5ad"):
        return "hest" if expression.parent.name == "st" else "h5ad"
    raise SpatialDataError(f"{expression}: cannot tell the format; set the manifest's format column "
                           f"({', '.join(FORMATS)})")


def _opt(row, col):
    v = row.get(col, None)
    if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
        return None
    return v


def read_manifest(path: str | Path) -> list[SampleSpec]:
    """Parse and check a manifest CSV (columns, unique sample ids, files present, numbers valid)."""
    path = Path(path)
    if not path.exists():
        raise SpatialDataError(f"{path}: manifest not found")
    from deepspot.io.owner import check_manifest_size

    try:
        check_manifest_size(path)
    except ValueError as e:
        raise SpatialDataError(str(e)) from None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read manifest ({type(e).__name__})") from None
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise SpatialDataError(f"{path}: manifest lacks columns {missing} (needs {', '.join(REQUIRED)})")
    if df.empty:
        raise SpatialDataError(f"{path}: manifest has no samples")
    dup = df["sample_id"][df["sample_id"].duplicated()].tolist()
    if dup:
        raise SpatialDataError(f"{path}: duplicated sample_id {dup[:3]}")
    base = path.parent
    out = []
    for _, row in df.iterrows():
        sid = str(row["sample_id"]).strip()
        if not sid or not str(row["patient_id"]).strip():
            raise SpatialDataError(f"{path}: a row has an empty sample_id or patient_id")
        try:  # both name files (plots, caches, training logs): never a path
            safe_name(sid, "sample_id", path)
            safe_name(str(row["patient_id"]).strip(), "patient_id", path)
        except UnsafeNameError as e:
            raise SpatialDataError(str(e)) from None
        res = lambda v: None if v is None else (Path(v) if Path(v).is_absolute() else base / v)  # noqa: E731
        image, expr = res(str(row["image"]).strip()), res(str(row["expression"]).strip())
        for what, p in (("image", image), ("expression", expr)):
            if p is None or not p.exists():
                raise SpatialDataError(f"{sid}: {what} not found ({p})")
        feats = res(_opt(row, "features_h5"))
        if feats is not None and not feats.is_file():
            raise SpatialDataError(f"{path.name}, row {sid}: features_h5 file not found ({feats})")
        fmt = (_opt(row, "format") or detect_format(expr)).strip().lower()
        if fmt not in FORMATS:
            raise SpatialDataError(f"{sid}: unknown format {fmt!r} (one of {', '.join(FORMATS)})")
        nums = {}
        for col in ("mpp", "spot_diameter_um"):
            v = _opt(row, col)
            if v is not None:
                try:
                    nums[col] = float(v)
                except ValueError:
                    raise SpatialDataError(f"{sid}: {col} {v!r} is not a number") from None
                if not nums[col] > 0:
                    raise SpatialDataError(f"{sid}: {col} must be positive, got {v}")
        out.append(SampleSpec(sid, str(row["patient_id"]).strip(), image, expr, fmt, nums.get("mpp"),
                              res(_opt(row, "positions")), nums.get("spot_diameter_um"), res(_opt(row, "alignment")),
                              feats))
    return out


def features_files(samples) -> list[Path] | None:
    """The ``features_h5`` file of every sample (loaded :class:`Sample` s or :class:`SampleSpec` s), or None
    when none has one (or ``samples`` is not a list of them). A manifest giving the column on some rows only
    is refused, naming the rows without it: a model is trained on the features of one source."""
    if isinstance(samples, (str, Path)) or not isinstance(samples, (list, tuple)):
        return None
    specs = [s.spec if isinstance(s, Sample) else s for s in samples]
    if not specs or not all(isinstance(s, SampleSpec) for s in specs):
        return None
    files = [s.features_h5 for s in specs]
    if all(f is None for f in files):
        return None
    lacking = [s.sample_id for s in specs if s.features_h5 is None]
    if lacking:
        raise SpatialDataError(f"features_h5 is given for {len(files) - len(lacking)} of {len(files)} samples; rows "
                               f"{', '.join(lacking[:5])} have none: give a patch-feature file on every row (or on "
                               f"none, to encode the images)")
    return files


def her2st_manifest(data_dir: str | Path | None = None, sections=("C2", "C3", "C4", "C5")) -> list[SampleSpec]:
    """The bundled HER2ST sections as a manifest. They are four serial sections of ONE patient; each
    section is given its own ``patient_id`` so leave-one-patient-out becomes leave-one-section-out
    (an optimistic stand-in for a true patient split, and labelled so in every report)."""
    from deepspot.io.datasets import her2st

    return [SampleSpec(s, f"section_{s}", f["image"], f["counts"], "her2st", positions=f["spots"])
            for s, f in her2st(tuple(sections), data_dir).items()]


def load_sample(spec: SampleSpec, check_image: bool = True, cells: bool = False) -> Sample:
    """Read one sample with the reader of its format; positions are checked against the image.

    Spots stay spots: spot data without array coordinates (an h5ad of positions only) gets them from a
    lattice fitted to its positions (logged), so its neighbours follow the same array rule as in
    prediction. ``cells``: the rows are cells, left as they are for :func:`as_spots` to pool."""
    img = spec.image if check_image else None
    sid, fmt = spec.sample_id, spec.format
    if fmt == "spaceranger":
        a = S.read_spaceranger(spec.expression, image=img, sample=sid, mpp=spec.mpp)
    elif fmt == "xenium":
        a = S.read_xenium(spec.expression, image=img, sample=sid, mpp=spec.mpp, alignment=spec.alignment)
    elif fmt == "hest":
        meta = spec.positions
        if meta is None:
            cand = spec.expression.parent.parent / "metadata" / f"{spec.expression.stem}.json"
            meta = cand if cand.exists() else None
        a = S.read_hest(spec.expression, image=img, metadata=meta, sample=sid, mpp=spec.mpp)
    elif fmt == "h5ad":
        a = S.read_spatial_h5ad(spec.expression, image=img, sample=sid, mpp=spec.mpp,
                                spot_diameter_um=spec.spot_diameter_um)
    elif fmt == "her2st":
        a = S.read_her2st(spec.expression, spots=spec.positions, image=img, sample=sid, mpp=spec.mpp)
    else:
        raise SpatialDataError(f"{sid}: unknown format {fmt!r}")
    total = a.X.sum() if a.n_obs and a.n_vars else 0
    if not np.isfinite(total) or total <= 0:
        raise SpatialDataError(f"{spec.expression}: sample {sid} has {'no finite' if not np.isfinite(total) else 'all-zero'} "
                               f"counts ({a.n_obs} spots × {a.n_vars} genes); nothing to train or score on")
    if not cells and fmt != "xenium" and not {"array_row", "array_col"} <= set(a.obs.columns):
        a = _on_lattice(a, spec)
    src = a.uns.get("source", {})
    mpp = spec.mpp if spec.mpp is not None else src.get("mpp")
    spot = spec.spot_diameter_um if spec.spot_diameter_um is not None else src.get("spot_diameter_um")
    if mpp is None:  # from the slide's own metadata (None for a JPG)
        from deepspot.io.slides import open_slide

        with open_slide(spec.image) as s:
            mpp = s.mpp
    return Sample(spec, a, None if mpp is None else float(mpp), None if spot is None else float(spot))


def _on_lattice(a: ad.AnnData, spec: SampleSpec) -> ad.AnnData:
    """``a`` with obs array_row / array_col from the lattice its spot positions lie on."""
    from deepspot.geometry.neighbors import LatticeError, lattice_coords

    try:
        row, col, layout, pitch = lattice_coords(np.asarray(a.obsm["spatial"])[:, :2])
    except LatticeError as e:
        raise SpatialDataError(f"{spec.sample_id}: {spec.expression.name} has no array_row/array_col and its "
                               f"positions give none: {e}. If its rows are cells, pass --cells to pool them "
                               f"into pseudo-spots") from None
    a.obs["array_row"], a.obs["array_col"] = row, col
    log.info("%s: no array coordinates in %s; spots placed on the %s lattice of their positions (pitch %.1f px); "
             "neighbours follow the array rule, as at prediction", spec.sample_id, spec.expression.name, layout,
             pitch)
    return a


def as_spots(sample: Sample, spot_diameter_um: float = S.VISIUM_SPOT_UM, spacing_um: float = 100.0) -> Sample:
    """A spot-level view of a sample: cell-level data (Xenium, or an h5ad read with ``cells=True``) is
    pooled into Visium-like pseudo-spots on a hex grid (µm converted with the sample's mpp)."""
    a = sample.adata
    if "array_row" in a.obs and "array_col" in a.obs:
        return sample
    if not sample.mpp:
        raise SpatialDataError(f"{sample.sample_id}: no µm per pixel for {sample.image.name}, so its cells cannot "
                               f"be pooled into {spot_diameter_um:g} µm pseudo-spots; set mpp in the manifest")
    log.info("%s: pooling %d cells into %g µm pseudo-spots every %g µm", sample.sample_id, a.n_obs,
             spot_diameter_um, spacing_um)
    from deepspot.geometry.grid import GridSpec, pool_cells
    from deepspot.io.slides import open_slide

    with open_slide(sample.image, mpp=sample.mpp) as s:
        w, h = s.dimensions
    spec = GridSpec(spot_diameter_um, spacing_um, unit="um").in_pixels(sample.mpp)
    spots, cell_to_spot = pool_cells(a, w, h, spec)
    if spots.n_obs == 0:
        raise SpatialDataError(f"{sample.sample_id}: no cell falls inside a pseudo-spot")
    spots.uns["source"] = {**a.uns.get("source", {}), "pooled_from_cells": int((cell_to_spot >= 0).sum())}
    return Sample(sample.spec, spots, sample.mpp, spot_diameter_um, {"pooled": True})
