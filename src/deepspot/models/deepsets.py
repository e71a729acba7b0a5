"""Deep-sets models of the DeepSpot family.

All ensembles are held as stacked parameters so the E heads run as one
batched matmul; there is no Python loop over spots or heads.

Shapes: ``B`` spots in a batch, ``S`` sub-spots per spot, ``K`` neighbours per
spot, ``d`` encoder feature dim, ``h`` hidden size, ``E`` ensemble size,
``G`` genes.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import torch
from torch import nn

Context = Literal["spot", "spot_subspot", "spot_neighbors", "spot_subspot_neighbors"]
CONTEXTS: tuple[str, ...] = get_args(Context)  # the one list of context modes


def masked_sum(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over the bag axis. x: (B,N,h), mask: (B,N) bool (True = real) -> (B,h)."""
    if mask is None:
        return x.sum(dim=1)
    return (x * mask.unsqueeze(-1).to(x.dtype)).sum(dim=1)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Max over the bag axis; an empty bag pools to 0. x: (B,N,h), mask: (B,N) -> (B,h)."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], x.shape[2])
    if mask is None:
        return x.max(dim=1).values
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    out = filled.max(dim=1).values
    empty = ~mask.any(dim=1)
    return out.masked_fill(empty.unsqueeze(-1), 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the bag axis; an empty bag pools to 0. x: (B,N,h) -> (B,h)."""
    if mask is None:
        return x.mean(dim=1)
    n = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
    return masked_sum(x, mask) / n


POOLS = {"sum": masked_sum, "max": masked_max, "mean": masked_mean}


@functools.lru_cache(maxsize=None)
def median_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort on ``n`` wires, keeping only those the
    lower middle wire ``(n - 1) // 2`` depends on (27 for n = 10)."""
    p = 1
    while p < n:
        p *= 2
    comps, t = [], 1
    while t < p:  # Knuth's formulation of Batcher's network for p = 2^k wires
        k = t
        while k >= 1:
            for j in range(k % t, p - k, 2 * k):
                for i in range(min(k, p - j - k)):
                    if (i + j) // (2 * t) == (i + j + k) // (2 * t):
                        comps.append((i + j, i + j + k))
            k //= 2
        t *= 2
    comps = [(a, b) for a, b in comps if b < n]  # wires >= n would hold +inf: never exchanged
    need, keep = {(n - 1) // 2}, []
    for a, b in reversed(comps):
        if a in need or b in need:
            keep.append((a, b))
            need |= {a, b}
    return tuple(reversed(keep))


def lower_median(z: torch.Tensor, rows: int | None = 64) -> torch.Tensor:
    """``z.median(dim=-2).values`` of (..., E, h), the same numbers (the lower middle value for an even E;
    NaN wherever a NaN is among the E, as torch.median), by the min/max comparators of
    :func:`median_network` over blocks of ``rows`` rows that stay in cache (None: all at once, for GPUs):
    several times faster than ``torch.median`` on a CPU. Not for autograd (ties split the gradient)."""
    e, h = z.shape[-2:]
    flat = z.reshape(-1, e, h)
    net, mid = median_network(e), (e - 1) // 2
    out = flat.new_empty(flat.shape[0], h)
    step = rows or max(flat.shape[0], 1)
    for s in range(0, flat.shape[0], step):
        w = list(flat[s:s + step].unbind(1))
        for a, b in net:
            w[a], w[b] = torch.minimum(w[a], w[b]), torch.maximum(w[a], w[b])
        out[s:s + step] = w[mid]
    return out.reshape(*z.shape[:-2], h)


class EnsembleLinear(nn.Module):
    """E independent Linear(in -> out) layers applied to the same input.

    weight: (E, in, out), bias: (E, out). forward: (..., in) -> (E, ..., out); :meth:`heads_last`:
    (..., in) -> (..., E, out). Both run the E heads as ONE matmul, x (M, in) @ W (in, E*out) (the E
    weight matrices side by side), the numbers of E separate ``addmm``.
    """

    def __init__(self, n_ensemble: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_ensemble, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_ensemble, out_features))
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default init
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def heads_last(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., E, out): one (M, in) @ (in, E*out) matmul (the weight is re-laid out per call,
        a copy of E*in*out floats, small next to the matmul)."""
        e, i, o = self.weight.shape
        w = self.weight.permute(1, 0, 2).reshape(i, e * o)  # (in, E*out): head k in columns k*out..(k+1)*out
        out = torch.addmm(self.bias.reshape(e * o), x.reshape(-1, i), w)
        return out.reshape(*x.shape[:-1], e, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads_last(x).movedim(-2, 0).contiguous()


class Phi(nn.Module):
    """Linear -> Dropout -> ReLU, E heads, median over heads. (..., d) -> (..., h)."""

    def __init__(self, in_dim: int, hidden: int, n_ensemble: int, dropout: float):
        super().__init__()
        self.linear = EnsembleLinear(n_ensemble, in_dim, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.median takes the lower middle value for an even E, as the original does. ReLU is monotone, so
        # it commutes with the median: relu(median(z)) == median(relu(z)) exactly, for 1/E of the ReLU work.
        if self.training:  # dropout on the (E, ..., h) layout, so a seeded run draws the masks it always drew
            return torch.relu(self.dropout(self.linear(x)).median(dim=0).values)
        z = self.linear.heads_last(x)  # (..., E, h)
        if z.requires_grad:
            return torch.relu(z.median(dim=-2).values)
        return torch.relu(lower_median(z, rows=None if z.is_cuda else 64))


class Rho(nn.Module):
    """Dropout -> ReLU -> Linear, E heads, mean over heads. (B, m*h) -> (B, G)."""

    def __init__(self, in_dim: int, n_genes: int, n_ensemble: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = EnsembleLinear(n_ensemble, in_dim, n_genes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dropout(x))
        if self.training:
            return self.linear(x).mean(dim=0)
        # At eval dropout is the identity, so the mean of E linear heads is one linear map with
        # the mean weights: the same numbers for 1/E of the compute.
        return torch.addmm(self.linear.bias.mean(dim=0), x.reshape(-1, x.shape[-1]),
                           self.linear.weight.mean(dim=0)).reshape(*x.shape[:-1], -1)


class InputProjection(nn.Module):
    """A fixed (not trained) map of encoder features: standardise each of the d dims, then project on
    the top-k principal axes of the training spots (HEST-Bench's ridge does the same). (..., d) -> (..., k).

    Buffers ``mean`` (d,), ``scale`` (d,), ``weight`` (d,k) live in the state dict, so a checkpoint carries
    the projection it was trained with and prediction applies it unchanged.
    """

    def __init__(self, in_dim: int, k: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.register_buffer("weight", torch.eye(in_dim, k))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "InputProjection":
        """Fit on training spot features x (N, d); needs N > k."""
        x = torch.as_tensor(x, dtype=torch.float32)
        k = self.weight.shape[1]
        if x.shape[0] <= k:
            raise ValueError(f"an input projection to {k} dims needs more than {k} training spots, got {x.shape[0]}")
        mean, scale = x.mean(dim=0), x.std(dim=0)
        scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))
        z = (x - mean) / scale
        _, _, vh = torch.linalg.svd(z.double(), full_matrices=False)
        w = vh[:k].T.float()  # (d, k)
        # a fixed sign per axis (largest loading positive), so the same data always gives the same weights
        sign = torch.sign(w[w.abs().argmax(dim=0), torch.arange(k)])
        self.mean.copy_(mean), self.scale.copy_(scale), self.weight.copy_(w * torch.where(sign == 0, 1.0, sign))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale) @ self.weight


class DeepSpot(nn.Module):
    """Spot-level deep-sets model.

    forward(spot (B,d), subspots (B,S,d), subspot_mask (B,S), neighbors (B,K,d),
    neighbor_mask (B,K)) -> (B,G). Inputs a context mode does not use may be None.
    ``input_proj=k``: encoder features pass through a fixed :class:`InputProjection` (d -> k, fitted with
    :meth:`fit_input_projection` on the training spots) before phi; None: phi sees the raw features (the
    published models). The class defaults are the published architecture; the training defaults are in
    :mod:`deepspot.training.recipe`.
    """

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        hidden: int = 512,
        n_ensemble: int = 10,
        dropout: float = 0.3,
        context: Context = "spot_subspot_neighbors",
        subspot_pool: str = "sum",
        neighbor_pool: str = "max",
        input_proj: int | None = None,
        n_ensemble_rho: int | None = None,
        dropout_rho: float | None = None,
    ):
        super().__init__()
        if context not in CONTEXTS:
            raise ValueError(f"unknown context mode {context!r}; choose one of {', '.join(CONTEXTS)}")
        self.in_dim, self.n_genes, self.hidden = in_dim, n_genes, hidden
        self.n_ensemble, self.dropout_p, self.context = n_ensemble, dropout, context
        self.subspot_pool, self.neighbor_pool = subspot_pool, neighbor_pool
        self.use_subspots = "subspot" in context
        self.use_neighbors = "neighbors" in context
        for name, pool in (("subspot_pool", subspot_pool), ("neighbor_pool", neighbor_pool)):
            if pool not in POOLS:
                raise ValueError(f"unknown {name} {pool!r}; choose one of {', '.join(POOLS)}")
        m = 1 + int(self.use_subspots) + int(self.use_neighbors)
        self.input_proj = None if input_proj is None else int(input_proj)
        self.proj = None if input_proj is None else InputProjection(in_dim, self.input_proj)
        self.phi = Phi(in_dim if input_proj is None else self.input_proj, hidden, n_ensemble, dropout)
        # the original sizes and drops out phi and rho ensembles separately (n_ensemble_phi/_rho, p_phi/_rho)
        self.n_ensemble_rho = n_ensemble if n_ensemble_rho is None else int(n_ensemble_rho)
        self.dropout_rho = dropout if dropout_rho is None else float(dropout_rho)
        self.rho = Rho(hidden * m, n_genes, self.n_ensemble_rho, self.dropout_rho)

    def config(self) -> dict:
        return dict(
            in_dim=self.in_dim, n_genes=self.n_genes, hidden=self.hidden, n_ensemble=self.n_ensemble,
            dropout=self.dropout_p, context=self.context, subspot_pool=self.subspot_pool,
            neighbor_pool=self.neighbor_pool,
            **({} if self.input_proj is None else {"input_proj": self.input_proj}),
            **self._rho_config(),
        )

    def _rho_config(self) -> dict:
        """rho's ensemble size / dropout, stored only where they differ from phi's."""
        out = {}
        if self.n_ensemble_rho != self.n_ensemble:
            out["n_ensemble_rho"] = self.n_ensemble_rho
        if self.dropout_rho != self.dropout_p:
            out["dropout_rho"] = self.dropout_rho
        return out

    def fit_input_projection(self, spot_features) -> "DeepSpot":
        """Fit the input projection on training spot features (N, d); a no-op without ``input_proj``."""
        if self.proj is not None:
            self.proj.fit(spot_features)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features as phi sees them: (..., d) -> (..., k) through the input projection, if any."""
        return x if self.proj is None else self.proj(x)

    def embed(self, spot, subspots=None, subspot_mask=None, neighbors=None, neighbor_mask=None) -> torch.Tensor:
        """The pooled representation fed to rho: (B, m*h)."""
        parts = [self.phi(self.features(spot))]
        if self.use_subspots:
            if subspots is None:
                raise ValueError(f"context {self.context!r} needs sub-spot features")
            parts.append(POOLS[self.subspot_pool](self.phi(self.features(subspots)), subspot_mask))
        if self.use_neighbors:
            if neighbors is None:
                raise ValueError(f"context {self.context!r} needs neighbour features")
            parts.append(POOLS[self.neighbor_pool](self.phi(self.features(neighbors)), neighbor_mask))
        return torch.cat(parts, dim=-1)

    def forward(self, spot, subspots=None, subspot_mask=None, neighbors=None, neighbor_mask=None) -> torch.Tensor:
        return self.rho(self.embed(spot, subspots, subspot_mask, neighbors, neighbor_mask))

    def shares_phi(self) -> bool:
        """Whether :meth:`forward_shared` gives :meth:`forward`'s numbers: a DeepSpot (or a subclass keeping
        its embed/forward) in eval mode, where phi is applied per spot and has no dropout."""
        return (type(self).embed is DeepSpot.embed and type(self).forward is DeepSpot.forward
                and not self.training)

    def forward_shared(self, feats, self_pos, subspots=None, subspot_mask=None, neighbor_pos=None,
                       neighbor_mask=None) -> torch.Tensor:
        """:meth:`forward` with phi evaluated once per distinct spot of a chunk.

        feats (U,d): the features of the U distinct spots the chunk's bags use; self_pos (B,) and
        neighbor_pos (B,K): rows of ``feats`` for each bag's own spot and its neighbours; subspots
        (B,S,d), subspot_mask (B,S), neighbor_mask (B,K). -> (B,G). A spot that is the neighbour of
        many others has phi computed once (the gathered rows of phi(feats) are what :meth:`embed`
        would compute from gathered features).
        """
        p = self.phi(self.features(feats))
        parts = [p[self_pos]]
        if self.use_subspots:
            if subspots is None:
                raise ValueError(f"context {self.context!r} needs sub-spot features")
            parts.append(POOLS[self.subspot_pool](self.phi(self.features(subspots)), subspot_mask))
        if self.use_neighbors:
            parts.append(POOLS[self.neighbor_pool](p[neighbor_pos], neighbor_mask))
        return self.rho(torch.cat(parts, dim=-1))
