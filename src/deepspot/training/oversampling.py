"""Class balance for training: Leiden clusters of the training spots, each resampled to the largest.

Done on the training split only (never on validation or test spots), on the training targets
(log-normalised expression): PCA -> kNN graph -> Leiden (scanpy + leidenalg).

Default: off. Oversampling repeats the spots of small clusters (up to ~k× for k clusters), which
makes an epoch k times longer and, on a few hundred spots, lets the model memorise the repeated
rare spots; the metric we report (per-gene Pearson over all held-out spots) weights every spot
equally, so nothing asks for re-weighting by default. It is a switch (``oversample=True``) for
data sets with rare but important niches; see docs/evaluation.md for its effect on HER2ST.
"""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import scanpy as sc

log = logging.getLogger(__name__)


def leiden_clusters(y: np.ndarray, n_pcs: int = 30, n_neighbors: int = 15, resolution: float = 1.0,
                    seed: int = 2024) -> np.ndarray:
    """Leiden cluster label (int, 0..k-1) of each row of ``y`` (N, G) targets: PCA -> neighbours -> Leiden."""
    y = np.asarray(y, dtype=np.float32)
    n = len(y)
    if n < 3:
        return np.zeros(n, dtype=np.int64)
    a = ad.AnnData(X=y)
    k = int(max(1, min(n_pcs, n - 1, y.shape[1] - 1)))
    sc.pp.pca(a, n_comps=k, random_state=seed, svd_solver="arpack" if k < min(a.shape) - 1 else "full")
    # Gaussian-kernel connectivities: the same kNN graph idea as the UMAP kernel without its numba compile
    sc.pp.neighbors(a, n_neighbors=int(min(n_neighbors, n - 1)), n_pcs=k, random_state=seed, method="gauss")
    sc.tl.leiden(a, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return a.obs["leiden"].astype(int).to_numpy()


def oversample_clusters(labels: np.ndarray, seed: int = 2024) -> np.ndarray:
    """Positions (into ``labels``) where every cluster is brought to the size of the largest: each cluster
    keeps all its members plus members drawn at random with replacement to fill the gap. Sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    uniq, counts = np.unique(labels, return_counts=True)
    target = int(counts.max()) if len(counts) else 0
    out = [np.arange(len(labels))]
    for c, n in zip(uniq, counts):
        members = np.flatnonzero(labels == c)
        if n < target:
            out.append(rng.choice(members, size=target - n, replace=True))
    return np.sort(np.concatenate(out))


def balanced_index(train_idx: np.ndarray, targets: np.ndarray, seed: int = 2024, resolution: float = 1.0,
                   n_pcs: int = 30, n_neighbors: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Training indices with Leiden-cluster oversampling: (expanded train indices, cluster label of each
    original training spot). ``targets`` is the full (N, G) table; only rows ``train_idx`` are used."""
    train_idx = np.asarray(train_idx)
    labels = leiden_clusters(targets[train_idx], n_pcs=n_pcs, n_neighbors=n_neighbors, resolution=resolution,
                             seed=seed)
    pos = oversample_clusters(labels, seed=seed)
    sizes = np.bincount(labels)
    log.info("oversampling: %d Leiden clusters (sizes %s) -> %d training spots", len(sizes), sizes.tolist(),
             len(pos))
    return train_idx[pos], labels
