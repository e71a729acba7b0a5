"""The encoder registry: one :class:`EncoderSpec` per name, looked up by :func:`get_spec`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from deepspot.config import EXTERNAL_ENCODER


class EncoderError(Exception):
    """A user-facing, one-line problem with an encoder (unknown name, missing or bad weights)."""


@dataclass
class EncoderSpec:
    """One registry entry.

    ``builder(path)`` builds the architecture and loads its weights from ``path``
    (``None``: look in the default places, raising :class:`EncoderError` when absent).
    It returns a module whose ``forward`` maps a preprocessed ``(B,3,S,S)`` batch to
    ``(B, dim)`` features. ``arch()``, when given, builds the same module with random
    weights (``load_encoder(..., random_init=True)``).

    ``licence`` and ``gated`` (the weights need an accepted licence on their hub page before download) are
    shown by ``deepspot encoders``, with ``output``: how the features are read off the model.
    """

    name: str
    dim: int
    input_size: int
    mean: tuple
    std: tuple
    builder: Callable[[Path | None], nn.Module]
    source: str
    needs_download: bool
    arch: Callable[[], nn.Module] | None = None
    hf_repo: str | None = None
    files: tuple[str, ...] = field(default_factory=tuple)
    licence: str = ""
    gated: bool = False
    output: str = ""


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, overwrite: bool = False) -> None:
    """Add an encoder to the registry (``overwrite=True`` to replace one with the same name)."""
    if spec.name in _REGISTRY and not overwrite:
        raise EncoderError(f"encoder '{spec.name}' is already registered")
    if len(spec.mean) != 3 or len(spec.std) != 3:
        raise EncoderError(f"encoder '{spec.name}': mean and std need 3 values (RGB)")
    _REGISTRY[spec.name] = spec


def unregister_encoder(name: str) -> EncoderSpec | None:
    """Remove encoder ``name`` from the registry; returns its spec (None if it was not registered)."""
    return _REGISTRY.pop(name, None)


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    key = name.strip().lower()
    if key == EXTERNAL_ENCODER:
        raise EncoderError(f"encoder '{EXTERNAL_ENCODER}': this model was converted with --feature-dim for features "
                           f"made outside deepspot, so deepspot has no image encoder for it and cannot predict from "
                           f"a slide; compute the features yourself and call Model.predict_features, or convert it "
                           f"again with --encoder NAME")
    if key not in _REGISTRY:
        raise EncoderError(f"unknown encoder '{name}'; available: {', '.join(list_encoders())}")
    return _REGISTRY[key]
