"""DeepSpot2Cell as published: cells of a spot + the spot's own tile + its neighbour spot tiles.

The model (``phi`` ensembles with a median over heads, ``rho`` ensemble with a mean over heads, every
head its own MLP) is::

    phi_x(t)   = ReLU(Dropout(W2 ReLU(Dropout(W1 t))))          x in {cell, spot}; W1: d->d, W2: d->h
    ctx(spot)  = [phi_spot(spot tile), mean over the real neighbour spot tiles of phi_spot]   (2h)
    z(cell)    = [phi_cell(cell tile), ctx(its spot)]                                         (3h)
    spot       = rho(sum over the spot's real cells of z(cell))
    one cell   = rho(z(cell))
    rho(z)     = Dropout_out(ReLU(W4 ReLU(W3 Dropout(z))))      W3: 3h->3h, W4: 3h->G; Dropout_out p = 0.1

(a spot without neighbours gets 0 for their mean, as in the original). Trained on spot targets, it
predicts single cells with the same ``rho``. The original's final ``Dropout(0.1)`` on every rho head's
output is kept (``dropout_out``): a no-op at inference, but in training it is what lets the published
architecture learn per-cell expression when spots hold different numbers of cells (docs/cells.md).

Shapes: ``B`` spots, ``C`` cells per spot (padded, ``cell_mask`` True = real), ``K`` neighbour spots
(``neighbor_mask`` True = real), ``N`` cells, ``d`` feature dim, ``h`` hidden, ``G`` genes, ``E`` heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepspot.models.deepsets import EnsembleLinear, masked_mean


def per_head_linear(layer: EnsembleLinear, x: torch.Tensor) -> torch.Tensor:
    """Head e of ``layer`` applied to x[e]: (E, ..., in) -> (E, ..., out)."""
    e, lead = x.shape[0], x.shape[1:-1]
    flat = x.reshape(e, -1, x.shape[-1])
    out = torch.baddbmm(layer.bias.unsqueeze(1), flat, layer.weight)
    return out.reshape(e, *lead, layer.weight.shape[2])


class MLPPhi(nn.Module):
    """E heads of Linear d->d, Dropout, ReLU, Linear d->h, Dropout, ReLU; median over heads. (..., d) -> (..., h)."""

    def __init__(self, in_dim: int, hidden: int, n_ensemble: int, dropout: float):
        super().__init__()
        self.linear1 = EnsembleLinear(n_ensemble, in_dim, in_dim)
        self.linear2 = EnsembleLinear(n_ensemble, in_dim, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.dropout(self.linear1(x)))                      # (E, ..., d)
        z = torch.relu(self.dropout(per_head_linear(self.linear2, z)))     # (E, ..., h)
        return z.median(dim=0).values  # the lower middle value for an even E, as torch.median in the original


class MLPRho(nn.Module):
    """E heads of Dropout, Linear m->m, ReLU, Linear m->G, ReLU, Dropout(p_out); mean over heads.
    (..., m) -> (..., G)."""

    def __init__(self, in_dim: int, n_genes: int, n_ensemble: int, dropout: float, dropout_out: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear1 = EnsembleLinear(n_ensemble, in_dim, in_dim)
        self.linear2 = EnsembleLinear(n_ensemble, in_dim, n_genes)
        self.dropout_out = nn.Dropout(dropout_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.relu(self.linear1(self.dropout(x)))
        return self.dropout_out(torch.relu(per_head_linear(self.linear2, z))).mean(dim=0)


class DeepSpot2Cell(nn.Module):
    """The published DeepSpot2Cell (see the module docstring).

    forward(cells (B,C,d), cell_mask (B,C), spot (B,d), neighbors (B,K,d), neighbor_mask (B,K)) -> (B,G)
    spot predictions; :meth:`cell_forward` (cells (N,d) with their spot's tile and neighbour tiles) ->
    (N,G) per-cell predictions. Defaults are the original's (hidden 512, 10 heads, dropout 0.3, output
    dropout 0.1 on every rho head); ``n_ensemble_rho`` / ``dropout_rho`` set rho's apart from phi's.
    """

    def __init__(self, in_dim: int, n_genes: int, hidden: int = 512, n_ensemble: int = 10, dropout: float = 0.3,
                 n_ensemble_rho: int | None = None, dropout_rho: float | None = None, dropout_out: float = 0.1):
        super().__init__()
        self.in_dim, self.n_genes, self.hidden = int(in_dim), int(n_genes), int(hidden)
        self.n_ensemble, self.dropout_p = int(n_ensemble), float(dropout)
        self.n_ensemble_rho = self.n_ensemble if n_ensemble_rho is None else int(n_ensemble_rho)
        self.dropout_rho = self.dropout_p if dropout_rho is None else float(dropout_rho)
        self.dropout_out = float(dropout_out)
        self.phi_cell = MLPPhi(in_dim, hidden, n_ensemble, dropout)
        self.phi_spot = MLPPhi(in_dim, hidden, n_ensemble, dropout)
        self.rho = MLPRho(3 * hidden, n_genes, self.n_ensemble_rho, self.dropout_rho, self.dropout_out)
        self.use_neighbors = True

    def config(self) -> dict:
        out = dict(in_dim=self.in_dim, n_genes=self.n_genes, hidden=self.hidden, n_ensemble=self.n_ensemble,
                   dropout=self.dropout_p)
        if self.n_ensemble_rho != self.n_ensemble:
            out["n_ensemble_rho"] = self.n_ensemble_rho
        if self.dropout_rho != self.dropout_p:
            out["dropout_rho"] = self.dropout_rho
        if self.dropout_out != 0.1:  # the published value is the default (checkpoints without the key have it)
            out["dropout_out"] = self.dropout_out
        return out

    def context(self, spot: torch.Tensor, neighbors: torch.Tensor | None = None,
                neighbor_mask: torch.Tensor | None = None) -> torch.Tensor:
        """A spot's context (B, 2h): phi_spot of its own tile ++ the mean of phi_spot over its real neighbour
        tiles (0 without any)."""
        own = self.phi_spot(spot)
        if neighbors is None or neighbors.shape[1] == 0:
            nb = own.new_zeros(own.shape)
        else:
            if neighbor_mask is None:
                neighbor_mask = torch.ones(neighbors.shape[:2], dtype=torch.bool, device=neighbors.device)
            nb = masked_mean(self.phi_spot(neighbors), neighbor_mask.bool())
        return torch.cat([own, nb], dim=-1)

    def forward(self, cells: torch.Tensor, cell_mask: torch.Tensor, spot: torch.Tensor,
                neighbors: torch.Tensor | None = None, neighbor_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Spot predictions (B,G) from the spot's cells (B,C,d) (``cell_mask`` (B,C), True/1 = real), its own
        tile (B,d) and its neighbour spot tiles (B,K,d)."""
        w = cell_mask.to(cells.dtype).unsqueeze(-1)                           # (B,C,1)
        cell_sum = (self.phi_cell(cells) * w).sum(dim=1)                      # (B,h)
        ctx = self.context(spot, neighbors, neighbor_mask) * w.sum(dim=1)     # each real cell carries the context
        return self.rho(torch.cat([cell_sum, ctx], dim=-1))

    def cell_forward(self, cells: torch.Tensor, spot: torch.Tensor | None = None,
                     neighbors: torch.Tensor | None = None, neighbor_mask: torch.Tensor | None = None,
                     context: torch.Tensor | None = None) -> torch.Tensor:
        """Per-cell predictions (N,G): cells (N,d) with their spot's tile (N,d) and neighbour tiles (N,K,d), or
        with the spot context (N,2h) from :meth:`context` already computed."""
        if context is None:
            if spot is None:
                raise ValueError("a DeepSpot2Cell cell prediction needs the tile of the cell's spot")
            context = self.context(spot, neighbors, neighbor_mask)
        return self.rho(torch.cat([self.phi_cell(cells), context], dim=-1))

    def cell_predictor(self) -> "CellLevel":
        return CellLevel(self)


class CellLevel(nn.Module):
    """A view of a :class:`DeepSpot2Cell` whose forward is the per-cell prediction (inputs as
    :meth:`DeepSpot2Cell.cell_forward`), for the batched predictors."""

    def __init__(self, model: DeepSpot2Cell):
        super().__init__()
        self.model = model
        self.n_genes = model.n_genes

    def forward(self, cells, spot=None, neighbors=None, neighbor_mask=None, context=None) -> torch.Tensor:
        return self.model.cell_forward(cells, spot, neighbors, neighbor_mask, context)


def nearest_spot(cell_xy: np.ndarray, spot_xy: np.ndarray) -> np.ndarray:
    """(N,) index of the spot centre nearest each cell: the spot whose context a cell is predicted with."""
    from scipy.spatial import cKDTree

    if len(spot_xy) == 0:
        return np.full(len(cell_xy), -1, np.int64)
    return cKDTree(np.asarray(spot_xy, np.float64)).query(np.asarray(cell_xy, np.float64), k=1)[1].astype(np.int64)


def pack_members(cell_to_spot: np.ndarray, n_spots: int) -> tuple[np.ndarray, np.ndarray]:
    """Spots as padded rows of their cells: members (S,C) int64 index of each spot's cells (real ones first,
    in cell order) and member_mask (S,C) bool, C = the largest cell count (at least one masked slot).
    ``cell_to_spot`` (N,): the spot of each cell or -1 (in no spot). The one packing of cells into spots of
    both DeepSpot2Cell architectures (:class:`SpotContextBags`, ``training.fit_cells.SpotCellBags``)."""
    c2s = np.asarray(cell_to_spot, dtype=np.int64)
    inside = np.flatnonzero(c2s >= 0)
    order = inside[np.argsort(c2s[inside], kind="stable")]
    counts = np.bincount(c2s[order], minlength=n_spots)
    c = max(int(counts.max()) if len(counts) else 0, 1)
    rank = np.arange(len(order)) - np.repeat(np.cumsum(counts) - counts, counts)
    members = np.zeros((n_spots, c), dtype=np.int64)
    mask = np.zeros((n_spots, c), dtype=bool)
    members[c2s[order], rank] = order
    mask[c2s[order], rank] = True
    return members, mask


@dataclass
class SpotContextBags:
    """Cells, the spots they lie in and the spots' neighbour spots, as DeepSpot2Cell batches.

    cell_features (N,d); spot_features (S,d) the spot tiles; spot_neighbors (S,K) int64 into the S spots and
    spot_neighbor_mask (S,K) bool; members (S,C) int64 index of each spot's cells (real ones first) with
    member_mask (S,C); cell_spot (N,) the spot giving each cell its context (-1: none, not predictable).
    ``batch`` gives spot-level inputs; :meth:`cells_view` gives the per-cell bags.
    """

    cell_features: torch.Tensor
    spot_features: torch.Tensor
    spot_neighbors: torch.Tensor
    spot_neighbor_mask: torch.Tensor
    members: torch.Tensor
    member_mask: torch.Tensor
    cell_spot: torch.Tensor

    @classmethod
    def build(cls, cell_features, spot_features, spot_neighbors, spot_neighbor_mask, cell_to_spot,
              cell_context_spot=None) -> "SpotContextBags":
        """cell_to_spot (N,): the spot whose bag each cell is in, or -1; cell_context_spot (N,): the spot whose
        context a cell is predicted with (default: cell_to_spot)."""
        c2s = np.asarray(cell_to_spot, dtype=np.int64)
        members, mask = pack_members(c2s, len(spot_features))
        ctx = c2s if cell_context_spot is None else np.asarray(cell_context_spot, dtype=np.int64)
        t = torch.as_tensor
        return cls(t(np.asarray(cell_features, np.float32)), t(np.asarray(spot_features, np.float32)),
                   t(np.asarray(spot_neighbors, np.int64)), t(np.asarray(spot_neighbor_mask, bool)),
                   t(members), t(mask), t(ctx))

    def __len__(self) -> int:
        return int(self.members.shape[0])

    def _spot_inputs(self, s: torch.Tensor) -> dict:
        return {"spot": self.spot_features[s], "neighbors": self.spot_features[self.spot_neighbors[s]],
                "neighbor_mask": self.spot_neighbor_mask[s]}

    def batch(self, ix: torch.Tensor) -> dict:
        """Spot-level inputs for spots ``ix`` (B,): cells (B,C,d), cell_mask (B,C), spot (B,d), neighbors (B,K,d),
        neighbor_mask (B,K); C = the largest cell count in the batch."""
        mask = self.member_mask[ix]
        c = max(int(mask.sum(dim=1).max()) if len(mask) else 0, 1)
        return {"cells": self.cell_features[self.members[ix][:, :c]], "cell_mask": mask[:, :c],
                **self._spot_inputs(ix)}

    def cells_view(self) -> "CellContextBags":
        return CellContextBags(self)


@dataclass
class CellContextBags:
    """Per-cell DeepSpot2Cell inputs (cells with a context spot only): ``batch(ix)`` -> cells (M,d), spot (M,d),
    neighbors (M,K,d), neighbor_mask (M,K); ``index`` (M_total,) the cells these rows are."""

    bags: SpotContextBags

    def __post_init__(self):
        self.index = torch.nonzero(self.bags.cell_spot >= 0).reshape(-1)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def batch(self, ix: torch.Tensor) -> dict:
        cells = self.index[ix]
        return {"cells": self.bags.cell_features[cells], **self.bags._spot_inputs(self.bags.cell_spot[cells])}
