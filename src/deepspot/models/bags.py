"""Assemble bags (spot, sub-spots, neighbours) from per-spot feature tables by indexing, and predict
them in chunks.

Neighbour features are the neighbours' own spot features, looked up, never re-encoded; at prediction a
DeepSpot's phi of a spot is computed once per chunk and reused in every bag the spot is a neighbour in
(:meth:`~deepspot.models.deepsets.DeepSpot.forward_shared`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepspot.models.deepsets import DeepSpot


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
def iter_predictions(model: torch.nn.Module, source, neighbor_idx, neighbor_mask, batch_size: int = 512,
                     device="cpu"):
    """Predict spots in order, a chunk at a time: yields (start, (B, G) float32 numpy).

    ``source`` is a feature source (``len``, ``spot_rows(rows)``, ``subspot_range(a, b)``): features in
    memory (:class:`~deepspot.features.store.Features`) or read lazily from a store
    (:class:`~deepspot.features.store.StoredFeatures`). A chunk loads the spot features of its spots and
    of their neighbours (looked up, never re-encoded) and its own sub-spot features, so memory is bounded
    by ``batch_size`` whatever the number of spots. neighbor_idx/neighbor_mask: (N,K) into the same N.
    """
    model.eval().to(device)
    n = len(source)
    nidx = np.zeros((n, 0), np.int64) if neighbor_idx is None else np.asarray(neighbor_idx, dtype=np.int64)
    nmask = np.zeros(nidx.shape, bool) if neighbor_mask is None else np.asarray(neighbor_mask, dtype=bool)
    shared = isinstance(model, DeepSpot) and model.shares_phi()
    use_sub = getattr(model, "use_subspots", True)
    for a in range(0, n, batch_size):
        b = min(a + batch_size, n)
        own = np.arange(a, b)
        ki, km = nidx[a:b], nmask[a:b]
        need = np.unique(np.concatenate([own, ki[km]]))
        feats = torch.from_numpy(source.spot_rows(need)).to(device)
        self_pos = torch.from_numpy(np.searchsorted(need, own))
        nbr_pos = torch.from_numpy(np.minimum(np.searchsorted(need, ki), len(need) - 1))  # padding: any row
        nbr_mask = torch.from_numpy(km).to(device)
        sub = source.subspot_range(a, b) if use_sub else None
        sub = None if sub is None else torch.from_numpy(sub).to(device)
        sub_mask = None if sub is None else torch.ones(sub.shape[:2], dtype=torch.bool, device=device)
        if shared:
            out = model.forward_shared(feats, self_pos, sub, sub_mask, nbr_pos, nbr_mask)
        else:
            inputs = {"spot": feats[self_pos], "neighbors": feats[nbr_pos], "neighbor_mask": nbr_mask}
            if sub is not None:
                inputs.update(subspots=sub, subspot_mask=sub_mask)
            out = model(**inputs)
        yield a, out.float().cpu().numpy()


def predict_bags(model: torch.nn.Module, bags: Bags, batch_size: int = 512, device="cpu") -> np.ndarray:
    """Batched model prediction over all spots of in-memory bags: (N, G) float32."""
    from deepspot.features.store import Features

    source = Features(bags.spot.numpy(), None if bags.subspot is None else bags.subspot.numpy())
    out = [p for _, p in iter_predictions(model, source, bags.neighbor_idx.numpy(), bags.neighbor_mask.numpy(),
                                          batch_size=batch_size, device=device)]
    if not out:
        return np.zeros((0, getattr(model, "n_genes", 0)), dtype=np.float32)
    return np.concatenate(out)
