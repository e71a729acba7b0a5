"""The spot-model training recipe: every choice that decides a trained DeepSpot, in one place.

``train``, ``evaluate`` and the API all train through :func:`fit_spot_model`, so the numbers that
``deepspot evaluate`` reports are those of the models that ``deepspot train`` writes. The defaults were
chosen by leave-one-section-out on the bundled HER2ST sections (docs/evaluation.md has the table and
the effect of each choice in isolation):

- encoder features as they are (``input_proj=None``); ``input_proj=k`` standardises them and projects
  them on their top-k principal axes of the training spots (a fixed layer inside the model): 5× less
  compute in phi, but it scored lower in leave-one-section-out (0.149 vs 0.169 at k = 256);
- targets standardised per gene (``scaler='standard'``; inverted at prediction and clipped to each
  gene's training range), so every gene weighs the same in the loss, as in the per-gene Pearson that
  scores the model;
- mean pooling of sub-spots and of neighbours: its scale does not depend on the bag size (neighbours
  at tissue edges); under this recipe the published sum / max scored the same within the seed spread;
- a smaller network for hundreds to thousands of spots (hidden 256, 5 heads, dropout 0.5), AdamW
  lr 1e-3, weight decay 1e-2;
- loss MSE + (1 − mean per-gene Pearson across the batch) (``mse_pearson``): the Pearson term asks for
  the spot-to-spot pattern that the score measures, the MSE keeps the scale;
- early stopping on the mean per-gene Pearson of a validation block cut from EVERY training sample
  (the top ``val_fraction`` of its array rows: spatially apart from the spots it trains on), so every
  training sample trains and the stopping signal is the score we report.

Presets (:data:`PRESETS`, ``--preset``): ``deepspot`` (the above) and ``original``, the original
DeepSpot's training as published: hidden 512, 10 heads, dropout 0.3, sum / max pooling, MSE, AdamW lr
1e-4 and weight decay 1e-6, batch 1024, 10–15 epochs with early stopping on the training loss (patience 3;
every spot trains, the validation block included), a standard scaler on the targets, Leiden-cluster
oversampling of the training spots, and a panel of the top 5,000 HVGs by scanpy's ``seurat_v3`` on counts
(:data:`PRESET_PANELS`). The preset's name is recorded with the recipe in the checkpoint.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # numpy, torch and Lightning are imported on use: the CLI reads the defaults without them
    import numpy as np

    from deepspot.config import Scaler
    from deepspot.models.bags import Bags
    from deepspot.models.deepsets import DeepSpot

HVG_FLAVORS = ("seurat", "seurat_v3")

@dataclass(frozen=True)
class SpotRecipe:
    """Hyper-parameters of a DeepSpot training run (recorded in the checkpoint as ``training.recipe``)."""

    context: str = "spot_subspot_neighbors"
    hidden: int = 256
    n_ensemble: int = 5
    dropout: float = 0.5
    subspot_pool: str = "mean"
    neighbor_pool: str = "mean"
    input_proj: int | None = None
    scaler: str | None = "standard"
    loss: str = "mse_pearson"
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    max_epochs: int = 40
    patience: int = 8
    monitor: str = "val_pearson"
    val_fraction: float = 0.2
    seed: int = 2024
    min_epochs: int = 1
    oversample: bool = False  # Leiden-cluster oversampling of the training spots (training/oversampling.py)
    hvg_flavor: str = "seurat"  # how a top-n HVG panel is ranked: seurat (log data) or seurat_v3 (counts)
    preset: str = "deepspot"  # the preset these settings started from (recorded in the checkpoint)
    augment_views: int = 1  # train on the first k of the 8 dihedral views of every crop (1: the crops as read)
    stain_jitter: float = 0.0  # HED stain jitter of the augmented crops (±sigma per channel; 0.05 in the literature)

    def __post_init__(self):
        from deepspot.config import SCALERS
        from deepspot.models.deepsets import CONTEXTS, POOLS
        from deepspot.models.losses import LOSSES
        from deepspot.training.fit import MONITORS

        checks = [(self.context in CONTEXTS, f"context {self.context!r}: choose one of {', '.join(CONTEXTS)}"),
                  (self.subspot_pool in POOLS, f"subspot_pool {self.subspot_pool!r}: choose {', '.join(POOLS)}"),
                  (self.neighbor_pool in POOLS, f"neighbor_pool {self.neighbor_pool!r}: choose {', '.join(POOLS)}"),
                  (self.loss in LOSSES, f"loss {self.loss!r}: choose one of {', '.join(LOSSES)}"),
                  (self.monitor in MONITORS, f"monitor {self.monitor!r}: choose {' or '.join(MONITORS)}"),
                  (self.scaler in (None, "none", *SCALERS), f"scaler {self.scaler!r}: choose "
                                                            f"{', '.join(SCALERS)} or none"),
                  (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
                  (self.input_proj is None or self.input_proj >= 1, "input_proj must be >= 1 or None"),
                  (self.hidden >= 1 and self.n_ensemble >= 1 and self.batch_size >= 1 and self.max_epochs >= 1,
                   "hidden, n_ensemble, batch_size and max_epochs must be >= 1"),
                  (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
                  (1 <= self.min_epochs <= self.max_epochs, f"min_epochs must be in [1, max_epochs], got "
                                                           f"{self.min_epochs}"),
                  (self.hvg_flavor in HVG_FLAVORS, f"hvg_flavor {self.hvg_flavor!r}: choose "
                                                   f"{' or '.join(HVG_FLAVORS)}"),
                  (self.preset in PRESET_PANELS, f"preset {self.preset!r}: choose {', '.join(PRESET_PANELS)}"),
                  (1 <= self.augment_views <= 8, f"augment_views must be in 1..8, got {self.augment_views}"),
                  (0 <= self.stain_jitter < 0.5, f"stain_jitter must be in [0, 0.5), got {self.stain_jitter}")]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("training recipe: " + "; ".join(bad))

    def replace(self, **changes) -> "SpotRecipe":
        """A copy with ``changes``; keys whose value is None are ignored (CLI options left unset)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {', '.join(sorted(known))}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


PRESET_PANELS = {  # gene-panel defaults of each preset, used where the caller does not choose
    "deepspot": {},
    "original": {"n_top_genes": 5000, "min_fraction": 0.0},
}

_PRESET_SETTINGS = {
    "deepspot": {},
    "original": dict(hidden=512, n_ensemble=10, dropout=0.3, subspot_pool="sum", neighbor_pool="max",
                     scaler="standard", loss="mse", lr=1e-4, weight_decay=1e-6, batch_size=1024,
                     min_epochs=10, max_epochs=15, patience=3, monitor="train_loss", oversample=True,
                     hvg_flavor="seurat_v3", preset="original"),
}
_PRESETS: dict[str, SpotRecipe] = {}


def __getattr__(name: str):
    """``PRESETS`` (name -> SpotRecipe) is built on first use: building a recipe checks its names against
    the model code, which imports torch, and importing this module must not (the CLI's --help reads it)."""
    if name == "PRESETS":
        if not _PRESETS:
            _PRESETS.update({k: SpotRecipe(**v) for k, v in _PRESET_SETTINGS.items()})
        return _PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def spot_preset(name: str | None = None, **changes) -> SpotRecipe:
    """The recipe of preset ``name`` ('deepspot', the default, or 'original') with ``changes`` (None values
    ignored, as :meth:`SpotRecipe.replace`)."""
    name = name or "deepspot"
    presets = __getattr__("PRESETS")
    if name not in presets:
        raise ValueError(f"unknown training preset {name!r}; choose {' or '.join(presets)}")
    return presets[name].replace(**changes)


def preset_panel(name: str | None, n_top_genes: int | None = None, min_fraction: float | None = None,
                 fallback_n_top: int | None = None, fallback_min_fraction: float = 0.1) -> tuple[int | None, float]:
    """(n_top_genes, min_fraction) of a run: the caller's, else the preset's, else the fallbacks."""
    d = PRESET_PANELS.get(name or "deepspot", {})
    n = n_top_genes if n_top_genes is not None else d.get("n_top_genes", fallback_n_top)
    f = min_fraction if min_fraction is not None else d.get("min_fraction", fallback_min_fraction)
    return n, f


def block_validation(rows: Sequence[np.ndarray], array_rows: Sequence[np.ndarray], fraction: float = 0.2,
                     min_spots: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Split each training sample into (train, validation) by space: its validation spots are those in
    the top ``fraction`` of its array rows (a block, not random spots, so neighbours of a training spot
    are rarely validation spots). ``rows[i]``: the sample's row numbers in the stacked data,
    ``array_rows[i]``: their array_row. A sample with fewer than ``min_spots`` spots trains only.
    Returns sorted (train, val) row numbers."""
    import numpy as np

    tr, va = [], []
    for r, a in zip(rows, array_rows):
        r, a = np.asarray(r), np.asarray(a, dtype=np.float64)
        if len(r) < min_spots:
            tr.append(r)
            continue
        cut = np.quantile(a, 1.0 - fraction)
        m = a >= cut
        if m.all() or not m.any():  # one array row only: fall back to the upper part of the order
            m = np.zeros(len(r), bool)
            m[np.argsort(a, kind="stable")[-max(1, int(round(fraction * len(r)))):]] = True
        va.append(r[m])
        tr.append(r[~m])
    cat = lambda xs: np.sort(np.concatenate(xs)) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(tr), cat(va)


def build_spot_model(recipe: SpotRecipe, in_dim: int, n_genes: int, train_spot_features: np.ndarray,
                     context: str | None = None) -> DeepSpot:
    """A seeded DeepSpot of the recipe, its input projection fitted on the training spots' features (N, d).
    The projection keeps at most min(input_proj, N - 1, d) axes."""
    import lightning as L

    from deepspot.models.deepsets import DeepSpot

    L.seed_everything(recipe.seed, verbose=False)  # model init is part of the seeded run
    k = recipe.input_proj
    if k is not None:
        k = int(min(k, len(train_spot_features) - 1, in_dim))
        if k < 1:
            raise ValueError(f"{len(train_spot_features)} training spots are too few to train on")
    model = DeepSpot(in_dim, n_genes, hidden=recipe.hidden, n_ensemble=recipe.n_ensemble, dropout=recipe.dropout,
                     context=context or recipe.context, subspot_pool=recipe.subspot_pool,
                     neighbor_pool=recipe.neighbor_pool, input_proj=k)
    return model.fit_input_projection(train_spot_features)


def fit_spot_model(recipe: SpotRecipe, bags: Bags, targets: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                   context: str | None = None, init=None, genes=None, **fit_options) -> tuple[DeepSpot, Scaler | None, dict]:
    """Train a DeepSpot by the recipe: the target scaler and the input projection fitted on ``train_idx``
    only, early stopping on ``val_idx``. ``fit_options`` go to :func:`deepspot.training.fit.fit`
    (precision, accelerator, devices, strategy, log_dir, loggers, progress).

    Early stopping on the training loss (``monitor='train_loss'``, the original's) trains on the
    validation spots too (they are only logged). ``recipe.oversample``: the training spots are
    resampled so that every Leiden cluster of their targets is as large as the largest.
    ``init``: a :class:`deepspot.training.warmstart.WarmStart` to start from (``genes``: the panel, in
    target column order); its architecture replaces the recipe's.
    Returns (model in eval mode with its best weights, scaler or None, fit summary)."""
    import numpy as np

    from deepspot.config import Scaler
    from deepspot.training.fit import fit

    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    if len(val_idx) == 0:
        raise ValueError("no validation spots for early stopping")
    if recipe.monitor == "train_loss":
        train_idx = np.concatenate([train_idx, val_idx])
    n_clusters = None
    if recipe.oversample:
        from deepspot.training.oversampling import balanced_index

        train_idx, labels = balanced_index(train_idx, np.asarray(targets, np.float32), seed=recipe.seed)
        n_clusters = int(labels.max()) + 1 if len(labels) else 0
    scaler = Scaler.fit(np.asarray(targets)[np.unique(train_idx)], recipe.scaler)
    if init is not None:
        import lightning as L

        scaler = init.scaler(genes, scaler)
        L.seed_everything(recipe.seed, verbose=False)  # the new head's initialisation is part of the seeded run
        model = init.build(genes)
    y = np.asarray(targets, np.float32) if scaler is None else scaler.transform(targets)
    if init is None:
        model = build_spot_model(recipe, int(bags.spot.shape[1]), int(y.shape[1]),
                                 bags.spot[np.unique(train_idx)].numpy(), context)
    summary = fit(model, bags, y, train_idx, val_idx, loss=recipe.loss, lr=recipe.lr,
                  weight_decay=recipe.weight_decay, batch_size=recipe.batch_size, max_epochs=recipe.max_epochs,
                  min_epochs=recipe.min_epochs, patience=recipe.patience, seed=recipe.seed, monitor=recipe.monitor,
                  **fit_options)
    summary["n_train_rows"] = int(len(train_idx))
    if init is not None:
        summary["init_from"] = init.provenance(genes)
    if n_clusters is not None:
        summary["leiden_clusters"] = n_clusters
    summary["reliability"] = validation_reliability(recipe, model, scaler, bags, targets, val_idx)
    return model, scaler, summary


def validation_reliability(recipe: SpotRecipe, model, scaler, bags: Bags, targets: np.ndarray,
                           val_idx: np.ndarray) -> dict | None:
    """Per-gene reliability and the conformal calibration of intervals on the validation spots
    (:mod:`deepspot.reliability`), as stored in the checkpoint; None when the validation spots trained
    too (``monitor='train_loss'``: they would not measure anything held out)."""
    if recipe.monitor == "train_loss":
        return None
    from deepspot.reliability import measure_model

    rel = measure_model(model, scaler, bags, targets, val_idx, seed=recipe.seed,
                        source="validation spots held out inside the training samples; they also chose the "
                               "early-stopping epoch")
    return rel.to_dict()


__all__ = ["PRESETS", "PRESET_PANELS", "SpotRecipe", "block_validation", "build_spot_model", "fit_spot_model",
           "preset_panel", "spot_preset", "validation_reliability"]
