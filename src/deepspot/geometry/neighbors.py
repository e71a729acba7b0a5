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


class LatticeError(ValueError):
    """Positions that do not lie on one square or hex lattice."""


def lattice_coords(points: np.ndarray, max_residual: float = 0.3) -> tuple[np.ndarray, np.ndarray, str, float]:
    """Array coordinates of spots from their positions alone: fit the square or hex lattice they lie on.

    points: (N, 2) x, y (any unit). The two lattice vectors are the mean nearest-neighbour offsets of the
    two (square) or three (hex) directions; an affine fit on the rounded coordinates then absorbs rotation
    and a pitch that drifts across the slide. Hex lattices get Visium's convention (``array_col`` steps 2
    along a row, rows offset by 1), so :func:`array_neighbors` gives the same neighbours as on real
    array coordinates. Returns (array_row, array_col, layout 'square' | 'hex', pitch in point units);
    raises :class:`LatticeError` when a spot lies more than ``max_residual`` lattice steps off the fit.
    """
    xy = np.asarray(points, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) < 3:
        raise LatticeError(f"need >= 3 (x, y) positions to fit a lattice, got shape {xy.shape}")
    tree = cKDTree(xy)
    d, _ = tree.query(xy, k=2)
    pitch = float(np.median(d[:, 1]))
    if not pitch > 0:
        raise LatticeError("positions coincide; cannot fit a lattice")
    pairs = tree.query_pairs(1.25 * pitch, output_type="ndarray")
    vec = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    ang = np.degrees(np.arctan2(vec[:, 1], vec[:, 0])) % 180.0
    # hex directions coincide modulo 60 degrees, square ones modulo 90
    conc = {p: np.abs(np.mean(np.exp(2j * np.pi * ang / p))) for p in (60.0, 90.0)}
    layout = "hex" if conc[60.0] > conc[90.0] else "square"
    period = 60.0 if layout == "hex" else 90.0
    c = np.degrees(np.angle(np.mean(np.exp(2j * np.pi * ang / period)))) * period / 360.0

    def direction(a0: float, flip_axis: int) -> np.ndarray:
        near = np.abs((ang - a0 + 90.0) % 180.0 - 90.0) < period / 4
        if not near.any():
            raise LatticeError(f"no neighbour pairs along {a0:.0f} degrees; positions are not a {layout} lattice")
        v = vec[near]
        v = v * np.where(v[:, flip_axis] < 0, -1.0, 1.0)[:, None]
        return v.mean(axis=0)

    b1 = direction(c, 0)  # the direction nearest horizontal, pointing +x
    b2 = direction(c + period, 1)  # 60 (hex) or 90 (square) degrees on, pointing +y
    basis = np.stack([b1, b2], axis=1)  # columns: lattice vectors
    uv = np.rint(np.linalg.solve(basis, (xy - xy[0]).T).T)
    for _ in range(3):  # refine: affine least squares on the integer coordinates
        design = np.column_stack([uv, np.ones(len(uv))])
        coef, *_ = np.linalg.lstsq(design, xy, rcond=None)
        frac = np.linalg.solve(coef[:2].T, (xy - coef[2]).T).T
        uv = np.rint(frac)
    worst = float(np.abs(frac - uv).max())
    if worst > max_residual:
        raise LatticeError(f"positions are not on a {layout} lattice (a spot lies {worst:.2f} steps off it)")
    if len(np.unique(uv, axis=0)) != len(uv):
        raise LatticeError(f"two spots fall on one {layout} lattice site; positions are not one spot grid")
    u, v = uv[:, 0].astype(np.int64), uv[:, 1].astype(np.int64)
    row, col = (v, 2 * u + v) if layout == "hex" else (v, u)
    return row - row.min(), col - col.min(), layout, float(np.linalg.norm(coef[0]))
