"""The public API (``import deepspot as ds``): a loaded predictor and the training entry point.

- :func:`load_model` -> :class:`Model`: network + checked config + encoder (built on first use).
- :meth:`Model.predict_slide` (virtual spot grid over a slide), :meth:`Model.predict_spots` (at the
  spots of an existing AnnData), :meth:`Model.predict_cells` (cell models, at cell centroids),
  :meth:`Model.predict_features` (encoder features in, genes out); all AnnData / numpy out.
- :func:`train` -> :class:`Model`: today one sample (an image with spot or cell counts), trained with a
  spatial hold-out and scored on it next to ridge.

The :class:`Model` and :func:`load_model` live here; :func:`train` in :mod:`deepspot.api.trainer`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import torch

from deepspot.config import CheckpointError, ModelConfig, SpotGeometry, invert_scaler
from deepspot.features.encoders import load_encoder
from deepspot.models.checkpoint import load_checkpoint, save_checkpoint
from deepspot.api.trainer import _read_samples, train

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
    def score(self, samples, plots=None, ridge_train=None, features_h5=None, **run):
        """Score on annotated samples (a manifest path or loaded Samples): (per_gene, summary) DataFrames,
        see :func:`deepspot.evaluation.score.score_samples`. ``plots``: a folder for one
        ``<sample_id>_score.png`` per sample (per-gene Pearson histogram, best gene measured / predicted).
        ``ridge_train``: a manifest path or samples to fit the PCA-256 + ridge baseline on, scored beside.
        ``features_h5``: a folder of TRIDENT / HEST patch-feature files, ``<sample_id>.h5`` (or
        ``<image stem>.h5``) per sample, used instead of the encoder (:mod:`deepspot.inference.external`).
        ``samples`` may also be a :class:`~deepspot.config.requests.ScoreRequest` (what ``deepspot score``
        passes: its ``out`` is ``plots``, its ``baseline`` the ridge's training data). ``run``: the settings
        of this call (:data:`deepspot.settings`: ``progress``, ``cache_dir``; None: the process's)."""
        from deepspot.config.output_names import score_plot
        from deepspot.config.requests import ScoreRequest
        from deepspot.config.runtime import settings
        from deepspot.evaluation.score import score_samples

        self._require(cells=False)  # a cell model: refused before any sample is read or encoded
        if isinstance(samples, ScoreRequest):
            request = samples
            samples, plots, features_h5 = request.manifest, request.out, request.features_h5
            ridge_train = self._ridge_train(request)
        with settings.override(**{k: v for k, v in run.items() if v is not None}):
            samples = list(_read_samples(samples))
            ridge_train = None if ridge_train is None else list(_read_samples(ridge_train))
            feats = None
            from deepspot.training.manifest import features_files

            if features_h5 is not None or features_files(samples) is not None:  # a folder, or the manifest's column
                from deepspot.inference.external import sample_file_features

                feats = {s.sample_id: sample_file_features(self, s, features_h5) for s in samples}
            enc = self.encoder if feats is None or ridge_train is not None else None
            per_gene, summary, preds = score_samples(self.network, self.config, enc, samples, ridge_train=ridge_train,
                                                     features=feats)
        if plots is not None:
            from deepspot import plotting
            from deepspot.training.targets import log_normalize

            for s in samples:
                r = per_gene.loc[per_gene["sample_id"] == s.sample_id, "pearson"].to_numpy()
                plotting.score_panels(np.asarray(s.adata.obsm["spatial"])[:, :2], preds[s.sample_id],
                                      log_normalize(s.adata, genes=self.genes), self.genes, r, s.sample_id,
                                      Path(plots) / score_plot(s.sample_id))
        return per_gene, summary

    def _ridge_train(self, request) -> Path | None:
        """The ridge baseline's training manifest of a score request: 'ridge' is the one this model was
        trained from (recorded in its config), else the path given."""
        if request.baseline is None:
            return None
        if not request.ridge_from_model:
            return Path(request.baseline)
        src = self.config.training.get("manifest")
        if not src or not Path(src).exists():
            raise ValueError(f"{self.source}: --baseline ridge needs the training manifest, which this checkpoint "
                             f"does not record{f' ({src} is gone)' if src else ''}; give its path instead")
        return Path(src)

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
        from deepspot.models.deepcell import cell_predictor
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
                      mpp: float | None = None, geometry: SpotGeometry | str | None = None,
                      as_spatialdata: bool = False, **options):
        """Predict every in-tissue spot of a virtual grid over ``slide`` (the model's geometry; ``layout``
        and ``spacing`` override its grid, ``mpp`` the slide's µm/px) -> AnnData (spots × genes).

        ``geometry``: another grid and crop rule — a preset name ('visium', 'original', 'tcga'; see
        :func:`deepspot.config.geometry_preset`, whose ``spot_px`` / ``spacing_px`` set the original's
        pixel sizes) or a :class:`SpotGeometry`.

        Without ``out``, in memory. With ``out`` (what ``deepspot predict`` does), streamed with flat memory
        into ``out/<name>.h5ad``, ``<name>_spots.csv`` and ``<name>_genes.png`` (``genes`` or the
        ``n_plot`` most variable); the AnnData returned is then the written file, opened backed
        (read-only); ``uns['deepspot']['outputs']`` lists the files. A folder that already holds this
        slide's result is refused unless ``overwrite``.

        ``options`` are the fields of :class:`~deepspot.config.requests.PredictRequest`:
        ``tissue`` (None = the geometry's rule (the original's presets drop tiles whose mean RGB > 200),
        else otsu | mean_rgb | tile_mean_rgb | none), ``min_tissue`` (0.1), ``fast``, ``layout``,
        ``spacing``, ``batch_size`` (16), ``library_id``, ``n_plot`` (4), ``overwrite``, ``interval``
        (0.9: the nominal level of the per-spot, per-gene conformal interval written as
        ``layers['lower']`` / ``layers['upper']``; None: none; only models trained with a validation carry
        one; ``var['val_pearson']`` / ``var['reliable']`` say which genes to trust), ``keep_genes`` (only
        these genes in the output, e.g. ``model.reliable_genes``), ``tta`` (test-time augmentation, the mean
        over the 8 dihedral views of every crop), ``name``, ``spot_px`` / ``spacing_px`` …; and the
        settings of this call (:data:`deepspot.settings`: ``progress``, ``num_workers``, ``cache_dir``;
        None: the process's). An unknown name is a TypeError.

        Everything that can be checked before compute is, once, before the encoder is built (the request,
        then its plan: the genes, the feature mode, the output folder, the slide opened once, its mpp
        resolved). ``slide`` may also be a ready :class:`~deepspot.config.requests.PredictRequest` or a
        :class:`~deepspot.inference.predict_plan.PredictPlan` (what ``deepspot predict`` passes).

        ``as_spatialdata``: return a SpatialData instead (the slide image, the spots as circles of their
        true radius, the predictions as a table linked to them; extra ``[spatialdata]``); with ``out`` it is
        ``out/<name>.zarr`` (in place of the h5ad), read back, its table's ``uns['deepspot']['outputs']``
        listing the files.
        """
        from deepspot.config.requests import PredictRequest
        from deepspot.config.runtime import settings
        from deepspot.inference.predict_plan import PredictPlan, plan_prediction

        self._require(cells=False)
        run = {k: options.pop(k) for k in ("progress", "num_workers", "cache_dir") if k in options}
        run = {k: v for k, v in run.items() if v is not None}  # None: the process's setting
        if isinstance(slide, PredictPlan):
            plan, request = slide, slide.request
        else:
            if "min_tissue_fraction" in options:
                options["min_tissue"] = options.pop("min_tissue_fraction")
            request = slide if isinstance(slide, PredictRequest) else PredictRequest(
                slide, out=out, genes=genes, mpp=mpp, geometry=geometry,
                fmt="spatialdata" if as_spatialdata else "h5ad", **options)
            plan = None
        with settings.override(device=self.device, **run):
            with (plan if plan is not None else
                  plan_prediction(request, self.config, self.source, "predict_slide(as_spatialdata=True)")) as plan:
                self._check_encoder()
                return self._run_prediction(plan)

    def _run_prediction(self, plan):
        """Run a checked plan (:func:`deepspot.inference.predict.run_prediction`) and give its result back as
        the API does: the AnnData (in memory, or the written file opened backed), or a SpatialData."""
        from deepspot.inference.predict import run_prediction

        r = plan.request
        res = run_prediction(plan, self.network, self.encoder)
        if r.out is None:
            if r.fmt != "spatialdata":
                return res
            from deepspot.io.outputs import spatialdata_from_predictions

            return spatialdata_from_predictions(res, r.slide, mpp=r.mpp)
        outputs = [str(p) for p in (res.h5ad, res.csv, res.png) if p is not None]
        if r.fmt == "spatialdata":
            import spatialdata

            sdata = spatialdata.read_zarr(res.h5ad)
            sdata.tables["table"].uns["deepspot"]["outputs"] = outputs
            return sdata
        a = ad.read_h5ad(res.h5ad, backed="r")
        a.uns["deepspot"]["outputs"] = outputs
        return a

    def predict_spots(self, adata: ad.AnnData, image, mpp: float | None = None, batch_size: int = 16,
                      library_id: str | None = None, interval: float | None = 0.9, tta: bool = False,
                      **run) -> ad.AnnData:
        """Predict at the spots of ``adata``: obsm['spatial'] (x, y) full-resolution px of ``image`` and
        obs array_row/array_col (for the neighbour context). Returns AnnData (same obs_names, same order)
        × the model's genes, with var val_pearson / reliable and, for a calibrated model, layers lower /
        upper at the nominal ``interval``. ``run``: the settings of this call (:data:`deepspot.settings`:
        ``progress``, ``num_workers`` (default here 0), ``cache_dir``; None: the process's)."""
        from deepspot.inference.predict import predict_spots

        self._require(cells=False)
        run = {k: v for k, v in run.items() if v is not None}
        return predict_spots(image, adata, self.network, self.config, self.encoder, mpp=mpp, batch_size=batch_size,
                             library_id=library_id, interval=interval, tta=tta, device=self.device, **run)

    def predict_cells(self, cells, image, x_col: str = "x", y_col: str = "y", id_col: str | None = None,
                      mpp: float | None = None, drop_outside: bool = False, batch_size: int = 16,
                      num_workers: int = 0, cache_dir=None, progress: bool = True,
                      library_id: str | None = None, out: str | Path | None = None,
                      target: str | Path | None = None) -> ad.AnnData:
        """Predict every cell (DeepCell / DeepSpot2Cell): ``cells`` is a centroid table (CSV/TSV/parquet/
        h5ad path; columns ``x_col``, ``y_col`` level-0 px), a segmentation (GeoJSON of polygons, Xenium
        cell_boundaries in µm: needs ``mpp``), an AnnData with obsm['spatial'] (and obsm['cell_bbox'] for a model
        trained on bounding-box crops), or an (N, 2) array. Returns AnnData (cells × genes); with ``out``, the
        h5ad is written there block by block and the AnnData returned has no X
        (:func:`deepspot.inference.predict_cells.predict_cells`)."""
        from deepspot.inference.predict_cells import check_cell_boxes, predict_cells
        from deepspot.io.segmentation import CELL_BOX_KEY, read_segmentation

        self._require(cells=True)
        boxes, source = None, "cells"
        if isinstance(cells, ad.AnnData):
            ids, xy = cells.obs_names, np.asarray(cells.obsm["spatial"], dtype=np.float64)
            boxes = cells.obsm.get(CELL_BOX_KEY)
        elif isinstance(cells, (str, Path)):
            source = str(cells)
            seg = read_segmentation(cells, um_per_px=mpp, x_col=x_col, y_col=y_col, id_col=id_col)
            ids, xy, boxes = seg.ids, seg.xy, seg.boxes
        else:
            ids, xy = None, np.asarray(cells, dtype=np.float64)
        check_cell_boxes(self.config, boxes, source)
        if not Path(image).exists():
            raise FileNotFoundError(f"{image}: file not found")
        from deepspot.inference import preflight

        preflight.check_slide(image, mpp, needs_um=preflight.needs_um(self.config))
        self._check_encoder()
        return predict_cells(image, xy, self.network, self.config, self.encoder, cell_ids=ids, mpp=mpp,
                             batch_size=batch_size, num_workers=num_workers, cache_dir=cache_dir, device=self.device,
                             progress=progress, drop_outside=drop_outside, library_id=library_id, boxes=boxes,
                             source=source, out=out, target=target)


def load_model(path: str | Path, device: str = "cpu", encoder_weights=None) -> Model:
    """Load a checkpoint folder: every config field, the genes and dims are checked before any compute;
    the encoder is built on first use."""
    from deepspot.features.encoders import list_encoders, get_spec

    network, config = load_checkpoint(path)
    if config.encoder.name.strip().lower() in list_encoders():  # built on first use; its dim is checked now
        config.check_encoder_dim(get_spec(config.encoder.name).dim, f"{Path(path) / 'config.json'}: encoder.dim")
    return Model(network.to(device), config, encoder_weights=encoder_weights, device=device, source=str(path))
