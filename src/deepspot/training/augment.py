"""Training on augmented views of the crops (the 8 dihedral views, HED stain jitter).

Features are precomputed, so an augmented copy of a training spot is a row of features encoded from
its crops seen as that view (:mod:`deepspot.features.views`), with the spot's own targets. The stacked
bags hold the plain features first (rows 0..N-1: the validation spots and, without stain jitter, view 0
of the training spots) and then one block of N rows per augmented view; a spot's neighbours are looked
up in its own block, so a bag is always one coherent view of the tissue. Validation always reads the
plain rows: early stopping and the stored reliability see the crops as they are.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from deepspot.models.bags import Bags


def views_of(n_views: int, stain_sigma: float) -> list[tuple[int, float]]:
    """The (view, stain sigma) copies a training spot is trained on: views 0..n_views-1 (dihedral order),
    each with the stain jitter when ``stain_sigma`` > 0."""
    if not 1 <= int(n_views) <= 8:
        raise ValueError(f"augment_views must be in 1..8, got {n_views}")
    return [(v, float(stain_sigma)) for v in range(int(n_views))]


def stack_views(plain: Bags, views: Sequence[Bags]) -> Bags:
    """One Bags of ``plain`` followed by every bag set of ``views`` (each over the same N spots, in the same
    order), neighbour indices shifted into their own block."""
    n = len(plain)
    blocks = [plain, *views]
    for b in blocks:
        if len(b) != n:
            raise ValueError(f"a view has {len(b)} spots, the plain features {n}")
    sub = None if any(b.subspot is None for b in blocks) else np.concatenate([b.subspot.numpy() for b in blocks])
    return Bags.from_numpy(np.concatenate([b.spot.numpy() for b in blocks]), sub,
                           np.concatenate([b.neighbor_idx.numpy() + k * n for k, b in enumerate(blocks)]),
                           np.concatenate([b.neighbor_mask.numpy() for b in blocks]))


def augmented_rows(train_idx: np.ndarray, n: int, copies: Sequence[tuple[int, float]]) -> np.ndarray:
    """Training rows of the stacked bags: view 0 without jitter is the plain block itself; every other copy
    k (1-based block) adds ``train_idx + k n``."""
    train_idx = np.asarray(train_idx, dtype=np.int64)
    rows = [train_idx] if (0, 0.0) in [(v, float(s)) for v, s in copies] else []
    k = 0
    for v, s in copies:
        if (v, float(s)) == (0, 0.0):
            continue
        k += 1
        rows.append(train_idx + k * n)
    return np.concatenate(rows)


def augment(plain: Bags, targets: np.ndarray, train_idx: np.ndarray, copies: Sequence[tuple[int, float]],
            view_bags: Callable[[int, float], Bags]) -> tuple[Bags, np.ndarray, np.ndarray]:
    """(stacked bags, tiled targets, training rows) for ``copies``; ``view_bags(view, sigma)`` gives the
    bags of one copy (same spots and order as ``plain``)."""
    extra = [view_bags(v, s) for v, s in copies if (v, float(s)) != (0, 0.0)]
    n = len(plain)
    bags = stack_views(plain, extra)
    y = np.concatenate([np.asarray(targets)] * (1 + len(extra)))
    return bags, y, augmented_rows(train_idx, n, copies)


__all__ = ["augment", "augmented_rows", "stack_views", "views_of"]
