"""Slide readers: PIL images, pyramidal TIFFs through every backend, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepspot.io.slides import SlideError, open_slide, require_mpp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ncbi858" / "NCBI858.jpg"


@pytest.fixture(scope="module")
def jpg(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A small JPG plus the pixels PIL decodes from it."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    p = tmp_path_factory.mktemp("img") / "small.jpg"
    Image.fromarray(arr).save(p, quality=90)
    return p, np.asarray(Image.open(p).convert("RGB"))


def test_jpg_read_region_equals_numpy_slicing(jpg):
    p, ref = jpg
    with open_slide(p) as s:
        assert s.backend == "pil"
        assert s.dimensions == (90, 70) and s.level_count == 1
        assert s.level_downsamples == [1.0] and s.mpp is None
        out = s.read_region((13, 7), 0, (40, 30))
        assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
        np.testing.assert_array_equal(out, ref[7:37, 13:53])


def test_region_partly_outside_is_padded_white(jpg):
    p, ref = jpg
    with open_slide(p) as s:
        out = s.read_region((-5, 60), 0, (20, 20))
    assert out.shape == (20, 20, 3)
    np.testing.assert_array_equal(out[:10, 5:], ref[60:70, 0:15])
    assert (out[:, :5] == 255).all() and (out[10:] == 255).all()


def test_region_fully_outside_raises(jpg):
    p, _ = jpg
    with open_slide(p) as s:
        with pytest.raises(SlideError, match="outside"):
            s.read_region((500, 0), 0, (10, 10))
        with pytest.raises(SlideError, match="level"):
            s.read_region((0, 0), 3, (10, 10))


def test_png_rgba_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200
    arr[:4, :, 3] = 255  # top half opaque red-ish, bottom half transparent
    p = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(p)
    with open_slide(p) as s:
        out = s.read_region((0, 0), 0, (8, 8))
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[7, 7], [255, 255, 255])


def test_mpp_override_and_require_mpp(jpg):
    p, _ = jpg
    with open_slide(p) as s:
        with pytest.raises(SlideError, match="--mpp"):
            require_mpp(s)
        assert require_mpp(s, 0.25) == 0.25
    with open_slide(p, mpp=0.5) as s:
        assert s.mpp == 0.5 and require_mpp(s) == 0.5


def test_missing_and_corrupt_image(tmp_path):
    with pytest.raises(SlideError, match="file not found") as e:
        open_slide(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(e.value)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(SlideError) as e:
        open_slide(bad)
    assert "bad.jpg" in str(e.value)
    # a JPG cut in half
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 200, 3), np.uint8)).save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SlideError, match="cut.jpg"):
        open_slide(cut)


def test_read_scaled_and_thumbnail_on_real_he():
    if not DATA.is_file():
        pytest.skip("NCBI858.jpg not available")
    with open_slide(DATA, mpp=1.0) as s:
        assert s.dimensions == (1431, 1249)
        full = s.read_region((100, 200), 0, (224, 224))
        crop = s.read_scaled((100, 200), (224, 224), 112)
        assert crop.shape == (112, 112, 3)
        ref = full.reshape(112, 2, 112, 2, 3).mean(axis=(1, 3))
        assert np.abs(crop.astype(float) - ref).mean() < 4
        th = s.get_thumbnail(500)
        assert max(th.shape[:2]) == 500 and th.shape[2] == 3
        assert abs(th.shape[1] / th.shape[0] - 1431 / 1249) < 0.01
