"""The geometries: the spot grid (:class:`GridSpec`), spot and sub-spot crops (:class:`SpotGeometry`) and its
presets, cell crops (:class:`CellGeometry`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from deepspot.config.constants import (FEATURE_MODES, GEOMETRY_PRESETS, GRID_LAYOUTS, GRID_ORIGINS, GRID_UNITS,
                                       MppError, NEIGHBOR_RULES, SUBSPOT_RULES, TISSUE_RULES, UNITS)
from deepspot.config.units import um_to_px
from deepspot.config.fields import _Fields, check_choice


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
        check_choice("grid unit", self.unit, GRID_UNITS)
        check_choice("grid layout", self.layout, GRID_LAYOUTS)
        if self.spot_diameter <= 0 or self.spacing <= 0:
            raise ValueError("spot diameter and spacing must be positive")
        check_choice("grid origin", self.origin, GRID_ORIGINS)
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
                   f.choice("layout", GRID_LAYOUTS, "hex"), f.choice("unit", GRID_UNITS),
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
        check_choice("feature mode", self.feature_mode, FEATURE_MODES)
        check_choice("sub-spot rule", self.subspot_rule, SUBSPOT_RULES)
        check_choice("tissue rule", self.tissue, TISSUE_RULES, optional=True)

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


def describe_geometries(default: str | None = None) -> str:
    """The presets in a command's words (``--geometry`` help), from the sizes :func:`geometry_preset` uses:
    'visium (55/100 µm hex), original (…) or tcga (…)'; ``default`` marks that one as the default."""
    v = GridSpec()
    words = {"visium": f"{v.spot_diameter:g}/{v.spacing:g} µm {v.layout}",
             "original": "the original's square pixel grid and crops",
             "tcga": f"its TCGA grid: {TCGA_SPOT_PX}/{TCGA_SPACING_PX} px at 20x, doubled at 40x"}
    parts = [f"{n} ({words[n]}{', the default' if n == default else ''})" for n in GEOMETRY_PRESETS]
    return f"{', '.join(parts[:-1])} or {parts[-1]}"


CELL_CROPS = ("tile", "bbox")  # how a cell's crop is cut (CellGeometry.crop)
MIN_CELL_CROP = 8.0  # the smallest side of a bbox crop, in the geometry's unit (CellGeometry.min_side)


@dataclass(frozen=True)
class CellGeometry:
    """How a cell's tile and context are cut; stored in every cell checkpoint.

    ``cell_diameter`` (tile side) and ``radius`` are in ``unit`` ('px' = level-0 pixels, or 'um',
    converted with the slide's mpp). ``neighbors``: 'knn' (the ``k`` nearest cells; published
    k = 45), 'radius' (all cells within ``radius``, at most ``max_neighbors`` nearest) or 'none'
    (the cell's own tile only).

    ``crop``: 'tile' (a square of side ``cell_diameter`` centred on the centroid) or 'bbox' (the cell
    polygon's bounding box, squared around the box centre: side = the larger of its width and height, at
    least ``min_side`` (in ``unit``) so that a tiny box is not blown up from a few pixels); every crop is
    resized to the encoder's input. Checkpoints written before the field read as 'tile'.
    """

    cell_diameter: float = 20.0
    unit: str = "px"
    neighbors: str = "knn"
    k: int = 45
    radius: float = 50.0
    max_neighbors: int | None = None
    crop: str = "tile"
    min_side: float = MIN_CELL_CROP

    def __post_init__(self):
        check_choice("cell crop", self.crop, CELL_CROPS)
        if not self.min_side > 0:
            raise ValueError(f"the smallest cell crop side must be positive, got {self.min_side}")
        check_choice("cell geometry unit", self.unit, UNITS)
        check_choice("neighbour rule", self.neighbors, NEIGHBOR_RULES)
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

    def min_side_px(self, mpp: float | None = None) -> float:
        return um_to_px(self.min_side, self.unit, mpp, "cell geometry")

    def describe(self) -> str:
        rule = {"knn": f"{self.k} nearest cells", "none": "no neighbours",
                "radius": f"cells within {self.radius:g} {self.unit}"}[self.neighbors]
        crop = (f"cell tile {self.cell_diameter:g} {self.unit}" if self.crop == "tile" else
                f"cell crop: its polygon's bounding box, squared, at least {self.min_side:g} {self.unit}")
        return f"{crop}, context: {rule}"

    def to_dict(self) -> dict:
        return {"kind": "cell", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", prefix: str = "") -> "CellGeometry":
        f = _Fields(d, source, prefix)
        return cls(f.number("cell_diameter", positive=True), f.choice("unit", UNITS),
                   f.choice("neighbors", NEIGHBOR_RULES), f.integer("k", 45, minimum=1),
                   f.number("radius", 50.0, positive=True), f.integer("max_neighbors", None, minimum=1),
                   f.choice("crop", CELL_CROPS, "tile"), f.number("min_side", MIN_CELL_CROP, positive=True))
