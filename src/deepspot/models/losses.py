"""Losses on (B, G) predictions vs targets. Pearson is per gene across the batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between each spot's predicted and true vector."""
    return 1.0 - F.cosine_similarity(pred, target, dim=1, eps=1e-8).mean()


def pearson(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - mean over genes of the Pearson correlation across the spots of the batch."""
    p = pred - pred.mean(dim=0, keepdim=True)
    t = target - target.mean(dim=0, keepdim=True)
    r = (p * t).sum(dim=0) / (p.norm(dim=0) * t.norm(dim=0) + eps)
    return 1.0 - r.mean()


def poisson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Poisson NLL with the raw output as log-rate (exp applied once)."""
    return F.poisson_nll_loss(pred, target, log_input=True, full=False)


def mse_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return mse(pred, target) + cosine(pred, target)


def mse_pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return mse(pred, target) + pearson(pred, target)


# Plain module-level functions (not lambdas), so a module holding one pickles (DDP spawn, Ray).
LOSSES = {
    "mse": mse,
    "cos": cosine,
    "mse_cos": mse_cosine,
    "pearson": pearson,
    "mse_pearson": mse_pearson,
    "poisson": poisson,
}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
