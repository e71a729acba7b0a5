"""deepspot: predict spatial gene expression from H&E histology.

    import deepspot as ds
    model = ds.load_model("model/")                 # or ds.train(adata, image=...)
    pred = model.predict_spots(adata, "HE.tif")     # AnnData, same spots as adata
    ds.pl.spatial(pred, genes=["EPCAM"])

Public names: :func:`load_model`, :class:`Model`, :func:`train`, ``read`` (slide and spatial readers),
``pl`` (plots), ``datasets`` (bundled example data), ``settings`` (the process-wide run settings:
``progress``, ``cache_dir``, ``num_workers``, ``device``, ``autocast_dtype``; ``ds.settings.override(...)``
for a block), the typed requests (``PredictRequest`` …) and the contract types of :mod:`deepspot.config`.
They are imported on first use, so ``import deepspot`` is cheap and changes no global state (the
matplotlib backend included).

Stages (one sub-package each, lowest first): ``config``; ``io``, ``geometry``; ``features``; ``models``;
``training``, ``inference``; ``evaluation``; ``api``; ``cli``. ``plotting`` uses only ``config`` and ``io``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("deepspot.api", "load_model"),
    "Model": ("deepspot.api", "Model"),
    "train": ("deepspot.api", "train"),
    "ModelConfig": ("deepspot.config", "ModelConfig"),
    "SpotGeometry": ("deepspot.config", "SpotGeometry"),
    "CellGeometry": ("deepspot.config", "CellGeometry"),
    "GridSpec": ("deepspot.config", "GridSpec"),
    "geometry_preset": ("deepspot.config", "geometry_preset"),
    "Scaler": ("deepspot.config", "Scaler"),
    "settings": ("deepspot.config.runtime", "settings"),
    "PredictRequest": ("deepspot.config.requests", "PredictRequest"),
    "ScoreRequest": ("deepspot.config.requests", "ScoreRequest"),
    "CohortRequest": ("deepspot.config.requests", "CohortRequest"),
    "TrainRequest": ("deepspot.config.requests", "TrainRequest"),
    "TrainJob": ("deepspot.training.request", "TrainJob"),
    "read": ("deepspot.io.read", None),
    "pl": ("deepspot.plotting", None),
    "datasets": ("deepspot.io.datasets", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'deepspot' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
