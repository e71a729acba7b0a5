"""A :class:`~deepspot.config.requests.PredictRequest` checked once into a :class:`PredictPlan`: the model's
config on the requested geometry, the feature mode, the genes to write and to plot, the interval
calibration, the optional extras, the output folder (one :class:`~deepspot.io.owner.OutputFolder`) and the
slide — opened once, its mpp resolved once; the run (:func:`deepspot.inference.predict.run_prediction`) reads
pixels through that same handle. Everything here is checked before torch is imported and before any
compute; this module imports neither torch nor anndata.

    request -> plan_prediction(request, config) -> PredictPlan -> run_prediction(plan, model, encoder)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deepspot.config import ModelConfig, SpotGeometry, geometry_preset, resolve_mpp
from deepspot.config.output_names import FORMAT_EXTRAS, prediction_files
from deepspot.config.requests import PredictRequest

__all__ = ["PredictPlan", "plan_prediction", "with_geometry"]


def with_geometry(config: ModelConfig, geometry, spot_px: float | None = None,
                  spacing_px: float | None = None) -> ModelConfig:
    """``config`` predicting on another spot geometry: a :class:`SpotGeometry`, or a preset name
    (:func:`~deepspot.config.geometry_preset`, with its ``spot_px`` / ``spacing_px``; the model's n_sub,
    neighbour radius and feature mode are kept). None: the checkpoint's own."""
    if geometry is None:
        return config
    if isinstance(geometry, str):
        geometry = geometry_preset(geometry, spot_px=spot_px, spacing_px=spacing_px, like=config.geometry)
    if not isinstance(geometry, SpotGeometry):
        raise ValueError(f"geometry must be a preset name or a SpotGeometry, got {type(geometry).__name__}")
    return config.replace(geometry=geometry)


@dataclass
class PredictPlan:
    """What one prediction will do, every check done: see the module doc. Close it (or use it as a context
    manager) to close the slide."""

    request: PredictRequest
    config: ModelConfig  # on the request's geometry
    mode: str  # feature mode: standard | fast
    slide: object  # the open deepspot.io.slides.Slide: the one handle of this prediction
    mpp: float | None  # µm per level-0 pixel used (None: a pixel geometry on a slide without one)
    dimensions: tuple[int, int]
    keep_genes: list[str] | None  # write only these genes (None: all of the model's)
    genes_plot: list[str] | None  # the genes to plot (None: the most reliable, else the most variable)
    calibration: object | None  # the interval calibration at request.interval, or None
    interval_note: str | None
    name: str | None = None  # the output files' stem (checked safe); None without an output folder
    files: tuple[str, str, str] | None = None  # prediction_files(name, fmt)
    owner: object | None = None  # the OutputFolder of request.out (checked, not yet opened)
    notes: list[str] = field(default_factory=list)

    @property
    def slide_path(self) -> Path:
        return self.request.slide

    @property
    def out(self) -> Path | None:
        return self.request.out

    @property
    def genes(self) -> list[str]:
        """The genes written, in output order."""
        return list(self.keep_genes) if self.keep_genes is not None else list(self.config.genes)

    def close(self) -> None:
        """Close the slide (again: nothing)."""
        if self.slide is not None:
            self.slide.close()
            self.slide = None

    def __enter__(self) -> "PredictPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def require_format(fmt: str, what: str | None = None) -> None:
    """Import the optional dependency of output format ``fmt``, if it has one, or raise MissingExtra naming
    its pip extra; ``what`` says what asked for it (default: ``--format <fmt>``)."""
    extra = FORMAT_EXTRAS.get(fmt)
    if extra is not None:
        from deepspot.extras import require

        require(extra, extra, what or f"--format {fmt}")


def _keep_genes(request: PredictRequest, config: ModelConfig, source) -> list[str] | None:
    if request.reliable_only:
        from deepspot.reliability import NO_VALIDATION, trusted_genes

        keep = trusted_genes(config)
        if not keep:
            raise ValueError(f"{source}: --genes reliable: no gene is marked reliable"
                             + ("" if "reliability" in config.extra else f" ({NO_VALIDATION})"))
        return keep
    if request.keep_genes is None:
        return None
    config.check_genes(list(request.keep_genes), source)
    return list(request.keep_genes)


def plan_prediction(request: PredictRequest, config, source: str | None = None,
                    extra_hint: str | None = None) -> PredictPlan:
    """Check ``request`` against the model's ``config`` once and open its slide once, in this order: the
    output folder (writable, owned by no other command, no file of these names deepspot did not write),
    the genes (to plot, to keep), the interval level, the feature mode, the optional extra of the format,
    the slide (opened, its mpp resolved, a thumbnail possible) and a previous result in the folder
    (``request.overwrite`` None: the caller keeps the folder's results itself, as a cohort run does; this
    slide's own outputs are then replaced).
    ``config``: the model's :class:`ModelConfig`, or its checkpoint folder (its config.json is read, every
    field checked, after the output folder's checks). ``source`` names the model in errors (its folder;
    default: the folder given as ``config``). ``extra_hint`` says what needed the format's
    extra (default: ``--format <fmt>``). The plan holds the open slide: close it
    (``with plan_prediction(...) as plan:``)."""
    from deepspot.inference.preflight import check_out_dir, check_previous, prediction_folder
    from deepspot.io.owner import safe_name
    from deepspot.io.slides import open_slide
    from deepspot.reliability import intervals_for

    owner = name = files = None
    if request.out is not None:
        check_out_dir(request.out)
        owner = prediction_folder(request.out, request.command).check()
        name = safe_name(request.stem, "slide name", request.slide)
        files = prediction_files(name, request.fmt)
        for f in files if request.overwrite is not None else ():
            owner.check_target(f, overwrite=True)  # a file of that name deepspot did not write: never replaced
    if not isinstance(config, (ModelConfig, dict)):
        from deepspot.config import read_config_file

        source = source or str(config)
        config = read_config_file(config)
    source = source or "model"
    config = ModelConfig.coerce(config)
    if config.is_cell_model:  # the words Model.predict_slide uses: a cell model has no spot grid
        from deepspot.config import CheckpointError

        raise CheckpointError(f"{source}: a {config.model} model predicts cells, not a spot grid; use "
                              f"predict_cells (`deepspot predict-cells CELL_TABLE --image IMAGE --model {source}`)")
    config = with_geometry(config, request.geometry, request.spot_px, request.spacing_px)
    genes_plot = list(request.genes) if request.genes else None
    config.check_genes(genes_plot, source)
    keep = _keep_genes(request, config, source)
    calibration, note = intervals_for(config, request.interval)
    mode = config.check_feature_mode(config.feature_mode if request.fast is None
                                     else ("fast" if request.fast else "standard"), source)
    require_format(request.fmt, extra_hint)
    slide = open_slide(request.slide, mpp=request.mpp)
    try:
        mpp = resolve_mpp(slide, request.mpp, needs_um=config.geometry.grid.needs_mpp)
        slide.thumbnail_plan(request.thumbnail_size)
        if owner is not None and request.overwrite is not None:
            check_previous(request.out, files, request.overwrite)
    except BaseException:
        slide.close()
        raise
    return PredictPlan(request, config, mode, slide, mpp, tuple(slide.dimensions), keep, genes_plot, calibration,
                       note, name, files, owner)
