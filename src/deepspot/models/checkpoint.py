"""Checkpoints are data, not code: ``model.safetensors`` + ``config.json`` in one folder.

config.json is a :class:`deepspot.config.ModelConfig` (model kind and arguments, encoder name and
dim, ordered genes, geometry, scaler, training provenance, schema version); reading it checks every
field, and loading checks the weights against it, before any compute.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deepspot.config import CheckpointError, ModelConfig, read_config_file
from deepspot.models import registry

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "CheckpointError", "build_model", "checkpoint_folder", "load_checkpoint",
           "read_config", "save_checkpoint"]


def build_model(kind: str, model_args: dict) -> torch.nn.Module:
    return registry.build(kind, model_args)


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: ModelConfig | dict) -> Path:
    """Write weights + config into folder ``path`` atomically (temp folder, then rename). The config's
    ``model_args`` are the model's own; a config dict is checked as :class:`ModelConfig` first."""
    path = Path(path)
    if isinstance(config, dict):
        config = dict(config, model_args=model.config()) if hasattr(model, "config") else config
        config = ModelConfig.from_dict(config, source=f"{path / CONFIG_FILE}")
    elif hasattr(model, "config"):
        config = config.replace(model_args=model.config())
    cfg = config.to_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    owner = checkpoint_folder(path).open()
    try:
        with owner.atomic(WEIGHTS_FILE) as tw, owner.atomic(CONFIG_FILE) as tc:  # both written, then renamed
            save_file(state, str(tw), metadata={"format": "pt"})  # (0600: the rename gives the usual mode)
            tc.write_text(json.dumps(cfg, indent=1))
    except BaseException:
        owner.abort()
        raise
    return path


def checkpoint_folder(path):
    """The :class:`~deepspot.io.owner.OutputFolder` of a checkpoint: new, empty, or a previous checkpoint
    (its two files); a folder holding anything else is refused, never emptied."""
    from deepspot.io.owner import OutputFolder

    return OutputFolder(path, "checkpoint", legacy=lambda n: n in (WEIGHTS_FILE, CONFIG_FILE))


def read_config(path: str | Path) -> ModelConfig:
    """The checked config of checkpoint folder ``path`` (older schema versions migrated on read)."""
    return read_config_file(path, CONFIG_FILE)


def load_checkpoint(path: str | Path, genes: list[str] | None = None, feature_dim: int | None = None):
    """Load (model in eval mode, config). Checks that requested ``genes`` are in the model and that
    ``feature_dim`` matches its encoder, before any compute."""
    path = Path(path)
    cfg = read_config(path)
    if feature_dim is not None:
        cfg.check_encoder_dim(feature_dim, source=str(path))
    cfg.check_genes(genes, source=str(path))
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} missing")
    try:
        model = build_model(cfg.model, cfg.model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: model_args do not build a {cfg.model} "
                              f"({str(e).splitlines()[0]})") from None
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors / shape errors
        raise CheckpointError(f"{weights}: cannot load weights ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, cfg
