"""Cell inputs: the one packing of cells into spots, polygon bounding-box crops (segmentation → crop plan →
features, recorded in the checkpoint), and predictions written to the h5ad block by block."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deepspot.config import CellGeometry, EncoderRef, ModelConfig
from deepspot.features.extract import extract_features
from deepspot.features.tiles import cell_crops
from deepspot.io.segmentation import CELL_BOX_KEY, attach_cell_boxes, read_segmentation
from deepspot.io.spatial import SpatialDataError
from deepspot.models.deepcell import CellBags
from deepspot.models.spot2cell import SpotContextBags, pack_members
from deepspot.training.fit_cells import SpotCellBags
from fixtures_cli import run_cli


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


# ----------------------------------------------------------------------------- polygon bounding-box crops

class Recorder:
    """An encoder that keeps the crops it is given (uint8 (B, S, S, 3)); its features are their channel means."""

    name, dim, input_size, device = "crop-recorder", 3, 32, torch.device("cpu")

    def __init__(self):
        self.crops = []

    def encode(self, crops, device=None, autocast_dtype=None, batch_size=None):
        self.crops.append(crops.clone())
        return crops.float().mean(dim=(1, 2))


def polygon(ring, cell_id):
    return {"type": "Feature", "properties": {"cell_id": cell_id},
            "geometry": {"type": "Polygon", "coordinates": [ring + [ring[0]]]}}


@pytest.fixture
def image(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, size=(120, 160, 3), dtype=np.uint8)
    path = tmp_path / "he.png"
    Image.fromarray(pixels).save(path)
    return path, pixels


# an octagon inside the 32 x 32 box x 40..72, y 20..52; a 10 x 32 box (x 100..110, y 60..92); a 3 x 2 triangle
OCTAGON = [[48, 20], [64, 20], [72, 28], [72, 44], [64, 52], [48, 52], [40, 44], [40, 28]]
TALL = [[100, 60], [110, 60], [110, 92], [100, 92]]
TINY = [[130, 100], [133, 100], [131, 102]]


def test_bbox_crops_exactly_the_polygons_box(image, tmp_path):
    path, pixels = image
    gj = tmp_path / "cells.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        polygon(OCTAGON, "a"), polygon(TALL, "b"), polygon(TINY, "c")]}))
    seg = read_segmentation(gj)
    np.testing.assert_array_equal(seg.boxes, [[40, 20, 72, 52], [100, 60, 110, 92], [130, 100, 133, 102]])
    centers, side = cell_crops(CellGeometry(crop="bbox"), seg.xy, seg.boxes)
    np.testing.assert_array_equal(side, [32, 32, 8])  # the larger side; at least min_side (8 px)
    np.testing.assert_array_equal(centers, [[56, 36], [105, 76], [131.5, 101]])  # box centres, not centroids
    enc = Recorder()
    feats = extract_features(path, centers, side, enc, n_sub=0, progress=False).spot
    crops = torch.cat(enc.crops).numpy()
    assert crops.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(crops[0], pixels[20:52, 40:72])  # the octagon's box, pixel for pixel
    np.testing.assert_array_equal(crops[1], pixels[60:92, 89:121])  # the tall box squared around its centre
    small = pixels[97:105, 128:136]  # 8 x 8 around (131.5, 101), resized to the encoder's 32 px
    np.testing.assert_array_equal(crops[2], np.asarray(Image.fromarray(small).resize((32, 32), Image.BILINEAR)))
    np.testing.assert_allclose(feats, crops.reshape(3, -1, 3).mean(axis=1), rtol=1e-6)
    # tile mode: the fixed side at the centroid, as before
    c_tile, s_tile = cell_crops(CellGeometry(cell_diameter=20), seg.xy, seg.boxes)
    assert s_tile == 20 and np.array_equal(c_tile, seg.xy)
    # the feature store keeps crops of varying side apart by their sides, and reuses a store of the same crops
    a = extract_features(path, centers, side, Recorder(), n_sub=0, progress=False, cache_dir=tmp_path / "c").spot
    again = Recorder()
    b = extract_features(path, centers, side, again, n_sub=0, progress=False, cache_dir=tmp_path / "c").spot
    assert not again.crops and np.array_equal(a, b) and np.allclose(a, feats)
    other = Recorder()
    extract_features(path, centers, side + 2, other, n_sub=0, progress=False, cache_dir=tmp_path / "c")
    assert len(torch.cat(other.crops)) == 3
    with pytest.raises(ValueError, match="no polygons"):
        cell_crops(CellGeometry(crop="bbox"), seg.xy, None, source="t.csv")


def test_xenium_boundaries_give_boxes_matched_by_id(tmp_path):
    # two cells in µm; the reader's map: px = µm / 0.5 + (3, 7)
    rows = [("c2", x, y) for x, y in [[10, 10], [20, 10], [20, 16], [10, 16]]] + \
           [("c1", x, y) for x, y in [[30, 30], [34, 30], [34, 40]]] + \
           [("c3", x, y) for x, y in [[50, 2], [52, 2], [52, 3]]]
    pd.DataFrame(rows, columns=["cell_id", "vertex_x", "vertex_y"]).to_parquet(tmp_path / "cell_boundaries.parquet")
    um = np.array([[32.0, 34.0], [15.0, 13.0], [51.0, 2.5], [70.0, 70.0]])
    cells = ad.AnnData(np.ones((4, 2), np.float32), obs=pd.DataFrame(index=["c1", "c2", "c3", "c4"]))
    cells.obsm["spatial_um"], cells.obsm["spatial"] = um, um / 0.5 + [3, 7]
    with pytest.raises(SpatialDataError, match=r"1 of 4 cells .* no polygon .*c4"):
        attach_cell_boxes(cells, tmp_path, "X")
    cells = cells[:3].copy()
    attach_cell_boxes(cells, tmp_path, "X")  # the folder: its cell_boundaries.parquet
    np.testing.assert_allclose(cells.obsm[CELL_BOX_KEY], [[63, 67, 71, 87], [23, 27, 43, 39], [103, 11, 107, 13]],
                               atol=1e-9)
    with pytest.raises(SpatialDataError, match="not on one line"):
        attach_cell_boxes(cells[:2].copy(), tmp_path, "X")
    del cells.obsm["spatial_um"]
    with pytest.raises(SpatialDataError, match="µm positions"):
        attach_cell_boxes(cells, tmp_path / "cell_boundaries.parquet", "X")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpatialDataError, match="no cell polygons"):
        attach_cell_boxes(cells, tmp_path / "empty", "X")
    del cells.obsm[CELL_BOX_KEY]
    with pytest.raises(SpatialDataError, match="give their segmentation"):
        attach_cell_boxes(cells, None, "X")


def test_cell_crop_recorded_and_read_back(tmp_path):
    from deepspot.models.checkpoint import read_config, save_checkpoint
    from deepspot.models.deepcell import DeepCell

    net = DeepCell(3, 2, hidden=4, n_ensemble=1, context="cell")
    geom = CellGeometry(cell_diameter=9, unit="um", neighbors="none", crop="bbox", min_side=3.0)
    config = ModelConfig("deepcell", net.config(), EncoderRef("e", 3), ["a", "b"], geom, mpp=0.5)
    save_checkpoint(tmp_path / "m", net, config)
    back = read_config(tmp_path / "m").geometry
    assert back == geom and back.crop == "bbox" and back.min_side == 3.0 and back.min_side_px(0.5) == 6.0
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["geometry"]["crop"] == "bbox"
    for key in ("crop", "min_side"):  # a checkpoint written before the fields
        del raw["geometry"][key]
    old = ModelConfig.from_dict(raw).geometry
    assert old.crop == "tile" and old.min_side == 8.0
    raw["geometry"]["crop"] = "polygon"
    with pytest.raises(Exception, match="crop"):
        ModelConfig.from_dict(raw)
    with pytest.raises(ValueError, match="cell crop"):
        CellGeometry(crop="mask")


def hexagons(xy, r):
    """(N, 6, 2) hexagon vertices of radius r (N,) around centres xy (N,2)."""
    a = np.deg2rad(np.arange(6) * 60.0)
    return xy[:, None, :] + r[:, None, None] * np.stack([np.cos(a), np.sin(a)], 1)[None]


def test_cli_trains_on_bbox_crops_and_predict_cells_uses_them(tmp_path, capsys):
    from spatial_fakes import tissue_image, xenium_folder

    from deepspot.models.checkpoint import read_config

    folder, xy_um, _, genes = xenium_folder(tmp_path, n_cells=24, width_um=120, height_um=100)
    rng = np.random.default_rng(0)
    radius_um = rng.uniform(1.5, 4.0, len(xy_um))
    verts = hexagons(xy_um, radius_um)
    ids = [f"cell{i}" for i in range(len(xy_um))]
    pd.DataFrame({"cell_id": np.repeat(ids, 6), "vertex_x": verts[..., 0].ravel(),
                  "vertex_y": verts[..., 1].ravel()}).to_parquet(folder / "cell_boundaries.parquet")
    image = tissue_image(tmp_path / "he.png", int(120 / 0.2125) + 1, int(100 / 0.2125) + 1)
    common = ["--image", image, "--max-epochs", "1", "--patience", "1", "--k", "5", "--no-progress"]
    code, out, err = run_cli(capsys, "train", "--model", "deepcell", "--adata", folder, "--cell-crop", "bbox",
                             "--out", tmp_path / "m", *common)
    assert code == 0, err
    cfg = read_config(tmp_path / "m")
    assert cfg.geometry.crop == "bbox" and "bounding box" in out
    # the same cells as a GeoJSON of polygons in pixels: predicted with their boxes
    px = verts / 0.2125
    gj = tmp_path / "cells.geojson"
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": [
        polygon(p.tolist(), i) for p, i in zip(px, ids)]}))
    code, out, err = run_cli(capsys, "predict-cells", gj, "--image", image, "--model", tmp_path / "m", "--out",
                             tmp_path / "pred", "--no-progress")
    assert code == 0, err
    pred = ad.read_h5ad(tmp_path / "pred" / "he_cells.h5ad")
    assert pred.shape == (24, len(cfg.genes)) and pred.uns["deepspot"]["cell_crop"] == "bbox"
    assert np.isfinite(pred.X).all() and list(pred.obs_names) == ids
    # a folder holding a user's file: refused before any compute, the file untouched, nothing written beside it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("mine")
    code, out, err = run_cli(capsys, "predict-cells", gj, "--image", image, "--model", tmp_path / "m", "--out",
                             tmp_path / "mine", "--no-progress")
    assert code == 1 and "thesis.txt" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.txt"]
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "mine"
    # a centroid table carries no polygons: refused, naming the file, before any compute
    table = tmp_path / "centroids.csv"
    pd.DataFrame({"cell_id": ids, "x": px.mean(1)[:, 0], "y": px.mean(1)[:, 1]}).to_csv(table, index=False)
    code, out, err = run_cli(capsys, "predict-cells", table, "--image", image, "--model", tmp_path / "m", "--out",
                             tmp_path / "pred2", "--no-progress")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "centroids.csv" in err and "bounding box" in err and "no polygons" in err
    assert not (tmp_path / "pred2" / "he_cells.h5ad").exists()

    # DeepSpot2Cell from a GeoJSON + counts (an h5ad of the cells, ids as the polygons')
    cells = ad.read_h5ad(tmp_path / "pred" / "he_cells.h5ad")
    counts = ad.AnnData(rng.poisson(3.0, size=(24, len(genes))).astype(np.float32),
                        obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=genes))
    counts.obsm["spatial"] = cells.obsm["spatial"]
    counts.write_h5ad(tmp_path / "counts.h5ad")
    code, out, err = run_cli(capsys, "train", "--model", "deepspot2cell", "--adata", tmp_path / "counts.h5ad",
                             "--cell-crop", "bbox", "--segmentation", gj, "--unit", "px", "--spot-diameter", "120",
                             "--spacing", "120", "--out", tmp_path / "s2c", *common)
    assert code == 0, err
    assert read_config(tmp_path / "s2c").geometry.crop == "bbox"
    code, out, err = run_cli(capsys, "train", "--model", "deepspot2cell", "--adata", tmp_path / "counts.h5ad",
                             "--cell-crop", "bbox", "--unit", "px", "--out", tmp_path / "s2c_b", *common)
    assert code == 1 and "give their segmentation" in err


# ----------------------------------------------------------------------------- the h5ad written in blocks

def test_blocked_rows_put_every_row_in_its_place_once(tmp_path):
    from deepspot.io.cells_h5ad import BlockedRows

    rng = np.random.default_rng(0)
    n, g = 103, 5
    X = rng.normal(size=(n, g)).astype(np.float32)
    skeleton = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]),
                          var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))
    perm = rng.permutation(n)
    rows = BlockedRows(n, g, tmp_path, slab_bytes=4 * g * 10, chunk_bytes=4 * g * 5)  # 11 slabs of 2 chunks
    assert (rows.rows_per_slab, rows.chunk_rows) == (10, 5)
    for a in range(0, n, 17):
        rows.write(perm[a:a + 17], X[perm[a:a + 17]])
    rows.finish(tmp_path / "x.h5ad", skeleton)
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    assert np.array_equal(back.X, X) and back.obs_names[5] == "c5"
    np.testing.assert_allclose(rows.variance, X.var(axis=0), rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5ad"]  # the spill files are gone
    for bad in (perm[:-1], np.r_[perm, perm[:1]]):  # a row never written; a row written twice
        rows = BlockedRows(n, g, tmp_path, slab_bytes=4 * g * 10, chunk_bytes=4 * g * 5)
        rows.write(bad, X[bad])
        with pytest.raises(RuntimeError, match=r"row \d+ was written [02] times"):
            rows.finish(tmp_path / "y.h5ad", skeleton)
        rows.close()
    with pytest.raises(ValueError, match="outside"):
        BlockedRows(n, g, tmp_path).write(np.array([n]), X[:1])


def test_cell_crop_is_refused_for_a_spot_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--image", tmp_path / "he.png", "--adata", tmp_path / "a.h5ad",
                           "--out", tmp_path / "m", "--cell-crop", "bbox")
    assert code == 1 and "--cell-crop" in err and "cell models" in err


def test_a_killed_runs_spill_folder_neither_blocks_the_folder_nor_stays(tmp_path):
    """The spill folder is a held work folder: the output owner passes over a killed run's, the next writer
    removes it, and a live run's is left alone."""
    from deepspot.io.cells_h5ad import SPILL_PREFIX, BlockedRows
    from deepspot.io.owner import OutputFolder, hold

    killed = tmp_path / f"{SPILL_PREFIX}dead"
    killed.mkdir()
    (killed / "0.values").write_bytes(b"x" * 64)
    live = tmp_path / f"{SPILL_PREFIX}live"
    live.mkdir()
    lock = hold(live)
    OutputFolder(tmp_path, "predict-cells").check()  # no FileExistsError: leftovers are not a user's files
    rows = BlockedRows(4, 2, tmp_path)
    assert not killed.exists() and live.is_dir() and rows.dir.is_dir()
    rows.close()
    lock.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
