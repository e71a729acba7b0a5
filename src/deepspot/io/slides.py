"""Slide readers behind one interface.

``open_slide(path)`` returns a :class:`Slide`: a pyramid of RGB levels with
``read_region`` in OpenSlide conventions (location in level-0 pixels, size in
the level's pixels), plus ``read_scaled`` (read a level-0 box from the best
level and resize) and ``get_thumbnail``.  Every failure a user can cause (a
missing, corrupt, truncated or unsupported file, a region outside the slide,
a bad level) raises :class:`SlideError` with a one-line message that names the
file and the reason.

Backends
--------
``pil``        JPG/PNG/BMP/GIF/WebP and other PIL formats (one level, no mpp).
``openslide``  SVS, NDPI, MRXS, SCN, VMS, BIF, generic tiled TIFF.
``tiffslide``  pure-Python fallback for SVS / tiled TIFF.
``tifffile``   pyramidal and OME-TIFF (levels from SubIFDs / series levels).
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "SlideError",
    "Slide",
    "ImageSlide",
    "open_slide",
    "require_mpp",
    "BACKENDS",
]


class SlideError(Exception):
    """A slide could not be opened or read; the message names file and reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = None if path is None else Path(path)
        self.reason = str(reason).strip().splitlines()[0] if str(reason).strip() else "unknown error"
        super().__init__(f"{path}: {self.reason}" if path is not None else self.reason)


# --------------------------------------------------------------------------- helpers


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    """Any (h,w), (h,w,1), (h,w,3) or (h,w,4) array → uint8 (h,w,3) RGB.

    RGBA is composited on white (straight alpha).
    """
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer):
            info = np.iinfo(a.dtype)
            a = (a.astype(np.float64) / info.max * 255.0).round().clip(0, 255).astype(np.uint8)
        else:  # float images are assumed in [0, 1]
            a = (np.nan_to_num(a.astype(np.float64)) * 255.0).round().clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3:
        raise ValueError(f"expected an image array, got shape {a.shape}")
    c = a.shape[2]
    if c == 3:
        return np.ascontiguousarray(a)
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:  # grey + alpha
        a = np.concatenate([np.repeat(a[:, :, :1], 3, axis=2), a[:, :, 1:2]], axis=2)
        c = 4
    if c >= 4:
        rgb = a[:, :, :3]
        alpha = a[:, :, 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        al = alpha.astype(np.uint16)[:, :, None]
        out = (rgb.astype(np.uint16) * al + 255 * (255 - al) + 127) // 255
        return out.astype(np.uint8)
    raise ValueError(f"unsupported channel count {c}")


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    return int(a), int(b)


def _resize(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Antialiased resize of a uint8 RGB array (PIL bilinear widens its kernel when shrinking)."""
    if img.shape[1] == out_w and img.shape[0] == out_h:
        return img
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((out_w, out_h), Image.BILINEAR))


def _block_reduce(img: np.ndarray, f: int) -> np.ndarray:
    """Mean over f×f blocks (img sides must be multiples of f)."""
    if f == 1:
        return img
    h, w = img.shape[:2]
    return (
        img.reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8)
    )


# --------------------------------------------------------------------------- interface


class Slide(ABC):
    """A multi-resolution RGB image.

    Coordinates: ``location`` is (x, y) in level-0 pixels, sizes are (w, h);
    arrays come back as uint8 (h, w, 3) RGB.  ``mpp`` is µm per level-0 pixel
    or ``None`` when unknown.
    """

    backend: str = "?"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        self.path = Path(path)
        self.mpp: float | None = None if mpp is None else float(mpp)
        self._closed = False

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
        w0, h0 = self.dimensions
        scale = min(1.0, max_size / max(w0, h0))
        tw, th = max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale)))
        level = self.best_level_for_downsample(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        f = int(max(1, math.floor(min(lw / tw, lh / th))))
        if f == 1:
            img = self._read_full_level(level)
        else:
            img = self._reduce_level(level, f)
        return _resize(img, tw, th)

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


# --------------------------------------------------------------------------- PIL images

#: Largest plain image (pixels) ImageSlide will decode; beyond this convert to a pyramidal TIFF.
MAX_IMAGE_PIXELS = 2_000_000_000
_PIL_LOCK = threading.Lock()


class ImageSlide(Slide):
    """JPG/PNG/… read whole into memory with PIL: one level, mpp only if given."""

    backend = "pil"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        super().__init__(path, mpp)
        p = self.path
        if not p.is_file():
            raise SlideError(p, "file not found")
        with _PIL_LOCK:  # H&E JPGs (10k×10k) exceed PIL's default bomb limit; use ours instead
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(p)
            except Exception as e:
                raise SlideError(p, f"not a readable image ({type(e).__name__}: {e})") from e
            finally:
                Image.MAX_IMAGE_PIXELS = old
        try:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise SlideError(
                    p,
                    f"{w}x{h} image is too large to decode in memory; convert it to a pyramidal TIFF",
                )
            try:
                im.load()
            except Exception as e:
                raise SlideError(p, f"corrupt or truncated image ({type(e).__name__}: {e})") from e
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                arr = _as_rgb(np.asarray(im.convert("RGBA")))
            elif im.mode == "RGB":
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("RGB"))
            self.format = im.format
        finally:
            im.close()
        self._img = np.ascontiguousarray(arr, dtype=np.uint8)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(self._img.shape[1], self._img.shape[0])]

    @property
    def level_downsamples(self) -> list[float]:
        return [1.0]

    def _read_level(self, level, x, y, w, h):
        return self._img[y : y + h, x : x + w].copy()

    def close(self):
        super().close()
        self._img = np.zeros((1, 1, 3), np.uint8)


# --------------------------------------------------------------------------- opening

_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".jpe", ".jfif", ".ppm", ".pgm"}

BACKENDS: dict[str, type[Slide]] = {"pil": ImageSlide}


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for s in (".ome.tiff", ".ome.tif"):
        if name.endswith(s):
            return s
    return p.suffix.lower()


def _candidates(p: Path) -> list[str]:
    ext = _suffix(p)
    if ext in _IMAGE_EXT:
        return ["pil"]
    return [b for b in ("openslide", "tiffslide", "tifffile", "pil") if b in BACKENDS]


def open_slide(path: str | os.PathLike, mpp: float | None = None, backend: str | None = None) -> Slide:
    """Open ``path`` with the backend its extension/content calls for (or ``backend``).

    ``mpp`` (µm per level-0 pixel) overrides whatever the file says.
    """
    p = Path(path)
    if mpp is not None and not (float(mpp) > 0 and math.isfinite(float(mpp))):
        raise SlideError(p, f"mpp must be a positive number, got {mpp!r}")
    if not p.exists():
        raise SlideError(p, "file not found")
    if p.is_dir():
        raise SlideError(p, "is a directory, not a slide file")
    if backend is not None:
        b = backend.lower()
        if b not in BACKENDS:
            raise SlideError(p, f"unknown backend {backend!r} (choose from {', '.join(sorted(BACKENDS))})")
        return BACKENDS[b](p, mpp=mpp)
    reasons = []
    for b in _candidates(p):
        try:
            return BACKENDS[b](p, mpp=mpp)
        except SlideError as e:
            reasons.append(f"{b}: {e.reason}")
    raise SlideError(p, "unsupported or corrupt slide (" + "; ".join(reasons) + ")")


def require_mpp(slide: Slide, mpp_override: float | None = None) -> float:
    """The slide's µm/px: ``mpp_override`` if given, else the file's; else a SlideError asking for ``--mpp``."""
    if mpp_override is not None:
        v = float(mpp_override)
        if not (v > 0 and math.isfinite(v)):
            raise SlideError(slide.path, f"mpp must be a positive number, got {mpp_override!r}")
        return v
    if slide.mpp is None:
        raise SlideError(
            slide.path,
            "resolution (µm per pixel) unknown: the file carries no mpp; pass --mpp (e.g. --mpp 0.5 for 20x)",
        )
    return float(slide.mpp)
