"""Hard images: too big to decode whole (decode budget, decoded once, reduced JPEG decodes), a PNG read
band by band, huge TIFFs refused before a long scan or decode (io/slides, io/png_stream).

Images are made here (small, or large but sparse: a tiled TIFF of one encoded tile repeated).
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from deepspot.io import slides as slides_mod
from deepspot.io.png_stream import PngBands, band_to_array
from deepspot.io.slides import SlideError, open_slide

from fixtures_hard_inputs import _fresh_cache, _tiny_vit, _sparse_tiff, _tissue  # noqa: F401 (_fresh_cache: autouse)


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
