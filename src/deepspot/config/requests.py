"""Typed requests: one frozen dataclass per user action, built by the CLI from its options or by the API from
its arguments, and checked once, when it is built (bounds, names, choices, the files it names exist).

- :class:`PredictRequest`: ``deepspot predict`` / ``Model.predict_slide``.
- :class:`ScoreRequest`: ``deepspot score`` / ``Model.score``.
- :class:`CohortRequest`: ``deepspot predict-cohort`` / ``run_cohort``.
- :class:`TrainRecipe` (what is learnt: loss, lr, epochs, patience …) and :class:`TrainerSettings` (how the
  trainer runs: precision, accelerator, devices, logs), the two halves of a :class:`TrainRequest`
  (``training.fit.fit``).

How the process runs (progress bars, device, reader workers, feature cache) is not part of a request: it is
:data:`deepspot.settings` (:mod:`deepspot.config.runtime`). A request becomes a plan (for prediction:
:mod:`deepspot.inference.predict_plan`) in which the slide is opened once; the plan, not the request's
fields one by one, travels down to the run. No torch, no I/O beyond ``exists``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from deepspot.config.constants import TISSUE_RULES, gene_name_faults
from deepspot.config.fields import check_choice
from deepspot.config.output_names import PREDICTION_FORMATS

__all__ = ["CohortRequest", "PredictRequest", "ScoreRequest", "TrainRecipe", "TrainRequest", "TrainerSettings",
           "check_gene_list", "check_options", "split_genes"]


def split_genes(s: str | None) -> list[str] | None:
    """A comma-separated option (``--genes A,B``) -> its names (None when empty)."""
    return [g.strip() for g in s.split(",") if g.strip()] if s else None


def check_gene_list(genes, option: str = "--genes") -> None:
    """A gene list the user gave: no empty and no repeated names."""
    if not genes:
        return
    blank, dups = gene_name_faults(genes)
    if blank:
        raise ValueError(f"{option}: empty gene name at position {blank[0]}")
    if dups:
        raise ValueError(f"{option}: repeated gene names ({', '.join(dups[:3])}{' …' if len(dups) > 3 else ''})")


def _number(v, option, lo=0.0, hi=math.inf, closed=False):
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = math.nan
    ok = math.isfinite(x) and (lo <= x <= hi if closed else lo < x <= hi)
    if not ok:
        rng = f"between {lo:g} and {hi:g}" if closed else f"a positive number{f' up to {hi:g}' if hi < math.inf else ''}"
        raise ValueError(f"{option} must be {rng}, got {v!r}")


def check_options(spacing=None, min_tissue=None, batch_size=None, spot_px=None, spacing_px=None,
                  num_workers=None) -> None:
    """Numeric prediction options, each a one-line error naming the option: sizes positive and finite,
    a fraction in [0, 1], counts at least 1."""
    for v, option in ((spacing, "--spacing"), (spot_px, "--spot-px"), (spacing_px, "--spacing-px")):
        if v is not None:
            _number(v, option, hi=1e6)
    if min_tissue is not None:
        _number(min_tissue, "--min-tissue", 0.0, 1.0, closed=True)
    _count(batch_size, "--batch-size")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {num_workers!r}")


def _check_tissue(tissue) -> None:
    """A tissue rule (None: the geometry's), one of :data:`~deepspot.config.constants.TISSUE_RULES`."""
    if tissue is not None and tissue not in TISSUE_RULES:
        raise ValueError(f"unknown tissue method {tissue!r}; use {', '.join(TISSUE_RULES)}")


def _count(v, option: str, lo: int = 1) -> None:
    if v is not None and (isinstance(v, bool) or not float(v).is_integer() or v < lo):
        raise ValueError(f"{option} must be a whole number of at least {lo}, got {v!r}")


def _genes(v) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = split_genes(v) or []
    return tuple(str(g) for g in v)


def _path(v) -> Path | None:
    return None if v is None else Path(v)


def _exists(p: Path | None, what: str = "file") -> None:
    if p is not None and not p.exists():
        raise FileNotFoundError(f"{p}: {what} not found")


class _Request:
    """Shared by the requests: ``replace`` (a changed copy, checked again) and ``as_dict``."""

    def replace(self, **changes):
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PredictRequest(_Request):
    """One slide predicted on a virtual spot grid (``deepspot predict``, ``Model.predict_slide``).

    ``out`` None: in memory (the API only). ``genes``: the genes to plot; ``reliable_only``: write only the
    model's reliable genes (``--genes reliable``); ``keep_genes``: write only these. ``geometry``: a preset
    name or a SpotGeometry; ``spot_px`` / ``spacing_px`` only with a preset name. ``fmt``: h5ad or
    spatialdata. ``name``: the output files' stem (default: the slide's). ``max_spots``: keep the first
    in-tissue spots (benchmarks). ``model``: the checkpoint folder the CLI loads (the API holds its model).
    """

    slide: Path
    out: Path | None = None
    model: Path | None = None
    genes: tuple[str, ...] | None = None
    reliable_only: bool = False
    keep_genes: tuple[str, ...] | None = None
    n_plot: int = 4
    mpp: float | None = None
    tissue: str | None = None
    min_tissue: float = 0.1
    fast: bool | None = None
    layout: str | None = None
    spacing: float | None = None
    geometry: Any = None  # None | preset name | SpotGeometry
    spot_px: float | None = None
    spacing_px: float | None = None
    batch_size: int = 16
    interval: float | None = 0.9
    tta: bool = False
    fmt: str = "h5ad"
    overwrite: bool | None = False  # None: no previous-result check (the caller's, e.g. a cohort run)
    library_id: str | None = None
    name: str | None = None
    thumbnail_size: int = 2000
    predict_batch: int = 512
    max_spots: int | None = None
    command: str = "predict"
    meta: dict | None = field(default=None, compare=False)
    encoder_weights: Path | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - normalising a frozen instance
        set_("slide", Path(self.slide))
        for k in ("out", "model", "encoder_weights"):
            set_(k, _path(getattr(self, k)))
        set_("genes", _genes(self.genes) or None)
        set_("keep_genes", _genes(self.keep_genes))
        check_options(spacing=self.spacing, min_tissue=self.min_tissue, batch_size=self.batch_size,
                      spot_px=self.spot_px, spacing_px=self.spacing_px)
        _count(self.predict_batch, "predict_batch")
        _count(self.thumbnail_size, "thumbnail_size")
        if self.max_spots is not None:
            _count(self.max_spots, "max_spots")
        _exists(self.slide)
        check_choice("--format", self.fmt, PREDICTION_FORMATS)
        _check_tissue(self.tissue)
        check_gene_list(self.genes)
        check_gene_list(self.keep_genes, "keep_genes")
        if self.keep_genes is not None and len(self.keep_genes) == 0:
            raise ValueError("no genes to keep")
        if self.reliable_only and self.keep_genes is not None:
            raise ValueError("--genes reliable and keep_genes: give one")
        if (self.spot_px is not None or self.spacing_px is not None) and not isinstance(self.geometry, str):
            raise ValueError("--spot-px / --spacing-px need --geometry original")
        if self.geometry is not None and not isinstance(self.geometry, str) and not hasattr(self.geometry, "grid"):
            raise ValueError(f"geometry must be a preset name or a SpotGeometry, got {type(self.geometry).__name__}")

    @classmethod
    def from_options(cls, slide, genes: str | None = None, **options) -> "PredictRequest":
        """The request of ``deepspot predict``'s options: ``genes`` is the comma-separated option
        (``reliable``: the model's reliable genes, written alone); ``interval`` 0 means none."""
        only_reliable = (genes or "").strip().lower() == "reliable"
        if options.get("interval") == 0:
            options["interval"] = None
        return cls(slide, genes=None if only_reliable else split_genes(genes), reliable_only=only_reliable,
                   **options)

    @property
    def stem(self) -> str:
        """The name of the output files (before the safe-name rule): ``name`` or the slide's stem."""
        return self.name or self.slide.stem


@dataclass(frozen=True)
class ScoreRequest(_Request):
    """Predict at the annotated spots of each sample of a manifest and score them (``deepspot score``,
    ``Model.score``). ``out``: the folder of per_gene.csv / summary.csv / the figures (CLI); ``baseline``:
    'ridge' (the training manifest the model records) or a manifest to fit the ridge baseline on."""

    manifest: Any  # a manifest path (CLI), or loaded samples (API)
    out: Path | None = None
    model: Path | None = None
    baseline: str | None = None
    features_h5: Path | None = None
    encoder_weights: Path | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if isinstance(self.manifest, (str, Path)):
            set_("manifest", Path(self.manifest))
        for k in ("out", "model", "features_h5", "encoder_weights"):
            set_(k, _path(getattr(self, k)))
        if self.baseline is not None and not str(self.baseline).strip():
            raise ValueError("--baseline: give 'ridge' or a training manifest")

    @property
    def ridge_from_model(self) -> bool:
        return self.baseline is not None and str(self.baseline).strip().lower() == "ridge"


@dataclass(frozen=True)
class CohortRequest(_Request):
    """Every slide of a manifest predicted into one folder, resumable (``deepspot predict-cohort``,
    :func:`deepspot.inference.cohort.run_cohort`). Its slides run in other processes (Ray tasks) as well as
    this one, so what each slide task runs with is part of the request: ``device`` ('auto': cuda when a GPU
    is visible), ``num_workers`` (reader processes per slide, 0 by default), ``cache_dir``; the progress bar
    over slides is :data:`deepspot.settings`."""

    manifest: Path
    model: Path
    out: Path
    backend: str = "ray"
    address: str | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_in_flight: int | None = None
    retry_failed: bool = False
    mpp: float | None = None
    tissue: str | None = None
    batch_size: int = 16
    plot_genes: int = 0
    autocast: str | None = None
    encoder_weights: Path | None = None
    new_run: bool = False
    overwrite: bool = False
    fmt: str = "h5ad"
    device: str = "auto"
    num_workers: int = 0
    cache_dir: Path | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for k in ("manifest", "model", "out", "encoder_weights", "cache_dir"):
            set_(k, _path(getattr(self, k)))
        if self.backend not in ("ray", "local"):
            raise ValueError(f"unknown backend {self.backend!r}; use 'ray' or 'local'")
        check_choice("--format", self.fmt, PREDICTION_FORMATS)
        if not (math.isfinite(self.num_cpus) and math.isfinite(self.num_gpus)) or self.num_cpus < 0 \
                or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be ≥ 0")
        if self.backend == "ray" and self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError("--num-cpus 0 without --num-gpus would run every slide at once; give each slide task "
                             "at least one CPU or GPU share (e.g. --num-cpus 1)")
        _check_tissue(self.tissue)
        _count(self.batch_size, "--batch-size")
        _count(self.plot_genes, "--plot-genes", lo=0)
        _count(self.num_workers, "--num-workers", lo=0)
        if self.new_run and self.overwrite:
            raise ValueError("give --new-run or --overwrite, not both")
        if self.max_in_flight is not None:
            _count(self.max_in_flight, "--max-in-flight")


@dataclass(frozen=True)
class TrainRecipe(_Request):
    """What is learnt and when to stop: the loss, the optimiser's lr and weight decay, the batch sizes, the
    epochs, early stopping (``monitor``, ``patience``, ``min_delta``) and the seed."""

    loss: str = "mse"
    lr: float = 1e-4
    weight_decay: float = 1e-6
    batch_size: int = 64
    val_batch_size: int | None = None
    max_epochs: int = 200
    min_epochs: int | None = None
    patience: int = 20
    monitor: str = "val_loss"
    min_delta: float = 0.0
    seed: int = 2024

    def __post_init__(self):
        _number(self.lr, "lr")
        _count(self.batch_size, "batch_size")
        _count(self.max_epochs, "max_epochs", lo=0)
        _count(self.patience, "patience", lo=0)
        if self.val_batch_size is not None:
            _count(self.val_batch_size, "val_batch_size")
        if self.min_epochs is not None:
            _count(self.min_epochs, "min_epochs", lo=0)
        if not (self.weight_decay >= 0 and self.min_delta >= 0):
            raise ValueError("weight_decay and min_delta must be 0 or more")


@dataclass(frozen=True)
class TrainerSettings(_Request):
    """How the trainer runs, whatever it learns: numeric precision, accelerator, devices, strategy, logs."""

    precision: str = "32-true"
    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    log_dir: Path | None = None
    loggers: str | tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "log_dir", _path(self.log_dir))
        if isinstance(self.loggers, list):
            object.__setattr__(self, "loggers", tuple(self.loggers))


@dataclass(frozen=True)
class TrainRequest(_Request):
    """One fit: its :class:`TrainRecipe` and its :class:`TrainerSettings` (progress bars: ``ds.settings``)."""

    recipe: TrainRecipe = field(default_factory=TrainRecipe)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)

    _RECIPE = frozenset(f.name for f in fields(TrainRecipe))
    _TRAINER = frozenset(f.name for f in fields(TrainerSettings))

    @classmethod
    def of(cls, **options) -> "TrainRequest":
        """From flat keyword options (``loss=``, ``precision=`` …), each sorted into its half; an unknown
        name is a TypeError, as for a function."""
        unknown = set(options) - cls._RECIPE - cls._TRAINER
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        return cls(TrainRecipe(**{k: v for k, v in options.items() if k in cls._RECIPE}),
                   TrainerSettings(**{k: v for k, v in options.items() if k in cls._TRAINER}))
