"""Hard inputs: images too big to decode whole, a PNG read band by band, convert-slide, every check made
before compute (one line naming file and field), outputs that never mix runs, Ctrl-C.

Images are made here (small, or large but sparse: a tiled TIFF of one encoded tile repeated); models
are random-weight DeepSpots on a tiny registered ViT, saved as real checkpoints.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepspot.config import GridSpec, SpotGeometry
from deepspot.io import slides as slides_mod
from deepspot.io.png_stream import PngBands, band_to_array
from deepspot.io.pyramid import convert_slide
from deepspot.io.slides import SlideError, open_slide
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

from fixtures_cli import register_tiny_vit, run_cli
from shared_data import HE, needs_data

TINY = "test-vit-tiny-robust"
GENES = [f"G{i}" for i in range(6)]
register_tiny_vit(TINY)


def _checkpoint(path: Path, seed: int = 1, encoder: str = TINY, dim: int = 32) -> Path:
    torch.manual_seed(seed)
    model = DeepSpot(dim, len(GENES), hidden=8, n_ensemble=2, context="spot_neighbors").eval()
    geom = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    cfg = {"model": "deepspot", "model_args": model.config(), "encoder": {"name": encoder, "dim": dim},
           "genes": GENES, "geometry": geom.to_dict(), "scaler": None}
    return save_checkpoint(path, model, cfg)


@pytest.fixture(autouse=True)
def _fresh_cache():
    slides_mod.clear_decode_cache()
    yield
    slides_mod.clear_decode_cache()


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Pink-purple texture (passes the tissue filter) as uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    base = np.array([180, 90, 160], np.float32)
    return (base + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


_cli = run_cli


def _one_line(err: str, *needles) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("deepspot: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- PNG band by band


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_png_bands_equal_pil_whole_decode(tmp_path, mode):
    rng = np.random.default_rng(3)
    h, w = 203, 117
    ramp = (np.linspace(0, 255, w)[None, :, None] + rng.integers(0, 40, (h, w, 1))).clip(0, 255)
    rgb = np.concatenate([ramp, ramp[:, ::-1], rng.integers(0, 256, (h, w, 1))], axis=2).astype(np.uint8)
    im = Image.fromarray(rgb)
    im = (Image.fromarray(np.concatenate([rgb, rng.integers(0, 256, (h, w, 1), np.uint8)], 2), "RGBA")
          if mode == "RGBA" else im.convert(mode))
    p = tmp_path / f"{mode}.png"
    im.save(p)  # PIL picks the filters (Sub, Up, Average, Paeth per row)
    got = np.concatenate([band_to_array(b) for _, b in PngBands(p).bands(16)])
    ref = Image.open(p)
    ref = np.asarray(ref) if ref.mode in ("L", "RGB") else slides_mod._as_rgb(np.asarray(ref.convert("RGBA")))
    np.testing.assert_array_equal(got, ref)


def test_truncated_png_fails_at_open_naming_the_file(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(_tissue(300, 300)).save(p)
    cut = tmp_path / "cut.png"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(SlideError, match=r"cut\.png: .*truncated"):
        open_slide(cut)


# --------------------------------------------------------------------------- decode budget, decode once


def test_image_over_the_decode_budget_is_refused_at_open_with_a_convert_hint(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.fromarray(_tissue(400, 500)).save(p)
    monkeypatch.setenv("DEEPSPOT_DECODE_BUDGET_GB", "0.0001")  # 100 kB; the image needs 600 kB
    with pytest.raises(SlideError, match=r"big\.png: 500x400 PNG image needs .* deepspot convert-slide big\.png"):
        open_slide(p)
    monkeypatch.setenv("DEEPSPOT_DECODE_BUDGET_GB", "1")
    with open_slide(p) as s:
        assert s.read_region((0, 0), 0, (5, 5)).shape == (5, 5, 3)


def test_an_image_is_decoded_once_per_process(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    img = _tissue(300, 200)
    Image.fromarray(img).save(p)
    calls = []
    real = slides_mod.ImageSlide._decode_png
    monkeypatch.setattr(slides_mod.ImageSlide, "_decode_png", lambda self: calls.append(1) or real(self))
    for _ in range(3):
        with open_slide(p) as s:
            np.testing.assert_array_equal(s.read_region((10, 20), 0, (30, 40)), img[20:60, 10:40])
            s.get_thumbnail(64)
    assert len(calls) == 1
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: decoded again
    with open_slide(p) as s:
        s.read_region((0, 0), 0, (1, 1))
    assert len(calls) == 2


def test_grayscale_png_stays_one_channel_in_memory(tmp_path):
    p = tmp_path / "g.png"
    g = _tissue(120, 90)[:, :, 0]
    Image.fromarray(g).save(p)
    with open_slide(p) as s:
        assert s.decode_bytes == 120 * 90
        out = s.read_region((0, 0), 0, (90, 120))
    np.testing.assert_array_equal(out, np.repeat(g[:, :, None], 3, axis=2))


def test_jpeg_thumbnail_comes_from_a_reduced_decode(tmp_path, monkeypatch):
    p = tmp_path / "a.jpg"
    img = np.asarray(Image.fromarray(_tissue(60, 80)).resize((4000, 3000), Image.BILINEAR))
    Image.fromarray(img).save(p, quality=92)
    drafts = []
    real = slides_mod.ImageSlide._draft
    monkeypatch.setattr(slides_mod.ImageSlide, "_draft", lambda self, im: drafts.append(1) or real(self, im))
    for _ in range(2):
        with open_slide(p) as s:
            s.get_thumbnail(500)
    assert len(drafts) == 1  # the reduced decode too is made once per process
    with open_slide(p) as s:
        assert s._preview is not None and max(s._preview.shape[:2]) < 4000  # draft: 1/2 scale or less
        thumb = s.get_thumbnail(500)
        assert s._full is None  # no full-resolution decode for the thumbnail
        full = s.read_region((0, 0), 0, (4000, 3000))
        assert s._full is not None
    ref = np.asarray(Image.fromarray(full).resize(thumb.shape[1::-1], Image.BILINEAR))
    assert thumb.shape == (375, 500, 3)
    assert np.abs(thumb.astype(int) - ref).mean() < 4


# --------------------------------------------------------------------------- huge TIFFs


def _sparse_tiff(path: Path, w: int, h: int, tile: int = 1024, rowsperstrip: int | None = None) -> Path:
    import tifffile

    if rowsperstrip:
        data = np.full((h, w, 3), 255, np.uint8)
        tifffile.imwrite(path, data, rowsperstrip=rowsperstrip, photometric="rgb", compression="zlib",
                         resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
        return path
    enc = zlib.compress(np.full((tile, tile, 3), 255, np.uint8).tobytes())
    n = (-(-w // tile)) * (-(-h // tile))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write((enc for _ in range(n)), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                 photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
    return path


def test_single_level_tiff_too_big_to_scan_is_refused_before_reading(tmp_path):
    p = _sparse_tiff(tmp_path / "flat.tif", 60_000, 50_000)  # 3,000 Mpx, one level
    with open_slide(p) as s:
        assert s.level_count == 1 and abs(s.mpp - 0.5) < 1e-9
        with pytest.raises(SlideError, match=r"flat\.tif: no pyramid level small enough .* convert-slide"):
            s.get_thumbnail(2000)
        assert s.read_region((30_000, 30_000), 0, (64, 64)).min() == 255  # regions are read by tile


def test_tiff_in_one_strip_over_the_budget_is_refused_at_open(tmp_path, monkeypatch):
    p = _sparse_tiff(tmp_path / "strip.tif", 3000, 2000, rowsperstrip=2000)  # one 18 MB strip
    monkeypatch.setenv("DEEPSPOT_DECODE_BUDGET_GB", "0.001")
    monkeypatch.setattr(slides_mod.integrity, "_MIN_CHUNK_CHECK", 1 << 20)
    with pytest.raises(SlideError, match=r"strip\.tif: one strip of this TIFF is .* decoded"):
        open_slide(p)


# --------------------------------------------------------------------------- convert-slide


def test_convert_slide_writes_a_pyramid_with_the_mpp_and_same_pixels(tmp_path, capsys):
    img = _tissue(1100, 1300)
    src = tmp_path / "a.png"
    Image.fromarray(img).save(src)
    out = tmp_path / "a.tif"
    code, o, err = _cli(capsys, "convert-slide", src, out, "--mpp", "0.25", "--tile", "256", "--compression", "zlib",
                        "--no-progress")
    assert code == 0, err
    assert "4 levels" in o
    with open_slide(out) as s:
        assert s.level_dimensions == [(1300, 1100), (650, 550), (325, 275), (162, 137)]
        assert s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (1300, 1100)), img)
        half = s.read_region((0, 0), 1, (650, 550)).astype(int)
    ref = img.astype(int).reshape(550, 2, 650, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - ref).max() <= 1
    code, _, err = _cli(capsys, "convert-slide", src, out, "--mpp", "0.25")
    assert code == 1
    _one_line(err, "a.tif", "already exists", "--overwrite")
    code, _, err = _cli(capsys, "convert-slide", src, tmp_path / "b.tif")
    assert code == 1
    _one_line(err, "a.png", "--mpp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.tif"]


def test_convert_slide_of_a_truncated_png_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(_tissue(800, 600)).save(src, compress_level=0)
    data = src.read_bytes()
    cut = tmp_path / "cut.png"  # IDAT shortened but the chunk structure intact: fails mid-stream
    i = data.index(b"IDAT") - 4
    n = int.from_bytes(data[i:i + 4], "big")
    body = data[i + 8:i + 8 + n][: n // 2]
    cut.write_bytes(data[:i] + len(body).to_bytes(4, "big") + b"IDAT" + body
                    + zlib.crc32(b"IDAT" + body).to_bytes(4, "big") + data[i + 12 + n:])
    code, _, err = _cli(capsys, "convert-slide", cut, tmp_path / "o.tif", "--mpp", "0.5", "--no-progress")
    assert code == 1
    _one_line(err, "cut.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "cut.png"]


# --------------------------------------------------------------------------- checks before compute


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "model")


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory):
    p = tmp_path_factory.mktemp("slide") / "he.png"
    Image.fromarray(_tissue(700, 700)).save(p)
    return p


@pytest.fixture()
def no_encoder(monkeypatch):
    """Fail loudly if anything builds an encoder (the checks must all come before)."""
    import deepspot.api

    def boom(*a, **k):
        raise AssertionError("encoder built before the checks")
    monkeypatch.setattr(deepspot.api, "load_encoder", boom)


def _edited(ck: Path, tmp: Path, edit) -> Path:
    import shutil

    d = tmp / "edited"
    shutil.copytree(ck, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case, edit, needles", [
    ("genes vs weights", lambda c: (c.update(genes=GENES[:4]), c["model_args"].update(n_genes=4)),
     ["model.safetensors", "cannot load weights"]),
    ("genes vs n_genes", lambda c: c.update(genes=GENES[:4]), ["config.json", "model_args.n_genes"]),
    ("duplicate gene", lambda c: c.update(genes=GENES[:5] + ["G0"]), ["config.json", "genes", "'G0'"]),
    ("empty gene name", lambda c: c.update(genes=GENES[:5] + [" "]), ["config.json", "genes", "empty name"]),
    ("feature dim vs encoder", lambda c: (c.update(encoder={"name": "efficientnet-lite0", "dim": 32})),
     ["config.json", "encoder.dim", "1280"]),
    ("unknown encoder", lambda c: c["encoder"].update(name="no-such-encoder"), ["encoder.name", "no-such-encoder"]),
])
def test_bad_checkpoint_is_one_line_before_compute(ck, slide_png, tmp_path, capsys, no_encoder, case, edit, needles):
    bad = _edited(ck, tmp_path, edit)
    code, _, err = _cli(capsys, "predict", slide_png, "--model", bad, "--mpp", "0.5", "--out", tmp_path / "o",
                        "--no-progress")
    assert code == 1
    _one_line(err, *needles)
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_first(ck, slide_png, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    (tmp_path / "m.csv").write_text(f"path,id\n{slide_png},a\n")
    for cmd in (["predict", slide_png, "--model", tmp_path / "nope"],
                ["predict-cells", tmp_path / "cells.csv", "--image", slide_png, "--model", tmp_path / "nope"],
                ["train", "--image", slide_png, "--adata", tmp_path / "nope.h5ad"],
                ["predict-cohort", tmp_path / "m.csv", "--model", ck, "--backend", "local"]):
        code, _, err = _cli(capsys, *cmd, "--out", f)
        assert code == 1
        _one_line(err, "taken", "existing file")  # (predict, train: before the missing model / data is looked at)
    assert f.read_text() == "x"


def test_train_checks_genes_and_slide_before_reading_counts(slide_png, tmp_path, capsys):
    missing = tmp_path / "nope.h5ad"  # never read: the checks come first
    code, _, err = _cli(capsys, "train", "--image", slide_png, "--adata", missing, "--out", tmp_path / "m",
                        "--genes", "A,B,A")
    assert code == 1
    _one_line(err, "--genes", "repeated", "A")
    code, _, err = _cli(capsys, "train", "--image", slide_png, "--adata", missing, "--out", tmp_path / "m")
    assert code == 1
    _one_line(err, "he.png", "--mpp")
    assert not (tmp_path / "m").exists()


def test_slide_and_mpp_are_checked_before_the_encoder(ck, slide_png, tmp_path, capsys, no_encoder):
    code, _, err = _cli(capsys, "predict", slide_png, "--model", ck, "--out", tmp_path / "o", "--no-progress")
    assert code == 1
    _one_line(err, "he.png", "--mpp")
    bad = tmp_path / "bad.png"
    bad.write_bytes(slide_png.read_bytes()[:200])
    code, _, err = _cli(capsys, "predict", bad, "--model", ck, "--mpp", "0.5", "--out", tmp_path / "o",
                        "--no-progress")
    assert code == 1
    _one_line(err, "bad.png", "truncated")
    flat = _sparse_tiff(tmp_path / "flat.tif", 60_000, 50_000)
    code, _, err = _cli(capsys, "predict", flat, "--model", ck, "--out", tmp_path / "o", "--no-progress")
    assert code == 1
    _one_line(err, "flat.tif", "convert-slide")
    assert not (tmp_path / "o").exists()


def test_predict_into_a_folder_with_a_previous_result_needs_overwrite(ck, slide_png, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["predict", slide_png, "--model", ck, "--mpp", "0.5", "--out", out, "--no-progress", "--num-workers", "0"]
    code, _, err = _cli(capsys, *args)
    assert code == 0, err
    first = (out / "he_spots.csv").read_bytes()
    mode = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(mode.values()) == {0o666 & ~umask}, mode
    code, _, err = _cli(capsys, *args)
    assert code == 1
    _one_line(err, "previous result", "he.h5ad", "--overwrite")
    code, _, err = _cli(capsys, *args, "--overwrite")
    assert code == 0, err
    assert (out / "he_spots.csv").read_bytes() == first


def test_checkpoint_files_get_the_usual_permissions(ck):
    umask = os.umask(0)
    os.umask(umask)
    for f in ("model.safetensors", "config.json"):
        assert (ck / f).stat().st_mode & 0o777 == 0o666 & ~umask, f


# --------------------------------------------------------------------------- cohorts never mix runs


def test_cohort_rerun_with_another_model_or_mpp_is_refused(ck, tmp_path):
    from deepspot.inference.cohort import RUN_FILE, run_cohort

    for i in range(2):
        Image.fromarray(_tissue(300, 300, seed=i)).save(tmp_path / f"s{i}.png")
    (tmp_path / "m.csv").write_text("path,id\ns0.png,a\ns1.png,b\n")
    other = _checkpoint(tmp_path / "other", seed=7)
    out = tmp_path / "out"
    kw = dict(backend="local", tissue="none", progress=False, echo=lambda *a, **k: None, device="cpu")
    s = run_cohort(tmp_path / "m.csv", ck, out, mpp=1.0, **kw)
    assert s.n_done == 2 and (out / RUN_FILE).exists()
    assert run_cohort(tmp_path / "m.csv", ck, out, mpp=1.0, **kw).ran == []  # same run: resumes
    with pytest.raises(ValueError, match=r"out: holds results of another run \(model weights sha256:"):
        run_cohort(tmp_path / "m.csv", other, out, mpp=1.0, **kw)
    with pytest.raises(ValueError, match=r"mpp of a, b \(a: 1.0 -> 2.0\)"):
        run_cohort(tmp_path / "m.csv", ck, out, mpp=2.0, **kw)
    first = (out / "a_spots.csv").read_bytes()
    s2 = run_cohort(tmp_path / "m.csv", other, out, mpp=1.0, new_run=True, **kw)
    assert s2.out_dir == tmp_path / "out-2" and s2.n_done == 2
    assert (out / "a_spots.csv").read_bytes() == first  # the first run untouched
    s3 = run_cohort(tmp_path / "m.csv", other, out, mpp=2.0, overwrite=True, **kw)
    assert s3.out_dir == out and len(s3.ran) == 2
    assert run_cohort(tmp_path / "m.csv", other, out, mpp=2.0, **kw).ran == []


# --------------------------------------------------------------------------- Ctrl-C


@needs_data("ncbi858/NCBI858.jpg")
def test_sigint_during_predict_exits_130_and_writes_nothing(tmp_path):
    ck = _checkpoint(tmp_path / "model", encoder="efficientnet-lite0", dim=1280)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "deepspot", "predict", str(HE), "--model", str(ck), "--mpp", "0.25",
                          "--out", str(out), "--no-progress", "--num-workers", "0", "--tissue", "none"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and p.poll() is None and not list(out.glob(".*.work-*")):
            time.sleep(0.05)  # the work folder appears when encoding starts
        assert p.poll() is None, p.communicate()
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "deepspot: interrupted; nothing written", err
    assert "Traceback" not in err
    assert not out.exists()  # the folder this run created is gone, with no partial file in it
