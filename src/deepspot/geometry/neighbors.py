"""Neighbour search with KD-trees (never O(N²) Python loops).

All functions return a padded index array ``idx (N, K)`` (int64, padding = 0)
and a boolean ``mask (N, K)`` (True = real neighbour); a point is never its own
neighbour.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.spatial import cKDTree


def _pad_pairs(rows: np.ndarray, cols: np.ndarray, dist: np.ndarray, n: int, max_k: int | None):
    """Turn (row, col) pairs into padded (N,K) idx + mask, nearest first."""
    keep = rows != cols
    rows, cols, dist = rows[keep], cols[keep], dist[keep]
    order = np.lexsort((cols, dist, rows))  # by row, then distance, then index (deterministic)
    rows, cols = rows[order], cols[order]
    counts = np.bincount(rows, minlength=n)
    k = int(counts.max()) if len(counts) and counts.size else 0
    if max_k is not None:
        k = min(k, max_k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(rows)) - np.repeat(starts, counts)
    sel = rank < k
    idx = np.zeros((n, k), dtype=np.int64)
    mask = np.zeros((n, k), dtype=bool)
    idx[rows[sel], rank[sel]] = cols[sel]
    mask[rows[sel], rank[sel]] = True
    return idx, mask


def radius_neighbors(points: np.ndarray, radius: float, p: float = 2.0, max_k: int | None = None):
    """Neighbours within ``radius`` (Minkowski p-norm; p=inf for a box). points: (N, D)."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n == 0:
        return np.zeros((0, 0), np.int64), np.zeros((0, 0), bool)
    tree = cKDTree(points)
    # a tiny epsilon so that neighbours exactly at the radius are kept despite float error
    sdm = tree.sparse_distance_matrix(tree, radius * (1 + 1e-9) + 1e-12, p=p, output_type="coo_matrix")
    sdm = coo_matrix(sdm)
    rows = np.concatenate([sdm.row, np.arange(n)])  # the diagonal (distance 0) is dropped by coo
    cols = np.concatenate([sdm.col, np.arange(n)])
    dist = np.concatenate([sdm.data, np.zeros(n)])
    return _pad_pairs(rows.astype(np.int64), cols.astype(np.int64), dist, n, max_k)


def array_neighbors(array_row: np.ndarray, array_col: np.ndarray, radius: int = 1):
    """Visium-style context: spots whose array row AND column differ by at most ``radius``.

    On a Visium hex grid with radius 1 these are the four diagonal neighbours.
    """
    pts = np.stack([np.asarray(array_row), np.asarray(array_col)], axis=1)
    return radius_neighbors(pts, float(radius), p=np.inf)


def knn_neighbors(points: np.ndarray, k: int):
    """The k nearest other points (Euclidean). points: (N, D) -> idx, mask (N, min(k, N-1))."""
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    k_eff = max(0, min(k, n - 1))
    if k_eff == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), bool)
    dist, idx = cKDTree(points).query(points, k=k_eff + 1)
    idx = idx.reshape(n, -1)
    # drop self (normally column 0, but ties at distance 0 may put it elsewhere)
    is_self = idx == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k_eff)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    idx = idx[keep].reshape(n, k_eff)
    return idx.astype(np.int64), np.ones((n, k_eff), dtype=bool)
