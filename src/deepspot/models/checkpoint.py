"""Checkpoints are data, not code: ``model.safetensors`` + ``config.json`` in one folder.

config.json holds: ``model`` (kind: deepspot | deepcell | deepspot2cell), ``model_args``
(constructor keyword arguments), ``encoder`` (name, dim), ``genes`` (ordered list),
``scaler`` (optional, per-gene arrays), ``geometry`` (tile sizes, neighbour rule)
and anything else the trainer records (``extra``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def build_model(kind: str, model_args: dict) -> torch.nn.Module:
    from deepspot.models import registry

    return registry.build(kind, model_args)


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict) -> Path:
    """Write weights + config into folder ``path`` atomically (temp folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg.setdefault("format_version", FORMAT_VERSION)
    if hasattr(model, "config"):
        cfg["model_args"] = model.config()
    for key in ("model", "genes", "encoder"):
        if key not in cfg:
            raise ValueError(f"checkpoint config needs {key!r}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
        from deepspot.io.outputs import current_umask

        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp creates 0700
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: not a deepspot checkpoint (no {CONFIG_FILE})")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e.msg})") from None


def load_checkpoint(path: str | Path, genes: list[str] | None = None, feature_dim: int | None = None):
    """Load (model in eval mode, config). Checks that requested ``genes`` are in the model and that
    ``feature_dim`` matches its encoder, before any compute."""
    path = Path(path)
    cfg = read_config(path)
    enc_dim = int(cfg["encoder"]["dim"])
    if feature_dim is not None and feature_dim != enc_dim:
        raise CheckpointError(
            f"{path}: model expects {enc_dim}-d features from encoder '{cfg['encoder']['name']}', "
            f"got {feature_dim}-d features")
    if genes is not None:
        missing = [g for g in genes if g not in set(cfg["genes"])]
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} requested genes are not predicted by this model "
                                  f"(e.g. {', '.join(map(str, missing[:3]))})")
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise CheckpointError(f"{path}: {WEIGHTS_FILE} missing")
    model = build_model(cfg["model"], cfg["model_args"])
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors / shape errors
        raise CheckpointError(f"{weights}: cannot load weights ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, cfg
