"""Train one DeepSpot over many samples (a manifest): features per sample, one stacked bag table,
a panel and a geometry decided from the training samples, validation blocks inside every sample.

Neighbours stay within their sample; features are encoded once per sample and cached.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np
from scipy.spatial import cKDTree

from deepspot.config import TARGETS, EncoderRef, GridSpec, ModelConfig, SpotGeometry, invert_scaler
from deepspot.features.store import Features
from deepspot.geometry.neighbors import array_neighbors
from deepspot.io.spatial import SpatialDataError
from deepspot.models.bags import Bags, predict_bags
from deepspot.training.manifest import Sample, features_files
from deepspot.training.recipe import SpotRecipe, block_validation, fit_spot_model
from deepspot.training.spots import SpotTrainResult
from deepspot.training.targets import log_normalize, select_panel

log = logging.getLogger(__name__)

GEOMETRY_TOLERANCE = 0.1  # relative disagreement in spot size or pitch that refuses a training set


def sample_features(samples: Sequence[Sample], encoder, n_sub: int, batch_size: int = 16, view: int = 0,
                    stain_sigma: float = 0.0, view_seed: int = 0, **run) -> dict[str, Features]:
    """Spot + sub-spot features of every sample, encoded once (cached per sample under ``cache_dir``);
    ``view`` / ``stain_sigma``: of that augmented view of the crops (:mod:`deepspot.features.views`).
    ``run``: the settings of this call (``cache_dir``, ``num_workers`` (default here 0), ``progress``,
    ``device``), else :data:`deepspot.settings`."""
    from deepspot.features.extract import extract_features

    feats = {}
    for s in samples:
        feats[s.sample_id] = extract_features(s.image, s.adata.obsm["spatial"], s.spot_px, encoder, n_sub=n_sub,
                                              mpp=s.mpp, batch_size=batch_size, view=view,
                                              stain_sigma=stain_sigma, view_seed=view_seed, **run)
    return feats


def file_features(samples: Sequence[Sample], encoder, n_sub: int = 0) -> dict[str, Features]:
    """Spot features of every sample from the ``features_h5`` file its manifest row names (no encoding):
    patches matched to the sample's spots by position, of the sample's spot crop, of ``encoder``'s width (and
    name, where a file records it). A file that does not fit is refused naming the manifest row and file."""
    from deepspot.features.external import ExternalFeatureError, file_spot_features

    files = features_files(list(samples))
    if files is None:
        raise SpatialDataError("no sample has a features_h5 file")
    feats = {}
    for s, path in zip(samples, files):
        try:
            feats[s.sample_id] = file_spot_features(path, s.adata.obsm["spatial"], s.spot_px, encoder.name,
                                                    encoder.dim, n_sub=n_sub, mpp=s.mpp)
        except (ExternalFeatureError, FileNotFoundError) as e:
            raise ExternalFeatureError(f"manifest row {s.sample_id}: {e}") from None
        log.info("%s: %d spot features from %s", s.sample_id, len(feats[s.sample_id]), path.name)
    return feats


def stack_bags(samples: Sequence[Sample], feats: dict[str, Features], radius: int) -> tuple[Bags, np.ndarray]:
    """One Bags over all samples (neighbours stay within their sample) and the sample number of each row."""
    idxs, masks, owner, off = [], [], [], 0
    for i, s in enumerate(samples):
        n = s.adata.n_obs
        f = feats[s.sample_id]
        if len(f) != n:
            raise ValueError(f"{s.sample_id}: {len(f)} feature rows for {n} spots")
        ix, m = array_neighbors(s.adata.obs["array_row"].to_numpy(), s.adata.obs["array_col"].to_numpy(), radius)
        idxs.append(ix + off)
        masks.append(m)
        owner.append(np.full(n, i))
        off += n
    k = max((ix.shape[1] for ix in idxs), default=0)
    pad = lambda a, v: np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=v)  # noqa: E731
    spot = np.concatenate([feats[s.sample_id].spot for s in samples])
    subs = [feats[s.sample_id].subspot for s in samples]
    sub = None if any(x is None for x in subs) else np.concatenate(subs)
    bags = Bags.from_numpy(spot, sub, np.concatenate([pad(ix, 0) for ix in idxs]),
                           np.concatenate([pad(m, False) for m in masks]))
    return bags, np.concatenate(owner)


def array_pitch_px(array_row, array_col, xy, layout: str) -> float | None:
    """Centre-to-centre spot distance in px from a least-squares fit of the positions on the array
    coordinates (one step vector per array axis; rotation-proof), or None when the spots do not span both
    axes. Square arrays: the mean length of the two step vectors. Hex (Visium's convention, ``array_col``
    steps 2 along a row): a column step is half a pitch, a row step √3/2 of one.

    Unlike the median nearest-neighbour distance, this is not pulled down by jitter in the positions (the
    nearest of four noisy neighbours is nearer than the pitch: on HER2ST 272 px against 291 px per 200 µm
    array step, which made the prediction grid 7 % denser than the array the model was trained on)."""
    A = np.c_[np.asarray(array_row, np.float64), np.asarray(array_col, np.float64), np.ones(len(xy))]
    if len(xy) < 3 or np.linalg.matrix_rank(A) < 3:
        return None
    coef, *_ = np.linalg.lstsq(A, np.asarray(xy, np.float64), rcond=None)
    r, c = np.linalg.norm(coef[0]), np.linalg.norm(coef[1])
    pitch = (r + c) / 2.0 if layout == "square" else (2.0 * c + 2.0 * r / np.sqrt(3.0)) / 2.0
    return float(pitch) if pitch > 0 else None


def sample_pitch_um(sample: Sample) -> float:
    """Centre-to-centre spot distance of a sample in µm: :func:`array_pitch_px` (the fit of positions on
    array coordinates) times its mpp; the median nearest-neighbour distance where the spots have no array
    coordinates or do not span both array axes."""
    xy = np.asarray(sample.adata.obsm["spatial"], dtype=np.float64)
    if len(xy) < 2 or not sample.mpp:
        raise SpatialDataError(f"{sample.sample_id}: cannot measure the spot pitch (needs >= 2 spots and an mpp)")
    obs = sample.adata.obs
    px = None
    if {"array_row", "array_col"} <= set(obs.columns):
        px = array_pitch_px(obs["array_row"], obs["array_col"], xy, array_layout(sample))
    if px is None:
        d, _ = cKDTree(xy).query(xy, k=2)
        px = float(np.median(d[:, 1]))
    return float(px * sample.mpp)


def array_layout(sample: Sample) -> str:
    """'hex' when every spot's array_row + array_col has one parity (Visium's offset rows), else 'square'
    (legacy ST arrays, binned data)."""
    obs = sample.adata.obs
    parity = (obs["array_row"].to_numpy().astype(np.int64) + obs["array_col"].to_numpy().astype(np.int64)) % 2
    return "hex" if len(np.unique(parity)) == 1 and len(parity) > 1 else "square"


def samples_geometry(samples: Sequence[Sample], n_sub: int = 3, neighbor_radius: int = 1) -> SpotGeometry:
    """The spot geometry the samples share, from the data: spot diameter (reader / manifest), pitch
    (measured), layout (:func:`array_layout`: from the array coordinates). Samples that disagree by more than
    :data:`GEOMETRY_TOLERANCE` are refused with a message naming both."""
    rows = []
    for s in samples:
        layout = array_layout(s)
        if s.spot_diameter_um is None:
            raise SpatialDataError(f"{s.sample_id}: spot diameter unknown; set spot_diameter_um in the manifest")
        rows.append((s.sample_id, float(s.spot_diameter_um), sample_pitch_um(s), layout))
    ref = rows[0]
    for r in rows[1:]:
        for j, what in ((1, "spot diameter"), (2, "spot pitch")):
            if abs(r[j] - ref[j]) > GEOMETRY_TOLERANCE * ref[j]:
                raise SpatialDataError(f"samples disagree on the {what}: {ref[0]} {ref[j]:.1f} µm vs {r[0]} "
                                       f"{r[j]:.1f} µm; train them separately")
        if r[3] != ref[3]:
            raise SpatialDataError(f"samples disagree on the array layout: {ref[0]} {ref[3]} vs {r[0]} {r[3]}")
    diam = float(np.median([r[1] for r in rows]))
    pitch = float(np.median([r[2] for r in rows]))
    return SpotGeometry(GridSpec(diam, round(pitch, 2), ref[3], "um"), n_sub=n_sub, neighbor_radius=neighbor_radius)


def recorded_geometry(adata, mpp: float | None = None, n_sub: int = 3, neighbor_radius: int = 1,
                      feature_mode: str = "standard") -> SpotGeometry | None:
    """The spot geometry of one AnnData as the ``--manifest`` form decides it (:func:`samples_geometry`): the
    spot diameter its reader recorded (``uns['source']['spot_diameter_um']``, e.g. 100 µm for legacy ST), the
    pitch and layout measured from its array coordinates and positions with ``mpp`` (else the mpp the reader
    recorded). None where no spot diameter or mpp is known, or the data has no array coordinates."""
    from dataclasses import replace
    from pathlib import Path

    from deepspot.training.manifest import SampleSpec

    src = adata.uns.get("source", {}) or {}
    diam = src.get("spot_diameter_um")
    mpp = mpp if mpp is not None else src.get("mpp")
    if diam is None or not mpp or not {"array_row", "array_col"} <= set(adata.obs.columns):
        return None
    where = Path(str(src.get("path", "")))
    spec = SampleSpec(str(src.get("sample", where.stem or "sample")), "", where, where, str(src.get("format", "h5ad")))
    geometry = samples_geometry([Sample(spec, adata, float(mpp), float(diam))], n_sub, neighbor_radius)
    return replace(geometry, feature_mode=feature_mode)


def train_samples(samples: Sequence[Sample], encoder, recipe: SpotRecipe | None = None,
                  genes: list[str] | None = None, n_top_genes: int | None = 250, on_missing: str = "error",
                  min_fraction: float = 0.1, n_sub: int = 3, neighbor_radius: int = 1,
                  features: dict[str, Features] | None = None, log_dir=None,
                  val_samples: Sequence[str] | None = None, val_patients: Sequence[str] | None = None,
                  precision: str = "32", accelerator: str = "cpu", add_genes: Sequence[str] | None = None,
                  init=None,
                  **recipe_options) -> SpotTrainResult:
    """One DeepSpot over all ``samples`` (every spot trains except each sample's validation block: the
    top ``recipe.val_fraction`` of its array rows). Panel: ``genes`` or the top-``n_top_genes`` HVGs across
    the samples (``batch_key`` = sample). ``val_samples`` / ``val_patients``: ids of samples, or of
    patients whose samples, are held out whole for early stopping instead (they do not train). ``accelerator``: cpu | cuda | auto; ``precision``: 32 | bf16 | fp16.
    The feature cache and the progress bars are :data:`deepspot.settings` (``cache_dir``, ``progress``).
    Returns the result with ``split = (train, val, empty)`` rows of
    the stacked spots, in sample order."""
    recipe = (recipe or SpotRecipe()).replace(**recipe_options)
    if init is not None:  # training/warmstart.py: start from a checkpoint, whose architecture wins
        recipe = init.recipe(recipe)
    samples = list(samples)
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicated sample ids {sorted({i for i in ids if ids.count(i) > 1})}")
    geometry = samples_geometry(samples, n_sub, neighbor_radius)
    panel = select_panel({s.sample_id: s.adata for s in samples}, n_top=n_top_genes, genes=genes,
                         on_missing=on_missing, min_fraction=min_fraction, flavor=recipe.hvg_flavor,
                         add=None if add_genes is None else list(add_genes))
    t0 = time.perf_counter()
    from_files = features is None and features_files(samples) is not None
    if from_files:  # every manifest row names its patch-feature file: nothing is encoded
        if "subspot" in recipe.context:
            raise SpatialDataError(f"the manifest's features_h5 files hold one feature per patch, no sub-spot "
                                   f"features, so context {recipe.context!r} cannot train on them; use "
                                   f"--context spot_neighbors (or spot)")
        if recipe.augment_views > 1 or recipe.stain_jitter > 0:
            raise SpatialDataError("augmented views (--augment-views, --stain-jitter) encode the crops again; the "
                                   "manifest's features_h5 files give one view only")
        features = file_features(samples, encoder)
    elif features is None:
        features = sample_features(samples, encoder, n_sub if "subspot" in recipe.context else 0)
    t_features = time.perf_counter() - t0
    bags, owner = stack_bags(samples, features, neighbor_radius)
    y = np.concatenate([log_normalize(s.adata, genes=panel) for s in samples]).astype(np.float32)
    if val_patients:
        unknown = sorted(set(val_patients) - {s.patient_id for s in samples})
        if unknown:
            raise ValueError(f"--val-patients {unknown} are not in the manifest")
        val_samples = [*(val_samples or []), *(s.sample_id for s in samples if s.patient_id in set(val_patients))]
    if val_samples:
        unknown = sorted(set(val_samples) - set(ids))
        if unknown:
            raise ValueError(f"--val-samples {unknown} are not in the manifest (samples: {', '.join(ids)})")
        held = np.isin(np.asarray(ids)[owner], list(val_samples))
        if held.all():
            raise ValueError("every sample is a validation sample; none is left to train on")
        tr, va = np.flatnonzero(~held), np.flatnonzero(held)
        split = f"validation: whole samples {', '.join(val_samples)}"
    else:
        tr, va = block_validation([np.flatnonzero(owner == i) for i in range(len(samples))],
                                  [s.adata.obs["array_row"].to_numpy() for s in samples], recipe.val_fraction)
        split = f"validation: top {recipe.val_fraction:.0%} of the array rows of every sample"
    log.info("training on %d spots of %d samples; early stopping on %d spots (%s)", len(tr), len(samples),
             len(va), split)
    t0 = time.perf_counter()
    fit_bags, fit_y, fit_tr = bags, y, tr
    if recipe.augment_views > 1 or recipe.stain_jitter > 0:
        from deepspot.training.augment import augment, views_of

        n_sub_ = n_sub if "subspot" in recipe.context else 0

        def view_bags(v, sigma):
            f = sample_features(samples, encoder, n_sub_, view=v, stain_sigma=sigma, view_seed=recipe.seed)
            return stack_bags(samples, f, neighbor_radius)[0]

        fit_bags, fit_y, fit_tr = augment(bags, y, tr, views_of(recipe.augment_views, recipe.stain_jitter), view_bags)
        log.info("augmented training: %d rows (%d views, stain jitter %g)", len(fit_tr), recipe.augment_views,
                 recipe.stain_jitter)
    model, scaler, summary = fit_spot_model(recipe, fit_bags, fit_y, fit_tr, va, log_dir=log_dir,
                                            precision=precision, accelerator=accelerator, init=init,
                                            genes=panel)
    reliability = summary.pop("reliability", None)
    t_fit = time.perf_counter() - t0
    pred = invert_scaler(predict_bags(model, bags), scaler)
    mpps = sorted({round(float(s.mpp), 4) for s in samples if s.mpp})
    training = {"recipe": recipe.to_dict(), "samples": ids, "n_train_spots": int(len(tr)),
                "n_val_spots": int(len(va)),
                "split": split, **summary,
                "seconds": {"features": round(t_features, 1), "training": round(t_fit, 1)}}
    config = ModelConfig("deepspot", model.config(), EncoderRef(encoder.name, int(encoder.dim)), list(panel),
                         geometry, scaler, TARGETS, mpps[0] if len(mpps) == 1 else None, training,
                         extra={"reliability": reliability} if reliability else {})
    feats = Features(bags.spot.numpy(), None if bags.subspot is None else bags.subspot.numpy())
    return SpotTrainResult(model, config, feats, y, panel, (tr, va, np.zeros(0, np.int64)), pred, summary)


__all__ = ["file_features", "sample_features", "stack_bags", "samples_geometry", "sample_pitch_um", "array_pitch_px", "recorded_geometry",
           "train_samples"]
