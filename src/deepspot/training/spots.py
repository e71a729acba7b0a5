"""Train DeepSpot on one image with spot-level counts: features -> bags -> targets -> fit -> checkpoint config.

The held-out side of the image is predicted here and scored in :mod:`deepspot.evaluation.holdout`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np

from deepspot.config import TARGETS, EncoderRef, ModelConfig, SpotGeometry, invert_scaler
from deepspot.features.extract import extract_features
from deepspot.features.store import Features
from deepspot.geometry.neighbors import array_neighbors
from deepspot.models.bags import Bags, predict_bags
from deepspot.models.deepsets import DeepSpot
from deepspot.training.recipe import SpotRecipe, block_validation, fit_spot_model
from deepspot.training.targets import log_normalize, select_genes

log = logging.getLogger(__name__)


def spatial_split(xy: np.ndarray, test_fraction: float = 0.3, val_fraction: float = 0.2, seed: int = 2024,
                  axis: int = 0):
    """Hold out one side of the image: spots with coordinate ``axis`` in the top ``test_fraction``
    are test; a seeded random ``val_fraction`` of the rest is validation. Returns (train, val, test) indices."""
    xy = np.asarray(xy)
    cut = np.quantile(xy[:, axis], 1.0 - test_fraction)
    test = np.flatnonzero(xy[:, axis] >= cut)
    rest = np.flatnonzero(xy[:, axis] < cut)
    rng = np.random.default_rng(seed)
    rest = rng.permutation(rest)
    n_val = max(1, int(round(val_fraction * len(rest))))
    return np.sort(rest[n_val:]), np.sort(rest[:n_val]), test


@dataclass
class SpotTrainResult:
    """A trained DeepSpot with what it was trained on: features and targets (N,G) of every spot, the
    (train, val, test) split, the model's predictions (N,G) of every spot, and ``scores`` once
    :func:`deepspot.evaluation.holdout.score_holdout` has scored the test spots."""

    model: DeepSpot
    config: ModelConfig
    features: Features
    targets: np.ndarray
    genes: list[str]
    split: tuple[np.ndarray, np.ndarray, np.ndarray]
    pred: np.ndarray
    fit_summary: dict
    scores: dict = field(default_factory=dict)


def bags_for(spots: ad.AnnData, features: Features, radius: int) -> Bags:
    idx, mask = array_neighbors(spots.obs["array_row"].to_numpy(), spots.obs["array_col"].to_numpy(), radius)
    return Bags.from_numpy(features.spot, features.subspot, idx, mask)


def train_spot_model(image, spots: ad.AnnData, encoder, geometry: SpotGeometry, mpp: float | None = None,
                     recipe: SpotRecipe | None = None, genes: list[str] | None = None,
                     n_top_genes: int | None = None, test_fraction: float = 0.3, batch_size_encoder: int = 16,
                     log_dir=None, add_genes: list[str] | None = None, init=None,
                     features: Features | None = None, **recipe_options) -> SpotTrainResult:
    """Train on the spots of one image with a spatial hold-out (the right-most ``test_fraction`` of the
    spots are neither trained nor validated on; early stopping watches the top 20 % of the array rows of
    the rest); predicts every spot. ``recipe`` (default :class:`SpotRecipe`) with ``recipe_options``
    (e.g. ``context=``, ``max_epochs=``; None values ignored) decides the training.

    spots: AnnData of raw counts with obs array_row/array_col and obsm['spatial'] (x, y) level-0 px.
    The feature cache, the reader workers (default here 0) and the progress bars are :data:`deepspot.settings`.
    """
    recipe = (recipe or SpotRecipe()).replace(**recipe_options)
    if init is not None:  # training/warmstart.py: start from a checkpoint, whose architecture wins
        recipe = init.recipe(recipe)
    context = recipe.context
    spec = geometry.grid.in_pixels(mpp)
    feats = features if features is not None else extract_features(  # features given: made elsewhere
        image, spots.obsm["spatial"], spec.spot_diameter, encoder,
        n_sub=geometry.n_sub if "subspot" in context else 0, mpp=mpp, batch_size=batch_size_encoder,
        mode=geometry.feature_mode, subspot_rule=geometry.subspot_rule)
    panel = select_genes(spots, n_top=n_top_genes, genes=genes, flavor=recipe.hvg_flavor, add=add_genes)
    y = log_normalize(spots, genes=panel)
    bags = bags_for(spots, feats, geometry.neighbor_radius)
    _, _, test = spatial_split(spots.obsm["spatial"], test_fraction=test_fraction, seed=recipe.seed)
    rest = np.setdiff1d(np.arange(spots.n_obs), test)
    train, val = block_validation([rest], [spots.obs["array_row"].to_numpy()[rest]], recipe.val_fraction)
    if len(val) == 0 or len(train) == 0:
        raise ValueError(f"{image}: {spots.n_obs} spots are too few for a train / validation / test split")
    model, scaler, summary = fit_spot_model(recipe, bags, y, train, val, log_dir=log_dir,
                                            init=init, genes=panel)
    reliability = summary.pop("reliability", None)
    pred = invert_scaler(predict_bags(model, bags), scaler)
    training = {"recipe": recipe.to_dict(),
                "split": "spatial: right-most %.0f%% of spots held out; validation: top %.0f%% of the array "
                         "rows of the rest" % (100 * test_fraction, 100 * recipe.val_fraction),
                **summary}
    config = ModelConfig("deepspot", model.config(), EncoderRef(encoder.name, int(encoder.dim)), list(panel),
                         geometry, scaler, TARGETS, mpp, training,
                         extra={"reliability": reliability} if reliability else {})
    return SpotTrainResult(model, config, feats, y, panel, (train, val, test), pred, summary)
