"""Write realistic test slides: pyramidal tiled TIFFs grown from a real H&E image.

The level-0 image is a mirrored mosaic of a source RGB image (no seams), so a
1431×1249 H&E photo becomes a 40 000×40 000 px slide with plausible texture.
Tiles are produced by a generator and streamed to tifffile, so memory stays
flat whatever the slide size.  Pixel (x, y) of level 0 is
``mosaic_pixels(unit, x, y)``; level k is the exact 2^k block mean of level 0
(computed from a block-meaned unit, which the mirrored layout allows when the
unit's sides are multiples of the largest downsample).

Layouts
-------
``pages``    every level a top-level page (level ≥1 marked reduced-resolution):
             read by openslide (generic tiled TIFF), tiffslide and tifffile.
``subifds``  levels as SubIFDs of level 0; with ``ome=True`` an OME-TIFF
             (PhysicalSizeX/Y in µm).  tifffile/tiffslide see the pyramid;
             openslide sees level 0 only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from deepspot.io.atomic import atomic_path

__all__ = ["make_unit", "mosaic_pixels", "write_pyramidal_tiff", "level_shapes"]


def make_unit(source: str | os.PathLike | np.ndarray, multiple: int = 1) -> np.ndarray:
    """Load ``source`` as uint8 RGB, cropped so both sides are multiples of ``multiple``."""
    if isinstance(source, np.ndarray):
        arr = source
    else:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(source) as im:
                arr = np.asarray(im.convert("RGB"))
        finally:
            Image.MAX_IMAGE_PIXELS = old
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)
    h = arr.shape[0] // multiple * multiple
    w = arr.shape[1] // multiple * multiple
    if h == 0 or w == 0:
        raise ValueError(f"source image {arr.shape[:2]} is smaller than one {multiple}px block")
    return arr[:h, :w]


def _super_tile(unit: np.ndarray) -> np.ndarray:
    """[[U, U⟷], [U↕, U⟷↕]]: tiling this has no seams."""
    top = np.concatenate([unit, unit[:, ::-1]], axis=1)
    return np.concatenate([top, top[::-1]], axis=0)


def mosaic_pixels(unit: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The (h, w, 3) box at (x, y) of the infinite mirrored mosaic of ``unit``."""
    sup = _super_tile(unit)
    return _take(sup, x, y, w, h)


def _take(sup: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    ys = np.arange(y, y + h) % sup.shape[0]
    xs = np.arange(x, x + w) % sup.shape[1]
    return sup[ys[:, None], xs[None, :]]


def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return img
    h, w = img.shape[:2]
    return img.reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8)


def level_shapes(width: int, height: int, levels: int, factor: int = 2) -> list[tuple[int, int]]:
    """(width, height) of each level: level k is floor(size / factor^k)."""
    return [(max(1, width // factor**k), max(1, height // factor**k)) for k in range(levels)]


def write_pyramidal_tiff(
    path: str | os.PathLike,
    source: str | os.PathLike | np.ndarray,
    width: int,
    height: int,
    *,
    mpp: float | None = 0.5,
    levels: int | None = None,
    factor: int = 2,
    tile: int = 256,
    compression: str | None = "jpeg",
    quality: int = 85,
    layout: str = "pages",
    ome: bool = False,
    min_level_size: int = 1024,
) -> Path:
    """Write a ``width``×``height`` pyramidal tiled TIFF made from ``source``; return its path.

    ``levels`` defaults to as many as needed for the smallest level to fit in
    ``min_level_size``.  ``compression``: ``"jpeg"`` (YCbCr, like scanners),
    ``"zlib"``/``"deflate"``, ``"lzw"`` or ``None`` (lossless → level-0 pixels
    equal ``mosaic_pixels``).  ``mpp`` goes to TIFF X/YResolution (pixels per
    cm) and, for OME-TIFF, PhysicalSizeX/Y.
    """
    import tifffile

    path = Path(path)
    if layout not in ("pages", "subifds"):
        raise ValueError("layout must be 'pages' or 'subifds'")
    if ome and layout != "subifds":
        layout = "subifds"
    if tile % 16:
        raise ValueError("tile must be a multiple of 16")
    if levels is None:
        levels = 1
        while max(width, height) // factor ** (levels - 1) > min_level_size and min(width, height) // factor**levels >= tile:
            levels += 1
    maxds = factor ** (levels - 1)
    unit = make_unit(source, multiple=maxds)
    supers = [_super_tile(_block_mean(unit, factor**k)) for k in range(levels)]
    shapes = level_shapes(width, height, levels, factor)

    def tiles(k: int) -> Iterator[np.ndarray]:
        lw, lh = shapes[k]
        sup = supers[k]
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                yield _take(sup, tx, ty, tile, tile)

    comp = None if compression in (None, "none", "raw") else compression
    kw: dict = {"tile": (tile, tile), "dtype": np.uint8}
    if comp == "jpeg":
        kw["photometric"] = "rgb"
        kw["compression"] = "jpeg"
        kw["compressionargs"] = {"level": int(quality)}
    else:
        kw["photometric"] = "rgb"
        if comp is not None:
            kw["compression"] = comp
    if mpp is not None:
        ppcm = 1e4 / float(mpp)
        kw["resolution"] = (ppcm, ppcm)
        kw["resolutionunit"] = "CENTIMETER"

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=width * height * 3 > 2**31, ome=ome) as tw:
        for k, (lw, lh) in enumerate(shapes):
            extra: dict = {}
            if k == 0:
                if layout == "subifds" and levels > 1:
                    extra["subifds"] = levels - 1
                if ome:
                    md = {"axes": "YXS"}
                    if mpp is not None:
                        md.update(PhysicalSizeX=float(mpp), PhysicalSizeXUnit="µm",
                                  PhysicalSizeY=float(mpp), PhysicalSizeYUnit="µm")
                    extra["metadata"] = md
                else:
                    extra["metadata"] = None
                    extra["description"] = f"deepspot synthetic slide {width}x{height} mpp={mpp}"
            else:
                extra["subfiletype"] = 1
                extra["metadata"] = None
                if mpp is not None:  # resolution of a reduced level in its own pixels
                    ppcm = 1e4 / (float(mpp) * width / lw)
                    extra["resolution"] = (ppcm, 1e4 / (float(mpp) * height / lh))
            tw.write(tiles(k), shape=(lh, lw, 3), **{**kw, **extra})
    return path
