"""Whole-slide prediction on real WSI formats: µm geometry, streamed/batched prediction against a per-spot
loop written here, fast mode, blank slides, mpp refusal, atomic outputs, bad input through the CLI.

Slides are pyramidal TIFFs grown from the bundled NCBI858 H&E (io/synthetic.py) at 0.5 µm/px; the
encoder is a one-block ViT on 32-px crops with fixed random weights (cheap enough for hundreds of spots).
"""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from deepspot.features.encoders import load_encoder
from deepspot.features.extract import extract_features
from deepspot.features.tiles import make_crops, read_size, spot_boxes
from deepspot.geometry.grid import GridSpec, make_grid
from deepspot.geometry.neighbors import array_neighbors
from deepspot.config import SpotGeometry
from deepspot.inference.predict import geometry_report, plan_slide, predict_image, predict_slide
from deepspot.io.slides import SlideError, open_slide
from deepspot.io.synthetic import write_pyramidal_tiff
from deepspot.models.checkpoint import CheckpointError, save_checkpoint
from deepspot.models.deepsets import DeepSpot
from deepspot.io.owner import RECORD_FILE

from shared_data import HE, ZEN38, needs_data  # noqa: E402
from fixtures_cli import run_cli, tiny_vit_encoder  # noqa: E402

pytestmark = needs_data("ncbi858/NCBI858.jpg")

TINY = "test-vit-tiny"
GENES = [f"G{i}" for i in range(6)]


_tiny_vit = tiny_vit_encoder(TINY)


def _model_and_config(mode="standard", layout="hex"):
    torch.manual_seed(1)
    model = DeepSpot(32, len(GENES), hidden=16, n_ensemble=10).eval()
    geom = SpotGeometry(GridSpec(55.0, 100.0, layout=layout, unit="um"), n_sub=3, neighbor_radius=1,
                        feature_mode=mode)
    cfg = {"model": "deepspot", "model_args": model.config(), "encoder": {"name": TINY, "dim": 32},
           "genes": GENES, "geometry": geom.to_dict(), "scaler": None}
    return model, cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards are faster on one thread (and do not fight other processes for the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_svs(path: Path, size: int, mpp: float = 0.5) -> Path:
    """An Aperio-style SVS (tiled JPEG pages, 'MPP = ' in the description) with the same level-0 pixels as
    ``write_pyramidal_tiff`` writes."""
    import tifffile
    from PIL import Image

    from deepspot.io.synthetic import make_unit, mosaic_pixels

    # write_pyramidal_tiff crops its unit to multiples of the largest downsample (4 for its 3 levels at 2400 px)
    img = mosaic_pixels(make_unit(HE, multiple=4), 0, 0, size, size)
    half = np.asarray(Image.fromarray(img).resize((size // 2, size // 2), Image.BILINEAR))
    head = "Aperio Image Library v12.0.15 \r\n"
    kw = dict(tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 85}, metadata=None)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, description=f"{head}{size}x{size} (256x256) JPEG/RGB Q=85|AppMag = 20|MPP = {mpp}", **kw)
        tw.write(half, description=f"{head}{size}x{size} -> {size // 2}x{size // 2}|MPP = {2 * mpp}",
                 subfiletype=1, **kw)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    return {
        "tif": write_pyramidal_tiff(d / "he.tif", HE, 2400, 2400, mpp=0.5),
        "ome": write_pyramidal_tiff(d / "he.ome.tif", HE, 2400, 2400, mpp=0.5, ome=True),
        "svs": _write_svs(d / "he.svs", 2400),
        "dir": d,
    }


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(TINY)


# --------------------------------------------------------------------------- geometry in µm

@needs_data("ZEN38_visium_meta.json")
def test_visium_geometry_from_um_zen38():
    meta = json.loads(ZEN38.read_text())
    mpp = meta["pixel_size_um_embedded"]
    geo, notes = geometry_report(55.0, 100.0, mpp, meta)
    assert geo["spot_px"] == pytest.approx(119.6, abs=0.1) and geo["spacing_px"] == pytest.approx(217.5, abs=0.1)
    # the declared fullres diameter is half of 55 µm at this mpp: reported, not used
    assert len(notes) == 1 and "spot_diameter_fullres" in notes[0] and "0.50x" in notes[0]
    spec = GridSpec(55.0, 100.0).in_pixels(mpp)
    grid = make_grid(meta["fullres_width"], meta["fullres_height"], spec)
    assert grid["x"].max() + spec.spot_diameter / 2 <= meta["fullres_width"]
    idx, mask = array_neighbors(grid["array_row"].to_numpy(), grid["array_col"].to_numpy(), 1)
    xy = grid[["x", "y"]].to_numpy()
    interior = np.flatnonzero(mask.sum(1) == 4)
    assert len(interior) > 0.9 * len(grid) and mask.sum(1).max() == 4
    d = np.linalg.norm(xy[idx[interior]] - xy[interior, None], axis=-1)
    np.testing.assert_allclose(d, 100.0 / mpp, rtol=1e-9)  # the 4 diagonal neighbours are 100 µm away
    same_row = grid[(grid.array_row == 10)].sort_values("array_col")
    np.testing.assert_allclose(np.diff(same_row["x"]), 100.0 / mpp)


def test_plan_takes_mpp_from_the_file_and_mpp_overrides(slides):
    _, cfg = _model_and_config()
    geom = SpotGeometry.from_dict(cfg["geometry"])
    for key in ("tif", "ome", "svs"):
        plan = plan_slide(slides[key], geom, tissue="none")
        assert plan.mpp == pytest.approx(0.5) and plan.spec.spot_diameter == pytest.approx(110.0)
        assert plan.spec.spacing == pytest.approx(200.0)
    plan = plan_slide(slides["tif"], geom, mpp=0.25, tissue="none")
    assert plan.spec.spot_diameter == pytest.approx(220.0) and plan.spec.spacing == pytest.approx(400.0)


def test_square_grid_has_8_neighbours(slides):
    _, cfg = _model_and_config(layout="hex")
    plan = plan_slide(slides["tif"], SpotGeometry.from_dict(cfg["geometry"]), tissue="none", layout="square")
    idx, mask = plan.neighbors()
    xy = plan.grid[["x", "y"]].to_numpy()
    assert mask.sum(1).max() == 8
    inner = np.flatnonzero(mask.sum(1) == 8)
    d = np.sort(np.linalg.norm(xy[idx[inner]] - xy[inner, None], axis=-1), axis=1)
    np.testing.assert_allclose(d[:, :4], 200.0)
    np.testing.assert_allclose(d[:, 4:], 200.0 * np.sqrt(2))


# --------------------------------------------------------------------------- reference equivalence

def _reference_predictions(slide_path, plan, model, encoder, mode="standard"):
    """One spot at a time, batch 1, every neighbour crop read and encoded again for every spot."""
    n = 3
    tile = plan.spec.spot_diameter
    rows, cols = plan.grid["array_row"].to_numpy(), plan.grid["array_col"].to_numpy()
    centers = plan.grid[["x", "y"]].to_numpy()

    def crops(slide, i, n_sub):
        box = spot_boxes(centers[i:i + 1], tile)[0]
        region = slide.read_scaled((int(box[0]), int(box[1])), (int(box[2]), int(box[3])),
                                   read_size(tile, encoder.input_size, n_sub))
        return make_crops(region, encoder.input_size, n_sub)

    def encode1(c):
        return encoder.encode(c.unsqueeze(0))[0]

    out = []
    with open_slide(slide_path) as slide, torch.no_grad():
        for i in range(len(centers)):
            if mode == "standard":
                c = crops(slide, i, n)
                spot = encode1(c[0])
                subs = torch.stack([encode1(c[k]) for k in range(1, n * n + 1)])
            else:
                x = encoder.preprocess(crops(slide, i, 0)[:1])
                cls, tok = encoder.forward_tokens(x)
                spot = cls[0]
                h, w = tok.shape[1:3]
                ys = [round(k * h / n) for k in range(n + 1)]
                xs = [round(k * w / n) for k in range(n + 1)]
                subs = torch.stack([tok[0, ys[a]:ys[a + 1], xs[b]:xs[b + 1]].mean(dim=(0, 1))
                                    for a in range(n) for b in range(n)])
            nb = [j for j in range(len(centers))
                  if j != i and abs(rows[j] - rows[i]) <= 1 and abs(cols[j] - cols[i]) <= 1]
            nbr = [encode1(crops(slide, j, n if mode == "standard" else 0)[0]) for j in nb]
            y = model(spot[None], subs[None], None,
                      torch.stack(nbr)[None] if nbr else torch.zeros(1, 0, spot.shape[0]),
                      torch.ones(1, len(nbr), dtype=torch.bool))
            out.append(y[0])
    return torch.stack(out).numpy()


@pytest.mark.parametrize("mode", ["standard", "fast"])
def test_streamed_prediction_equals_per_spot_loop(slides, encoder, tmp_path, mode):
    model, cfg = _model_and_config(mode)
    res = predict_slide(slides["tif"], model, cfg, encoder, tmp_path / "out", batch_size=7, predict_batch=23,
                        num_workers=1, progress=False)
    a = ad.read_h5ad(res.h5ad)
    assert a.n_obs == res.n_spots > 100 and list(a.var_names) == GENES
    plan = plan_slide(slides["tif"], SpotGeometry.from_dict(cfg["geometry"]))
    assert list(a.obs["array_row"]) == list(plan.grid["array_row"])
    ref = _reference_predictions(slides["tif"], plan, model, encoder, mode)
    np.testing.assert_allclose(a.X, ref, atol=1e-5, rtol=0)
    # the in-memory variant gives the same numbers
    mem = predict_image(slides["tif"], model, cfg, encoder, progress=False)
    np.testing.assert_allclose(mem.X, a.X, atol=1e-6, rtol=0)
    assert a.uns["deepspot"]["feature_mode"] == mode


def test_formats_give_the_same_prediction(slides, encoder, tmp_path):
    """SVS (openslide, Aperio MPP), pyramidal TIFF (openslide, resolution tags), OME-TIFF (tifffile,
    PhysicalSizeX) and a PNG crop with --mpp: same pixels, same numbers."""
    model, cfg = _model_and_config()
    from PIL import Image

    with open_slide(slides["svs"]) as s:
        assert (s.backend, s.vendor, s.mpp) == ("openslide", "aperio", 0.5)
    with open_slide(slides["tif"]) as s:
        assert s.backend == "openslide"
        region = s.read_region((0, 0), 0, (900, 800))
    jpg = tmp_path / "crop.png"  # lossless, so the pixels are those of the TIFF
    Image.fromarray(region).save(jpg)
    got = {}
    for key, path, mpp in (("tif", slides["tif"], None), ("ome", slides["ome"], None), ("svs", slides["svs"], None),
                           ("png", jpg, 0.5)):
        got[key] = predict_image(path, model, cfg, encoder, mpp=mpp, tissue="none", progress=False)
    np.testing.assert_allclose(got["ome"].X, got["tif"].X, atol=1e-6)
    np.testing.assert_allclose(got["svs"].X, got["tif"].X, atol=1e-6)
    tif = got["tif"][[n in set(got["png"].obs_names) for n in got["tif"].obs_names]]
    xy = got["png"].obsm["spatial"]
    inner = (xy[:, 0] + 100 + 55 <= 900) & (xy[:, 1] + 173.3 + 55 <= 800)  # all their neighbours in the crop
    np.testing.assert_allclose(got["png"].X[inner], tif.X[inner], atol=1e-6)


def test_fast_mode_mismatch_is_refused(slides, encoder, tmp_path):
    model, cfg = _model_and_config("standard")
    with pytest.raises(CheckpointError, match="standard"):
        predict_slide(slides["tif"], model, cfg, encoder, tmp_path / "o", fast=True, progress=False)
    assert not (tmp_path / "o").exists()


def test_cnn_tokens_pool_the_final_feature_map():
    enc = load_encoder("efficientnet-lite0")
    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    with torch.no_grad():
        cls, tok = enc.forward_tokens(enc.preprocess(crops))
    assert tok.shape == (2, 7, 7, 1280)
    np.testing.assert_allclose(cls.numpy(), enc.encode(crops).numpy(), atol=1e-5)
    np.testing.assert_allclose(tok.mean(dim=(1, 2)).numpy(), cls.numpy(), atol=1e-5)  # avg pool of the map


# --------------------------------------------------------------------------- blank slide, outputs

def test_blank_slide_gives_empty_anndata_and_a_warning(tmp_path, encoder):
    model, cfg = _model_and_config()
    blank = write_pyramidal_tiff(tmp_path / "blank.tif", np.full((256, 256, 3), 244, np.uint8), 1600, 1600, mpp=0.5)
    for method in ("otsu", "mean_rgb"):
        with pytest.warns(UserWarning, match="no tissue"):
            res = predict_slide(blank, model, cfg, encoder, tmp_path / method, tissue=method, progress=False)
        a = ad.read_h5ad(res.h5ad)
        assert a.shape == (0, len(GENES)) and res.n_grid > 0 and res.png is None
        assert pd.read_csv(res.csv).shape[0] == 0
        assert sorted(p.name for p in (tmp_path / method).iterdir() if p.name != RECORD_FILE) == ["blank.h5ad", "blank_spots.csv"]


def test_outputs_complete_and_nothing_left_on_failure(slides, encoder, tmp_path, monkeypatch):
    import deepspot.inference.predict as P

    model, cfg = _model_and_config()
    res = predict_slide(slides["tif"], model, cfg, encoder, tmp_path / "ok", genes=["G1", "G2"], progress=False)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir() if p.name != RECORD_FILE) == ["he.h5ad", "he_genes.png", "he_spots.csv"]
    a = ad.read_h5ad(res.h5ad)
    csv = pd.read_csv(res.csv, index_col="barcode")
    assert list(csv.columns) == ["array_row", "array_col", "pxl_x", "pxl_y", "in_tissue"]
    assert list(csv.index) == list(a.obs_names)
    np.testing.assert_allclose(csv[["pxl_x", "pxl_y"]].to_numpy(), a.obsm["spatial"])
    sf = a.uns["spatial"]["he"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(110.0)
    assert a.uns["spatial"]["he"]["images"]["hires"].shape[1] == round(2400 * sf["tissue_hires_scalef"])

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(P.plotting, "spatial_columns", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        predict_slide(slides["tif"], model, cfg, encoder, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    existing = tmp_path / "keep"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        predict_slide(slides["tif"], model, cfg, encoder, existing, progress=False)
    assert list(existing.iterdir()) == []


# --------------------------------------------------------------------------- bad input through the CLI

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, cfg = _model_and_config()
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "model", model, cfg)


_cli = run_cli


def _one_line(err: str, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("deepspot: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_jpg_without_mpp_is_refused_then_runs_with_mpp(checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _cli(capsys, "predict", HE, "--model", checkpoint, "--out", out, "--no-progress")
    assert code == 1
    _one_line(err, "NCBI858.jpg", "--mpp")
    assert not out.exists()
    code, stdout, err = _cli(capsys, "predict", HE, "--model", checkpoint, "--out", out, "--mpp", "0.5",
                             "--no-progress", "--num-workers", "0")
    assert code == 0, err
    a = ad.read_h5ad(out / "NCBI858.h5ad")
    assert a.n_obs > 10 and a.uns["deepspot"]["mpp"] == 0.5 and "spots on tissue" in stdout


def test_cli_fast_flag_on_standard_model(checkpoint, slides, tmp_path, capsys):
    code, _, err = _cli(capsys, "predict", slides["tif"], "--model", checkpoint, "--out", tmp_path / "o", "--fast")
    assert code == 1
    _one_line(err, str(checkpoint), "standard", "--fast")


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _corrupt_tile(src: Path, dst: Path) -> Path:
    """Overwrite one level-0 JPEG tile in the middle of the slide with garbage (the file stays complete)."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[0]
        k = len(page.dataoffsets) // 2
        off, cnt = page.dataoffsets[k], page.databytecounts[k]
    data[off:off + cnt] = bytes(np.random.default_rng(0).integers(0, 256, cnt, dtype=np.uint8))
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("case", ["truncated", "unsupported", "corrupt_tile", "not_an_image"])
def test_cli_bad_slides_one_line_no_output(case, checkpoint, slides, tmp_path, capsys):
    if case == "truncated":
        path, needle = _truncated(slides["tif"], tmp_path / "cut.tif"), "truncated"
    elif case == "unsupported":
        path, needle = tmp_path / "slide.xyz", "unsupported"
        path.write_bytes(b"\x00" * 4096)
    elif case == "corrupt_tile":
        path, needle = _corrupt_tile(slides["tif"], tmp_path / "bad.tif"), "bad.tif"
    else:
        path, needle = tmp_path / "fake.svs", "unsupported"
        path.write_text("this is not a slide\n")
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "predict", path, "--model", checkpoint, "--out", out, "--no-progress")
    assert code == 1
    _one_line(err, path.name, needle)
    assert not out.exists()


def test_region_outside_the_slide_names_the_file(slides, encoder):
    with pytest.raises(SlideError, match=r"he\.tif.*outside"):
        extract_features(slides["tif"], np.array([[-5000.0, -5000.0]]), 110, encoder, num_workers=1, progress=False)
