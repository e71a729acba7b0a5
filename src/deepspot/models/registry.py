"""Model kinds by name (as stored in checkpoint configs): name -> nn.Module class."""
from __future__ import annotations

from torch import nn

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
    from deepspot.models.deepsets import DeepSpot

    register_model("deepspot", DeepSpot)
    from deepspot.models.cells import DeepCell, PooledDeepSpot2Cell
    from deepspot.models.spot2cell import DeepSpot2Cell
    _MODELS.update({"deepcell": DeepCell, "deepspot2cell": DeepSpot2Cell, "deepspot2cell-pooled": PooledDeepSpot2Cell})


_register_builtin()
