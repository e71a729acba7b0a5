"""The crop plan: which pixels each spot's crops come from.

One function cuts sub-spots for training and inference alike, so they always match.
A spot's box is read once; the spot crop and its n×n sub-spot crops are made from
that one read in memory. Neighbour crops are never read: neighbours reuse spot features.
In fast mode only the spot crop is encoded and its sub-spot features are the encoder's
patch tokens (ViT) or final feature map (CNN) pooled over the same n×n regions.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from deepspot.config import SUBSPOT_RULES, check_choice

# Bump when the way crops are cut or resampled changes: it is part of every feature-store key, so
# features made by older crop code are never silently reused.
CROP_VERSION = 2


def spot_boxes(centers: np.ndarray, tile_px) -> np.ndarray:
    """Level-0 boxes (x0, y0, w, h), int64 (N,4), of side ``tile_px`` centred on (x, y) centres (N,2).
    ``tile_px``: one side for every box, or one per box (N,) (cells cropped by their polygon's box)."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    side = np.broadcast_to(np.maximum(1, np.round(np.asarray(tile_px, np.float64))).astype(np.int64),
                           (len(centers),))
    x0 = np.floor(centers[:, 0] - side / 2.0 + 0.5).astype(np.int64)
    y0 = np.floor(centers[:, 1] - side / 2.0 + 0.5).astype(np.int64)
    return np.stack([x0, y0, side, side], axis=1)


def read_size(tile_px, out_size: int, n_sub: int, rule: str = "split"):
    """Pixels per side to read a spot box at: native resolution, capped at what the crops need
    (always native under the 'floor' rule, whose sub-spot squares are whole level-0 pixels). One int for one
    side, an int64 array for an array of sides."""
    native = np.maximum(1, np.round(np.asarray(tile_px, np.float64))).astype(np.int64)
    out = native if rule == "floor" else np.minimum(out_size * max(1, n_sub), native)
    return int(out) if out.ndim == 0 else out


def cell_crops(geometry, xy: np.ndarray, boxes: np.ndarray | None = None, mpp: float | None = None,
               source: str = "cells"):
    """The crop plan of cells under a :class:`~deepspot.config.CellGeometry`: (centres (N,2), side).

    'tile': each centroid ``xy`` with the one side ``cell_diameter`` (a float); 'bbox': each polygon's bounding
    box ``boxes`` (N,4: x0, y0, x1, y1 level-0 px) squared around the box centre, side (N,) = max(width,
    height, ``min_side``). A square box is then cropped exactly; crops of every size are resized to the
    encoder's input by the same code as spot crops (:func:`make_crops`)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if geometry.crop == "tile":
        return xy, geometry.tile_px(mpp)
    if boxes is None:
        raise ValueError(f"{source}: the cells are cropped by their polygon's bounding box (cell crop 'bbox'), "
                         f"but no polygons were given")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(b) != len(xy):
        raise ValueError(f"{source}: {len(b)} cell boxes for {len(xy)} cells")
    if not np.isfinite(b).all() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"{source}: cell boxes must be finite (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    centers = np.stack([(b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0], axis=1)
    side = np.maximum(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]), geometry.min_side_px(mpp))
    return centers, side


def _resize_box(img: Image.Image, size: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The ``box`` (x0, y0, x1, y1) of ``img`` resampled straight to size×size (PIL bilinear, which
    widens its filter when shrinking, i.e. antialiased): uint8 (size, size, 3)."""
    if box == (0, 0, img.width, img.height) and img.width == size and img.height == size:
        return np.asarray(img)
    part = img if box == (0, 0, img.width, img.height) else img.crop(box)  # no bleed across sub-spot edges
    return np.asarray(part.resize((size, size), Image.BILINEAR))


def make_crops(region: np.ndarray, out_size: int, n_sub: int, rule: str = "split") -> torch.Tensor:
    """One spot's crops from its box read: uint8 (1 + n_sub², out, out, 3), spot first, then the
    n×n sub-spots row-major. Each sub-spot square (edges from :func:`region_bounds`, so no pixel is
    dropped when the side is not divisible by n; or, ``rule='floor'``, the original's exact
    ``side // n`` squares from the corner, the remainder dropped) is resampled once, to ``out_size``."""
    region = np.ascontiguousarray(region, dtype=np.uint8)
    img = Image.fromarray(region, mode="RGB") if region.ndim == 3 else Image.fromarray(region).convert("RGB")
    h, w = region.shape[:2]
    crops = [_resize_box(img, out_size, (0, 0, w, h))]
    if n_sub > 0:
        ys, xs = subspot_bounds(h, n_sub, rule), subspot_bounds(w, n_sub, rule)
        crops += [_resize_box(img, out_size, (xs[j], ys[i], xs[j + 1], ys[i + 1]))
                  for i in range(n_sub) for j in range(n_sub)]
    return torch.from_numpy(np.stack(crops))


def subspot_bounds(size: int, n: int, rule: str = "split") -> list[int]:
    """Sub-spot edges along one side: :func:`region_bounds` ('split') or ``i * (size // n)`` ('floor')."""
    check_choice("sub-spot rule", rule, SUBSPOT_RULES)
    if rule == "floor":
        if size < n:
            raise ValueError(f"a {size}-px tile cannot be cut into {n}x{n} whole-pixel sub-spots")
        return [i * (size // n) for i in range(n + 1)]
    return region_bounds(size, n)


def region_bounds(size: int, n: int) -> list[int]:
    """Integer edges ``round(i*size/n)`` of an n-way split: the rule ``make_crops`` and ``pool_regions`` share."""
    return [round(i * size / n) for i in range(n + 1)]


def pool_regions(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Fast-mode sub-spot features: mean of a (B,h,w,d) token/feature map over an n×n grid of regions,
    row-major like :func:`make_crops` -> (B, n*n, d). Regions follow :func:`region_bounds`."""
    b, h, w, d = tokens.shape
    if h < n or w < n:
        raise ValueError(f"a {h}x{w} token grid cannot be split into {n}x{n} sub-spots")
    ys, xs = region_bounds(h, n), region_bounds(w, n)
    parts = [tokens[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(dim=(1, 2)) for i in range(n) for j in range(n)]
    return torch.stack(parts, dim=1)
