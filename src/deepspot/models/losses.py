"""Losses on (B, G) predictions vs targets. Pearson is per gene across the batch.

Our defaults (``mse``, ``cos``, ``pearson``, ``mse_cos``, ``mse_pearson``, ``poisson``) are defined the way
the score is (per-gene Pearson across spots; a spot's cosine across its genes). The original DeepSpot code
defines some of them differently; those definitions are kept as named variants (``original_*``, plus
``l1`` and ``huber`` of its cell models) so that its training can be reproduced:

- ``original_cos``: 1 − mean over genes of the (uncentred) cosine across the batch (its ``dim=0``);
- ``original_pearson`` (spot model): 1 − mean over spots of the Pearson r across genes;
- ``original_mse_cos``: ``original_cos`` + MSE;
- ``original_mse_pearson`` (spot model): ``original_cos`` + 0.2·MSE (its "pearson" term is the cosine);
- ``original_cell_mse_pearson`` (cell model): 0.1·``original_cos`` + MSE;
- ``l1``, ``huber`` (δ = 1), ``original_l1_cos``, ``original_huber_cos`` (cell model: + ``original_cos``).

Its Poisson loss is not offered: it exponentiates the (log) target and passes it as the *input* of
``poisson_nll_loss`` with ``log_input=True``, i.e. exp is applied twice and prediction and target swap
roles; ``poisson`` here is the intended PoissonNLL with the output as log-rate.
"""
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


def original_cos(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original's cosine loss: 1 - mean over genes of the uncentred cosine across the batch (dim 0)."""
    return (1.0 - F.cosine_similarity(target, pred, dim=0, eps=1e-8)).mean()


def original_pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original spot model's Pearson loss: 1 - mean over spots of the Pearson r across genes."""
    t = target - target.mean(dim=1, keepdim=True)
    p = pred - pred.mean(dim=1, keepdim=True)
    return (1.0 - F.cosine_similarity(t, p, dim=1, eps=1e-8)).mean()


def original_mse_cos(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return original_cos(pred, target) + mse(pred, target)


def original_mse_pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original spot model's ``mse_pearson``: its cosine (per gene, dim 0) + 0.2·MSE."""
    return original_cos(pred, target) + 0.2 * mse(pred, target)


def original_cell_mse_pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original cell model's ``mse_pearson``: 0.1·its cosine (per gene, dim 0) + MSE."""
    return 0.1 * original_cos(pred, target) + mse(pred, target)


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def huber(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber loss with delta 1 (mean over all entries)."""
    return F.huber_loss(pred, target, delta=1.0)


def original_l1_cos(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return original_cos(pred, target) + l1(pred, target)


def original_huber_cos(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return original_cos(pred, target) + huber(pred, target)


# Plain module-level functions (not lambdas), so a module holding one pickles (DDP spawn, Ray).
LOSSES = {
    "mse": mse,
    "cos": cosine,
    "mse_cos": mse_cosine,
    "pearson": pearson,
    "mse_pearson": mse_pearson,
    "poisson": poisson,
    "l1": l1,
    "huber": huber,
    "original_cos": original_cos,
    "original_pearson": original_pearson,
    "original_mse_cos": original_mse_cos,
    "original_mse_pearson": original_mse_pearson,
    "original_cell_mse_pearson": original_cell_mse_pearson,
    "original_l1_cos": original_l1_cos,
    "original_huber_cos": original_huber_cos,
}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]
