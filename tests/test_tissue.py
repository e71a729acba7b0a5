"""Tissue detection: real H&E, blank slides, fraction_at against brute force, the reference rule."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from deepspot.geometry.tissue import (
    TissueMask,
    mask_from_rgb,
    tile_is_background_mean_rgb,
    tissue_mask,
)
from deepspot.io.slides import open_slide

from shared_data import HE as DATA, needs_data as _needs, stand_in_he  # noqa: E402

needs_data = _needs("ncbi858/NCBI858.jpg")


@needs_data
@pytest.mark.parametrize("method", ["otsu", "mean_rgb"])
def test_finds_tissue_in_real_he(method):
    # NCBI858 is a round lung section (alveolar septa + air spaces) on white glass with dust specks
    with open_slide(DATA) as s:
        tm = tissue_mask(s, method, max_size=1024)
    assert tm.mask.shape == (894, 1024) and tm.level0_size == (1431, 1249)
    assert 0.2 < tm.tissue_fraction < 0.6
    x0, y0, w, h = tm.bbox()
    assert 60 < x0 < 140 and x0 + w > 1300 and h > 1100  # the section spans the image
    # every spot-sized disc well inside the section holds some tissue; the glass corners none
    gy, gx = np.mgrid[150:1100:50, 250:1200:50]
    inside = (gx - 715) ** 2 + (gy - 620) ** 2 < 420**2
    f_in = tm.fraction_at(gx[inside], gy[inside], 55)
    assert (f_in > 0.05).mean() > 0.95 and f_in.mean() > 0.3
    corners = tm.fraction_at([40, 40, 1400], [40, 1210, 1230], 35)
    np.testing.assert_array_equal(corners, 0)


@pytest.mark.parametrize("method", ["otsu", "mean_rgb"])
def test_blank_slide_gives_empty_mask(tmp_path, method):
    rng = np.random.default_rng(0)
    white = np.clip(248 + rng.normal(0, 3, (600, 800, 3)), 0, 255).astype(np.uint8)
    p = tmp_path / "blank.png"
    Image.fromarray(white).save(p)
    with open_slide(p, mpp=0.5) as s:
        tm = tissue_mask(s, method)
    assert not tm.mask.any() and tm.bbox() is None
    np.testing.assert_array_equal(tm.fraction_at([10, 400], [10, 300], 50), 0)


def test_tinted_background_and_dust_are_not_tissue():
    rng = np.random.default_rng(1)
    img = np.empty((400, 400, 3), np.uint8)
    img[:] = (242, 226, 240)  # pinkish glass
    img[100:300, 100:300] = (170, 80, 150)  # stained tissue
    img[20:23, 20:23] = (150, 60, 140)  # a speck of dust
    img = np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)
    mask, t = mask_from_rgb(img, "otsu", px_um=4.0)
    assert mask[110:290, 110:290].all()
    assert not mask[:90].any() and not mask[310:].any()
    assert 20 <= t <= 80


def _brute(mask: np.ndarray, size, x, y, r, shape):
    h, w = mask.shape
    sx, sy = size[0] / w, size[1] / h
    cy, cx = (np.arange(h) + 0.5) * sy, (np.arange(w) + 0.5) * sx
    out = []
    for px, py in zip(x, y):
        # pixel centres (in or beyond the image) near the point
        ii = np.arange(int(np.floor((py - r) / sy)) - 2, int(np.ceil((py + r) / sy)) + 3)
        jj = np.arange(int(np.floor((px - r) / sx)) - 2, int(np.ceil((px + r) / sx)) + 3)
        tot = tis = 0
        for i in ii:
            for j in jj:
                dx, dy = (j + 0.5) * sx - px, (i + 0.5) * sy - py
                hit = (dx * dx + dy * dy <= r * r) if shape == "disc" else (abs(dx) <= r and abs(dy) <= r)
                if hit:
                    tot += 1
                    tis += bool(0 <= i < h and 0 <= j < w and mask[i, j])
        if tot == 0:  # no pixel centre inside: the pixel under the point decides
            i, j = int(np.floor(py / sy)), int(np.floor(px / sx))
            out.append(float(0 <= i < h and 0 <= j < w and mask[i, j]))
        else:
            out.append(tis / tot)
    del cx, cy
    return np.array(out)


@pytest.mark.parametrize("shape", ["disc", "box"])
@pytest.mark.parametrize("r", [0.0, 3.0, 12.5, 40.0])
def test_fraction_at_matches_brute_force(shape, r):
    rng = np.random.default_rng(5)
    mask = rng.random((37, 53)) < 0.4
    tm = TissueMask(mask=mask, level0_size=(500, 400))  # non-integer scale 9.43 × 10.81
    x = np.concatenate([rng.uniform(-60, 560, 150), [0.0, 499.9, 250.0]])
    y = np.concatenate([rng.uniform(-60, 460, 150), [0.0, 399.9, 200.0]])
    got = tm.fraction_at(x, y, r, shape=shape)
    np.testing.assert_allclose(got, _brute(mask, (500, 400), x, y, r, shape), atol=1e-12)
    assert got.shape == x.shape


def test_fraction_at_shapes_and_chunking():
    mask = np.zeros((100, 100), bool)
    mask[:, 50:] = True
    tm = TissueMask(mask=mask, level0_size=(1000, 1000))
    xs = np.full((300, 400), 750.0)
    ys = np.full((300, 400), 500.0)
    f = tm.fraction_at(xs, ys, 120.0)  # 120k points: several chunks
    assert f.shape == (300, 400) and np.all(f == 1.0)
    assert tm.fraction_at(500.0, 500.0, 200.0) == pytest.approx(0.5, abs=0.05)


def test_tile_is_background_mean_rgb():
    tiles = np.zeros((4, 8, 8, 3), np.uint8)
    tiles[0] = 255
    tiles[1] = 200  # exactly 200 is not background (rule: mean > 200)
    tiles[2] = 201
    tiles[3, :, :4] = 255  # half white, half black: mean 127.5
    np.testing.assert_array_equal(tile_is_background_mean_rgb(tiles), [True, False, True, False])
    assert tile_is_background_mean_rgb(tiles[0]).tolist() == [True]
    assert tile_is_background_mean_rgb(tiles, threshold=100).tolist() == [True, True, True, True]


def test_mask_on_pyramid_reads_a_coarse_level(tmp_path):
    from deepspot.io.synthetic import write_pyramidal_tiff

    src = DATA if DATA.is_file() else stand_in_he(512, 512)  # tissue on glass, as the real H&E
    p = write_pyramidal_tiff(tmp_path / "p.tif", src, 4096, 4096, mpp=0.5, levels=3, compression="jpeg")
    with open_slide(p) as s:
        used = []
        orig = s._read_level
        s._read_level = lambda level, *a: used.append(level) or orig(level, *a)
        tm = tissue_mask(s, max_size=1024)
    assert set(used) == {2} and tm.mask.shape == (1024, 1024)
    assert tm.downsample == pytest.approx(4.0) and 0.1 < tm.tissue_fraction < 0.9


# --------------------------------------------------------------------------- grayscale and pale H&E


def _gray(src, dst):
    Image.open(src).convert("L").convert("RGB").save(dst, quality=92)
    return dst


@needs_data
def test_grayscale_and_pale_copies_of_the_bundled_he_find_the_same_tissue(tmp_path):
    """Grayscale: the intensity fallback. Pale: half the stain contrast (at 0.4 the overlap drops to ~0.5)."""
    with open_slide(DATA) as s:
        ref = tissue_mask(s)
    pale = np.asarray(Image.open(DATA).convert("RGB"), np.float32)
    Image.fromarray(np.round(255 - 0.5 * (255 - pale)).astype(np.uint8)).save(tmp_path / "pale.png")
    for name in ("gray", "pale"):
        path = _gray(DATA, tmp_path / "gray.jpg") if name == "gray" else tmp_path / "pale.png"
        with open_slide(path) as s:
            got = tissue_mask(s)
        inter = (got.mask & ref.mask).sum()
        iou = inter / (got.mask | ref.mask).sum()
        assert got.mask.shape == ref.mask.shape and iou > 0.6, (name, iou, got.tissue_fraction, ref.tissue_fraction)


def test_blank_grayscale_glass_stays_blank():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(232, 6, (400, 500)), 0, 255).astype(np.uint8)
    mask, t = mask_from_rgb(np.repeat(glass[:, :, None], 3, axis=2))
    assert not mask.any() and t <= 200


@pytest.mark.needs_data("her2st/C2_counts.tsv.gz", "her2st/C2_spots.tsv", "her2st/C2_HE.jpg")
def test_her2st_grayscale_section_keeps_the_annotated_in_tissue_spots(tmp_path):
    import pandas as pd

    from deepspot.datasets import her2st

    f = her2st("C2")["C2"]
    spots = pd.read_csv(f["spots"], sep="\t")
    spots = spots[spots["selected"] == 1]
    ax, ay = np.polyfit(spots.x, spots.pixel_x, 1), np.polyfit(spots.y, spots.pixel_y, 1)
    mpp = 200.0 / ((ax[0] + ay[0]) / 2)  # 200 µm pitch
    gx, gy = (g.ravel() for g in np.meshgrid(np.arange(40), np.arange(40)))
    px, py, r = np.polyval(ax, gx), np.polyval(ay, gy), 50.0 / mpp
    with Image.open(f["image"]) as im:
        w, h = im.size
    on = (px - r >= 0) & (py - r >= 0) & (px + r < w) & (py + r < h)
    annotated = np.array([(x, y) in set(zip(spots.x, spots.y)) for x, y in zip(gx, gy)])[on]
    for path in (f["image"], _gray(f["image"], tmp_path / "C2_gray.jpg")):
        with open_slide(path, mpp=mpp) as s:
            keep = tissue_mask(s, mpp=mpp).fraction_at(px[on], py[on], r) >= 0.1
        recall = (keep & annotated).sum() / annotated.sum()
        background = (keep & ~annotated).sum() / keep.sum()
        assert recall >= 0.98 and background <= 0.1, (path.name, recall, background)
