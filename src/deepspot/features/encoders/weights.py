"""Finding and reading an encoder's weight files, never from the network and never running pickled code.

Weights are looked up, in order, at:

1. the ``weights`` argument (the CLI's ``--encoder-weights``): a file, or a
   folder holding one of the expected files;
2. ``$DEEPSPOT_WEIGHTS_DIR/<encoder name>/<expected file>``;
3. the local Hugging Face cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``), for
   encoders published on the Hub, and the torch hub cache
   (``$TORCH_HOME/hub/checkpoints``) for the torchvision CNNs.

Weight files are read with ``torch.load(weights_only=True)`` or safetensors.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from deepspot.features.encoders.registry import EncoderError, EncoderSpec

WEIGHTS_DIR_ENV = "DEEPSPOT_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _hf_cached(repo: str, filename: str) -> Path | None:
    """Path of ``filename`` of model repo ``repo`` in the local HF cache, or None. Never uses the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        p = try_to_load_from_cache(repo, filename, cache_dir=str(_hf_cache_dir()))
    except Exception:  # malformed cache
        return None
    return Path(p) if isinstance(p, str) and Path(p).is_file() else None


def find_weights(spec: EncoderSpec, weights: Path | None, want_dir: bool = False) -> Path | None:
    """Resolve the weight file (or, ``want_dir``, a folder with ``config.json``) of ``spec``."""

    def in_dir(d: Path) -> Path | None:
        if want_dir and (d / "config.json").is_file():
            return d
        for f in spec.files:
            if (d / f).is_file():
                return d / f
        return None

    if weights is not None:
        if weights.is_file():
            return weights
        hit = in_dir(weights) or in_dir(weights / spec.name)
        if hit is None:
            raise EncoderError(f"encoder '{spec.name}': none of {', '.join(spec.files)} found in {weights}")
        return hit
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        hit = in_dir(Path(env).expanduser() / spec.name)
        if hit is not None:
            return hit
    if spec.hf_repo:
        names = ("config.json",) if want_dir else spec.files
        for f in names:
            p = _hf_cached(spec.hf_repo, f)
            if p is not None:
                return p.parent if want_dir else p
    return None


def missing_weights(spec: EncoderSpec) -> EncoderError:
    cache = "the local Hugging Face cache" if spec.hf_repo else "the torch hub cache (<TORCH_HOME>/hub/checkpoints)"
    return EncoderError(
        f"encoder '{spec.name}': weights not found; {spec.source}; give the file with --encoder-weights PATH, "
        f"put it in ${WEIGHTS_DIR_ENV}/{spec.name}/ or in {cache}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch file without running pickled code."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            try:  # memory-map zip-format files (giant ViTs); legacy files cannot be mapped
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EncoderError(f"cannot read weights {path}: {msg[:300]}") from None
    for key in ("state_dict", "model", "module"):  # training checkpoints that wrap the state dict
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise EncoderError(f"{path}: not a state dict (got {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(sd: dict, prefixes=("module.", "model.", "backbone.", "encoder.")) -> dict:
    for pre in prefixes:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def _load_into(make: Callable[[], nn.Module], sd: dict, path: Path, name: str, ignore=()) -> nn.Module:
    """Build ``make()`` without initialising (meta device) and assign ``sd``; strict except ``ignore`` regexes."""
    sd = {k: v for k, v in sd.items() if not any(re.fullmatch(p, k) for p in ignore)}
    with torch.device("meta"):
        model = make()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise EncoderError(
            f"{path} does not fit encoder '{name}': {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise EncoderError(f"{path} does not fit encoder '{name}': {line}") from None
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):  # non-persistent buffers
        real = make()
        real.load_state_dict(sd, strict=True)
        model = real
    return model.float().eval()

