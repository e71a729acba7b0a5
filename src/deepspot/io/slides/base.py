"""The :class:`Slide` interface every backend implements (geometry, region reads, thumbnails)."""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.pixels import _block_reduce, _pair, _resize

#: Most pixels ``get_thumbnail`` scans on one level; a slide whose coarsest suitable level is larger (a
#: single-level 100k x 100k TIFF) is refused at once with a hint to convert it, instead of a long scan.
MAX_SCAN_PIXELS = 1_000_000_000


class Slide(ABC):
    """A multi-resolution RGB image.

    Coordinates: ``location`` is (x, y) in level-0 pixels, sizes are (w, h);
    arrays come back as uint8 (h, w, 3) RGB.  ``mpp`` is µm per level-0 pixel
    or ``None`` when unknown.
    """

    #: File extensions (lower case, with the dot) this backend is chosen first for; see ``opening._candidates``.
    extensions: frozenset[str] = frozenset()
    backend: str = "?"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        self.path = Path(path)
        self._mpp_arg = None if mpp is None else float(mpp)
        self.mpp: float | None = self._mpp_arg
        self._closed = False

    def __reduce__(self):  # pickles as "reopen this file" (DataLoader workers, Ray tasks)
        return (type(self), (self.path, self._mpp_arg))

    # ---- geometry ----------------------------------------------------------
    @property
    @abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) of every level, level 0 first."""

    @property
    def level_downsamples(self) -> list[float]:
        w0, h0 = self.level_dimensions[0]
        return [((w0 / w) + (h0 / h)) / 2.0 for (w, h) in self.level_dimensions]

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def best_level_for_downsample(self, downsample: float) -> int:
        """Level with the largest downsample ≤ ``downsample`` (0.1 % tolerance)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.001 and d >= self.level_downsamples[best]:
                best = i
        return best

    # ---- reading -----------------------------------------------------------
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a box fully inside ``level`` (level coordinates) → uint8 (h,w,3)."""

    def _check_open(self):
        if self._closed:
            raise SlideError(self.path, "slide is closed")

    def _check_level(self, level: int) -> int:
        if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < self.level_count:
            raise SlideError(self.path, f"level {level!r} does not exist (slide has {self.level_count})")
        return int(level)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` (w,h) pixels of ``level`` whose top-left is ``location`` (level-0 px).

        Parts outside the image are white; a region entirely outside raises
        :class:`SlideError`.
        """
        self._check_open()
        level = self._check_level(level)
        x0, y0 = _pair(location, "location")
        w, h = _pair(size, "size")
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {(w, h)}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        lx, ly = int(math.floor(x0 / ds)), int(math.floor(y0 / ds))
        ix0, iy0 = max(lx, 0), max(ly, 0)
        ix1, iy1 = min(lx + w, lw), min(ly + h, lh)
        if ix0 >= ix1 or iy0 >= iy1:
            raise SlideError(
                self.path,
                f"region at {(x0, y0)} size {(w, h)} on level {level} lies outside the slide "
                f"({self.dimensions[0]}x{self.dimensions[1]} at level 0)",
            )
        try:
            part = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
        except SlideError:
            raise
        except Exception as e:  # decoder errors on truncated / corrupt data
            raise SlideError(self.path, f"cannot read level {level}: {type(e).__name__}: {e}") from e
        if (ix0, iy0, ix1, iy1) == (lx, ly, lx + w, ly + h):
            return part
        out = np.full((h, w, 3), 255, np.uint8)
        out[iy0 - ly : iy1 - ly, ix0 - lx : ix1 - lx] = part
        return out

    def read_scaled(
        self,
        location: tuple[int, int],
        size_level0: tuple[int, int],
        out_size: int | tuple[int, int],
    ) -> np.ndarray:
        """Read the level-0 box ``location + size_level0`` and return it at ``out_size`` (w,h).

        The box is read from the coarsest level that still has at least the
        output resolution, then resized (antialiased) to ``out_size``.
        """
        x, y = _pair(location, "location")
        bw, bh = _pair(size_level0, "size_level0")
        ow, oh = _pair(out_size, "out_size")
        if bw <= 0 or bh <= 0 or ow <= 0 or oh <= 0:
            raise SlideError(self.path, f"sizes must be positive, got box {(bw, bh)} out {(ow, oh)}")
        level = self.best_level_for_downsample(min(bw / ow, bh / oh))
        ds = self.level_downsamples[level]
        rw, rh = max(1, int(round(bw / ds))), max(1, int(round(bh / ds)))
        img = self.read_region((x, y), level, (rw, rh))
        return _resize(img, ow, oh)

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """Whole slide with its longer side ≤ ``max_size`` (no upscaling), from the coarsest suitable level."""
        self._check_open()
        max_size = int(max_size)
        if max_size <= 0:
            raise SlideError(self.path, f"thumbnail size must be positive, got {max_size}")
        level, (tw, th), f = self.thumbnail_plan(max_size)
        if f == 1:
            img = self._read_full_level(level)
        else:
            img = self._reduce_level(level, f)
        return _resize(img, tw, th)

    def thumbnail_plan(self, max_size: int) -> tuple[int, tuple[int, int], int]:
        """(level read, thumbnail (w, h), block factor) of ``get_thumbnail(max_size)``, without reading.

        Raises :class:`SlideError` when that level has more than :data:`MAX_SCAN_PIXELS` pixels (a huge
        image without a pyramid: scanning it whole would take many minutes).
        """
        w0, h0 = self.dimensions
        scale = min(1.0, int(max_size) / max(w0, h0))
        tw, th = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
        level = self.best_level_for_downsample(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        f = int(max(1, math.floor(min(lw / tw, lh / th))))
        if f > 1 and lw * lh > MAX_SCAN_PIXELS:
            raise SlideError(
                self.path, f"no pyramid level small enough for a thumbnail: the smallest is {lw}x{lh} "
                           f"({lw * lh / 1e6:,.0f} Mpx{', the only level' if self.level_count == 1 else ''}), too "
                           f"many to scan; convert it to a pyramidal TIFF first: deepspot convert-slide "
                           f"{self.path.name} {self.path.stem}-pyramid.tif", fatal=True)
        return level, (tw, th), f

    def _read_full_level(self, level: int) -> np.ndarray:
        lw, lh = self.level_dimensions[level]
        return self.read_region((0, 0), level, (lw, lh))

    def _reduce_level(self, level: int, f: int) -> np.ndarray:
        """Block-mean a whole level by ``f`` reading bands, so memory stays small."""
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        ow, oh = lw // f, lh // f
        band = max(1, (4096 * 4096 // max(lw, 1)) // f) * f  # ~16 Mpx per band
        rows = []
        for ly in range(0, oh * f, band):
            bh = min(band, oh * f - ly)
            part = self.read_region((0, int(math.ceil(ly * ds))), level, (ow * f, bh))
            rows.append(_block_reduce(part, f))
        return np.concatenate(rows, axis=0)

    # ---- lifetime ----------------------------------------------------------
    def close(self) -> None:
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions if not self._closed else (0, 0)
        return (
            f"{type(self).__name__}({str(self.path)!r}, {w}x{h}, levels={self.level_count if not self._closed else '?'}, "
            f"mpp={self.mpp})"
        )
