"""Convert any image deepspot reads into a tiled pyramidal BigTIFF with its mpp, streaming.

:func:`convert_slide` (``deepspot convert-slide IN OUT.tif``) reads the source in full-width bands
of one tile row (a PNG of any size band by band through :mod:`deepspot.io.png_stream`, anything
else through :func:`deepspot.io.slides.open_slide` region reads), hands the band's tiles to
tifffile and appends its 2x-reduced copy to a raw file for the next level; each further level is
read back from its raw file the same way. Memory: a few bands; disk: the output plus a third of
the raw level-0 bytes for the levels (temporary, beside the output). Levels are SubIFDs of level 0
(as OME-TIFF and QPTIFF store them), resolution tags carry the mpp. The output appears only when
complete (temp name, then rename).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from deepspot.io.atomic import atomic_path
from deepspot.io.slides import SlideError, open_slide

__all__ = ["ConvertedSlide", "convert_slide"]

COMPRESSIONS = ("jpeg", "zlib", "none")


@dataclass
class ConvertedSlide:
    path: Path
    levels: list[tuple[int, int]]  # (width, height) of each level, level 0 first
    mpp: float


def _source_bands(src: Path, mpp: float | None, rows: int):
    """((width, height), mpp or None, iterator of (h, w, 3) uint8 bands of ``rows`` rows, top to bottom)."""
    from deepspot.io.png_stream import PngBands, PngError, band_to_array

    is_png = False
    with contextlib.suppress(OSError):
        with open(src, "rb") as fh:
            is_png = fh.read(8) == b"\x89PNG\r\n\x1a\n"
    if is_png:
        try:
            png = PngBands(src)
        except PngError as e:
            raise SlideError(src, f"corrupt or truncated image ({e})") from None
        if png.supported:
            def png_bands():
                try:
                    for _, band in png.bands(rows):
                        a = band_to_array(band)
                        yield np.repeat(a[:, :, None], 3, axis=2) if a.ndim == 2 else a
                except PngError as e:
                    raise SlideError(src, f"corrupt or truncated image ({e})") from None
            return (png.width, png.height), mpp, png_bands()
    slide = open_slide(src, mpp=mpp)
    w, h = slide.dimensions

    def slide_bands():
        with slide:
            for y in range(0, h, rows):
                yield slide.read_region((0, y), 0, (w, min(rows, h - y)))
    return (w, h), slide.mpp, slide_bands()


def _halve(band: np.ndarray) -> np.ndarray:
    """2x2 mean of a (h, w, 3) band (odd last row/column dropped)."""
    h, w = band.shape[0] // 2 * 2, band.shape[1] // 2 * 2
    b = band[:h, :w].astype(np.uint16)
    return ((b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2] + 2) // 4).astype(np.uint8)


def _tiles(bands: Iterator[np.ndarray], width: int, tile: int, sink: Callable[[np.ndarray], None],
           tick: Callable[[int], None]) -> Iterator[np.ndarray]:
    """Tiles (tile, tile, 3) of consecutive bands in row-major order (edges padded white). Each band goes
    to ``sink`` (its 2x reduction, for the next level) and ``tick`` (rows) before its tiles are yielded:
    tifffile stops pulling after the last tile, so nothing may wait behind it."""
    carry = None  # an odd-height band's last row, kept for the next band's 2x reduction
    for band in bands:
        if band.shape[1] != width:
            raise SlideError(None, f"band of width {band.shape[1]} in a {width}-wide image")
        both = band if carry is None else np.concatenate([carry, band])
        even = both.shape[0] // 2 * 2
        if even:
            sink(_halve(both[:even]))
        carry = both[even:] if even < both.shape[0] else None
        tick(band.shape[0])
        full = np.full((tile, -(-width // tile) * tile, 3), 255, np.uint8)
        full[:band.shape[0], :width] = band
        for x in range(0, width, tile):
            yield full[:, x:x + tile]


def _raw_bands(path: Path, width: int, height: int, rows: int) -> Iterator[np.ndarray]:
    row_bytes = width * 3
    with open(path, "rb") as fh:
        for y in range(0, height, rows):
            n = min(rows, height - y)
            buf = fh.read(n * row_bytes)
            if len(buf) != n * row_bytes:
                raise SlideError(path, f"level file ends after {y} of {height} rows")
            yield np.frombuffer(buf, np.uint8).reshape(n, width, 3)


def level_sizes(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """Level 0 and its halvings until the whole image fits one tile."""
    sizes = [(width, height)]
    while max(sizes[-1]) > tile and min(sizes[-1]) >= 2:
        w, h = sizes[-1]
        sizes.append((w // 2, h // 2))
    return sizes


def convert_slide(src: str | os.PathLike, out: str | os.PathLike, mpp: float | None = None, tile: int = 512,
                  compression: str = "jpeg", quality: int = 90, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> ConvertedSlide:
    """Write ``src`` as a tiled pyramidal BigTIFF at ``out`` (see the module doc).

    ``mpp`` (µm per level-0 pixel) overrides the source's; one of the two is required. ``progress``
    is called with (rows written, total rows over all levels).
    """
    import tifffile

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise SlideError(src, "file not found" if not src.exists() else "is not a file")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"{out}: the output must be a .tif or .tiff file")
    if out.is_dir():
        raise IsADirectoryError(f"{out}: is a folder; give the .tif file to write")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output would replace its source")
    try:
        (w, h), src_mpp, bands = _source_bands(src, mpp, tile)
    except MemoryError:
        raise SlideError(src, "too large to read in this machine's memory (check the image size in its header)",
                         fatal=True) from None
    if src_mpp is None:
        raise SlideError(src, "no mpp in the file; pass --mpp (µm per pixel) so the pyramid records it")
    sizes = level_sizes(w, h, tile)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # the reduced levels, raw
    total = sum(s[1] for s in sizes)
    state = {"rows": 0}

    def tick(n):
        state["rows"] += n
        if progress is not None:
            progress(state["rows"], total)

    opts = dict(dtype=np.uint8, tile=(tile, tile), photometric="rgb", metadata=None,
                compression=None if compression == "none" else compression,
                compressionargs={"level": quality} if compression == "jpeg" else None,
                resolution=(1e4 / src_mpp, 1e4 / src_mpp), resolutionunit="CENTIMETER")
    try:
        with atomic_path(out) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            for k, (lw, lh) in enumerate(sizes):
                nxt = work / f"level{k + 1}.raw"
                fh = open(nxt, "wb") if k + 1 < len(sizes) else None
                try:
                    if fh is not None:
                        nw = sizes[k + 1][0]

                        def sink(b, fh=fh, nw=nw):
                            fh.write(np.ascontiguousarray(b[:, :nw]).tobytes())
                    else:
                        def sink(b):
                            return None
                    src_bands = bands if k == 0 else _raw_bands(work / f"level{k}.raw", lw, lh, tile)
                    tiles = _tiles(src_bands, lw, tile, sink, tick)
                    before = state["rows"]
                    if k == 0:
                        tw.write(tiles, shape=(lh, lw, 3), subifds=len(sizes) - 1,
                                 description=f"deepspot pyramid|MPP = {src_mpp:g}", **opts)
                    else:
                        tw.write(tiles, shape=(lh, lw, 3), subfiletype=1, **opts)
                    if state["rows"] - before != lh:
                        raise SlideError(src, f"level {k}: the source gave {state['rows'] - before} of {lh} rows")
                finally:
                    if fh is not None:
                        fh.close()
                if k > 0:
                    os.remove(work / f"level{k}.raw")
    except MemoryError:
        raise SlideError(src, f"{w}×{h} px: out of memory while converting it", fatal=True) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return ConvertedSlide(out, sizes, float(src_mpp))

