"""Cell inputs: the one packing of cells into spots, polygon bounding-box crops (segmentation → crop plan →
features, recorded in the checkpoint), and predictions written to the h5ad block by block."""
from __future__ import annotations

import numpy as np
import torch

from deepspot.models.deepcell import CellBags
from deepspot.models.spot2cell import SpotContextBags, pack_members
from deepspot.training.fit_cells import SpotCellBags


def test_one_packing_of_cells_into_spots():
    c2s = np.array([1, -1, 0, 1, 1, 3])
    members, mask = pack_members(c2s, 4)
    assert members.tolist() == [[2, 0, 0], [0, 3, 4], [0, 0, 0], [5, 0, 0]]
    assert mask.tolist() == [[True, False, False], [True] * 3, [False] * 3, [True, False, False]]
    feats = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    ctx = SpotContextBags.build(feats, np.zeros((4, 3)), np.zeros((4, 1), np.int64), np.zeros((4, 1), bool), c2s)
    pooled = SpotCellBags.from_assignment(CellBags.from_numpy(feats, np.zeros((6, 0), np.int64),
                                                              np.zeros((6, 0), bool)), c2s, 4)
    for bags in (ctx, pooled):
        assert torch.equal(bags.members, torch.as_tensor(members)) and torch.equal(bags.member_mask,
                                                                                   torch.as_tensor(mask))
    empty_members, empty_mask = pack_members(np.full(3, -1), 2)
    assert empty_members.shape == (2, 1) and not empty_mask.any()
