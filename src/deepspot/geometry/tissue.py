"""Tissue detection on a low-resolution view of a slide.

``tissue_mask(slide)`` thresholds a thumbnail (a coarse pyramid level, ~2k px)
and returns a :class:`TissueMask`: a boolean array plus its scale relative to
level 0.  ``TissueMask.fraction_at(x, y, r)`` gives, for many level-0 centres
at once, the fraction of tissue pixels in the disc (or box) of radius ``r``
level-0 px around each; a caller keeps spots whose fraction passes a
threshold.

Methods
-------
``otsu`` (default)  Otsu threshold on the HSV saturation channel (stain is
                    coloured, glass is grey/white even when tinted), clipped
                    to a sane range so a blank slide stays blank and a tinted
                    background does not pass; plus pale-but-not-bright stained
                    pixels (mean RGB ≤ 200 with some colour); then a small morphological
                    clean-up (dust removed, small gaps and holes closed).
                    Where saturation carries no signal (99th percentile below
                    ``min_saturation``: a grayscale or very pale scan), Otsu on
                    the mean-RGB intensity instead, capped at 200.
``mean_rgb``        The original DeepSpot rule: a pixel is background when its
                    mean RGB > 200.

For crops there is the reference rule itself:
:func:`tile_is_background_mean_rgb` (a tile is background when its mean RGB
> 200), and :func:`tile_mean_rgb` computes it on full-resolution tiles of a
slide (the ``tile_mean_rgb`` tissue rule: exactly the original's filter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "BACKGROUND_MEAN_RGB",
    "TissueMask",
    "spot_mean_rgb",
    "tissue_spots",
    "tissue_mask",
    "mask_from_rgb",
    "saturation",
    "tile_is_background_mean_rgb",
    "tile_mean_rgb",
]


BACKGROUND_MEAN_RGB = 200.0  # the reference rule: background where the mean RGB exceeds this


def tile_is_background_mean_rgb(tiles: np.ndarray, threshold: float = BACKGROUND_MEAN_RGB) -> np.ndarray:
    """Reference rule on crops: True where a tile's mean over all pixels and channels > ``threshold``.

    ``tiles`` is uint8 (B, h, w, 3) (a single (h, w, 3) tile gives a 1-element result).
    """
    t = np.asarray(tiles)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"tiles must be (B, h, w, C), got shape {t.shape}")
    if t.shape[0] == 0:
        return np.zeros(0, bool)
    means = t.reshape(t.shape[0], -1).mean(axis=1, dtype=np.float64)
    return means > threshold


def tile_mean_rgb(slide, boxes: np.ndarray, max_width: int = 8192) -> np.ndarray:
    """Mean RGB (over all pixels and channels) of each level-0 box (x0, y0, w, h) int (N,4) of ``slide``:
    float64 (N,). Boxes sharing a top edge and size (one grid row) are read together, in strips at most
    ``max_width`` px wide, so each pixel is read once; parts outside the slide count as white."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    out = np.zeros(len(boxes), dtype=np.float64)
    if len(boxes) == 0:
        return out
    keys = np.stack([boxes[:, 1], boxes[:, 2], boxes[:, 3]], axis=1)
    _, group = np.unique(keys, axis=0, return_inverse=True)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        members = members[np.argsort(boxes[members, 0], kind="stable")]
        _, y0, w, h = (int(v) for v in boxes[members[0]])
        start = 0
        while start < len(members):
            x_lo = int(boxes[members[start], 0])
            stop = start + 1
            while stop < len(members) and boxes[members[stop], 0] + w - x_lo <= max(max_width, w):
                stop += 1
            x_hi = int(boxes[members[stop - 1], 0]) + w
            strip = slide.read_region((x_lo, y0), 0, (x_hi - x_lo, h))[..., :3]
            col = strip.sum(axis=(0, 2), dtype=np.float64)  # (width,) sum over rows and channels
            csum = np.concatenate([[0.0], np.cumsum(col)])
            x0 = boxes[members[start:stop], 0] - x_lo
            out[members[start:stop]] = (csum[x0 + w] - csum[x0]) / (3.0 * w * h)
            start = stop
    return out


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in 0–255 (uint8) of a uint8 RGB image: 255·(max−min)/max."""
    rgb = np.asarray(rgb)
    mx = rgb.max(axis=2).astype(np.int32)
    mn = rgb.min(axis=2).astype(np.int32)
    s = np.zeros(mx.shape, np.int32)
    nz = mx > 0
    s[nz] = (255 * (mx[nz] - mn[nz]) + mx[nz] // 2) // mx[nz]
    return s.astype(np.uint8)


def _otsu(values: np.ndarray) -> float:
    """Otsu threshold of uint8 values (histogram form; constant input → that value)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    if between.max() <= 0:
        return float(values.max())
    return float(np.argmax(between))  # class 0 is ≤ t, tissue is > t


def _disk(r: int) -> np.ndarray:
    r = max(int(r), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx * xx + yy * yy <= r * r + r  # a slightly round disc also for r = 1


def mask_from_rgb(
    rgb: np.ndarray,
    method: str = "otsu",
    *,
    px_um: float | None = None,
    min_saturation: float = 20,
    max_saturation: float = 80,
    mean_rgb_threshold: float = BACKGROUND_MEAN_RGB,
    dark_threshold: float = 30,
    with_dark_stain: bool = True,
    clean: bool = True,
    opening_um: float = 8.0,
    closing_um: float = 16.0,
    min_object_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a uint8 RGB thumbnail and the threshold used.

    ``px_um`` is the thumbnail pixel size in µm; the clean-up sizes are in µm
    and converted with it.  Without it the view is assumed to span ~8 mm (a
    whole section), i.e. ``px_um = 8000 / longer side``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"expected an (h, w, 3) RGB image, got {rgb.shape}")
    rgb = rgb[:, :, :3]
    if method == "otsu":
        sat = saturation(rgb)
        dark = rgb.max(axis=2) < dark_threshold  # black borders, scanner voids, thick pen
        vals = sat[~dark]
        if vals.size and np.percentile(vals, 99) < min_saturation:
            # grayscale or very pale: saturation carries no signal, so threshold the intensity instead
            # (Otsu on mean RGB, never above the reference 200, so blank glass stays blank)
            m = rgb.mean(axis=2, dtype=np.float32)
            t = min(_otsu(np.round(m[~dark]).astype(np.uint8)), float(mean_rgb_threshold))
            mask = (m <= t) & ~dark
            with_dark_stain = False
        else:
            t = _otsu(vals) if vals.size else 255.0
            t = float(np.clip(t, min_saturation, max_saturation))
            mask = (sat > t) & ~dark
        if with_dark_stain:
            # pale-pink stroma has little saturation but is still darker than glass: add pixels that
            # pass the reference mean-RGB rule and carry at least a trace of colour
            dim = rgb.mean(axis=2, dtype=np.float32) <= mean_rgb_threshold
            mask = mask | (dim & (sat > min_saturation) & ~dark)
    elif method == "mean_rgb":
        m = rgb.mean(axis=2, dtype=np.float32)
        t = float(mean_rgb_threshold)
        mask = m <= t
    else:
        raise ValueError(f"unknown tissue method {method!r} (use 'otsu' or 'mean_rgb')")
    if clean and mask.any():
        if px_um is None or not (px_um > 0):
            px_um = 8000.0 / max(mask.shape)  # assume the view spans ~8 mm (a typical section)
        r_open = int(round(opening_um / px_um / 2))
        r_close = int(round(closing_um / px_um / 2))
        if r_open >= 1:
            mask = ndi.binary_opening(mask, structure=_disk(r_open))
        if r_close >= 1:
            pad = r_close + 1  # pad so closing does not glue tissue to the border
            mask = ndi.binary_closing(np.pad(mask, pad), structure=_disk(r_close))[pad:-pad, pad:-pad]
        min_obj = min_object_um2 / (px_um * px_um)
        max_hole = max_hole_um2 / (px_um * px_um)
        if min_obj >= 1:
            mask = _drop_small(mask, min_obj)
        if max_hole >= 1:
            mask = ~_drop_small(~mask, max_hole, keep_border=True)
    return mask.astype(bool), t


def _drop_small(mask: np.ndarray, min_size: float, keep_border: bool = False) -> np.ndarray:
    """Remove connected components (8-connected) smaller than ``min_size`` px."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_size
    keep[0] = False
    if keep_border:  # components touching the border (the glass around a section) are never "holes"
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        keep[border[border > 0]] = True
    return keep[lab]


@dataclass
class TissueMask:
    """Boolean tissue mask of a slide at low resolution.

    ``mask[i, j]`` covers level-0 pixels ``[j·sx, (j+1)·sx) × [i·sy, (i+1)·sy)``
    where ``sx = level0_size[0] / mask.shape[1]`` (and likewise ``sy``).
    """

    mask: np.ndarray
    level0_size: tuple[int, int]  # (width, height) of level 0
    method: str = "otsu"
    threshold: float = float("nan")

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 pixels per mask pixel along x and y."""
        h, w = self.mask.shape
        return self.level0_size[0] / w, self.level0_size[1] / h

    @property
    def downsample(self) -> float:
        """Mean level-0 pixels per mask pixel."""
        sx, sy = self.scale
        return (sx + sy) / 2.0

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    def bbox(self) -> tuple[int, int, int, int] | None:
        """Level-0 (x, y, w, h) box around all tissue, or None if there is none."""
        if not self.mask.any():
            return None
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        sx, sy = self.scale
        x0, y0 = int(math.floor(cols[0] * sx)), int(math.floor(rows[0] * sy))
        x1 = min(int(math.ceil((cols[-1] + 1) * sx)), self.level0_size[0])
        y1 = min(int(math.ceil((rows[-1] + 1) * sy)), self.level0_size[1])
        return x0, y0, x1 - x0, y1 - y0

    def contains(self, x, y) -> np.ndarray:
        """Whether the mask pixel under each level-0 point is tissue (False outside)."""
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        sx, sy = self.scale
        j = np.floor(x / sx).astype(np.int64)
        i = np.floor(y / sy).astype(np.int64)
        h, w = self.mask.shape
        ok = (i >= 0) & (i < h) & (j >= 0) & (j < w)
        out = np.zeros(np.broadcast(x, y).shape, bool)
        out[ok] = self.mask[i[ok], j[ok]]
        return out

    def fraction_at(self, x, y, radius_px_level0: float, shape: str = "disc") -> np.ndarray:
        """Fraction of tissue in the disc (or square box) of radius ``radius`` around each level-0 centre.

        A mask pixel counts when its centre lies within the disc/box; pixels
        beyond the slide count as background.  When the radius is smaller than
        half a mask pixel (no pixel centre inside), the pixel under the centre
        decides (0 or 1).  Vectorised over ``x``, ``y`` (any equal shapes).
        """
        x = np.asarray(x, np.float64)
        y = np.asarray(y, np.float64)
        x, y = np.broadcast_arrays(x, y)
        shp = x.shape
        x, y = x.ravel(), y.ravel()
        r = float(radius_px_level0)
        if r < 0:
            raise ValueError("radius must be ≥ 0")
        if shape == "box":
            frac, count = self._box(x, y, r)
        elif shape == "disc":
            frac, count = self._disc(x, y, r)
        else:
            raise ValueError("shape must be 'disc' or 'box'")
        none = count == 0
        if none.any():
            frac[none] = self.contains(x[none], y[none])
        return frac.reshape(shp)

    # ---- implementations ---------------------------------------------------
    def _ranges(self, c: np.ndarray, r: float, s: float) -> tuple[np.ndarray, np.ndarray]:
        """Index range [lo, hi] of mask pixels whose centres (k+0.5)·s lie in [c−r, c+r]."""
        lo = np.ceil((c - r) / s - 0.5).astype(np.int64)
        hi = np.floor((c + r) / s - 0.5).astype(np.int64)
        return lo, hi

    def _box(self, x, y, r):
        sx, sy = self.scale
        h, w = self.mask.shape
        ii = np.zeros((h + 1, w + 1), np.int64)
        ii[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        x0, x1 = self._ranges(x, r, sx)
        y0, y1 = self._ranges(y, r, sy)
        count = np.clip(x1 - x0 + 1, 0, None) * np.clip(y1 - y0 + 1, 0, None)
        cx0, cx1 = np.clip(x0, 0, w), np.clip(x1 + 1, 0, w)
        cy0, cy1 = np.clip(y0, 0, h), np.clip(y1 + 1, 0, h)
        cx1, cy1 = np.maximum(cx1, cx0), np.maximum(cy1, cy0)
        tissue = ii[cy1, cx1] - ii[cy0, cx1] - ii[cy1, cx0] + ii[cy0, cx0]
        frac = np.zeros(x.shape, np.float64)
        ok = count > 0
        frac[ok] = tissue[ok] / count[ok]
        return frac, count

    def _disc(self, x, y, r):
        sx, sy = self.scale
        h, w = self.mask.shape
        n = x.size
        kx = int(math.floor(2 * r / sx)) + 2
        ky = int(math.floor(2 * r / sy)) + 2
        frac = np.zeros(n, np.float64)
        count = np.zeros(n, np.int64)
        if n == 0:
            return frac, count
        mpad = np.pad(self.mask, 1)  # index −1 and w/h land on the zero border
        chunk = max(1, int(2e7 // (kx * ky)))
        offx = np.arange(kx)
        offy = np.arange(ky)
        r2 = r * r
        for a in range(0, n, chunk):
            xs, ys = x[a : a + chunk], y[a : a + chunk]
            x0, _ = self._ranges(xs, r, sx)
            y0, _ = self._ranges(ys, r, sy)
            jj = x0[:, None] + offx[None, :]  # (B, kx)
            ii = y0[:, None] + offy[None, :]  # (B, ky)
            dx2 = ((jj + 0.5) * sx - xs[:, None]) ** 2
            dy2 = ((ii + 0.5) * sy - ys[:, None]) ** 2
            inside = dy2[:, :, None] + dx2[:, None, :] <= r2  # (B, ky, kx)
            jc = np.clip(jj, -1, w) + 1
            ic = np.clip(ii, -1, h) + 1
            vals = mpad[ic[:, :, None], jc[:, None, :]]
            cnt = inside.sum(axis=(1, 2))
            tis = (inside & vals).sum(axis=(1, 2))
            count[a : a + chunk] = cnt
            ok = cnt > 0
            frac[a : a + chunk][ok] = tis[ok] / cnt[ok]
        return frac, count


def tissue_mask(
    slide,
    method: str = "otsu",
    *,
    max_size: int = 2048,
    mpp: float | None = None,
    **kwargs,
) -> TissueMask:
    """Detect tissue on a thumbnail (longer side ≤ ``max_size``, from a coarse level) of ``slide``.

    ``mpp`` (µm per level-0 px) defaults to ``slide.mpp`` and scales the
    clean-up sizes; other keyword arguments go to :func:`mask_from_rgb`.
    A blank slide gives an all-False mask.
    """
    thumb = slide.get_thumbnail(max_size)
    w0, h0 = slide.dimensions
    mpp = mpp if mpp is not None else getattr(slide, "mpp", None)
    px_um = None
    if mpp:
        px_um = float(mpp) * ((w0 / thumb.shape[1]) + (h0 / thumb.shape[0])) / 2.0
    mask, t = mask_from_rgb(thumb, method, px_um=px_um, **kwargs)
    return TissueMask(mask=mask, level0_size=(int(w0), int(h0)), method=method, threshold=t)


def spot_mean_rgb(view: np.ndarray, level0_size: tuple[int, int], x, y, spot_px: float) -> np.ndarray:
    """Mean RGB of each spot's square tile (side ``spot_px`` level-0 px around (x, y)) on a low-resolution
    view of the slide, by an integral image (a block-mean thumbnail preserves tile means)."""
    h, w = view.shape[:2]
    sx, sy = w / level0_size[0], h / level0_size[1]
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = view[:, :, :3].mean(axis=2, dtype=np.float64).cumsum(0).cumsum(1)
    x, y, r = np.asarray(x, float), np.asarray(y, float), spot_px / 2.0
    x0 = np.clip(np.floor((x - r) * sx), 0, w - 1).astype(int)
    y0 = np.clip(np.floor((y - r) * sy), 0, h - 1).astype(int)
    x1 = np.clip(np.ceil((x + r) * sx), x0 + 1, w).astype(int)
    y1 = np.clip(np.ceil((y + r) * sy), y0 + 1, h).astype(int)
    return (ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) / ((x1 - x0) * (y1 - y0))


def tissue_spots(slide, grid: pd.DataFrame, spot_px: float, method: str = "otsu", min_fraction: float = 0.1,
                 view: np.ndarray | None = None) -> np.ndarray:
    """Boolean (N,) keep-mask of grid spots on tissue, decided on a low-resolution view (``view``, else a
    ≤2048-px thumbnail read from a coarse pyramid level).

    'otsu' (default): the tissue module's per-pixel Otsu-on-saturation classification; a spot is kept
    when at least ``min_fraction`` of its disc is tissue (the spot-level fraction is the clean-up).
    'mean_rgb': the reference rule — a spot is background when the mean RGB of its tile exceeds
    :data:`BACKGROUND_MEAN_RGB`.
    'none': every spot.
    """
    if method == "none" or len(grid) == 0:
        return np.ones(len(grid), dtype=bool)
    view = slide.get_thumbnail(2048) if view is None else view
    size = tuple(int(v) for v in slide.dimensions)
    x, y = grid["x"].to_numpy(), grid["y"].to_numpy()
    if method == "mean_rgb":
        return spot_mean_rgb(view, size, x, y, spot_px) <= BACKGROUND_MEAN_RGB
    mask, t = mask_from_rgb(view, method, clean=False)
    return TissueMask(mask, size, method, t).fraction_at(x, y, spot_px / 2.0) >= min_fraction
