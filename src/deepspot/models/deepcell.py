"""Cell-level models: DeepCell (trained on cells) and PooledDeepSpot2Cell (``deepspot2cell-pooled``: a
DeepCell trained on spot counts by pooling its per-cell outputs). The published DeepSpot2Cell
architecture (``deepspot2cell``) is :mod:`deepspot.models.spot2cell`.

Both see a cell as the deep-sets bag the spot model uses: the cell's own tile
(side = the cell diameter) and the tiles of its neighbouring cells (k nearest or
within a radius, the rule stored in the checkpoint). The pieces — ensemble phi
(median), ensemble rho (mean) and masked pooling — are those of
:mod:`deepspot.models.deepsets`.

Shapes: ``N`` cells, ``B`` spots in a batch, ``C`` cells per spot (padded, with a
mask), ``K`` neighbours per cell, ``d`` feature dim, ``G`` genes.

Indexed inputs: with k = 45 neighbours a batch of cells touches each cell's tile
dozens of times, so the cell models also take ``table`` (U,d) — the features of the
U distinct cells of a batch — with ``cell_index`` and ``neighbor_index`` into it;
phi then runs once per distinct cell (:class:`CellBags` builds these batches). In
eval mode this gives the same numbers as gathered ``(B,K,d)`` neighbour features;
in training one dropout mask is shared by every use of a cell within a step.

Target space of PooledDeepSpot2Cell
-----------------------------------
Spot targets are ``log1p(normalize_total(summed counts, 1e4))``. A spot's counts are
the *sum* of its cells' counts, so the model aggregates where that sum happens:

``aggregate="sum"`` (default): the cell head outputs log-rates ``l_c`` (one per gene;
``exp(l_c)`` is a non-negative relative expression rate). The spot's rate is their
sum over the spot's real cells, and the spot prediction is that sum put through
the same transform as the targets::

    spot = log1p(1e4 * R / R.sum()),  R = sum_c exp(l_c)   (= log1p(1e4 * softmax_g(logsumexp_c l_c)))

so pooling is exact in count space (no Jensen gap) and the loss is the usual one on
the usual spot targets. A cell's expression is ``log1p(1e4 * softmax_g(l_c))`` — the
same space as the spot targets and DeepCell. Normalisation removes one scale per
spot, so a *mean* of rates would give the identical spot vector; that is why
``mean`` is defined in log space instead:

``aggregate="mean"``: the cell head outputs log1p-normalised expression directly and
the spot prediction is the masked mean over its cells (simple, but biased: the mean
of logs is not the log of the pooled counts).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepspot.config import CellGeometry
from deepspot.geometry.neighbors import knn_neighbors, radius_neighbors
from deepspot.models.deepsets import POOLS, DeepSpot

log = logging.getLogger(__name__)

CELL_CONTEXTS = ("cell", "cell_neighbors")
AGGREGATES = ("sum", "mean")


class DeepCell(DeepSpot):
    """Cell-level deep-sets model: phi(cell tile) ++ pool(phi(neighbour cell tiles)) -> rho -> (N, G).

    Published defaults: hidden 1024, dropout 0.2, ensemble 10. The inputs use the keys of
    :class:`deepspot.models.bags.Bags` so the same bags, trainer and predictor serve spots and
    cells: ``spot`` is the cell's own tile features (N,d), ``neighbors`` (N,K,d) its neighbour
    cells' tile features (looked up, never re-encoded), ``neighbor_mask`` (N,K).
    """

    def __init__(self, in_dim: int, n_genes: int, hidden: int = 1024, n_ensemble: int = 10, dropout: float = 0.2,
                 context: str = "cell_neighbors", neighbor_pool: str = "max", n_ensemble_rho: int | None = None,
                 dropout_rho: float | None = None):
        if context not in CELL_CONTEXTS:
            raise ValueError(f"unknown cell context {context!r}; choose one of {', '.join(CELL_CONTEXTS)}")
        if neighbor_pool not in POOLS:
            raise ValueError(f"unknown neighbour pool {neighbor_pool!r}; choose one of {', '.join(POOLS)}")
        super().__init__(in_dim, n_genes, hidden=hidden, n_ensemble=n_ensemble, dropout=dropout,
                         context="spot_neighbors" if context == "cell_neighbors" else "spot",
                         neighbor_pool=neighbor_pool, n_ensemble_rho=n_ensemble_rho, dropout_rho=dropout_rho)
        self.cell_context = context

    def config(self) -> dict:
        return dict(in_dim=self.in_dim, n_genes=self.n_genes, hidden=self.hidden, n_ensemble=self.n_ensemble,
                    dropout=self.dropout_p, context=self.cell_context, neighbor_pool=self.neighbor_pool,
                    **self._rho_config())

    def forward(self, spot=None, subspots=None, subspot_mask=None, neighbors=None, neighbor_mask=None,
                table=None, cell_index=None, neighbor_index=None) -> torch.Tensor:
        """Gathered inputs (``spot`` (M,d), ``neighbors`` (M,K,d), ``neighbor_mask``) or indexed inputs
        (``table`` (U,d), ``cell_index`` (M,), ``neighbor_index`` (M,K), ``neighbor_mask``) -> (M,G)."""
        if table is None:
            return super().forward(spot, neighbors=neighbors, neighbor_mask=neighbor_mask)
        z = self.phi(table)  # (U,h): once per distinct cell
        parts = [z[cell_index]]
        if self.use_neighbors:
            parts.append(POOLS[self.neighbor_pool](z[neighbor_index], neighbor_mask))
        return self.rho(torch.cat(parts, dim=-1))


@dataclass
class CellBags:
    """Feature table of N cells + each cell's neighbour cells, assembled into indexed batches.

    features (N,d) float; neighbor_idx (N,K) int64 into the same N; neighbor_mask (N,K) bool.
    """

    features: torch.Tensor
    neighbor_idx: torch.Tensor
    neighbor_mask: torch.Tensor

    @classmethod
    def from_numpy(cls, features, neighbor_idx, neighbor_mask) -> "CellBags":
        return cls(torch.as_tensor(np.asarray(features, dtype=np.float32)),
                   torch.as_tensor(np.asarray(neighbor_idx, dtype=np.int64)),
                   torch.as_tensor(np.asarray(neighbor_mask, dtype=bool)))

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def gather(self, cells: torch.Tensor) -> dict:
        """Indexed DeepCell inputs for cells ``cells`` (M,): table (U,d) of the distinct cells they and
        their neighbours are, cell_index (M,), neighbor_index (M,K), neighbor_mask (M,K)."""
        cells = torch.as_tensor(cells, dtype=torch.long)
        nidx = self.neighbor_idx[cells]
        uniq, inv = torch.unique(torch.cat([cells, nidx.reshape(-1)]), return_inverse=True)
        m = len(cells)
        return {"table": self.features[uniq], "cell_index": inv[:m], "neighbor_index": inv[m:].reshape(nidx.shape),
                "neighbor_mask": self.neighbor_mask[cells]}

    def batch(self, ix: torch.Tensor) -> dict:
        return self.gather(ix)


def cell_neighbors(geometry: CellGeometry, xy_px: np.ndarray, mpp: float | None = None):
    """Padded neighbour index (N,K) + mask (N,K) of cells at level-0 (x, y) px, by the geometry's rule."""
    xy_px = np.asarray(xy_px, dtype=np.float64)
    if geometry.neighbors == "knn":
        return knn_neighbors(xy_px, geometry.k)
    if geometry.neighbors == "radius":
        return radius_neighbors(xy_px, geometry.radius_px(mpp), max_k=geometry.max_neighbors)
    return np.zeros((len(xy_px), 0), np.int64), np.zeros((len(xy_px), 0), bool)


def cell_bags(features: np.ndarray, xy_px: np.ndarray, geometry: CellGeometry, mpp: float | None = None) -> CellBags:
    """Bags over cells: each cell's own tile features + its neighbours' (looked up by index)."""
    idx, mask = cell_neighbors(geometry, xy_px, mpp)
    if geometry.neighbors != "none" and len(xy_px) and mask.shape[1] == 0:
        log.warning("only %d cell(s): no neighbour context", len(xy_px))
    return CellBags.from_numpy(features, idx, mask)


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x))) over the bag axis of real elements. x: (B,C,G), mask: (B,C) -> (B,G).

    An empty bag gives a finite, meaningless value (callers replace it); its gradient stays finite.
    """
    low = torch.finfo(x.dtype).min
    return x.masked_fill(~mask.unsqueeze(-1), low).logsumexp(dim=1)


class PooledDeepSpot2Cell(nn.Module):
    """Per-cell DeepCell network trained through spot-level aggregation (model kind ``deepspot2cell-pooled``).

    forward(cells (B,C,d), cell_mask (B,C), neighbors (B,C,K,d), neighbor_mask (B,C,K)) -> (B,G) spot
    predictions in log1p-normalised space. :meth:`cell_expression` (and :meth:`cell_predictor`, a module
    with DeepCell's inputs) gives the per-cell expression (N,G) at prediction time. Padded cells
    (``cell_mask`` False) do not enter the spot aggregate.
    """

    def __init__(self, in_dim: int, n_genes: int, hidden: int = 1024, n_ensemble: int = 10, dropout: float = 0.2,
                 context: str = "cell_neighbors", neighbor_pool: str = "max", aggregate: str = "sum",
                 target_sum: float = 1e4):
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
        self.cell = DeepCell(in_dim, n_genes, hidden=hidden, n_ensemble=n_ensemble, dropout=dropout,
                             context=context, neighbor_pool=neighbor_pool)
        self.aggregate, self.target_sum = aggregate, float(target_sum)
        self.in_dim, self.n_genes = in_dim, n_genes
        self.use_neighbors = self.cell.use_neighbors

    def config(self) -> dict:
        return {**self.cell.config(), "aggregate": self.aggregate, "target_sum": self.target_sum}

    def cell_outputs(self, spot=None, neighbors=None, neighbor_mask=None, **indexed) -> torch.Tensor:
        """Raw per-cell head output (M,G): log-rates (sum) or log1p expression (mean). Inputs as DeepCell's."""
        return self.cell(spot, neighbors=neighbors, neighbor_mask=neighbor_mask, **indexed)

    def to_expression(self, out: torch.Tensor) -> torch.Tensor:
        """Raw head output -> log1p(normalize_total) expression, per row."""
        if self.aggregate == "sum":
            return torch.log1p(self.target_sum * torch.softmax(out, dim=-1))
        return out

    def cell_expression(self, spot=None, neighbors=None, neighbor_mask=None, **indexed) -> torch.Tensor:
        """Per-cell log1p-normalised expression (M,G); inputs as DeepCell's."""
        return self.to_expression(self.cell_outputs(spot, neighbors, neighbor_mask, **indexed))

    def pool_cells(self, out: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
        """Spot prediction (B,G) from raw per-cell outputs (B,C,G) of the real cells; empty spots give 0."""
        if self.aggregate == "sum":
            spot = self.to_expression(masked_logsumexp(out, cell_mask))
            return spot.masked_fill(~cell_mask.any(dim=1, keepdim=True), 0.0)
        return POOLS["mean"](out, cell_mask)

    def forward(self, cell_mask, cells=None, neighbors=None, neighbor_mask=None, table=None, cell_index=None,
                neighbor_index=None) -> torch.Tensor:
        """Spot predictions (B,G). Gathered inputs: cells (B,C,d), neighbors (B,C,K,d); or indexed inputs:
        table (U,d), cell_index (B,C), neighbor_index (B,C,K); with cell_mask (B,C), neighbor_mask (B,C,K)."""
        b, c = cell_mask.shape
        flat_mask = None if neighbor_mask is None else neighbor_mask.reshape(b * c, -1)
        if table is not None:
            out = self.cell_outputs(table=table, cell_index=cell_index.reshape(b * c),
                                    neighbor_index=neighbor_index.reshape(b * c, -1), neighbor_mask=flat_mask)
        else:
            if self.use_neighbors and neighbors is None:
                raise ValueError("context 'cell_neighbors' needs neighbour features")
            flat_nb = None if neighbors is None else neighbors.reshape(b * c, neighbors.shape[2], -1)
            out = self.cell_outputs(cells.reshape(b * c, -1), flat_nb, flat_mask)
        return self.pool_cells(out.reshape(b, c, -1), cell_mask)

    def cell_predictor(self) -> "CellExpression":
        return CellExpression(self)


class CellExpression(nn.Module):
    """A view of a PooledDeepSpot2Cell with DeepCell's inputs and per-cell expression as output,
    so the batched bag predictor serves both cell models."""

    def __init__(self, model: PooledDeepSpot2Cell):
        super().__init__()
        self.model = model
        self.n_genes = model.n_genes

    def forward(self, spot=None, subspots=None, subspot_mask=None, neighbors=None, neighbor_mask=None,
                **indexed) -> torch.Tensor:
        return self.model.cell_expression(spot, neighbors, neighbor_mask, **indexed)


def cell_predictor(model: nn.Module) -> nn.Module:
    """The module mapping cell bags to per-cell expression, for either cell model."""
    return model.cell_predictor() if hasattr(model, "cell_predictor") else model


@torch.no_grad()
def predict_batches(model: nn.Module, bags, batch_size: int = 512, device="cpu") -> np.ndarray:
    """Eval-mode prediction over bags that give ``len()`` and ``batch(ix) -> inputs`` (:class:`CellBags`,
    spots as bags of cells), a chunk of rows at a time: (N, G) float32."""
    model.eval().to(device)
    out = None  # filled in place (a list of chunks then one concatenation would hold the rows twice)
    for a in range(0, len(bags), batch_size):
        ix = torch.arange(a, min(a + batch_size, len(bags)))
        pred = model(**{k: v.to(device) for k, v in bags.batch(ix).items()}).float().cpu().numpy()
        if out is None:
            out = np.empty((len(bags), pred.shape[1]), dtype=np.float32)
        out[a:a + len(pred)] = pred
    if out is None:
        return np.zeros((0, getattr(model, "n_genes", 0)), dtype=np.float32)
    return out
