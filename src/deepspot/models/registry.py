"""Model kinds by name (as stored in checkpoint configs): name -> nn.Module class.

The names are :data:`deepspot.config.MODEL_KINDS` (the one list a checkpoint's ``model`` field is checked
against); this module binds each to its class."""
from __future__ import annotations

from torch import nn

from deepspot.config import MODEL_KINDS

_MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str, cls: type[nn.Module]) -> None:
    _MODELS[name] = cls


def build(name: str, model_args: dict) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"unknown model kind {name!r}; available: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**model_args)


def available() -> list[str]:
    return sorted(_MODELS)


def _register_builtin() -> None:
    from deepspot.models.deepcell import DeepCell, PooledDeepSpot2Cell
    from deepspot.models.deepsets import DeepSpot
    from deepspot.models.spot2cell import DeepSpot2Cell

    # in MODEL_KINDS order: deepspot, deepcell, deepspot2cell, deepspot2cell-pooled
    for kind, cls in zip(MODEL_KINDS, (DeepSpot, DeepCell, DeepSpot2Cell, PooledDeepSpot2Cell), strict=True):
        register_model(kind, cls)


_register_builtin()
