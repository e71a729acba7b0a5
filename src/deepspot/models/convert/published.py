"""Writing a converted published checkpoint as our checkpoint folder (``model.safetensors`` + ``config.json``):
:func:`convert_checkpoint`."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

from deepspot.config import SpotGeometry
from deepspot.models.convert.genes import read_gene_list
from deepspot.models.convert.layouts import _scaler_config, to_model
from deepspot.models.convert.original import read_original
from deepspot.models.convert.unpickle import ConvertError

log = logging.getLogger(__name__)


def _default_geometry(kind: str, context: str) -> dict:
    from deepspot.config import CellGeometry

    if kind == "deepspot":
        return SpotGeometry().to_dict()
    return CellGeometry(neighbors="knn" if context == "cell_neighbors" else "none").to_dict()


#: The encoders a checkpoint of the original DeepSpot code can have been trained with (deepspot's registry has
#: more, e.g. UNI2-h, H-optimus-1, H0-mini and Prov-GigaPath, also 1536-d; the original never offered those, so
#: they do not make a width ambiguous when guessing a converted checkpoint's encoder).
ORIGINAL_ENCODERS = ("efficientnet-lite0", "uni", "hoptimus0", "phikon", "phikon-v2", "resnet50", "inception-v3",
                     "densenet121")


def _encoder_for_dim(dim: int, encoder: str | None, path: Path, feature_dim: int | None = None) -> str:
    """The encoder to record: ``encoder`` (checked against the weights), 'external' for ``feature_dim``, or
    the one registered encoder with this feature size."""
    from deepspot.config import EXTERNAL_ENCODER
    from deepspot.features.encoders import EncoderError, get_spec, list_encoders

    if encoder is not None and encoder.strip().lower() == EXTERNAL_ENCODER:
        encoder, feature_dim = None, dim if feature_dim is None else feature_dim
    if encoder is not None and feature_dim is not None:
        raise ConvertError(f"{path}: give --encoder or --feature-dim, not both")
    if feature_dim is not None:
        if int(feature_dim) != dim:
            raise ConvertError(f"{path}: the model takes {dim}-d features, not --feature-dim {feature_dim}")
        return EXTERNAL_ENCODER
    if encoder is not None:
        try:
            spec = get_spec(encoder)
        except EncoderError as e:
            raise ConvertError(str(e)) from None
        if spec.dim != dim:
            raise ConvertError(f"{path}: the model takes {dim}-d features but encoder '{spec.name}' gives {spec.dim}-d")
        return spec.name
    fits = [n for n in list_encoders() if get_spec(n).dim == dim]
    guess = [n for n in fits if n in ORIGINAL_ENCODERS]
    if len(guess) == 1:
        return guess[0]
    raise ConvertError(f"{path}: the model takes {dim}-d features; say which encoder it was trained with "
                       f"(--encoder {' | '.join(fits) if fits else 'NAME'}), or --feature-dim {dim} for features "
                       f"made outside deepspot")


def _jsonable(hp: dict) -> dict:
    out = {}
    for k, v in hp.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


_NOTES = {
    "deepspot": "original output Dropout(0.1) dropped (a no-op at inference)",
    "deepcell": "original output Dropout(0.1) dropped (a no-op at inference)",
    "deepspot2cell": "original output Dropout(0.1) kept as dropout_out (a no-op at inference, used in training); "
                     "context_padded (True = padding) "
                     "becomes neighbor_mask (True = real)",
}


def convert_checkpoint(src: str | Path, out_dir: str | Path, genes=None, encoder: str | None = None,
                       context: str | None = None, geometry: dict | None = None, kind: str | None = None,
                       feature_dim: int | None = None, module_aliases: dict[str, str] | None = None,
                       extra_allowed: Iterable[str] = ()) -> Path:
    """Convert a published DeepSpot / DeepCell / DeepSpot2Cell checkpoint into a checkpoint folder
    (model.safetensors + config.json).

    ``genes``: the model's gene list (list or file: text, JSON, CSV or the original's gene table), in
    output order; without it genes are named ``gene_0``… and a warning is logged. ``encoder``: the feature
    extractor the model was trained on (inferred from the feature dim when unique); ``feature_dim``
    instead records an external encoder (the model then predicts from given features only).
    ``context``: only where the file does not store it and the shapes leave it open. ``kind``:
    deepspot | deepcell | deepspot2cell, where a state dict does not say.
    """
    from deepspot.config import GridSpec
    from deepspot.models.checkpoint import save_checkpoint

    src = Path(src)
    orig = read_original(src, module_aliases, extra_allowed)
    kind, model, info = to_model(orig, kind, context)
    gene_list = read_gene_list(genes)
    placeholder_genes = not gene_list
    if placeholder_genes:
        log.warning("%s: no gene list given; genes are named gene_0..gene_%d (pass --genes FILE)",
                    src, info["n_genes"] - 1)
        gene_list = [f"gene_{i}" for i in range(info["n_genes"])]
    if len(gene_list) != info["n_genes"]:
        where = f"the gene list {genes}" if isinstance(genes, (str, Path)) else "the gene list given"
        raise ConvertError(f"{src}: the model predicts {info['n_genes']} genes but {where} has {len(gene_list)}")
    if len(set(gene_list)) != len(gene_list):
        raise ConvertError(f"{src}: the gene list has duplicates")
    enc = _encoder_for_dim(info["in_dim"], encoder, src, feature_dim)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    config = {
        "model": kind,
        "encoder": {"name": enc, "dim": info["in_dim"]},
        "genes": gene_list,
        "scaler": _scaler_config(orig.scaler),
        "converted_from": {
            "file": src.name, "sha256": digest, "class": orig.class_name,
            "hparams": _jsonable(orig.hparams), "genes_are_placeholders": placeholder_genes, "note": _NOTES[kind],
        },
    }
    if kind == "deepspot2cell":
        config["spot_grid"] = GridSpec().to_dict()
    if geometry is not None and kind != "deepspot" and "cell_diameter" not in geometry:
        raise ConvertError(f"{src}: a spot geometry (--geometry) is for DeepSpot models, this is a {kind}")
    config["geometry"] = geometry if geometry is not None else _default_geometry(kind, info["context"])
    return save_checkpoint(out_dir, model, config)


convert_deepspot = convert_checkpoint  # the name this function had when it converted DeepSpot files only
