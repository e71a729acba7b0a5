"""Predict from a patch-feature file another tool wrote (``deepspot predict SLIDE --features-h5 F``).

Every patch of the file is a spot: its centre the prediction's position, its neighbours the adjacent
patches of the file's lattice (array rows / columns from the patch positions). No encoder runs; the
file's features must come from the model's encoder (same dim; same name when the file records one)
and its patches must be the model's spot crop (:func:`deepspot.features.external.check_patch_size`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.config import CheckpointError, invert_scaler
from deepspot.features.external import (ExternalFeatureError, check_patch_size, patch_spots,
                                        read_patch_features)

log = logging.getLogger(__name__)


def check_file_encoder(pf, config, source: str) -> None:
    """The file's features are the model's encoder's: same dim, and same name where the file names one."""
    if pf.dim != config.encoder.dim:
        raise CheckpointError(f"{source}: model expects {config.encoder.dim}-d features from encoder "
                              f"'{config.encoder.name}', {pf.path} holds {pf.dim}-d features")
    if pf.encoder and pf.encoder.strip().lower() != config.encoder.name.strip().lower():
        raise CheckpointError(f"{source}: model was trained on encoder '{config.encoder.name}', {pf.path} was "
                              f"made by '{pf.encoder}'")


def predict_patch_file(model, path, mpp: float | None = None, patch_px: float | None = None) -> ad.AnnData:
    """Predictions (patches × the model's genes) from patch-feature file ``path`` for a loaded
    :class:`deepspot.api.Model`; ``mpp``: µm/px of the slide the patches were cut from (needed when the
    model's geometry is in µm)."""
    from deepspot.geometry.neighbors import array_neighbors
    from deepspot.models.bags import Bags, predict_bags

    config = model.config
    if config.is_cell_model:
        raise CheckpointError(f"{model.source}: a {config.model} model predicts cells; --features-h5 is for spot models")
    if "subspot" in config.context:
        raise ExternalFeatureError(f"{model.source}: context {config.context!r} needs sub-spot features, which a "
                                   f"patch-feature file does not hold; train with --context spot_neighbors")
    pf = read_patch_features(path, patch_px=patch_px)
    check_file_encoder(pf, config, model.source)
    geo = config.geometry
    spot_px = geo.grid.in_pixels(mpp).spot_diameter
    check_patch_size(pf, spot_px, mpp)
    spots, step = patch_spots(pf)
    pitch = geo.grid.in_pixels(mpp).spacing
    if abs(step - pitch) > 0.1 * pitch and config.context != "spot":
        log.warning("%s: patches lie %.0f px apart, the model's spots %.0f px: its neighbours are the adjacent "
                    "patches", pf.path, step, pitch)
    idx, mask = array_neighbors(spots["array_row"].to_numpy(), spots["array_col"].to_numpy(), geo.neighbor_radius)
    bags = Bags.from_numpy(pf.features, None, idx, mask)
    net = model.network.eval().to("cpu")
    pred = invert_scaler(predict_bags(net, bags), config.scaler).astype(np.float32)
    names = (pf.barcodes if pf.barcodes is not None and len(set(pf.barcodes)) == len(pf.barcodes)
             else [f"patch_{i}" for i in range(len(spots))])
    obs = pd.DataFrame({"array_row": spots["array_row"].to_numpy(), "array_col": spots["array_col"].to_numpy(),
                        "in_tissue": 1}, index=pd.Index([str(n) for n in names], name="barcode"))
    out = ad.AnnData(pred, obs=obs, var=pd.DataFrame(index=pd.Index(config.genes, name="gene")))
    out.obsm["spatial"] = spots[["x", "y"]].to_numpy(dtype=np.float64)
    out.uns["deepspot"] = {"features_h5": str(Path(path)), "encoder": config.encoder.name, "patch_px": float(pf.patch_px),
                           "patch_step_px": float(step), "mpp": None if mpp is None else float(mpp),
                           "model": str(model.source), "context": config.context}
    return out


def sample_file_features(model, sample, folder=None):
    """The spot features of an annotated sample (:class:`deepspot.training.manifest.Sample`) from its file in
    ``folder`` (``<sample_id>.h5``, else ``<image stem>.h5``) or, with no folder, from the file its manifest
    row names (``features_h5``), checked against the model."""
    from deepspot.features.external import read_patch_features, spot_features

    if folder is None:
        path = sample.spec.features_h5
        if path is None:
            raise FileNotFoundError(f"sample {sample.sample_id}: its manifest row names no features_h5 file")
    else:
        folder = Path(folder)
        cands = [folder / f"{sample.sample_id}.h5", folder / f"{Path(sample.image).stem}.h5"]
        path = next((p for p in cands if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{folder}: no {cands[0].name} or {cands[1].name} for sample {sample.sample_id}")
    config = model.config
    if "subspot" in config.context:
        raise ExternalFeatureError(f"{model.source}: context {config.context!r} needs sub-spot features, which a "
                                   f"patch-feature file does not hold")
    pf = read_patch_features(path)
    check_file_encoder(pf, config, model.source)
    spot_px = config.geometry.grid.in_pixels(sample.mpp).spot_diameter
    return spot_features(pf, sample.adata.obsm["spatial"], spot_px, mpp=sample.mpp)


__all__ = ["check_file_encoder", "predict_patch_file", "sample_file_features"]
