"""predict-cells in blocks: the per-block neighbour search is the whole-table rule, and predicting in blocks
(features read back from the feature store) gives the numbers of predicting every cell at once."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from deepspot.config import CellGeometry, EncoderRef, GridSpec, ModelConfig
from deepspot.inference.predict_cells import block_neighbors, predict_cells
from deepspot.models.deepcell import DeepCell, PooledDeepSpot2Cell, cell_neighbors
from deepspot.models.spot2cell import DeepSpot2Cell
from fixtures_cli import register_tiny_vit


def neighbour_sets(idx, mask):
    return [list(r[m]) for r, m in zip(idx, mask)]


@pytest.mark.parametrize("geom", [CellGeometry(neighbors="knn", k=6), CellGeometry(neighbors="radius", radius=9.0),
                                  CellGeometry(neighbors="radius", radius=9.0, max_neighbors=3),
                                  CellGeometry(neighbors="none")])
def test_block_neighbours_are_the_whole_table_rule(geom):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 60, size=(300, 2))
    xy[10] = xy[11]  # two cells at the same place
    whole = neighbour_sets(*cell_neighbors(geom, xy))
    tree = cKDTree(xy)
    got = []
    for a in range(0, len(xy), 37):
        rows = np.arange(a, min(a + 37, len(xy)))
        got += neighbour_sets(*block_neighbors(tree, len(xy), xy[rows], rows, geom))
    assert got == whole
    if geom.neighbors != "none":
        assert sum(map(len, whole)) > len(xy)  # the rule finds neighbours here


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("slide") / "he.png"
    Image.fromarray(rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)).save(path)
    xy = rng.uniform(5, 235, size=(90, 2))
    return path, xy


def config_for(kind, model, geom, **extra):
    return ModelConfig(kind, model.config(), EncoderRef("tiny-stream-test", 32), [f"g{i}" for i in range(4)], geom,
                       extra=extra)


@pytest.mark.parametrize("kind", ["deepcell", "deepspot2cell-pooled", "deepspot2cell"])
def test_blocks_give_the_whole_table_predictions(slide, tmp_path, kind, monkeypatch):
    from deepspot.features.encoders import load_encoder

    path, xy = slide
    enc = load_encoder(register_tiny_vit("tiny-stream-test"))
    torch.manual_seed(0)
    geom = CellGeometry(16.0, neighbors="knn", k=5)
    extra = {}
    if kind == "deepcell":
        model = DeepCell(32, 4, hidden=8, n_ensemble=2, context="cell_neighbors")
    elif kind == "deepspot2cell-pooled":
        model = PooledDeepSpot2Cell(32, 4, hidden=8, n_ensemble=2, context="cell_neighbors")
    else:
        # spot tiles as large as the cell tiles: the two feature stores must not collide
        model, geom = DeepSpot2Cell(32, 4, hidden=8, n_ensemble=2), CellGeometry(16.0, neighbors="none")
        extra = {"spot_grid": GridSpec(16, 16, "square", "px").to_dict()}
    cfg = config_for(kind, model.eval(), geom, **extra)
    whole = predict_cells(path, xy, model, cfg, enc, progress=False, block_size=10 ** 6)
    blocks = predict_cells(path, xy, model, cfg, enc, progress=False, block_size=7, cache_dir=tmp_path / "store")
    np.testing.assert_allclose(blocks.X, whole.X, rtol=1e-5, atol=1e-6)
    assert whole.X.std(axis=0).min() > 0  # cells differ: a wrong row order would show
    assert any(p.name.endswith(".zarr") for p in (tmp_path / "store").iterdir())  # features went to the store
    # written block by block into the h5ad (slabs of 20 output rows, chunks of 10: several slabs, each filled from
    # many blocks)
    monkeypatch.setattr("deepspot.io.cells_h5ad.SLAB_BYTES", 20 * 4 * 4)
    monkeypatch.setattr("deepspot.io.cells_h5ad.CHUNK_BYTES", 10 * 4 * 4)
    out = tmp_path / "cells.h5ad"
    skeleton = predict_cells(path, xy, model, cfg, enc, progress=False, block_size=7, cache_dir=tmp_path / "store",
                             out=out)
    assert skeleton.X is None and sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "store"]
    back = ad.read_h5ad(out)
    assert back.X.dtype == np.float32 and np.array_equal(back.X, blocks.X)  # the in-memory result, exactly
    assert list(back.obs_names) == list(blocks.obs_names) and list(back.var_names) == list(blocks.var_names)
    np.testing.assert_array_equal(back.obsm["spatial"], blocks.obsm["spatial"])
    assert back.uns["deepspot"] == blocks.uns["deepspot"]
    lib = next(iter(blocks.uns["spatial"]))
    np.testing.assert_array_equal(back.uns["spatial"][lib]["images"]["hires"], blocks.uns["spatial"][lib]["images"]["hires"])
    np.testing.assert_allclose(skeleton.var["variance"], blocks.X.var(axis=0), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="block_size"):
        predict_cells(path, xy, model, cfg, enc, progress=False, block_size=0)


def test_blocks_follow_the_slide_not_the_table():
    """Blocks of cells consecutive in the Z order are compact on the slide: a block's kNN neighbours are
    mostly inside it, however the input table is ordered (here: at random)."""
    from deepspot.inference.predict_cells import spatial_order

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, size=(20000, 2))
    order = spatial_order(xy)
    assert sorted(order.tolist()) == list(range(len(xy)))
    geom, tree = CellGeometry(neighbors="knn", k=8), cKDTree(xy)

    def rows_needed(rows):
        idx, _ = block_neighbors(tree, len(xy), xy[rows], rows, geom)
        return len(np.unique(np.concatenate([rows, idx.ravel()])))

    b = 2000
    in_order = np.mean([rows_needed(order[a:a + b]) for a in range(0, len(xy), b)])
    as_given = np.mean([rows_needed(np.arange(a, a + b)) for a in range(0, len(xy), b)])
    assert in_order < 1.5 * b < 5 * b < as_given
