"""The training entry point of the public API: :func:`train` (one sample or a manifest of several) and the
helpers that read its samples and wrap the result in a :class:`~deepspot.api.Model`."""
from __future__ import annotations

from pathlib import Path

import anndata as ad

from deepspot.config import CellGeometry, CheckpointError, GridSpec, SpotGeometry
from deepspot.features.encoders import load_encoder


def _read_samples(samples, cells: bool = False):
    """A manifest path read into loaded Samples (every row read and checked before any compute, one progress
    bar over the rows when ``ds.settings.progress``); anything else as given. ``cells``: the rows are cells
    (pooled later, not here)."""
    if isinstance(samples, (str, Path)):
        from rich.progress import track

        from deepspot.config.runtime import settings
        from deepspot.training.manifest import load_sample, read_manifest

        specs = read_manifest(samples)
        rows = track(specs, description="reading samples", disable=not settings.progress or len(specs) < 2)
        return [load_sample(s, cells=cells) for s in rows]
    return samples


def _feature_cache(cache_dir, out):
    """Where training caches features: ``cache_dir``, else a hidden folder beside ``out`` (None: no cache)."""
    if cache_dir is not None or out is None:
        return cache_dir
    out = Path(out).resolve()
    return out.parent / f".{out.name}-features"


def _trained(res, enc, out) -> "Model":
    """The Model of a training result (``result`` kept on it), saved to ``out`` when given."""
    from deepspot.api import Model  # (the package imports this module: Model is looked up when called)

    trained = Model(res.model, res.config, encoder=enc, source=str(out) if out is not None else "model")
    trained.result = res
    if out is not None:
        trained.save(out)
        from deepspot.training.curves import write_curves  # training_curves.png beside the weights

        write_curves(out, res.config.training or {}, len(res.config.genes))
    return trained


def _many_samples(samples):
    """The loaded samples when ``samples`` (already read by :func:`_read_samples`) holds several, else None.
    Cell data among them (Xenium, or rows read as cells) is pooled into pseudo-spots, logged."""
    from deepspot.training.manifest import Sample, as_spots

    if isinstance(samples, ad.AnnData):
        return None
    samples = list(samples)
    if len(samples) > 1 and all(isinstance(s, Sample) for s in samples):
        return [as_spots(s) for s in samples]
    return None


def _train_many(job, samples, manifest=None, init=None) -> "Model":
    """One DeepSpot over several loaded ``samples`` by ``job`` (a :class:`TrainJob`)."""
    from deepspot.config.requests import TrainerSettings
    from deepspot.config.runtime import settings
    from deepspot.training.multi_sample import train_samples
    from deepspot.training.recipe import preset_panel

    if job.model != "deepspot":
        raise ValueError(f"training on several samples is implemented for deepspot, not {job.model}")
    untaken = sorted(k for k in ("devices", "strategy", "loggers")
                     if getattr(job.trainer, k) != getattr(TrainerSettings(), k))
    if untaken:
        raise ValueError(f"options {untaken}: training on several samples takes precision, accelerator and log_dir")
    options = dict(job.samples_options)
    n_top_genes, options["min_fraction"] = preset_panel(job.preset, job.n_top_genes, options.get("min_fraction"),
                                                        fallback_n_top=250)
    if init is not None:
        options["init"] = init
    if job.add_genes:
        options["add_genes"] = list(job.add_genes)
    from deepspot.features.external import patch_feature_dim
    from deepspot.training.manifest import features_files

    files = features_files(samples)  # the manifest's features_h5 column: the encoder only names the features
    enc = (_named_encoder(job.encoder, patch_feature_dim(files[0]), files[0]) if files
           else load_encoder(job.encoder, weights=job.encoder_weights))
    tr = job.trainer
    with settings.override(cache_dir=_feature_cache(settings.cache_dir, job.out)):
        res = train_samples(samples, enc, recipe=job.spot_recipe, genes=_listed(job.genes), n_top_genes=n_top_genes,
                            log_dir=tr.log_dir, precision=tr.precision, accelerator=tr.accelerator, **options)
    if manifest is not None:  # `deepspot score --baseline ridge` refits the baseline on these samples
        res.config.training["manifest"] = manifest
    return _trained(res, enc, job.out)


def _listed(names):
    return None if names is None else list(names)


class _NamedEncoder:
    """The encoder that made features read from a file: a name and a dim (it never runs here)."""

    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, int(dim)


def _named_encoder(name: str, dim: int, source) -> "_NamedEncoder":
    """The encoder ``name`` of features made elsewhere; a registered encoder of another dim is refused."""
    from deepspot.features.encoders import EncoderError, get_spec

    try:
        known = get_spec(name).dim
    except EncoderError:
        known = None
    if known is not None and int(known) != int(dim):
        raise CheckpointError(f"{source}: {int(dim)}-d features, but encoder '{name}' makes {known}-d ones; pass "
                              f"--encoder with the name of the encoder that made the file")
    return _NamedEncoder(name, dim)


def _one_sample(samples, image):
    """(counts AnnData, image path, mpp or None) of the one sample to train on."""
    from deepspot.training.manifest import Sample

    if isinstance(samples, ad.AnnData):
        if image is None:
            raise ValueError("train(adata, image=...): the H&E image the positions refer to is needed")
        src = samples.uns.get("source", {}) if isinstance(samples.uns.get("source"), dict) else {}
        # Visium HD bins carry the image's µm/px from Space Ranger's scalefactors (io/visium_hd.py)
        return samples, Path(image), (src.get("mpp") if src.get("format") == "visium_hd" else None)
    samples = list(samples)
    if len(samples) != 1 or not isinstance(samples[0], Sample):
        raise ValueError(f"training takes one sample for now, got {len(samples)}; train on one image "
                         f"(or use `deepspot evaluate` for patient-level cross-validation over several)")
    s = samples[0]
    return s.adata, s.image, s.mpp


def train(samples, image=None, **options) -> Model:
    """Train a model on one sample and score it on a held-out side of the image; returns the :class:`Model`
    (held-out scores in ``Model.scores``; written to ``out`` when given).

    ``samples``: an AnnData of raw counts with obsm['spatial'] (x, y) px of ``image``, a list holding one
    loaded :class:`~deepspot.training.manifest.Sample`, or a manifest path with one row. ``model``:
    'deepspot' (spots; ``cells=True`` pools cells into pseudo-spots on ``geometry.grid``), 'deepcell'
    (cells with their counts) or 'deepspot2cell' (the published architecture; cells pooled into
    pseudo-spots on ``grid``, trained on the spot counts only; 'deepspot2cell-pooled': a DeepCell per cell
    pooled into the spot by ``aggregate``). ``geometry``: :class:`SpotGeometry` (spots, default Visium
    55/100 µm) or :class:`CellGeometry` (cells). ``mpp`` overrides the image's µm/px. ``preset`` (spot models):
    'deepspot' (ours, the default) or 'original' (the original DeepSpot's training: batch 1024, 10–15
    epochs, early stop on the training loss, Leiden oversampling, top 5,000 ``seurat_v3`` HVGs…; see
    :mod:`deepspot.training.recipe`); for 'deepspot2cell', 'original' is the original DeepSpot2Cell's training
    (batch 4, 8 heads, ≤ 50 epochs, early stop on validation loss with patience 5 / min_delta 1e-3; see
    :data:`deepspot.training.fit_cells.SPOT2CELL_PRESETS`); options given here override the preset's.

    Spot models read what the data records, as with a manifest: without ``geometry``, an AnnData whose reader
    recorded a spot diameter (``uns['source']``, e.g. ``ds.read.her2st``: 100 µm ST spots) trains on that
    diameter and the pitch and layout of its array (else Visium's 55/100 µm hex); ``mpp`` defaults to the
    one it recorded. The panel is ``genes``, else the top ``n_top_genes`` HVGs (default 250, as for
    several samples), plus ``add_genes`` (markers the HVGs may miss, e.g. ERBB2).

    ``init_from`` (spot models): a checkpoint folder to start from (:mod:`deepspot.training.warmstart`):
    same genes continue the whole network, other genes keep phi under a new gene head; without ``genes``
    / ``n_top_genes`` the panel is the checkpoint's. ``freeze``: 'none' or 'phi' (train the head only).
    The encoder must be the checkpoint's.

    ``features_h5`` (one sample, spot models): the spot features from a TRIDENT / HEST patch-feature file
    (:mod:`deepspot.features.external`) instead of running ``encoder``, which then only names the encoder
    that made them (recorded in the checkpoint; its dim is the file's). No sub-spots: a context without them.

    ``samples`` may also be a :class:`~deepspot.training.request.TrainJob` (what ``deepspot train`` passes); the
    keyword options above are the same request's fields, mapped onto it (``loss``, ``max_epochs``, ``patience``,
    ``seed``, ``hidden``, ``n_ensemble``, ``context``, and for a manifest any other
    :class:`~deepspot.training.recipe.SpotRecipe` name: its recipe; ``log_dir``, ``precision``,
    ``accelerator``: its trainer settings; ``val_samples``, ``val_patients``, ``on_missing``,
    ``min_fraction``: a manifest's split and panel), checked once when it is built.

    ``progress``, ``cache_dir`` (the feature cache; default: ``<out>/features`` when writing ``out``) and
    ``num_workers`` (slide-reading processes; default here 0) are :data:`deepspot.settings`; given here,
    they hold for this call.
    """
    from deepspot.config.runtime import settings
    from deepspot.training.request import TrainJob

    run = {k: options.pop(k) for k in ("progress", "cache_dir", "num_workers") if k in options}
    if isinstance(samples, TrainJob):
        if image is not None or options:
            raise TypeError(f"train(TrainJob): give the options in the request, not as keywords "
                            f"({', '.join(sorted(options) or ['image'])})")
        job = samples
    else:
        job = TrainJob.of(samples, image=image, **options)
    with settings.override(**run):
        return _train(job)


def _train(job) -> Model:
    from deepspot.config.runtime import settings

    cache_dir, progress = settings.cache_dir, settings.progress
    num_workers = 0 if settings.num_workers is None else settings.num_workers  # training reads in this process
    from deepspot.config import resolve_mpp
    from deepspot.evaluation.holdout import score_holdout
    from deepspot.geometry.grid import pool_cells
    from deepspot.io.slides import open_slide
    from deepspot.io.spatial import SpatialDataError, check_inside

    model, out, encoder, preset, geometry, cells = job.model, job.out, job.encoder, job.preset, job.geometry, job.cells
    genes, n_top_genes, features_h5, context = _listed(job.genes), job.n_top_genes, job.features_h5, job.recipe["context"]
    if out is not None:
        from deepspot.models.checkpoint import checkpoint_folder

        checkpoint_folder(out).check()  # refused before any data is read, never emptied
    samples = job.samples
    manifest = str(Path(samples).resolve()) if isinstance(samples, (str, Path)) else None
    samples = _read_samples(samples, cells=cells)
    many = _many_samples(samples)
    if features_h5 is None and many is None:  # a one-row manifest's features_h5 column
        from deepspot.training.manifest import features_files

        features_h5 = next(iter(features_files(samples) or []), None)
    init = None
    if many is None and job.samples_only:
        raise ValueError(f"options {sorted(job.samples_only)} apply to training on several samples (a manifest)")
    if preset not in (None, "deepspot") and model not in ("deepspot", "deepspot2cell"):
        raise ValueError(f"training presets are for spot models (deepspot) and deepspot2cell, not {model}")
    if job.add_genes and model != "deepspot":
        raise ValueError(f"add_genes is for spot models (deepspot), not {model}")
    if job.init_from is not None:
        from deepspot.features.encoders import get_spec
        from deepspot.training.warmstart import read_init

        if model != "deepspot":
            raise ValueError(f"init_from is for spot models (deepspot), not {model}")
        if features_h5 is not None:
            from deepspot.features.external import read_patch_features

            dim = read_patch_features(features_h5).dim
        else:
            dim = get_spec(encoder).dim
        init = read_init(job.init_from, encoder, dim, freeze=job.freeze)
        if genes is None and n_top_genes is None:
            genes = list(init.config.genes)
            job = job.replace(genes=genes)
    if many is not None and features_h5 is not None:
        raise ValueError("features_h5 is one sample's file; train a manifest with the encoder (or one sample at a time)")
    if many is not None:
        return _train_many(job, many, manifest=manifest, init=init)
    data, image, sample_mpp = _one_sample(samples, job.image)
    mpp = job.mpp if job.mpp is not None else sample_mpp
    if mpp is None and model == "deepspot" and not cells:  # the mpp the reader recorded (a manifest uses it too)
        mpp = (data.uns.get("source", {}) or {}).get("mpp")
    if not Path(image).exists():
        raise FileNotFoundError(f"{image}: file not found")
    with open_slide(image, mpp=mpp) as slide:
        w, h = slide.dimensions
        unit = geometry.unit if isinstance(geometry, CellGeometry) else (geometry or SpotGeometry()).grid.unit
        slide_mpp = resolve_mpp(slide, mpp, needs_um=unit == "um")
    check_inside(data.obsm["spatial"], w, h, str(data.uns.get("source", {}).get("path", f"{image}: positions")))
    external = None
    if features_h5 is not None:
        from deepspot.features.external import read_patch_features

        if model != "deepspot":
            raise ValueError(f"features_h5 is for spot models (deepspot), not {model}")
        external = read_patch_features(features_h5)
        enc = _named_encoder(encoder, external.dim, features_h5)
    else:
        enc = load_encoder(encoder, weights=job.encoder_weights)
    cache_dir = _feature_cache(cache_dir, out)
    if model == "deepspot":
        from deepspot.training.spots import train_spot_model

        if geometry is None and not cells:  # what the reader recorded, as --manifest reads it
            from deepspot.training.multi_sample import recorded_geometry

            geometry = recorded_geometry(data, slide_mpp)
        geometry = geometry or SpotGeometry()
        if not isinstance(geometry, SpotGeometry):
            raise ValueError("a deepspot model needs a SpotGeometry")
        if cells:
            data, _ = pool_cells(data, w, h, geometry.grid.in_pixels(slide_mpp))
        elif "array_row" not in data.obs or "array_col" not in data.obs:
            raise SpatialDataError(f"{image}: obs needs array_row/array_col for the neighbour context "
                                   f"(or pool cells into spots: cells=True)")
        from deepspot.training.recipe import preset_panel

        n_top_genes = preset_panel(preset, n_top_genes, fallback_n_top=250)[0]  # as for several samples
        feats = None
        if external is not None:
            from deepspot.features.external import spot_features

            use_sub = "subspot" in (init.context if init is not None else context)
            feats = spot_features(external, data.obsm["spatial"], geometry.grid.in_pixels(slide_mpp).spot_diameter,
                                  n_sub=geometry.n_sub if use_sub else 0, mpp=slide_mpp)
        with settings.override(cache_dir=cache_dir, num_workers=num_workers):  # the recipe: job.spot_recipe
            res = train_spot_model(image, data, enc, geometry, mpp=slide_mpp, recipe=job.spot_recipe, genes=genes,
                                   n_top_genes=n_top_genes, log_dir=job.trainer.log_dir,
                                   add_genes=_listed(job.add_genes), init=init, features=feats)
    else:
        from deepspot.training.fit_cells import train_cell_model, train_spot2cell_from_cells

        geometry = geometry or CellGeometry()
        if not isinstance(geometry, CellGeometry):
            raise ValueError(f"a {model} model needs a CellGeometry")
        # the recipe choices made (the rest: each cell model's own defaults)
        chosen = {k: v for k, v in job.one_sample_recipe.items() if k != "context"}
        common = dict(genes=genes, n_top_genes=n_top_genes, cache_dir=cache_dir, num_workers=num_workers,
                      progress=progress, log_dir=job.trainer.log_dir, **chosen)
        if model == "deepcell":
            res = train_cell_model(image, data, enc, geometry, mpp=mpp, **common)
        else:
            res = train_spot2cell_from_cells(image, data, enc, job.grid or GridSpec(), geometry=geometry, mpp=mpp,
                                             aggregate=job.aggregate, model=model, preset=preset, **common)
    score_holdout(res)
    return _trained(res, enc, out)
