"""The contract every stage imports: the checkpoint config, the geometries, the target scaler, the
µm-per-pixel rule and µm -> px.

A checkpoint folder holds ``model.safetensors`` and ``config.json``; :class:`ModelConfig` is the typed
form of ``config.json``. :meth:`ModelConfig.from_dict` checks every field and raises one
:class:`CheckpointError` naming the file and the field (``config.json: geometry.grid.spot_diameter
missing``) before anything is computed; configs written before the schema version existed are
migrated on read (:func:`migrate`).

This module imports nothing else from deepspot, so every layer may import it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

SCHEMA_VERSION = 2
FEATURE_MODES = ("standard", "fast")
SPOT_MODELS = ("deepspot",)
CELL_MODELS = ("deepcell", "deepspot2cell", "deepspot2cell-pooled")
MODEL_KINDS = SPOT_MODELS + CELL_MODELS  # the one list of model kinds (models/registry.py binds each to its class)
EXTERNAL_ENCODER = "external"  # features made outside deepspot (a model converted with --feature-dim)
NEIGHBOR_RULES = ("knn", "radius", "none")
SCALERS = ("standard", "minmax")
UNITS = ("um", "px")
# a spot grid may also be in "px20x": pixels at 20x (~0.5 µm/px), doubled on a 40x slide (the original's TCGA rule)
GRID_UNITS = UNITS + ("px20x",)
GRID_ORIGINS = ("edge", "original")
SUBSPOT_RULES = ("split", "floor")
TISSUE_RULES = ("otsu", "mean_rgb", "tile_mean_rgb", "none")
GEOMETRY_PRESETS = ("visium", "original", "tcga")
TARGETS = "normalize_total(1e4) + log1p"


def gene_name_faults(genes) -> tuple[list[int], list[str]]:
    """The one rule for a list of gene names (a checkpoint's genes, a user's --genes): (positions of empty
    names, names repeated, in the order of their first repeat). Both empty: the list is fine."""
    blank = [i for i, g in enumerate(genes) if not str(g).strip()]
    seen, dups = set(), []
    for g in genes:
        if g in seen and g not in dups:
            dups.append(g)
        seen.add(g)
    return blank, dups


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used; the message names the file (and field) and the reason."""


class MppError(ValueError):
    """A slide's µm per pixel is unknown or invalid where one is needed."""


# --------------------------------------------------------------------------- units


def um_to_px(value: float, unit: str, mpp: float | None, what: str = "length") -> float:
    """A length in ``unit`` ('px' or 'um') as level-0 pixels; µm need ``mpp`` (µm per pixel)."""
    if unit == "px":
        return float(value)
    if unit != "um":
        raise ValueError(f"unit must be 'um' or 'px', got {unit!r}")
    if mpp is None or not mpp > 0:
        raise MppError(f"this {what} is in µm: an mpp (µm per pixel) is needed; pass --mpp")
    return float(value) / float(mpp)


def resolve_mpp(slide, override: float | None = None, needs_um: bool = False) -> float | None:
    """The µm per level-0 pixel to use for ``slide`` (anything with ``.mpp`` and ``.path``).

    ``override`` (the user's ``--mpp``) wins over the file's; without either, a geometry in µm
    (``needs_um``) is refused with an error naming the file, and a pixel geometry gets None.
    """
    source = getattr(slide, "path", "slide")
    if override is not None:
        v = float(override)
        if not (v > 0 and math.isfinite(v)):
            raise MppError(f"{source}: mpp must be a positive number, got {override!r}")
        return v
    mpp = getattr(slide, "mpp", None)
    if mpp is not None:
        return float(mpp)
    if needs_um:
        raise MppError(f"{source}: resolution (µm per pixel) unknown: the file carries no mpp; "
                       f"pass --mpp (e.g. --mpp 0.5 for 20x)")
    return None


# --------------------------------------------------------------------------- field checks


class _Fields:
    """Reads typed fields of one mapping; every failure is a CheckpointError naming ``source: prefix.key``."""

    def __init__(self, d: Any, source: str, prefix: str = ""):
        self.source, self.prefix = source, prefix
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: {prefix.rstrip('.') or 'config'} must be a JSON object, "
                                  f"got {type(d).__name__}")
        self.d = d

    def fail(self, key: str, why: str):
        raise CheckpointError(f"{self.source}: {self.prefix}{key} {why}")

    def get(self, key: str, default: Any = ..., types=None, name: str = ""):
        if key not in self.d or self.d[key] is None:
            if default is ...:
                self.fail(key, "missing")
            return default
        v = self.d[key]
        if types is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in _tuple(types)):
            self.fail(key, f"must be {name or _names(types)}, got {v!r}"[:200])
        return v

    def number(self, key: str, default: Any = ..., positive: bool = False) -> float:
        v = self.get(key, default, (int, float), "a number")
        if v is None:
            return v
        if not math.isfinite(float(v)) or positive and not v > 0:
            self.fail(key, f"must be a {'positive ' if positive else ''}finite number, got {v!r}")
        return float(v)

    def integer(self, key: str, default: Any = ..., minimum: int | None = None) -> int:
        v = self.get(key, default, int, "an integer")
        if v is not None and minimum is not None and v < minimum:
            self.fail(key, f"must be >= {minimum}, got {v}")
        return v

    def choice(self, key: str, options, default: Any = ...) -> str:
        v = self.get(key, default, str, "a string")
        if v not in options:
            self.fail(key, f"must be one of {', '.join(options)}, got {v!r}")
        return v

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.get(key, types=dict, name="an object"), self.source, f"{self.prefix}{key}.")


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _names(types) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", dict: "an object",
                        list: "a list", bool: "true/false"}.get(t, t.__name__) for t in _tuple(types))


# --------------------------------------------------------------------------- geometries


@dataclass(frozen=True)
class GridSpec:
    """A spot grid. Lengths are in ``unit``: 'um', 'px' (level-0 pixels) or 'px20x' (pixels at 20x,
    doubled on a 40x slide, picked from its mpp: the original's TCGA rule).

    ``origin`` 'edge': the first spot touches the image's top-left corner (centre at offset + radius);
    'original': the original DeepSpot's square pixel grid, centres at ``D + 1, D + 1 + spacing, …`` while
    below ``size - D - 1`` in each axis (D, spacing rounded to whole pixels).
    """

    spot_diameter: float = 55.0
    spacing: float = 100.0  # centre to centre
    layout: str = "hex"  # 'hex' (Visium) or 'square' (Visium HD-like bins)
    unit: str = "um"
    offset_x: float = 0.0
    offset_y: float = 0.0
    origin: str = "edge"

    def __post_init__(self):
        if self.unit not in GRID_UNITS:
            raise ValueError(f"grid unit must be one of {', '.join(GRID_UNITS)}, got {self.unit!r}")
        if self.layout not in ("hex", "square"):
            raise ValueError(f"grid layout must be 'hex' or 'square', got {self.layout!r}")
        if self.spot_diameter <= 0 or self.spacing <= 0:
            raise ValueError("spot diameter and spacing must be positive")
        if self.origin not in GRID_ORIGINS:
            raise ValueError(f"grid origin must be one of {', '.join(GRID_ORIGINS)}, got {self.origin!r}")
        if self.origin == "original" and self.layout != "square":
            raise ValueError("the original's grid origin is for a square grid (layout 'square')")

    @property
    def needs_mpp(self) -> bool:
        """Whether turning this grid into pixels needs the slide's µm per pixel."""
        return self.unit != "px"

    def in_pixels(self, mpp: float | None) -> "GridSpec":
        """The same grid with lengths in level-0 pixels."""
        if self.unit == "px":
            return self
        if self.unit == "px20x":
            f = magnification_factor(mpp)
        else:
            f = um_to_px(1.0, "um", mpp, "grid")
        return GridSpec(self.spot_diameter * f, self.spacing * f, self.layout, "px",
                        self.offset_x * f, self.offset_y * f, self.origin)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", prefix: str = "") -> "GridSpec":
        f = _Fields(d, source, prefix)
        return cls(f.number("spot_diameter", positive=True), f.number("spacing", positive=True),
                   f.choice("layout", ("hex", "square"), "hex"), f.choice("unit", GRID_UNITS),
                   f.number("offset_x", 0.0), f.number("offset_y", 0.0), f.choice("origin", GRID_ORIGINS, "edge"))


def magnification_factor(mpp: float | None) -> float:
    """Pixels-at-20x -> level-0 pixels: 1 on a 20x slide (mpp ~0.5), 2 on a 40x slide (mpp ~0.25), as the
    original picked its TCGA geometry; other resolutions are refused."""
    if mpp is None or not mpp > 0:
        raise MppError("this geometry is in pixels at 20x/40x: an mpp (µm per pixel) is needed to tell which; "
                       "pass --mpp")
    if not 0.15 <= float(mpp) <= 0.75:
        raise MppError(f"this geometry is defined at 20x (~0.5 µm/px) and 40x (~0.25 µm/px); the slide has "
                       f"{float(mpp):g} µm/px")
    return 2.0 if float(mpp) < 0.375 else 1.0


@dataclass(frozen=True)
class SpotGeometry:
    """How crops and context are cut, stored in every spot checkpoint.

    grid: spot diameter and spacing (µm or px, converted with the slide's mpp) and layout; n_sub:
    sub-spot grid (n×n); neighbours: spots whose array row and column differ by at most
    ``neighbor_radius`` (the same rule in training and prediction: the 4 diagonal neighbours on a
    Visium hex grid, the 8-neighbourhood on a square grid; in µm that is one grid spacing, since the
    array coordinates come from the µm grid); feature_mode: 'standard' or 'fast' (sub-spots from
    the spot's patch tokens) — a model is used in the mode it was trained in.

    subspot_rule: 'split' (sub-spot edges at round(i·D/n): every pixel in one sub-spot) or 'floor' (the
    original's: exact ``D // n`` squares from the tile's corner, the remainder dropped, cut at full
    resolution; the rule of standard features: fast mode pools patch tokens over the 'split' regions);
    tissue: the tissue filter prediction uses unless told otherwise (None: 'otsu');
    preset: the name of the preset this geometry came from (:func:`geometry_preset`), if any.
    """

    grid: GridSpec = field(default_factory=GridSpec)
    n_sub: int = 3
    neighbor_radius: int = 1
    feature_mode: str = "standard"
    subspot_rule: str = "split"
    tissue: str | None = None
    preset: str | None = None

    def __post_init__(self):
        if self.feature_mode not in FEATURE_MODES:
            raise ValueError(f"unknown feature mode {self.feature_mode!r}; use 'standard' or 'fast'")
        if self.subspot_rule not in SUBSPOT_RULES:
            raise ValueError(f"unknown sub-spot rule {self.subspot_rule!r}; use {' or '.join(SUBSPOT_RULES)}")
        if self.tissue is not None and self.tissue not in TISSUE_RULES:
            raise ValueError(f"unknown tissue rule {self.tissue!r}; use {', '.join(TISSUE_RULES)}")

    def to_dict(self) -> dict:
        return {"grid": self.grid.to_dict(), "n_sub": self.n_sub, "neighbor_radius": self.neighbor_radius,
                "feature_mode": self.feature_mode, "subspot_rule": self.subspot_rule, "tissue": self.tissue,
                "preset": self.preset}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", prefix: str = "") -> "SpotGeometry":
        f = _Fields(d, source, prefix)
        tissue = f.get("tissue", None, str)
        if tissue is not None:
            tissue = f.choice("tissue", TISSUE_RULES)
        preset = f.get("preset", None, str)
        if preset is not None:
            preset = f.choice("preset", GEOMETRY_PRESETS)
        return cls(GridSpec.from_dict(f.get("grid", types=dict, name="an object"), source, f"{prefix}grid."),
                   f.integer("n_sub", minimum=1), f.integer("neighbor_radius", minimum=0),
                   f.choice("feature_mode", FEATURE_MODES, "standard"),
                   f.choice("subspot_rule", SUBSPOT_RULES, "split"), tissue, preset)


ORIGINAL_SPOT_PX = 100  # the original's example grid: 100 px spots, 100 px apart
TCGA_SPOT_PX, TCGA_SPACING_PX = 160, 290  # the original's TCGA grid at 20x (doubled at 40x)


def geometry_preset(name: str, spot_px: float | None = None, spacing_px: float | None = None,
                    like: SpotGeometry | None = None) -> SpotGeometry:
    """A named spot geometry.

    - ``visium``: ours — a 55 µm spot every 100 µm on a hex grid, crops in µm (the default);
    - ``original``: the original DeepSpot's prediction grid — a square grid in pixels (spot side
      ``spot_px``, spacing ``spacing_px``; default 100/100), starting at one spot side from the corner,
      neighbours the up-to-8 grid cells within one step, each sub-spot an exact ``D // n`` square (the
      remainder dropped), tiles whose mean RGB exceeds 200 dropped;
    - ``tcga``: the original's TCGA settings — as ``original`` with 160 px spots 290 px apart at 20x,
      doubled on a 40x slide (picked from the slide's mpp).

    ``like``: a model's geometry whose n_sub, neighbour radius and feature mode are kept; when it already
    is this preset, its sizes are kept too (a converted checkpoint's px sizes) unless given here.
    """
    if name not in GEOMETRY_PRESETS:
        raise ValueError(f"unknown geometry {name!r}; choose one of {', '.join(GEOMETRY_PRESETS)}")
    if name != "original" and (spot_px is not None or spacing_px is not None):
        raise ValueError(f"spot and spacing in px are options of the 'original' geometry, not of {name!r}")
    keep = {} if like is None else {"n_sub": like.n_sub, "neighbor_radius": like.neighbor_radius,
                                    "feature_mode": like.feature_mode}
    if name == "visium":
        return SpotGeometry(GridSpec(), preset="visium", **keep)
    if name == "tcga":
        grid = GridSpec(TCGA_SPOT_PX, TCGA_SPACING_PX, "square", "px20x", origin="original")
    else:
        base = like.grid if like is not None and like.preset == "original" else None
        spot = spot_px if spot_px is not None else (base.spot_diameter if base else ORIGINAL_SPOT_PX)
        spacing = spacing_px if spacing_px is not None else (base.spacing if base else spot)
        for what, v in (("spot side", spot), ("spacing", spacing)):
            if not float(v).is_integer() or v < 1:
                raise ValueError(f"the original geometry's {what} is a whole number of pixels, got {v:g}")
        grid = GridSpec(float(spot), float(spacing), "square", "px", origin="original")
    return SpotGeometry(grid, subspot_rule="floor", tissue="tile_mean_rgb", preset=name, **keep)


@dataclass(frozen=True)
class CellGeometry:
    """How a cell's tile and context are cut; stored in every cell checkpoint.

    ``cell_diameter`` (tile side) and ``radius`` are in ``unit`` ('px' = level-0 pixels, or 'um',
    converted with the slide's mpp). ``neighbors``: 'knn' (the ``k`` nearest cells; published
    k = 45), 'radius' (all cells within ``radius``, at most ``max_neighbors`` nearest) or 'none'
    (the cell's own tile only).
    """

    cell_diameter: float = 20.0
    unit: str = "px"
    neighbors: str = "knn"
    k: int = 45
    radius: float = 50.0
    max_neighbors: int | None = None

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"cell geometry unit must be 'um' or 'px', got {self.unit!r}")
        if self.neighbors not in NEIGHBOR_RULES:
            raise ValueError(f"neighbour rule must be one of {', '.join(NEIGHBOR_RULES)}, got {self.neighbors!r}")
        if self.cell_diameter <= 0:
            raise ValueError(f"cell diameter must be positive, got {self.cell_diameter}")
        if self.neighbors == "knn" and self.k < 1:
            raise ValueError(f"k nearest neighbours needs k >= 1, got {self.k}")
        if self.neighbors == "radius" and self.radius <= 0:
            raise ValueError(f"neighbour radius must be positive, got {self.radius}")

    @property
    def context(self) -> str:
        """The model context this rule implies."""
        return "cell" if self.neighbors == "none" else "cell_neighbors"

    def tile_px(self, mpp: float | None = None) -> float:
        return um_to_px(self.cell_diameter, self.unit, mpp, "cell geometry")

    def radius_px(self, mpp: float | None = None) -> float:
        return um_to_px(self.radius, self.unit, mpp, "cell geometry")

    def describe(self) -> str:
        rule = {"knn": f"{self.k} nearest cells", "none": "no neighbours",
                "radius": f"cells within {self.radius:g} {self.unit}"}[self.neighbors]
        return f"cell tile {self.cell_diameter:g} {self.unit}, context: {rule}"

    def to_dict(self) -> dict:
        return {"kind": "cell", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", prefix: str = "") -> "CellGeometry":
        f = _Fields(d, source, prefix)
        return cls(f.number("cell_diameter", positive=True), f.choice("unit", UNITS),
                   f.choice("neighbors", NEIGHBOR_RULES), f.integer("k", 45, minimum=1),
                   f.number("radius", 50.0, positive=True), f.integer("max_neighbors", None, minimum=1))


# --------------------------------------------------------------------------- target scaler


@dataclass(frozen=True, eq=False)
class Scaler:
    """Per-gene target scaler: ``y_scaled = (y - a) / b``; a, b (G,) float32.

    standard: a = mean, b = std; minmax: a = min, b = max - min; constant genes get b = 1. Stored in
    the checkpoint as ``{'kind', 'a', 'b'}`` (lists), plus ``lo``, ``hi`` (G,) when set: the range of
    each gene in the training targets, to which :meth:`inverse` clips predictions, so that a tile
    unlike any training tile (glass, pen, a slide edge) cannot predict expression far outside what
    was ever measured (a network extrapolates linearly there).
    """

    kind: str
    a: np.ndarray
    b: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    @classmethod
    def fit(cls, y: np.ndarray, kind: str | None) -> "Scaler | None":
        """Fit on (training) targets y (N, G); ``kind`` None or 'none' gives None (no scaling)."""
        if kind in (None, "none"):
            return None
        y = np.asarray(y, dtype=np.float64)
        if kind == "standard":
            a, b = y.mean(axis=0), y.std(axis=0)
        elif kind == "minmax":
            a, b = y.min(axis=0), y.max(axis=0) - y.min(axis=0)
        else:
            raise ValueError(f"unknown scaler {kind!r}; choose standard, minmax or none")
        b = np.where(b > 1e-12, b, 1.0)
        return cls(kind, a.astype(np.float32), b.astype(np.float32), y.min(axis=0).astype(np.float32),
                   y.max(axis=0).astype(np.float32))

    def transform(self, y: np.ndarray) -> np.ndarray:
        """(N, G) targets -> scaled targets, float32."""
        return ((np.asarray(y, dtype=np.float32) - self.a) / self.b).astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """(N, G) scaled predictions -> target space (clipped to the training range when known), float32."""
        out = y * self.b + self.a
        if self.lo is not None and self.hi is not None:
            out = np.clip(out, self.lo, self.hi)
        return out

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "a": self.a.tolist(), "b": self.b.tolist()}
        if self.lo is not None and self.hi is not None:
            d.update(lo=self.lo.tolist(), hi=self.hi.tolist())
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", prefix: str = "scaler.",
                  n_genes: int | None = None) -> "Scaler":
        f = _Fields(d, source, prefix)
        kind = f.get("kind", "standard", str)
        arrays = []
        keys = ("a", "b", "lo", "hi") if ("lo" in d or "hi" in d) else ("a", "b")
        for key in keys:
            v = f.get(key, types=list, name="a list of numbers")
            try:
                arr = np.asarray(v, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                f.fail(key, "must be a list of numbers")
            if n_genes is not None and len(arr) != n_genes:
                f.fail(key, f"has {len(arr)} values for {n_genes} genes")
            if not np.all(np.isfinite(arr)):
                bad = int(np.flatnonzero(~np.isfinite(arr))[0])
                f.fail(key, f"has a NaN or infinite value (first at position {bad}); the gene would be all NaN")
            arrays.append(arr)
        if not np.all(arrays[1] != 0):
            f.fail("b", "has zeros (division by zero)")
        return cls(kind, *arrays)


# --------------------------------------------------------------------------- checkpoint config


@dataclass(frozen=True)
class EncoderRef:
    """The image encoder a model was trained on: registry name and feature dim d."""

    name: str
    dim: int


@dataclass
class ModelConfig:
    """The typed ``config.json`` of a checkpoint.

    model: kind ('deepspot', 'deepcell', 'deepspot2cell', 'deepspot2cell-pooled'); model_args: the network's constructor
    arguments (``in_dim`` = encoder dim, ``n_genes`` = len(genes)); genes: output order; geometry:
    :class:`SpotGeometry` (spot models) or :class:`CellGeometry` (cell models); scaler: undone on
    every prediction; mpp: µm/px used in training (cell models); training: provenance (loss, lr,
    seed, split, epochs…); scores: held-out scores; extra: any other top-level keys, kept as they are
    (e.g. ``converted_from``).
    """

    model: str
    model_args: dict
    encoder: EncoderRef
    genes: list[str]
    geometry: SpotGeometry | CellGeometry
    scaler: Scaler | None = None
    targets: str = TARGETS
    mpp: float | None = None
    training: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def context(self) -> str:
        """The context mode (DeepSpot: 'spot'…'spot_subspot_neighbors'; cells: 'cell', 'cell_neighbors')."""
        return str(self.model_args.get("context", ""))

    @property
    def feature_mode(self) -> str:
        """How features are made: 'standard' or 'fast' (spot models trained with --fast)."""
        return self.geometry.feature_mode if isinstance(self.geometry, SpotGeometry) else "standard"

    @property
    def is_cell_model(self) -> bool:
        return self.model in CELL_MODELS

    def check_feature_mode(self, mode: str, source: str = "model") -> str:
        """Refuse to use a model with features made another way than in its training."""
        if mode != self.feature_mode:
            hint = "pass --fast" if self.feature_mode == "fast" else "drop --fast"
            raise CheckpointError(f"{source}: model was trained on {self.feature_mode!r} features, asked for "
                                  f"{mode!r} ({hint})")
        return mode

    def check_genes(self, genes, source: str = "model") -> None:
        """Every requested gene must be one the model predicts."""
        missing = [g for g in (genes or ()) if g not in set(self.genes)]
        if missing:
            lower = {str(g).lower(): g for g in self.genes}
            case = [f"{g} -> {lower[str(g).lower()]}" for g in missing if str(g).lower() in lower]
            raise CheckpointError(f"{source}: {len(missing)} requested genes are not predicted by this model "
                                  f"(e.g. {', '.join(map(str, missing[:3]))})"
                                  + (f"; did you mean {', '.join(case[:3])}?" if case else
                                     "; its panel is fixed at training: `deepspot train --add-genes` adds markers"))

    def check_encoder_dim(self, dim: int, source: str = "model") -> None:
        if int(dim) != self.encoder.dim:
            raise CheckpointError(f"{source}: model expects {self.encoder.dim}-d features from encoder "
                                  f"'{self.encoder.name}', got {int(dim)}-d features")

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "model": self.model, "model_args": dict(self.model_args),
                "encoder": {"name": self.encoder.name, "dim": self.encoder.dim}, "genes": list(self.genes),
                "geometry": self.geometry.to_dict(), "scaler": None if self.scaler is None else self.scaler.to_dict(),
                "targets": self.targets, "mpp": self.mpp, "training": dict(self.training),
                "scores": dict(self.scores), **self.extra}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Check every field (one CheckpointError naming ``source`` and the field) and build the config."""
        d = migrate(d, source)
        f = _Fields(d, source)
        kind = f.choice("model", MODEL_KINDS)
        enc = f.sub("encoder")
        encoder = EncoderRef(enc.get("name", types=str), enc.integer("dim", minimum=1))
        genes = f.get("genes", types=list, name="a list of gene names")
        if not genes or not all(isinstance(g, str) for g in genes):
            f.fail("genes", "must be a non-empty list of gene names")
        blank, dups = gene_name_faults(genes)
        if blank:
            f.fail("genes", f"has {len(blank)} empty name(s) (first at position {blank[0]})")
        if dups:
            f.fail("genes", f"has duplicates ({', '.join(map(repr, dups[:3]))}{' …' if len(dups) > 3 else ''})")
        args = f.sub("model_args")
        in_dim, n_genes = args.integer("in_dim", minimum=1), args.integer("n_genes", minimum=1)
        if in_dim != encoder.dim:
            args.fail("in_dim", f"is {in_dim} but encoder.dim is {encoder.dim}")
        if n_genes != len(genes):
            args.fail("n_genes", f"is {n_genes} but genes lists {len(genes)}")
        for key, v in args.d.items():  # sizes checked before a network of them is allocated
            bound = MAX_GENES if key == "n_genes" else MAX_MODEL_SIZE
            if isinstance(v, (int, float)) and not isinstance(v, bool) and key not in ("dropout", "lr") \
                    and (not math.isfinite(v) or abs(v) > bound):
                args.fail(key, f"is {v!r}, over the bound {bound} (the network would not fit in memory)")
        geo = f.get("geometry", types=dict, name="an object")
        try:
            geometry = (CellGeometry.from_dict(geo, source, "geometry.") if kind in CELL_MODELS
                        else SpotGeometry.from_dict(geo, source, "geometry."))
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"{source}: geometry {e}") from None
        scaler = d.get("scaler")
        scaler = None if not scaler else Scaler.from_dict(scaler, source, "scaler.", n_genes=len(genes))
        known = {"schema_version", "model", "model_args", "encoder", "genes", "geometry", "scaler", "targets",
                 "mpp", "training", "scores"}
        return cls(kind, dict(args.d), encoder, list(genes), geometry, scaler,
                   f.get("targets", TARGETS, str), f.number("mpp", None, positive=True),
                   dict(f.get("training", {}, dict)), dict(f.get("scores", {}, dict)),
                   {k: v for k, v in d.items() if k not in known}, SCHEMA_VERSION)

    @classmethod
    def coerce(cls, config: "ModelConfig | dict", source: str = "config") -> "ModelConfig":
        """A ModelConfig as it is, or a config dict checked and typed."""
        return config if isinstance(config, cls) else cls.from_dict(config, source)


MAX_MODEL_SIZE = 65536  # any size in model_args (hidden, heads, in_dim…)
MAX_GENES = 1_000_000


def read_config_file(folder, name: str = "config.json") -> "ModelConfig":
    """The checked :class:`ModelConfig` of checkpoint folder ``folder`` (its ``name`` file), without
    importing torch: every problem is one CheckpointError naming the file."""
    import json
    from pathlib import Path

    folder = Path(folder)
    cfg_file = folder / name
    if not folder.exists():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not cfg_file.exists():
        raise CheckpointError(f"{folder}: not a deepspot checkpoint (no {name})")
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise CheckpointError(f"{cfg_file}: JSON nested too deeply to be a deepspot config") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({e.strerror or type(e).__name__})") from None
    return ModelConfig.from_dict(raw, source=str(cfg_file))


def invert_scaler(pred: np.ndarray, scaler: "Scaler | dict | None") -> np.ndarray:
    """Undo an optional target scaler (a :class:`Scaler` or its stored dict form) on predictions (N, G)."""
    if not scaler:
        return pred
    return (scaler if isinstance(scaler, Scaler) else Scaler.from_dict(scaler)).inverse(pred)


def migrate(d: dict, source: str = "config.json") -> dict:
    """A config dict of any schema version as the current one (a new dict; ``d`` is not changed).

    Version 1 (``format_version`` 1, or none: the checkpoints written before the typed config) differs
    only in where it kept the feature mode: at the top level (``feature_mode``) in some, in the
    geometry in the others.
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: config must be a JSON object, got {type(d).__name__}")
    version = d.get("schema_version", d.get("format_version", 1))
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{source}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise CheckpointError(f"{source}: schema_version {version} is newer than this deepspot reads "
                              f"({SCHEMA_VERSION}); update deepspot")
    out = {k: v for k, v in d.items() if k != "format_version"}
    args = out.get("model_args")
    if out.get("model") == "deepspot2cell" and isinstance(args, dict) and "aggregate" in args:
        out["model"] = "deepspot2cell-pooled"  # written before 'deepspot2cell' became the published architecture
    if version == 1:
        mode = out.pop("feature_mode", None)
        geo = out.get("geometry")
        if mode and isinstance(geo, dict) and "grid" in geo and not geo.get("feature_mode"):
            out["geometry"] = {**geo, "feature_mode": mode}
    out["schema_version"] = SCHEMA_VERSION
    return out
