"""Slide readers: PIL images, pyramidal TIFFs through every backend, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepspot.config import MppError, resolve_mpp
from deepspot.io.slides import SlideError, open_slide

from shared_data import HE as DATA, needs_data, stand_in_he  # noqa: E402


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


def test_mpp_override_and_resolve_mpp(jpg):
    p, _ = jpg
    with open_slide(p) as s:
        with pytest.raises(MppError, match=rf"^{p}: .*--mpp"):
            resolve_mpp(s, needs_um=True)
        assert resolve_mpp(s) is None  # a pixel geometry needs none
        assert resolve_mpp(s, 0.25, needs_um=True) == 0.25
        with pytest.raises(MppError, match="positive"):
            resolve_mpp(s, -1.0)
    with open_slide(p, mpp=0.5) as s:
        assert s.mpp == 0.5 and resolve_mpp(s, needs_um=True) == 0.5


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


@needs_data("ncbi858/NCBI858.jpg")
def test_read_scaled_and_thumbnail_on_real_he():
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


# --------------------------------------------------------------------------- pyramidal TIFF

from deepspot.io.synthetic import make_unit, mosaic_pixels, write_pyramidal_tiff  # noqa: E402

W, H = 4096, 3072


def _source() -> np.ndarray:
    if DATA.is_file():
        return make_unit(DATA, multiple=4)
    return stand_in_he(600, 800)  # H&E-like, so JPEG keeps it close (white noise would not survive JPEG)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> tuple[Path, np.ndarray]:
    unit = _source()
    p = tmp_path_factory.mktemp("wsi") / "synthetic.tif"
    write_pyramidal_tiff(p, unit, W, H, mpp=0.5, levels=3, compression=None)
    return p, unit


@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "tifffile"])
def test_pyramid_opens_with_each_backend(pyramid, backend):
    p, unit = pyramid
    with open_slide(p, backend=backend) as s:
        assert s.backend == backend
        assert s.mpp == pytest.approx(0.5)
        assert s.level_dimensions == [(4096, 3072), (2048, 1536), (1024, 768)]
        assert s.level_downsamples == pytest.approx([1.0, 2.0, 4.0])
        np.testing.assert_array_equal(s.read_region((1234, 567), 0, (300, 200)), mosaic_pixels(unit, 1234, 567, 300, 200))
        # level 1 is the 2×2 block mean of level 0 (the writer's definition)
        l1 = s.read_region((1000, 600), 1, (64, 48)).astype(int)
        ref = mosaic_pixels(unit, 1000, 600, 128, 96).reshape(48, 2, 64, 2, 3).mean(axis=(1, 3))
        assert np.abs(l1 - ref).max() <= 1
        # bottom-right corner on level 2: inside part real, outside white
        edge = s.read_region((4096 - 40, 3072 - 40), 2, (20, 20))
        assert (edge[10:] == 255).all() and (edge[:, 10:] == 255).all() and (edge[:10, :10] != 255).any()
        with pytest.raises(SlideError, match="outside"):
            s.read_region((5000, 0), 1, (10, 10))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide", "tifffile"])
def test_read_scaled_uses_lower_level(pyramid, backend):
    p, unit = pyramid
    with open_slide(p, backend=backend) as s:
        used = []
        orig = s._read_level
        s._read_level = lambda level, *a: used.append(level) or orig(level, *a)
        out = s.read_scaled((800, 800), (448, 448), 112)  # 4× smaller → level 2
        assert used == [2] and out.shape == (112, 112, 3)
        ref = mosaic_pixels(unit, 800, 800, 448, 448).reshape(112, 4, 112, 4, 3).mean(axis=(1, 3))
        assert np.abs(out.astype(int) - ref).max() <= 1
        used.clear()
        s.read_scaled((800, 800), (448, 448), 224)  # 2× → level 1
        assert used == [1]
        used.clear()
        th = s.get_thumbnail(1024)
        assert th.shape == (768, 1024, 3) and set(used) == {2}


def test_auto_backend_and_ome_subifds(tmp_path, pyramid):
    p, unit = pyramid
    with open_slide(p) as s:
        assert s.backend == "openslide"
    ome = write_pyramidal_tiff(tmp_path / "x.ome.tif", unit, 1024, 768, mpp=0.25, levels=2, compression="zlib", ome=True)
    with open_slide(ome) as s:  # SubIFD pyramid: tifffile sees both levels
        assert s.backend == "tifffile" and s.level_count == 2 and s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region((10, 20), 0, (50, 40)), mosaic_pixels(unit, 10, 20, 50, 40))
    renamed = tmp_path / "same.tif"  # same file without the .ome name: openslide sees 1 level, tifffile wins
    renamed.write_bytes(ome.read_bytes())
    with open_slide(renamed) as s:
        assert s.level_count == 2


def test_jpeg_pyramid_backends_agree(tmp_path):
    unit = _source()
    p = write_pyramidal_tiff(tmp_path / "j.tif", unit, 1024, 1024, mpp=0.5, levels=2, compression="jpeg")
    outs = []
    for b in ("openslide", "tiffslide", "tifffile"):
        with open_slide(p, backend=b) as s:
            outs.append(s.read_region((100, 300), 0, (256, 256)).astype(int))
    assert np.abs(outs[0] - mosaic_pixels(unit, 100, 300, 256, 256)).mean() < 6
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_tiff_mpp_override_and_missing_mpp(tmp_path, pyramid):
    p, unit = pyramid
    with open_slide(p, mpp=0.25) as s:
        assert s.mpp == 0.25
    q = write_pyramidal_tiff(tmp_path / "nompp.tif", unit, 512, 512, mpp=None, levels=1, compression=None)
    for b in ("openslide", "tiffslide", "tifffile"):
        with open_slide(q, backend=b) as s:
            assert s.mpp is None, b
            with pytest.raises(MppError, match="--mpp"):
                resolve_mpp(s, needs_um=True)


@pytest.mark.parametrize("name", ["random.svs", "random.tif", "random.ndpi", "empty.svs"])
def test_random_bytes_slide_raises_naming_file(tmp_path, name):
    p = tmp_path / name
    data = b"" if name.startswith("empty") else np.random.default_rng(4).bytes(8000)
    if name.endswith(".tif"):
        data = b"II*\x00" + data
    p.write_bytes(data)
    with pytest.raises(SlideError) as e:
        open_slide(p)
    assert name in str(e.value)


@pytest.mark.parametrize("frac", [0.05, 0.5, 0.97, 0.9999])
@pytest.mark.parametrize("backend", [None, "openslide", "tiffslide", "tifffile"])
def test_truncated_tiff_raises(tmp_path, pyramid, frac, backend):
    p, _ = pyramid
    data = p.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(SlideError, match="cut.tif"):
        with open_slide(cut, backend=backend) as s:  # if opening passed, reading everything must fail
            for lv, (w, h) in enumerate(s.level_dimensions):
                s.read_region((0, 0), lv, (w, h))


def test_unknown_backend_and_pickle(pyramid):
    import pickle

    p, _ = pyramid
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(p, backend="bogus")
    with open_slide(p, mpp=0.3, backend="tifffile") as s:
        s2 = pickle.loads(pickle.dumps(s))
        assert type(s2) is type(s) and s2.mpp == 0.3 and s2.level_count == 3
        s2.close()


def test_large_jpeg_thumbnail_is_the_same_on_every_open(tmp_path):
    """A JPEG above the preview size: the thumbnail comes from one reduced decode, before and after the
    full image is decoded, and on a second open of the file (the same tissue spots on every run)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)
    Image.fromarray(small).resize((2400, 1800), Image.NEAREST).save(tmp_path / "big.jpg", quality=90)
    with open_slide(tmp_path / "big.jpg", mpp=0.5) as s:
        first = s.get_thumbnail(512)
        s.read_region((100, 100), 0, (64, 64))  # decodes the full image
        after = s.get_thumbnail(512)
    with open_slide(tmp_path / "big.jpg", mpp=0.5) as s:  # full image still decoded in this process
        again = s.get_thumbnail(512)
    assert first.shape == (384, 512, 3)
    np.testing.assert_array_equal(first, after)
    np.testing.assert_array_equal(first, again)
