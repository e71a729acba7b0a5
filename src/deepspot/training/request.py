"""The request of ``deepspot train`` / ``ds.train``: :class:`TrainJob`, what one training run needs (the data,
the image, the model kind and its geometry, the gene panel, the recipe, the trainer settings), checked once
when it is built.

The recipe is not a list of its own: it is the choices made among :class:`~deepspot.training.recipe.SpotRecipe`'s
fields (``loss``, ``max_epochs``, ``context`` …), on top of the preset for a spot model
(:attr:`TrainJob.spot_recipe`), on top of each cell model's own defaults for the cell models. How the trainer
runs is a :class:`~deepspot.config.requests.TrainerSettings`; how the process runs (progress bars, the feature
cache, reader workers) is :data:`deepspot.settings`, not part of the request.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from deepspot.config.constants import CELL_MODELS, MODEL_KINDS
from deepspot.config.requests import TrainerSettings, _Request, check_gene_list

__all__ = ["SAMPLES_OPTIONS", "TrainJob"]

#: options of training on several samples (a manifest) that are neither recipe nor trainer settings
SAMPLES_OPTIONS = ("val_samples", "val_patients", "on_missing", "min_fraction", "n_sub", "neighbor_radius", "features")
#: the recipe names every model kind takes (the others are the spot recipe's, for training on several samples)
ONE_SAMPLE_RECIPE = ("context", "loss", "max_epochs", "patience", "seed", "hidden", "n_ensemble")
_DEFAULT_RECIPE = {"context": "spot_subspot_neighbors", "seed": 2024}


def _recipe_names() -> frozenset[str]:
    from deepspot.training.recipe import SpotRecipe

    return frozenset(f.name for f in fields(SpotRecipe))


def _names(v) -> tuple[str, ...] | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = [g.strip() for g in v.split(",") if g.strip()]
    return tuple(str(g) for g in v)


@dataclass(frozen=True)
class TrainJob(_Request):
    """One training run (``deepspot train``, ``ds.train``).

    ``samples``: an AnnData of raw counts (with ``image``), loaded samples, or a manifest path. ``recipe``: the
    training choices made, by :class:`~deepspot.training.recipe.SpotRecipe`'s names (None values dropped: the
    preset's or the model's default); ``context`` and ``seed`` are always set (defaults
    spot_subspot_neighbors, 2024). ``trainer``: precision, accelerator, log_dir … ``samples_options``: a
    manifest's split and panel options (``val_samples``, ``val_patients``, ``on_missing``, ``min_fraction``).
    """

    samples: Any
    image: Path | None = None
    out: Path | None = None
    model: str = "deepspot"
    encoder: str = "efficientnet-lite0"
    encoder_weights: Path | None = None
    mpp: float | None = None
    geometry: Any = None  # SpotGeometry | CellGeometry | None
    grid: Any = None  # GridSpec of deepspot2cell's pseudo-spots
    cells: bool = False
    genes: tuple[str, ...] | None = None
    n_top_genes: int | None = None
    add_genes: tuple[str, ...] | None = None
    preset: str | None = None
    recipe: dict = field(default_factory=dict)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    aggregate: str = "sum"
    init_from: Path | None = None
    freeze: str = "none"
    features_h5: Path | None = None
    samples_options: dict = field(default_factory=dict)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - normalising a frozen instance
        for k in ("image", "out", "init_from", "features_h5"):
            set_(k, None if getattr(self, k) is None else Path(getattr(self, k)))
        set_("genes", _names(self.genes))
        set_("add_genes", _names(self.add_genes))
        if isinstance(self.trainer, dict):
            set_("trainer", TrainerSettings(**self.trainer))
        recipe = {**_DEFAULT_RECIPE, **{k: v for k, v in dict(self.recipe).items() if v is not None}}
        set_("recipe", recipe)
        set_("samples_options", {k: v for k, v in dict(self.samples_options).items() if v is not None})
        unknown = sorted(set(recipe) - _recipe_names())
        if unknown:
            raise TypeError(f"unexpected training option(s): {', '.join(unknown)}")
        unknown = sorted(set(self.samples_options) - set(SAMPLES_OPTIONS))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        if self.model not in MODEL_KINDS:
            raise ValueError(f"unknown model {self.model!r}; choose deepspot, {' or '.join(CELL_MODELS)}")
        check_gene_list(self.genes)
        check_gene_list(self.add_genes, "--add-genes")
        for k in ("image", "init_from", "features_h5"):
            p = getattr(self, k)
            if p is not None and not p.exists():
                raise FileNotFoundError(f"{p}: file not found")
        if self.model == "deepspot":
            self.spot_recipe  # noqa: B018 - the preset with these choices: names and bounds checked now

    @property
    def spot_recipe(self):
        """The :class:`~deepspot.training.recipe.SpotRecipe` of a spot model: the preset with ``recipe``."""
        from deepspot.training.recipe import spot_preset

        return spot_preset(self.preset, **self.recipe)

    @property
    def one_sample_recipe(self) -> dict:
        """The recipe choices a one-sample run passes on (each model's defaults for the rest)."""
        return {k: v for k, v in self.recipe.items() if k in ONE_SAMPLE_RECIPE}

    @property
    def samples_only(self) -> dict:
        """The options given that only training on several samples takes (refused for one sample)."""
        extra = {k: v for k, v in self.recipe.items() if k not in ONE_SAMPLE_RECIPE}
        trainer = {k: v for k, v in self.trainer.as_dict().items()
                   if k != "log_dir" and v != getattr(TrainerSettings(), k)}
        return {**extra, **trainer, **self.samples_options}

    _TRAINER = frozenset(f.name for f in fields(TrainerSettings))

    @classmethod
    def of(cls, samples, **options) -> "TrainJob":
        """From ``ds.train``'s keyword options, each sorted into its place: a field of the request, a recipe
        name (:class:`~deepspot.training.recipe.SpotRecipe`'s), a trainer setting or a manifest option; an
        unknown name is a TypeError, as for a function."""
        own = {f.name for f in fields(cls)} - {"recipe", "trainer", "samples_options", "samples"}
        recipe_names = _recipe_names()
        mine = {k: options.pop(k) for k in list(options) if k in own}
        recipe = {k: options.pop(k) for k in list(options) if k in recipe_names}
        trainer = {k: options.pop(k) for k in list(options) if k in cls._TRAINER}
        if trainer.get("precision") is not None:  # the trainer's short names (32, bf16 …) as given
            trainer["precision"] = str(trainer["precision"])
        samples_opts = {k: options.pop(k) for k in list(options) if k in SAMPLES_OPTIONS}
        if options:
            raise TypeError(f"train() got unexpected keyword argument(s): {', '.join(sorted(options))}")
        return cls(samples, recipe=recipe, trainer=TrainerSettings(**{k: v for k, v in trainer.items()
                                                                       if v is not None}),
                   samples_options=samples_opts, **mine)
