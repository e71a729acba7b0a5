"""Assemble bags (spot, sub-spots, neighbours) from per-spot feature tables by indexing.

Neighbour features are the neighbours' own spot features, looked up, never re-encoded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Bags:
    """Feature tables for N spots.

    spot (N,d); subspot (N,S,d) or None; neighbor_idx (N,K) int64 into the same N;
    neighbor_mask (N,K) bool.
    """

    spot: torch.Tensor
    subspot: torch.Tensor | None
    neighbor_idx: torch.Tensor
    neighbor_mask: torch.Tensor

    @classmethod
    def from_numpy(cls, spot, subspot, neighbor_idx, neighbor_mask) -> "Bags":
        t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
        idx = t(neighbor_idx) if neighbor_idx is not None else torch.zeros((len(spot), 0), dtype=torch.long)
        mask = t(neighbor_mask) if neighbor_mask is not None else torch.zeros((len(spot), 0), dtype=torch.bool)
        return cls(t(spot).float(), None if subspot is None else t(subspot).float(), idx.long(), mask.bool())

    def __len__(self) -> int:
        return int(self.spot.shape[0])

    def batch(self, ix: torch.Tensor) -> dict:
        """Model inputs for spots ``ix`` (B,): spot (B,d), subspots (B,S,d), subspot_mask (B,S),
        neighbors (B,K,d), neighbor_mask (B,K)."""
        out = {"spot": self.spot[ix]}
        if self.subspot is not None:
            sub = self.subspot[ix]
            out["subspots"] = sub
            out["subspot_mask"] = torch.ones(sub.shape[:2], dtype=torch.bool)
        nidx = self.neighbor_idx[ix]
        out["neighbors"] = self.spot[nidx]  # (B,K,d)
        out["neighbor_mask"] = self.neighbor_mask[ix]
        return out


@torch.no_grad()
def predict_bags(model: torch.nn.Module, bags: Bags, batch_size: int = 4096, device="cpu") -> np.ndarray:
    """Batched model prediction over all spots: (N, G) float32."""
    model.eval().to(device)
    out = []
    for start in range(0, len(bags), batch_size):
        ix = torch.arange(start, min(start + batch_size, len(bags)))
        inputs = {k: v.to(device) for k, v in bags.batch(ix).items()}
        out.append(model(**inputs).float().cpu())
    if not out:
        return np.zeros((0, getattr(model, "n_genes", 0)), dtype=np.float32)
    return torch.cat(out).numpy()
