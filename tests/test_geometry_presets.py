"""Geometry presets: `deepspot predict --geometry original` reproduces the original's spot positions,
neighbour sets and crops on a generated slide, checked against a plain implementation of its rules
written here; the TCGA preset's 20x/40x rule; presets stored in and read from a checkpoint.

The encoder is a probe: ``Flatten`` over 4×4-px inputs, so a sub-spot's features are its pixels (/255)
when the sub-spot is 4×4 px, and any pixel off in a crop changes the prediction.
"""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import torch
from PIL import Image

from deepspot.config import (GridSpec, ModelConfig, MppError, SpotGeometry, geometry_preset, magnification_factor)
from deepspot.features.encoders import EncoderSpec, load_encoder
from deepspot.features.tiles import make_crops
from deepspot.geometry.grid import make_grid
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot
from fixtures_cli import encoder_registered, run_cli

PROBE = "test-pixel-probe"
S = 4  # encoder input side = the sub-spot side below
D, SPACING, N_SUB = 14, 17, 3  # 14 // 3 = 4: two pixel rows and columns of each tile belong to no sub-spot
GENES = [f"G{i}" for i in range(5)]


@pytest.fixture(scope="module", autouse=True)
def _pixel_probe():
    with encoder_registered(EncoderSpec(PROBE, 3 * S * S, S, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                        lambda _p: torch.nn.Flatten(), "pixels as features (tests)", False,
                                        arch=torch.nn.Flatten)):
        yield PROBE


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 130 × 110 px PNG: noise, with a white block (tiles there are dropped) and a pale band (some
    tiles just above, some just below the mean-RGB cut of 200)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(110, 130, 3), dtype=np.uint8)
    img[:45, 85:] = 255
    img[60:80, :50] = rng.integers(170, 240, size=(20, 50, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("slide") / "tiny.png"
    Image.fromarray(img).save(path)
    return path, img


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = DeepSpot(3 * S * S, len(GENES), hidden=8, n_ensemble=2).eval()
    cfg = {"model": "deepspot", "model_args": model.config(), "encoder": {"name": PROBE, "dim": 3 * S * S},
           "genes": GENES, "geometry": SpotGeometry(n_sub=N_SUB).to_dict(), "scaler": None}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", model, cfg), model


def original_rules(img: np.ndarray, d: int, spacing: int, n: int):
    """The original's prediction grid, written out plainly: centres (row, col) at range(d + 1, size - d - 1,
    spacing); the tile [c - d//2, c - d//2 + d) in each axis; tiles with mean RGB > 200 dropped; sub-spots
    the n×n exact (d // n)-px squares from the tile's corner; neighbours the kept spots whose array row and
    column both differ by at most 1."""
    h, w = img.shape[:2]
    spots = []
    for i, r in enumerate(range(d + 1, h - d - 1, spacing)):
        for j, c in enumerate(range(d + 1, w - d - 1, spacing)):
            tile = img[r - d // 2:r - d // 2 + d, c - d // 2:c - d // 2 + d]
            if tile.mean() > 200:
                continue
            q = d // n
            subs = [tile[a * q:(a + 1) * q, b * q:(b + 1) * q] for a in range(n) for b in range(n)]
            spots.append({"ij": (i, j), "xy": (c, r), "tile": tile, "subs": subs})
    for s in spots:
        s["neighbors"] = [k for k, o in enumerate(spots) if o is not s
                          and abs(o["ij"][0] - s["ij"][0]) <= 1 and abs(o["ij"][1] - s["ij"][1]) <= 1]
    return spots


_cli = run_cli


def test_predict_geometry_original_reproduces_the_original(slide, checkpoint, tmp_path, capsys):
    path, img = slide
    ckpt, model = checkpoint
    code, _, err = _cli(capsys, "predict", path, "--model", ckpt, "--out", tmp_path / "o", "--geometry", "original",
                        "--spot-px", D, "--spacing-px", SPACING, "--num-workers", 0, "--no-progress")
    assert code == 0, err
    pred = ad.read_h5ad(tmp_path / "o" / "tiny.h5ad")
    want = original_rules(img, D, SPACING, N_SUB)
    n_grid = len(range(D + 1, 110 - D - 1, SPACING)) * len(range(D + 1, 130 - D - 1, SPACING))
    assert 0 < len(want) < n_grid  # the white block and part of the pale band are dropped
    assert pred.uns["deepspot"]["tissue_method"] == "tile_mean_rgb"
    assert pred.uns["deepspot"]["geometry_preset"] == "original"
    # spot positions and array coordinates, in the original's order
    np.testing.assert_array_equal(pred.obsm["spatial"], np.array([s["xy"] for s in want], dtype=float))
    np.testing.assert_array_equal(np.stack([pred.obs["array_row"], pred.obs["array_col"]], 1),
                                  np.array([s["ij"] for s in want]))
    # crops and neighbour sets: the original's prediction of every kept spot, one at a time
    enc = load_encoder(PROBE)
    expected = []
    for s in want:
        spot_img = np.asarray(Image.fromarray(s["tile"]).resize((S, S), Image.BILINEAR))  # the encoder's input size
        f_spot = enc.encode(spot_img[None])
        f_sub = enc.encode(np.stack(s["subs"]))[None]
        nb = [want[k]["tile"] for k in s["neighbors"]]
        nb = [np.asarray(Image.fromarray(t).resize((S, S), Image.BILINEAR)) for t in nb]
        f_nb = enc.encode(np.stack(nb))[None] if nb else torch.zeros(1, 1, enc.dim)
        mask = torch.ones(1, f_nb.shape[1], dtype=torch.bool) if nb else torch.zeros(1, 1, dtype=torch.bool)
        with torch.no_grad():
            expected.append(model(f_spot, subspots=f_sub, neighbors=f_nb, neighbor_mask=mask)[0].numpy())
    np.testing.assert_allclose(np.asarray(pred.X), np.stack(expected), atol=1e-5, rtol=1e-5)


def test_original_plan_neighbour_sets(slide, checkpoint):
    from deepspot.inference.predict import plan_slide

    path, img = slide
    geo = geometry_preset("original", spot_px=D, spacing_px=SPACING)
    plan = plan_slide(path, geo)
    want = original_rules(img, D, SPACING, N_SUB)
    idx, mask = plan.neighbors()
    got = [sorted(int(k) for k in row[m]) for row, m in zip(idx, mask)]
    assert got == [sorted(s["neighbors"]) for s in want]
    assert max(len(g) for g in got) == 8  # an interior spot has all 8 grid cells around it


def test_floor_subspots_drop_the_remainder_and_split_does_not():
    region = np.arange(14 * 14 * 3, dtype=np.uint32).reshape(14, 14, 3).astype(np.uint8)
    floor = make_crops(region, 4, 3, "floor").numpy()
    np.testing.assert_array_equal(floor[1 + 8], region[8:12, 8:12])  # last sub-spot ends at 12, not 14
    split = make_crops(region, 5, 3, "split").numpy()  # edges 0, 5, 9, 14: the last one is 5 px
    np.testing.assert_array_equal(split[1 + 8], region[9:14, 9:14])


def test_tcga_geometry_from_the_slide_mpp():
    grid = geometry_preset("tcga").grid
    at20, at40 = grid.in_pixels(0.5), grid.in_pixels(0.2528)
    assert (at20.spot_diameter, at20.spacing) == (160, 290)
    assert (at40.spot_diameter, at40.spacing) == (320, 580)
    assert at20.unit == at40.unit == "px" and at40.origin == "original"
    for bad in (None, 1.0):
        with pytest.raises(MppError):
            magnification_factor(bad)
    xy = make_grid(1000, 800, at20)
    assert xy["x"].min() == 161 and xy["y"].min() == 161 and np.all(np.diff(np.unique(xy["x"])) == 290)


def test_presets_round_trip_through_the_checkpoint_config(checkpoint):
    ckpt, _ = checkpoint
    cfg = json.loads((ckpt / "config.json").read_text())
    for name in ("visium", "original", "tcga"):
        geo = geometry_preset(name, **({"spot_px": 160, "spacing_px": 290} if name == "original" else {}))
        back = ModelConfig.from_dict({**cfg, "geometry": geo.to_dict()}).geometry
        assert back == geo and back.preset == name
    assert geometry_preset("visium").grid == GridSpec()  # ours: 55/100 µm hex
    old = {k: v for k, v in SpotGeometry().to_dict().items() if k in ("grid", "n_sub", "neighbor_radius")}
    assert SpotGeometry.from_dict(old) == SpotGeometry()  # configs without the new fields read as before
    with pytest.raises(ValueError, match="whole number of pixels"):
        geometry_preset("original", spot_px=100.5)
    with pytest.raises(ValueError, match="'original' geometry"):
        geometry_preset("tcga", spot_px=100)


def test_preset_keeps_the_models_sizes_and_sub_spot_grid():
    stored = geometry_preset("original", spot_px=160, spacing_px=290, like=SpotGeometry(n_sub=2, neighbor_radius=2))
    assert (stored.n_sub, stored.neighbor_radius) == (2, 2)
    again = geometry_preset("original", like=stored)  # a converted model's stored px sizes are kept
    assert (again.grid.spot_diameter, again.grid.spacing) == (160, 290)
    assert geometry_preset("original", spacing_px=300, like=stored).grid.spacing == 300


def test_convert_weights_passes_the_geometry(monkeypatch, tmp_path, capsys):
    import deepspot.convert as convert

    seen = {}

    def fake(src, out, **kw):
        seen.update(kw)
        return out

    monkeypatch.setattr(convert, "convert_checkpoint", fake)
    src = tmp_path / "m.pkl"
    src.write_bytes(b"x")
    code, _, err = _cli(capsys, "convert-weights", src, "--out", tmp_path / "c", "--geometry", "original",
                        "--spot-px", 160, "--spacing-px", 290)
    assert code == 0, err
    geo = SpotGeometry.from_dict(seen["geometry"])
    assert geo.preset == "original" and (geo.grid.spot_diameter, geo.grid.spacing) == (160, 290)
    assert geo.subspot_rule == "floor" and geo.tissue == "tile_mean_rgb"
