"""The public API (``import deepspot as ds``): a loaded predictor and the training entry point.

- :func:`load_model` -> :class:`Model`: network + checked config + encoder (built on first use).
- :meth:`Model.predict_slide` (virtual spot grid over a slide), :meth:`Model.predict_spots` (at the
  spots of an existing AnnData), :meth:`Model.predict_cells` (cell models, at cell centroids),
  :meth:`Model.predict_features` (encoder features in, genes out); all AnnData / numpy out.
- :func:`train` -> :class:`Model`: today one sample (an image with spot or cell counts), trained with a
  spatial hold-out and scored on it next to ridge.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import torch

from deepspot.config import CellGeometry, CheckpointError, GridSpec, ModelConfig, SpotGeometry, invert_scaler
from deepspot.features.encoders import load_encoder
from deepspot.models.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["Model", "load_model", "train"]


class Model:
    """A trained DeepSpot / DeepCell / DeepSpot2Cell with its config, ready to predict.

    ``network``: the torch module (eval mode); ``config``: :class:`~deepspot.config.ModelConfig`;
    the encoder named by the config is loaded on first use (``encoder_weights``: a local weights file
    or folder for encoders that need one) on ``device``.
    """

    def __init__(self, network: torch.nn.Module, config: ModelConfig, encoder=None, encoder_weights=None,
                 device: str = "cpu", source: str = "model"):
        self.network = network.eval()
        self.config = config
        self.device = device
        self.source = source
        self.encoder_weights = encoder_weights
        self._encoder = encoder
        self.result = None  # set by train(): the features, targets, split and predictions of the run
        if encoder is not None:
            config.check_encoder_dim(encoder.dim, source)

    def __repr__(self) -> str:
        return (f"Model({self.config.model}, context={self.config.context!r}, encoder={self.config.encoder.name!r}, "
                f"{len(self.genes)} genes, device={self.device!r})")

    @property
    def genes(self) -> list[str]:
        """The predicted genes, in output order."""
        return list(self.config.genes)

    @property
    def gene_table(self):
        """One row per predicted gene (output order): ``val_pearson`` (Pearson on the validation spots held
        out in training), ``noise_band`` (95 % of |r| with shuffled predictions), ``reliable``
        (val_pearson above the band), ``interval_q`` and ``rank``; NaN / <NA> for a model without
        validation (a converted published model): see :mod:`deepspot.reliability`."""
        from deepspot.reliability import gene_table

        return gene_table(self.config)

    @property
    def reliable_genes(self) -> list[str]:
        """The genes whose validation Pearson is above the noise band, most reliable first ([] without
        validation)."""
        from deepspot.reliability import trusted_genes

        return trusted_genes(self.config)

    @property
    def scores(self) -> dict:
        """Held-out scores recorded at training ({} when none were)."""
        return dict(self.config.scores)

    @property
    def encoder(self):
        """The image encoder (loaded on first use; its feature dim is checked against the config)."""
        if self._encoder is None:
            enc = load_encoder(self.config.encoder.name, weights=self.encoder_weights, device=self.device)
            self.config.check_encoder_dim(enc.dim, self.source)
            self._encoder = enc
        return self._encoder

    def to(self, device: str) -> "Model":
        """Move the network (and a loaded encoder, its normalisation buffers included) to ``device``."""
        self.device = device
        self.network.to(device)
        if self._encoder is not None:
            self._encoder.to(device)
        return self

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint folder (model.safetensors + config.json)."""
        return save_checkpoint(path, self.network, self.config)

    def _check_encoder(self) -> None:
        """The config's encoder is a registered one (before any compute; it is built on first use)."""
        from deepspot.features.encoders import EncoderError, get_spec

        if self._encoder is None:
            try:
                get_spec(self.config.encoder.name)
            except EncoderError as e:
                raise EncoderError(f"{self.source}: config encoder.name: {e}") from None

    def _require(self, cells: bool) -> None:
        if cells and not self.config.is_cell_model:
            raise CheckpointError(f"{self.source}: a {self.config.model} model predicts spots, not cells; use "
                                  f"predict_slide or predict_spots (`deepspot predict`)")
        if not cells and self.config.is_cell_model:
            raise CheckpointError(f"{self.source}: a {self.config.model} model predicts cells, not a spot grid; "
                                  f"use predict_cells (`deepspot predict-cells CELL_TABLE --image IMAGE "
                                  f"--model {self.source}`)")

    @torch.no_grad()
    def score(self, samples, cache_dir=None, progress: bool = True, plots=None, ridge_train=None, features_h5=None):
        """Score on annotated samples (a manifest path or loaded Samples): (per_gene, summary) DataFrames,
        see :func:`deepspot.evaluation.score.score_samples`. ``plots``: a folder for one
        ``<sample_id>_score.png`` per sample (per-gene Pearson histogram, best gene measured / predicted).
        ``ridge_train``: a manifest path or samples to fit the PCA-256 + ridge baseline on, scored beside.
        ``features_h5``: a folder of TRIDENT / HEST patch-feature files, ``<sample_id>.h5`` (or
        ``<image stem>.h5``) per sample, used instead of the encoder (:mod:`deepspot.inference.external`)."""
        from deepspot.evaluation.score import score_samples

        self._require(cells=False)  # a cell model: refused before any sample is read or encoded

        samples = list(_read_samples(samples, progress=progress))
        ridge_train = None if ridge_train is None else list(_read_samples(ridge_train, progress=progress))
        feats = None
        if features_h5 is not None:
            from deepspot.inference.external import sample_file_features

            feats = {s.sample_id: sample_file_features(self, s, features_h5) for s in samples}
        enc = self.encoder if feats is None or ridge_train is not None else None
        per_gene, summary, preds = score_samples(self.network, self.config, enc, samples, cache_dir=cache_dir,
                                                 progress=progress, ridge_train=ridge_train, features=feats)
        if plots is not None:
            from deepspot import plotting
            from deepspot.training.targets import log_normalize

            for s in samples:
                r = per_gene.loc[per_gene["sample_id"] == s.sample_id, "pearson"].to_numpy()
                plotting.score_panels(np.asarray(s.adata.obsm["spatial"])[:, :2], preds[s.sample_id],
                                      log_normalize(s.adata, genes=self.genes), self.genes, r, s.sample_id,
                                      Path(plots) / f"{s.sample_id}_score.png")
        return per_gene, summary

    def predict_features(self, spot, subspots=None, neighbors=None, neighbor_mask=None, raw: bool = False,
                         cells=None, cell_mask=None):
        """Predictions from encoder features (numpy arrays) -> (B,G) numpy, in target space (the model's scaler
        undone) unless ``raw``.

        - DeepSpot: ``spot`` (B,d), ``subspots`` (B,S,d), ``neighbors`` (B,K,d), ``neighbor_mask`` (B,K) bool
          (True = a real neighbour; default all real).
        - DeepCell (and ``deepspot2cell-pooled``): ``spot`` = the cells' own tile features (B,d), ``neighbors``
          their neighbour cells' (B,K,d).
        - DeepSpot2Cell: ``spot`` = the spot tile (B,d), ``neighbors`` its neighbour spot tiles (B,K,d) and
          ``cells`` either (B,C,d) the cells of each spot with ``cell_mask`` (B,C) (True = a real cell; default
          all) -> spot predictions, or (B,d) one cell per row, predicted with that row's spot context -> cell
          predictions.
        """
        from deepspot.models.cells import cell_predictor
        from deepspot.models.spot2cell import DeepSpot2Cell

        def t(a, dtype=torch.float32):
            return None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)

        d = self.config.encoder.dim
        x = t(spot)
        if x is None or x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"spot features must be (B, {d}), got {None if x is None else tuple(x.shape)}")
        nb = t(neighbors)
        if nb is not None and (nb.ndim != 3 or nb.shape[0] != x.shape[0] or nb.shape[2] != d):
            raise ValueError(f"neighbour features must be ({x.shape[0]}, K, {d}), got {tuple(nb.shape)}")
        mask = None
        if nb is not None:
            mask = (torch.ones(nb.shape[:2], dtype=torch.bool, device=self.device) if neighbor_mask is None
                    else t(neighbor_mask, torch.bool))
            if tuple(mask.shape) != tuple(nb.shape[:2]):
                raise ValueError(f"neighbor_mask must be {tuple(nb.shape[:2])}, got {tuple(mask.shape)}")
        net = self.network.eval().to(self.device)
        if isinstance(net, DeepSpot2Cell):
            c = t(cells)
            if c is None or c.ndim not in (2, 3) or c.shape[0] != x.shape[0] or c.shape[-1] != d:
                raise ValueError(f"a deepspot2cell model needs cells=({x.shape[0]}, C, {d}) (spot predictions) or "
                                 f"({x.shape[0]}, {d}) (one cell per row), got "
                                 f"{None if c is None else tuple(c.shape)}")
            with torch.no_grad():
                if c.ndim == 3:
                    cm = (torch.ones(c.shape[:2], dtype=torch.bool, device=self.device) if cell_mask is None
                          else t(cell_mask, torch.bool))
                    out = net(c, cm, x, nb, mask)
                else:
                    out = net.cell_forward(c, x, nb, mask)
        else:
            if cells is not None:
                raise ValueError(f"cells= is for deepspot2cell models; this is a {self.config.model}")
            sub = t(subspots)
            inputs = {"spot": x, "neighbors": nb, "neighbor_mask": mask}
            if sub is not None:
                inputs.update(subspots=sub, subspot_mask=torch.ones(sub.shape[:2], dtype=torch.bool,
                                                                    device=self.device))
            if self.config.is_cell_model:
                net = cell_predictor(net)
            with torch.no_grad():
                out = net(**inputs)
        out = out.float().cpu().numpy()
        return out if raw else invert_scaler(out, self.config.scaler)

    def predict_slide(self, slide, out: str | Path | None = None, genes: Sequence[str] | None = None,
                      mpp: float | None = None, tissue: str | None = None, min_tissue: float = 0.1,
                      fast: bool | None = None, layout: str | None = None, spacing: float | None = None,
                      batch_size: int = 16, num_workers: int | None = None, cache_dir=None, progress: bool = True,
                      library_id: str | None = None, n_plot: int = 4,
                      geometry: SpotGeometry | str | None = None, overwrite: bool = False,
                      as_spatialdata: bool = False, interval: float | None = 0.9,
                      keep_genes: Sequence[str] | None = None, tta: bool = False):
        """Predict every in-tissue spot of a virtual grid over ``slide`` (the model's geometry; ``layout``
        and ``spacing`` override its grid, ``mpp`` the slide's µm/px) -> AnnData (spots × genes).

        ``geometry``: another grid and crop rule — a preset name ('visium', 'original', 'tcga'; see
        :func:`deepspot.config.geometry_preset`, whose ``spot_px`` / ``spacing_px`` set the original's
        pixel sizes) or a :class:`SpotGeometry`. ``tissue``: None = the geometry's rule (the original's
        presets drop tiles whose mean RGB > 200), else otsu | mean_rgb | tile_mean_rgb | none.

        Without ``out``, in memory. With ``out`` (what ``deepspot predict`` does), streamed with flat memory
        into ``out/<name>.h5ad``, ``<name>_spots.csv`` and ``<name>_genes.png`` (``genes`` or the
        ``n_plot`` most variable); the AnnData returned is then the written file, opened backed
        (read-only); ``uns['deepspot']['outputs']`` lists the files. A folder that already holds this
        slide's result is refused unless ``overwrite``.

        Everything that can be checked before compute is, before the encoder is built: the genes, the
        feature mode, the output folder, the slide (opened, its mpp resolved, a thumbnail possible).

        ``as_spatialdata``: return a SpatialData instead (the slide image, the spots as circles of their
        true radius, the predictions as a table linked to them; extra ``[spatialdata]``); with ``out`` it is
        ``out/<name>.zarr`` (in place of the h5ad), read back, its table's ``uns['deepspot']['outputs']``
        listing the files.

        ``tta``: test-time augmentation, the mean over the 8 dihedral views of every crop (8 encoder passes
        per crop). ``keep_genes``: only these genes in the output (e.g. ``model.reliable_genes``).
        ``interval``: the nominal level of the per-spot, per-gene conformal interval written as
        ``layers['lower']`` / ``layers['upper']`` (None: none; only models trained with a validation
        carry one); ``var['val_pearson']`` / ``var['reliable']`` say which genes to trust.
        """
        from deepspot.inference import preflight
        from deepspot.reliability import intervals_for

        intervals_for(self.config, interval)  # a level the model is not calibrated at fails before compute
        from deepspot.inference.predict import predict_image, predict_slide

        self._require(cells=False)
        self.config.check_genes(genes, self.source)
        if fast is not None:
            self.config.check_feature_mode("fast" if fast else "standard", self.source)
        if out is not None:
            preflight.check_out_dir(out)
            preflight.prediction_folder(out).check()
            preflight.check_previous(out, preflight.prediction_files(Path(slide).stem,
                                                                     "spatialdata" if as_spatialdata else "h5ad"),
                                     overwrite)
        preflight.check_slide(slide, mpp, needs_um=preflight.needs_um(self.config, geometry))
        self._check_encoder()
        common = dict(mpp=mpp, tissue=tissue, min_tissue_fraction=min_tissue, fast=fast, layout=layout,
                      spacing=spacing, batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir,
                      device=self.device, progress=progress, library_id=library_id, geometry=geometry,
                      interval=interval, tta=tta)
        if as_spatialdata:
            from deepspot.extras import require

            require("spatialdata", "spatialdata", "predict_slide(as_spatialdata=True)")
        if out is None:
            a = predict_image(slide, self.network, self.config, self.encoder, **common)
            if keep_genes is not None:
                a = a[:, list(keep_genes)].copy()
            if not as_spatialdata:
                return a
            from deepspot.io.outputs import spatialdata_from_predictions

            return spatialdata_from_predictions(a, slide, mpp=mpp)
        res = predict_slide(slide, self.network, self.config, self.encoder, out, genes=list(genes or []) or None,
                            n_plot=n_plot, fmt="spatialdata" if as_spatialdata else "h5ad",
                            keep_genes=None if keep_genes is None else list(keep_genes), **common)
        outputs = [str(p) for p in (res.h5ad, res.csv, res.png) if p is not None]
        if as_spatialdata:
            import spatialdata

            sdata = spatialdata.read_zarr(res.h5ad)
            sdata.tables["table"].uns["deepspot"]["outputs"] = outputs
            return sdata
        a = ad.read_h5ad(res.h5ad, backed="r")
        a.uns["deepspot"]["outputs"] = outputs
        return a

    def predict_spots(self, adata: ad.AnnData, image, mpp: float | None = None, batch_size: int = 16,
                      num_workers: int | None = 0, cache_dir=None, progress: bool = True,
                      library_id: str | None = None, interval: float | None = 0.9, tta: bool = False) -> ad.AnnData:
        """Predict at the spots of ``adata``: obsm['spatial'] (x, y) full-resolution px of ``image`` and
        obs array_row/array_col (for the neighbour context). Returns AnnData (same obs_names, same order)
        × the model's genes, with var val_pearson / reliable and, for a calibrated model, layers lower /
        upper at the nominal ``interval``."""
        from deepspot.inference.predict import predict_spots

        self._require(cells=False)
        return predict_spots(image, adata, self.network, self.config, self.encoder, mpp=mpp, batch_size=batch_size,
                             num_workers=num_workers, cache_dir=cache_dir, device=self.device, progress=progress,
                             library_id=library_id, interval=interval, tta=tta)

    def predict_cells(self, cells, image, x_col: str = "x", y_col: str = "y", id_col: str | None = None,
                      mpp: float | None = None, drop_outside: bool = False, batch_size: int = 16,
                      num_workers: int = 0, cache_dir=None, progress: bool = True,
                      library_id: str | None = None) -> ad.AnnData:
        """Predict every cell (DeepCell / DeepSpot2Cell): ``cells`` is a centroid table (CSV/TSV/parquet/
        h5ad path; columns ``x_col``, ``y_col`` level-0 px), an AnnData with obsm['spatial'], or an (N, 2)
        array. Returns AnnData (cells × genes)."""
        from deepspot.inference.cells import predict_cells
        from deepspot.io.spatial import read_cell_table

        self._require(cells=True)
        if isinstance(cells, ad.AnnData):
            ids, xy = cells.obs_names, np.asarray(cells.obsm["spatial"], dtype=np.float64)
        elif isinstance(cells, (str, Path)):
            ids, xy = read_cell_table(cells, x_col=x_col, y_col=y_col, id_col=id_col)
        else:
            ids, xy = None, np.asarray(cells, dtype=np.float64)
        if not Path(image).exists():
            raise FileNotFoundError(f"{image}: file not found")
        from deepspot.inference import preflight

        preflight.check_slide(image, mpp, needs_um=preflight.needs_um(self.config))
        self._check_encoder()
        return predict_cells(image, xy, self.network, self.config, self.encoder, cell_ids=ids, mpp=mpp,
                             batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir, device=self.device,
                             progress=progress, drop_outside=drop_outside, library_id=library_id)


def load_model(path: str | Path, device: str = "cpu", encoder_weights=None) -> Model:
    """Load a checkpoint folder: every config field, the genes and dims are checked before any compute;
    the encoder is built on first use."""
    from deepspot.features.encoders import list_encoders, get_spec

    network, config = load_checkpoint(path)
    if config.encoder.name.strip().lower() in list_encoders():  # built on first use; its dim is checked now
        config.check_encoder_dim(get_spec(config.encoder.name).dim, f"{Path(path) / 'config.json'}: encoder.dim")
    return Model(network.to(device), config, encoder_weights=encoder_weights, device=device, source=str(path))


# --------------------------------------------------------------------------- training


def _read_samples(samples, cells: bool = False, progress: bool = False):
    """A manifest path read into loaded Samples (every row read and checked before any compute, one progress
    bar over the rows); anything else as given. ``cells``: the rows are cells (pooled later, not here)."""
    if isinstance(samples, (str, Path)):
        from rich.progress import track

        from deepspot.training.manifest import load_sample, read_manifest

        specs = read_manifest(samples)
        rows = track(specs, description="reading samples", disable=not progress or len(specs) < 2)
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


def _train_many(samples, model, out, encoder, encoder_weights, context, genes, n_top_genes, loss, max_epochs,
                patience, seed, hidden, n_ensemble, cache_dir, progress, log_dir, manifest=None, preset=None,
                **options) -> "Model":
    from deepspot.training.recipe import preset_panel, spot_preset
    from deepspot.training.multi_sample import train_samples

    if model != "deepspot":
        raise ValueError(f"training on several samples is implemented for deepspot, not {model}")
    recipe = spot_preset(preset)
    n_top_genes, options["min_fraction"] = preset_panel(preset, n_top_genes, options.get("min_fraction"),
                                                        fallback_n_top=250)
    enc = load_encoder(encoder, weights=encoder_weights)
    res = train_samples(samples, enc, recipe=recipe, genes=genes, n_top_genes=n_top_genes,
                        cache_dir=_feature_cache(cache_dir, out), progress=progress, log_dir=log_dir,
                        context=context, loss=loss,
                        max_epochs=max_epochs, patience=patience, seed=seed, hidden=hidden, n_ensemble=n_ensemble,
                        **options)
    if manifest is not None:  # `deepspot score --baseline ridge` refits the baseline on these samples
        res.config.training["manifest"] = manifest
    return _trained(res, enc, out)


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


def train(samples, image=None, model: str = "deepspot", out: str | Path | None = None,
          encoder: str = "efficientnet-lite0", encoder_weights=None, mpp: float | None = None,
          geometry: SpotGeometry | CellGeometry | None = None, grid: GridSpec | None = None,
          cells: bool = False, context: str = "spot_subspot_neighbors", genes: list[str] | None = None,
          n_top_genes: int | None = None, loss: str | None = None, max_epochs: int | None = None,
          patience: int | None = None, seed: int = 2024, hidden: int | None = None, n_ensemble: int | None = None,
          aggregate: str = "sum",
          cache_dir=None, num_workers: int = 0, progress: bool = True, log_dir=None, preset: str | None = None,
          add_genes: list[str] | None = None, init_from: str | Path | None = None, freeze: str = "none",
          features_h5: str | Path | None = None, **many_options) -> Model:
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
    :data:`deepspot.training.cells.SPOT2CELL_PRESETS`); options given here override the preset's.

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
    """
    from deepspot.config import CELL_MODELS, MODEL_KINDS, resolve_mpp
    from deepspot.evaluation.holdout import score_holdout
    from deepspot.geometry.grid import pool_cells
    from deepspot.io.slides import open_slide
    from deepspot.io.spatial import SpatialDataError, check_inside

    if out is not None:
        from deepspot.models.checkpoint import checkpoint_folder

        checkpoint_folder(out).check()  # refused before any data is read, never emptied
    manifest = str(Path(samples).resolve()) if isinstance(samples, (str, Path)) else None
    samples = _read_samples(samples, cells=cells, progress=progress)
    many = _many_samples(samples)
    init = None
    if many_options and many is None:
        raise ValueError(f"options {sorted(many_options)} apply to training on several samples (a manifest)")
    if preset not in (None, "deepspot") and model not in ("deepspot", "deepspot2cell"):
        raise ValueError(f"training presets are for spot models (deepspot) and deepspot2cell, not {model}")
    if add_genes and model != "deepspot":
        raise ValueError(f"add_genes is for spot models (deepspot), not {model}")
    if init_from is not None:
        from deepspot.features.encoders import get_spec
        from deepspot.training.warmstart import read_init

        if model != "deepspot":
            raise ValueError(f"init_from is for spot models (deepspot), not {model}")
        if features_h5 is not None:
            from deepspot.features.external import read_patch_features

            dim = read_patch_features(features_h5).dim
        else:
            dim = get_spec(encoder).dim
        init = read_init(init_from, encoder, dim, freeze=freeze)
        if genes is None and n_top_genes is None:
            genes = list(init.config.genes)
    if many is not None and features_h5 is not None:
        raise ValueError("features_h5 is one sample's file; train a manifest with the encoder (or one sample at a time)")
    if many is not None:
        if init is not None:
            many_options["init"] = init
        if add_genes:
            many_options["add_genes"] = list(add_genes)
        return _train_many(many, model, out, encoder, encoder_weights, context, genes, n_top_genes, loss,
                           max_epochs, patience, seed, hidden, n_ensemble, cache_dir, progress, log_dir,
                           manifest=manifest, preset=preset, **many_options)
    data, image, sample_mpp = _one_sample(samples, image)
    mpp = mpp if mpp is not None else sample_mpp
    if mpp is None and model == "deepspot" and not cells:  # the mpp the reader recorded (a manifest uses it too)
        mpp = (data.uns.get("source", {}) or {}).get("mpp")
    if model not in MODEL_KINDS:
        raise ValueError(f"unknown model {model!r}; choose deepspot, {' or '.join(CELL_MODELS)}")
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
        enc = load_encoder(encoder, weights=encoder_weights)
    cache_dir = _feature_cache(cache_dir, out)
    # training options left as None take each model's own defaults (for spots: training.recipe.SpotRecipe)
    chosen = {k: v for k, v in dict(loss=loss, max_epochs=max_epochs, patience=patience, hidden=hidden,
                                    n_ensemble=n_ensemble).items() if v is not None}
    common = dict(genes=genes, n_top_genes=n_top_genes, seed=seed, cache_dir=cache_dir, num_workers=num_workers,
                  progress=progress, log_dir=log_dir, **chosen)
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
        from deepspot.training.recipe import preset_panel, spot_preset

        common["n_top_genes"] = preset_panel(preset, n_top_genes, fallback_n_top=250)[0]  # as for several samples
        feats = None
        if external is not None:
            from deepspot.features.external import spot_features

            use_sub = "subspot" in (init.context if init is not None else context)
            feats = spot_features(external, data.obsm["spatial"], geometry.grid.in_pixels(slide_mpp).spot_diameter,
                                  n_sub=geometry.n_sub if use_sub else 0, mpp=slide_mpp)
        res = train_spot_model(image, data, enc, geometry, mpp=slide_mpp, context=context,
                               recipe=spot_preset(preset), add_genes=add_genes, init=init, features=feats, **common)
    else:
        from deepspot.training.cells import train_cell_model, train_spot2cell_from_cells

        geometry = geometry or CellGeometry()
        if not isinstance(geometry, CellGeometry):
            raise ValueError(f"a {model} model needs a CellGeometry")
        if model == "deepcell":
            res = train_cell_model(image, data, enc, geometry, mpp=mpp, **common)
        else:
            res = train_spot2cell_from_cells(image, data, enc, grid or GridSpec(), geometry=geometry, mpp=mpp,
                                             aggregate=aggregate, model=model, preset=preset, **common)
    score_holdout(res)
    return _trained(res, enc, out)
