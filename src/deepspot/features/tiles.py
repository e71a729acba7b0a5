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
import torch.nn.functional as F


def spot_boxes(centers: np.ndarray, tile_px: float) -> np.ndarray:
    """Level-0 boxes (x0, y0, w, h), int64 (N,4), of side ``tile_px`` centred on (x, y) centres (N,2)."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    side = max(1, int(round(tile_px)))
    x0 = np.floor(centers[:, 0] - side / 2.0 + 0.5).astype(np.int64)
    y0 = np.floor(centers[:, 1] - side / 2.0 + 0.5).astype(np.int64)
    return np.stack([x0, y0, np.full_like(x0, side), np.full_like(x0, side)], axis=1)


def read_size(tile_px: float, out_size: int, n_sub: int) -> int:
    """Pixels per side to read a spot box at: native resolution, capped at what the crops need."""
    need = out_size * max(1, n_sub)
    return int(min(need, max(1, round(tile_px))))


def resize(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B,H,W,3) -> uint8 (B,size,size,3), bilinear with antialias."""
    if tiles.shape[1] == size and tiles.shape[2] == size:
        return tiles
    x = tiles.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def cut_subspots(crop: torch.Tensor, n: int) -> torch.Tensor:
    """Cut one spot crop uint8 (H,W,3) into an n×n grid, row-major: (n*n, H//n, W//n, 3).

    Edges are split with integer bounds ``round(i*H/n)`` (:func:`region_bounds`) and each square is then
    resized to a common size, so no pixel is dropped when H is not divisible by n.
    """
    h, w = crop.shape[:2]
    ys, xs = region_bounds(h, n), region_bounds(w, n)
    side = max(1, min(h, w) // n)
    parts = [resize(crop[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].unsqueeze(0), side)[0]
             for i in range(n) for j in range(n)]
    return torch.stack(parts)


def make_crops(region: np.ndarray, out_size: int, n_sub: int) -> torch.Tensor:
    """One spot's crops from its box read: uint8 (1 + n_sub², out, out, 3), spot first."""
    region = np.ascontiguousarray(region)
    t = torch.from_numpy(region if region.flags.writeable else region.copy())
    spot = resize(t.unsqueeze(0), out_size)
    if n_sub <= 0:
        return spot
    subs = resize(cut_subspots(t, n_sub), out_size)
    return torch.cat([spot, subs], dim=0)


def region_bounds(size: int, n: int) -> list[int]:
    """Integer edges ``round(i*size/n)`` of an n-way split: the rule ``cut_subspots`` and ``pool_regions`` share."""
    return [round(i * size / n) for i in range(n + 1)]


def pool_regions(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Fast-mode sub-spot features: mean of a (B,h,w,d) token/feature map over an n×n grid of regions,
    row-major like :func:`cut_subspots` -> (B, n*n, d). Regions follow :func:`region_bounds`."""
    b, h, w, d = tokens.shape
    if h < n or w < n:
        raise ValueError(f"a {h}x{w} token grid cannot be split into {n}x{n} sub-spots")
    ys, xs = region_bounds(h, n), region_bounds(w, n)
    parts = [tokens[:, ys[i]:ys[i + 1], xs[j]:xs[j + 1]].mean(dim=(1, 2)) for i in range(n) for j in range(n)]
    return torch.stack(parts, dim=1)
