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

import logging
import math
import os
import struct
import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "SlideError",
    "Slide",
    "ImageSlide",
    "OpenSlideSlide",
    "TiffSlideSlide",
    "TifffileSlide",
    "open_slide",
    "BACKENDS",
]


class SlideError(Exception):
    """A slide could not be opened or read; the message names file and reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str, *, fatal: bool = False):
        self.fatal = fatal  # a verdict on the file itself: open_slide tries no other backend
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


#: Most pixels ``get_thumbnail`` scans on one level; a slide whose coarsest suitable level is larger (a
#: single-level 100k x 100k TIFF) is refused at once with a hint to convert it, instead of a long scan.
MAX_SCAN_PIXELS = 1_000_000_000
_MIN_CHUNK_CHECK = 1 << 28  # TIFF tiles/strips up to 256 MB decoded are never refused

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


# --------------------------------------------------------------------------- PIL images

#: Share of the available memory (MemAvailable) one full-resolution image decode may take; beyond it the
#: image is refused with a hint to convert it. ``DEEPSPOT_DECODE_BUDGET_GB`` sets the budget directly.
DECODE_FRACTION = 0.125
#: Longest side of the reduced decode kept for thumbnails of a JPEG (PIL ``draft``: 1/2, 1/4 or 1/8 scale).
PREVIEW_SIZE = 2000  # the thumbnail predict takes
#: Images whose decode is at most this many bytes are decoded when opened (a corrupt one fails at open).
EAGER_DECODE_BYTES = 64 << 20
_PIL_LOCK = threading.Lock()
_DECODED: dict[tuple, object] = {}  # the last full decode of this process: key -> ndarray or PIL image
_DECODED_LOCK = threading.Lock()
_PREVIEWS: dict[tuple, np.ndarray] = {}  # the last reduced JPEG decode: key -> (h', w', 3)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; else free pages; else 8 GiB)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def decode_budget() -> int:
    """Bytes one full-resolution image decode may take (``DEEPSPOT_DECODE_BUDGET_GB``, else an eighth of the available memory)."""
    env = os.environ.get("DEEPSPOT_DECODE_BUDGET_GB", "").strip()
    if env:
        try:
            gb = float(env)
        except ValueError:
            gb = float("nan")
        if not (math.isfinite(gb) and gb > 0):  # a setting, not the slide: fatal, no other backend tried
            raise SlideError(None, f"DEEPSPOT_DECODE_BUDGET_GB must be a positive number of GB, got {env!r}",
                             fatal=True)
        return int(gb * 1e9)
    return int(DECODE_FRACTION * available_memory())


def clear_decode_cache() -> None:
    """Drop this process's cached full-resolution image decode."""
    with _DECODED_LOCK:
        _DECODED.clear()
        _PREVIEWS.clear()


_GRAY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "F"}


class ImageSlide(Slide):
    """JPG/PNG/… as one level, mpp only if given.

    Opening reads the header only (plus, for a JPEG, a reduced decode for thumbnails, which also
    proves the data complete); the full-resolution decode happens on the first region read, once per
    process (the last image decoded is kept and reused by every slide object of the same file) and is
    refused beforehand when it would need more than :func:`decode_budget`. A PNG decodes band by band
    (:mod:`deepspot.io.png_stream`) into a (h, w) or (h, w, 3) array, so it costs its pixels once; other
    formats are held as PIL decodes them. Grayscale stays one channel in memory.
    """

    backend = "pil"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        super().__init__(path, mpp)
        p = self.path
        if not p.is_file():
            raise SlideError(p, "file not found")
        with _PIL_LOCK:  # H&E JPGs (10k×10k) exceed PIL's default bomb limit; the decode budget stands in for it
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(p)
            except Exception as e:
                raise SlideError(p, f"not a readable image ({type(e).__name__}: {e})") from e
            finally:
                Image.MAX_IMAGE_PIXELS = old
        try:
            self._w, self._h = im.size
            self._mode, self.format = im.mode, im.format
            if self._w < 1 or self._h < 1:
                raise SlideError(p, f"image has no pixels ({self._w}x{self._h})")
            self._png = None
            if im.format == "PNG":
                from deepspot.io.png_stream import PngBands, PngError

                try:
                    bands = PngBands(p)
                except PngError as e:
                    raise SlideError(p, f"corrupt or truncated image ({e})", fatal=True) from None
                self._png = bands if bands.supported else None
            st = p.stat()
            self._key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
            self._full = _DECODED.get(self._key)
            self._preview = _PREVIEWS.get(self._key)
            if self._full is None:
                need, budget = self.decode_bytes, decode_budget()
                if need > budget:
                    raise SlideError(
                        p, f"{self._w}x{self._h} {im.format or ''} image needs {need / 1e9:.1f} GB to decode, more "
                           f"than the {budget / 1e9:.1f} GB decode budget (an eighth of the available memory); convert it to "
                           f"a tiled pyramidal TIFF first: deepspot convert-slide {p.name} {p.stem}.tif --mpp <µm/px>",
                        fatal=True)
            # the thumbnail always comes from this reduced decode (made once per process), so every open of
            # the file gives the same tissue spots, whether or not the full image is decoded already
            if im.format == "JPEG" and max(self._w, self._h) > PREVIEW_SIZE and self._preview is None:
                self._preview = self._draft(im)  # decodes the whole stream (reduced): a broken file fails now
                _PREVIEWS.clear()
                _PREVIEWS[self._key] = self._preview
        finally:
            im.close()
        if self._full is None and self._preview is None and self.decode_bytes <= EAGER_DECODE_BYTES:
            self._decode()  # small: decode now, so a corrupt file fails at open

    @property
    def decode_bytes(self) -> int:
        """Bytes the full-resolution decode holds (PIL keeps RGB as 4 bytes a pixel; a PNG band decode 3 or 1)."""
        gray = self._mode in _GRAY_MODES or (self._png is not None and self._png.color_type == 0)
        if self._png is not None:
            return self._w * self._h * (1 if gray else 3)
        per_px = 1 if self._mode in ("1", "L", "P") else 2 if self._mode.startswith("I;16") else 4
        return self._w * self._h * (per_px + (0 if self._mode in ("L", "RGB") else (1 if gray else 4)))

    def _draft(self, im) -> np.ndarray:
        """A reduced-size decode (JPEG DCT scaling) with the longer side ≥ PREVIEW_SIZE."""
        s = PREVIEW_SIZE / max(self._w, self._h)
        try:
            im.draft("RGB" if im.mode not in ("L",) else "L", (max(1, int(self._w * s)), max(1, int(self._h * s))))
            im.load()
        except Exception as e:
            raise SlideError(self.path, f"corrupt or truncated image ({type(e).__name__}: {e})", fatal=True) from e
        return _as_rgb(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im))

    def _decode(self):
        """The full-resolution image (decoded now, or this process's earlier decode of the same file)."""
        if self._full is not None:
            return self._full
        with _DECODED_LOCK:
            full = _DECODED.get(self._key)
            if full is None:
                _DECODED.clear()  # one image at a time: free the previous before decoding the next
                full = self._decode_png() if self._png is not None else self._decode_pil()
                _DECODED[self._key] = full
        self._full = full
        return full

    def _decode_png(self) -> np.ndarray:
        from deepspot.io.png_stream import PngError, band_to_array

        gray = self._png.color_type == 0
        out = np.empty((self._h, self._w) if gray else (self._h, self._w, 3), np.uint8)
        try:
            for y0, band in self._png.bands(max(1, (64 << 20) // max(self._png.row_bytes, 1))):
                arr = band_to_array(band)
                out[y0:y0 + arr.shape[0]] = arr
        except PngError as e:
            raise SlideError(self.path, f"corrupt or truncated image ({e})", fatal=True) from None
        except Exception as e:
            raise SlideError(self.path, f"corrupt or truncated image ({type(e).__name__}: {e})", fatal=True) from e
        return out

    def _decode_pil(self):
        with _PIL_LOCK:
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(self.path)
                im.load()
            except Exception as e:
                raise SlideError(self.path, f"corrupt or truncated image ({type(e).__name__}: {e})", fatal=True) from e
            finally:
                Image.MAX_IMAGE_PIXELS = old
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            return _as_rgb(np.asarray(im.convert("RGBA")))
        if im.mode in ("RGB", "L"):
            return im
        if im.mode in _GRAY_MODES:
            return _as_rgb(np.asarray(im))[:, :, 0].copy()
        return im.convert("RGB")

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return [(self._w, self._h)]

    @property
    def level_downsamples(self) -> list[float]:
        return [1.0]

    def _read_level(self, level, x, y, w, h):
        img = self._decode()
        if isinstance(img, np.ndarray):
            return _as_rgb(img[y:y + h, x:x + w])
        return _as_rgb(np.asarray(img.crop((x, y, x + w, y + h))))

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """From the reduced JPEG decode when it is large enough (also once the full image is decoded: the
        same thumbnail, hence the same tissue spots, on every call, and no full-resolution scan)."""
        self._check_open()
        if self._preview is not None and int(max_size) > 0:
            ph, pw = self._preview.shape[:2]
            scale = min(1.0, int(max_size) / max(self._w, self._h))
            tw, th = max(1, int(round(self._w * scale))), max(1, int(round(self._h * scale)))
            if tw <= pw and th <= ph:
                return _resize(self._preview, tw, th)
        return super().get_thumbnail(max_size)

    def close(self):
        super().close()
        self._full = self._preview = None


# --------------------------------------------------------------------------- TIFF metadata helpers

_UNIT_TO_UM = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _plausible_mpp(v) -> float | None:
    """µm/px if it looks like a microscope resolution (0.01–100 µm/px), else None (e.g. 72 dpi)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and 0.01 <= v <= 100 else None


def _is_tiff(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM") and head[2:4] in (b"*\x00", b"\x00*", b"+\x00", b"\x00+")


def _tifffile_mpp(tf) -> float | None:
    """µm/px from OME PhysicalSizeX, an Aperio 'MPP =' description, or X/YResolution + ResolutionUnit."""
    import re

    if getattr(tf, "is_ome", False) and tf.ome_metadata:
        m = re.search(r"<Pixels\b[^>]*>", tf.ome_metadata)
        if m:
            px = re.search(r'PhysicalSizeX="([^"]+)"', m.group(0))
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', m.group(0))
            if px:
                factor = _UNIT_TO_UM.get(unit.group(1) if unit else "µm", None)
                if factor is not None:
                    v = _plausible_mpp(float(px.group(1)) * factor)
                    if v:
                        return v
    page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m and _plausible_mpp(m.group(1)):
        return float(m.group(1))
    tags = page.tags
    xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if xres is not None and unit is not None:
        num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
        if num and den:
            ppu = num / den
            u = int(unit.value)
            if u == 3:  # centimetre
                return _plausible_mpp(1e4 / ppu)
            if u == 2:  # inch
                return _plausible_mpp(25400.0 / ppu)
    return None


def _check_isotropic(p: Path, mx, my) -> None:
    """Refuse a resolution that differs between x and y (the grid needs square pixels): one line, --mpp wins."""
    mx, my = _plausible_mpp(mx), _plausible_mpp(my)
    if mx and my and abs(mx - my) > 0.01 * min(mx, my):
        raise SlideError(p, f"anisotropic resolution (x {mx:g}, y {my:g} µm/px): the spot grid needs square "
                            f"pixels; resample the image or pass --mpp to use one value", fatal=True)


def _tiff_colour(p: Path) -> dict:
    """How the first page of a TIFF stores colour: photometric name, sample dtype, palette (3, n) or None, and
    the x / y resolution in µm/px (None when absent)."""
    import tifffile

    with tifffile.TiffFile(p) as tf:
        page = tf.pages.first if hasattr(tf.pages, "first") else tf.pages[0]
        photo = getattr(page.photometric, "name", str(page.photometric))
        cmap = page.colormap if photo == "PALETTE" else None
        tags = page.tags
        res = [None, None]
        unit = tags.get("ResolutionUnit")
        for i, key in enumerate(("XResolution", "YResolution")):
            t = tags.get(key)
            if t is not None and unit is not None and int(unit.value) in (2, 3):
                num, den = t.value if isinstance(t.value, tuple) else (t.value, 1)
                if num and den:
                    res[i] = (1e4 if int(unit.value) == 3 else 25400.0) / (num / den)
        smax = tags.get("SMaxSampleValue")
        return {"photometric": photo, "dtype": np.dtype(page.dtype) if page.dtype is not None else None,
                "colormap": None if cmap is None else np.asarray(cmap), "mpp_xy": tuple(res),
                "smax": None if smax is None else np.max(np.asarray(smax.value, dtype=np.float64))}


def _special_colour(c: dict) -> str | None:
    if c["photometric"] in ("SEPARATED", "PALETTE"):
        return {"SEPARATED": "CMYK", "PALETTE": "palette"}[c["photometric"]] + " colour"
    if c["dtype"] is not None and c["dtype"].kind == "f":
        return "floating-point samples"
    return None


def _check_tiff_complete(p: Path) -> None:
    """SlideError if any tile/strip of any page points past the end of the file (truncated download)."""
    if not _is_tiff(p):
        return
    import tifffile

    size = p.stat().st_size
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)  # tifffile logs broken IFD chains; we report them ourselves
    try:
        with tifffile.TiffFile(p) as tf:
            pages = list(tf.pages)
            if not pages:
                raise SlideError(p, "TIFF header found but no readable image directory (corrupt file)", fatal=True)
            last = pages[-1] if pages else None
            if last is not None and not tf.is_ndpi:  # next-IFD pointer of the last page must be 0 or inside the file
                t = tf.tiff
                fh = tf.filehandle
                fh.seek(last.offset)
                (ntags,) = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))
                fh.seek(last.offset + t.tagnosize + ntags * t.tagsize)
                raw = fh.read(t.offsetsize)
                nxt = struct.unpack(t.offsetformat, raw)[0] if len(raw) == t.offsetsize else size
                if nxt >= size:
                    raise SlideError(
                        p, f"file is truncated ({size} bytes; the directory chain points beyond the end)", fatal=True
                    )
            for s in tf.series:
                for lv in s.levels:
                    pages.extend(lv.pages)
            budget = None
            for page in pages:
                if page is None or not hasattr(page, "dataoffsets"):
                    continue
                chunk = int(np.prod(getattr(page, "chunks", ()) or (0,))) * np.dtype(page.dtype or np.uint8).itemsize
                if chunk > _MIN_CHUNK_CHECK and chunk > (budget := budget or decode_budget()):
                    kind = "tile" if page.is_tiled else "strip"
                    raise SlideError(
                        p, f"one {kind} of this TIFF is {chunk / 1e9:.1f} GB decoded ({page.shape[1]}x{page.shape[0]} "
                           f"image in {len(page.dataoffsets)} {kind}s), more than the decode budget; re-save it as a "
                           f"tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)", fatal=True)
                offs, counts = page.dataoffsets, page.databytecounts
                if len(offs) and max(o + c for o, c in zip(offs, counts)) > size:
                    raise SlideError(
                        p, f"file is truncated ({size} bytes; image data extends beyond the end)", fatal=True
                    )
    except SlideError:
        raise
    except Exception as e:  # tifffile cannot even parse it: damaged structure
        raise SlideError(p, f"damaged TIFF structure ({type(e).__name__}: {e})", fatal=True) from e
    finally:
        log.setLevel(level)


# --------------------------------------------------------------------------- OpenSlide


class _OpenSlideAPISlide(Slide):
    """Shared part of the back-ends whose library follows the OpenSlide API (``openslide``,
    ``tiffslide``): ``self._handle`` is the open library object; level geometry is read once."""

    def _take_levels(self, handle) -> None:
        self._handle = handle
        self._dims = [tuple(map(int, d)) for d in handle.level_dimensions]
        self._ds = [float(d) for d in handle.level_downsamples]

    @property
    def properties(self) -> dict:
        return dict(self._handle.properties)

    @property
    def level_dimensions(self):
        return self._dims

    @property
    def level_downsamples(self):
        return self._ds

    def close(self):
        if not self._closed:
            self._handle.close()
        super().close()


class OpenSlideSlide(_OpenSlideAPISlide):
    """SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, Philips TIFF, generic tiled TIFF via OpenSlide."""

    backend = "openslide"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        super().__init__(path, mpp)
        p = self.path
        if not p.is_file() and not p.is_dir():
            raise SlideError(p, "file not found")
        try:
            import openslide
        except Exception as e:  # pragma: no cover - depends on the install
            raise SlideError(p, f"openslide is not available ({e})") from e
        _check_tiff_complete(p)
        try:
            self._osr = openslide.OpenSlide(str(p))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError(p, "format not supported by OpenSlide") from e
        except Exception as e:
            raise SlideError(p, f"OpenSlide cannot open it ({type(e).__name__}: {e})") from e
        props = self._osr.properties
        self.vendor = props.get("openslide.vendor")
        self._take_levels(self._osr)
        if self.mpp is None:
            mx = _plausible_mpp(props.get("openslide.mpp-x"))
            my = _plausible_mpp(props.get("openslide.mpp-y"))
            if mx and my:
                self.mpp = (mx + my) / 2.0
            elif mx:
                self.mpp = mx
            else:
                unit = (props.get("tiff.ResolutionUnit") or "").lower()
                xres = props.get("tiff.XResolution")
                try:
                    if xres and unit in ("centimeter", "inch"):
                        self.mpp = _plausible_mpp((1e4 if unit == "centimeter" else 25400.0) / float(xres))
                except (ValueError, ZeroDivisionError):
                    pass
        try:  # decode one pixel now so a broken file fails at open, not mid-run
            self._osr.read_region((0, 0), self.level_count - 1, (1, 1))
        except Exception as e:
            self._osr.close()
            raise SlideError(p, f"cannot decode image data ({type(e).__name__}: {e})") from e

    def _read_level(self, level, x, y, w, h):
        ds = self._ds[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        img = self._osr.read_region(loc, level, (w, h))
        return _as_rgb(np.asarray(img))


# --------------------------------------------------------------------------- tiffslide


def _level0_loc(lx: int, ds: float) -> int:
    """A level-0 coordinate that int(loc / ds) maps back to exactly ``lx`` (tiffslide's rule)."""
    loc = int(math.ceil(lx * ds))
    while loc > 0 and int(loc / ds) > lx:
        loc -= 1
    while int(loc / ds) < lx:
        loc += 1
    return loc


class TiffSlideSlide(_OpenSlideAPISlide):
    """SVS / tiled TIFF / OME-TIFF through tiffslide (pure Python, tifffile + zarr)."""

    backend = "tiffslide"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        super().__init__(path, mpp)
        p = self.path
        if not p.is_file():
            raise SlideError(p, "file not found")
        try:
            import tiffslide
        except Exception as e:  # pragma: no cover
            raise SlideError(p, f"tiffslide is not available ({e})") from e
        if not _is_tiff(p):
            raise SlideError(p, "not a TIFF file")
        _check_tiff_complete(p)
        try:
            colour = _tiff_colour(p)
        except Exception as e:  # noqa: BLE001 - tiffslide says why below
            colour = None
        if colour is not None:
            if mpp is None:
                _check_isotropic(p, *colour["mpp_xy"])
            why = _special_colour(colour)
            if why:  # tiffslide reads these as white / grey: tifffile's backend converts them
                raise SlideError(p, f"{why}: read through tifffile")
        try:
            self._ts = tiffslide.TiffSlide(str(p))
            self._take_levels(self._ts)
            props = self._ts.properties
        except Exception as e:
            raise SlideError(p, f"tiffslide cannot open it ({type(e).__name__}: {e})") from e
        if self.mpp is None:
            mx = _plausible_mpp(props.get("tiffslide.mpp-x"))
            my = _plausible_mpp(props.get("tiffslide.mpp-y"))
            self.mpp = (mx + my) / 2.0 if (mx and my) else mx
        try:
            self._read_level(self.level_count - 1, 0, 0, 1, 1)
        except Exception as e:
            self._ts.close()
            raise SlideError(p, f"cannot decode image data ({type(e).__name__}: {e})") from e

    def _read_level(self, level, x, y, w, h):
        ds = self._ds[level]
        loc = (_level0_loc(x, ds), _level0_loc(y, ds))
        arr = self._ts.read_region(loc, level, (w, h), as_array=True, padding=False)
        return _as_rgb(arr)


# --------------------------------------------------------------------------- tifffile


class TifffileSlide(Slide):
    """Pyramidal / OME-TIFF (levels from SubIFDs or series levels) and plain TIFFs via tifffile + zarr."""

    backend = "tifffile"

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        super().__init__(path, mpp)
        p = self.path
        if not p.is_file():
            raise SlideError(p, "file not found")
        import tifffile
        import zarr

        if not _is_tiff(p):
            raise SlideError(p, "not a TIFF file")
        _check_tiff_complete(p)
        try:
            self._tf = tifffile.TiffFile(p)
        except Exception as e:
            raise SlideError(p, f"tifffile cannot open it ({type(e).__name__}: {e})") from e
        try:
            sidx, series = self._pick_series()
            self._axes = series.axes
            self._levels = []
            dims = []
            for i, lv in enumerate(series.levels):
                store = self._tf.aszarr(series=sidx, level=i)
                z = zarr.open(store, mode="r")
                self._levels.append(z)
                shape = dict(zip(series.axes, lv.shape))
                dims.append((int(shape["X"]), int(shape["Y"])))
            self._dims = dims
            self._colour = _tiff_colour(p)
            self._float_scale = self._float_range() if (self._colour["dtype"] is not None
                                                        and self._colour["dtype"].kind == "f") else 1.0
            if self.mpp is None:
                _check_isotropic(p, *self._colour["mpp_xy"])
                self.mpp = _tifffile_mpp(self._tf)
        except SlideError:
            self._tf.close()
            raise
        except Exception as e:
            self._tf.close()
            raise SlideError(p, f"unreadable TIFF pyramid ({type(e).__name__}: {e})") from e
        try:
            self._read_level(self.level_count - 1, 0, 0, 1, 1)
        except Exception as e:
            self._tf.close()
            raise SlideError(p, f"cannot decode image data ({type(e).__name__}: {e})") from e

    def _pick_series(self):
        """The largest image series with X and Y axes (skips labels, macros, thumbnails)."""
        best, area = None, (-1, -1)
        for i, s in enumerate(self._tf.series):
            if "X" not in s.axes or "Y" not in s.axes:
                continue
            name = (s.name or "").lower()
            if any(k in name for k in ("label", "macro", "thumbnail", "overview")):
                continue
            shape = dict(zip(s.axes, s.shape))
            a = int(shape["X"]) * int(shape["Y"])
            if a > area[1]:
                best, area = s, (i, a)
        if best is None:
            raise SlideError(self.path, "no image with X and Y axes in the TIFF")
        return area[0], best

    @property
    def level_dimensions(self):
        return self._dims

    def _read_level(self, level, x, y, w, h):
        z = self._levels[level]
        idx, keep = [], []
        for ax, n in zip(self._axes, z.shape):
            if ax == "Y":
                idx.append(slice(y, y + h))
                keep.append(ax)
            elif ax == "X":
                idx.append(slice(x, x + w))
                keep.append(ax)
            elif ax in ("S", "C") and n in (2, 3, 4) and "S" not in keep and "C" not in keep:
                idx.append(slice(None))
                keep.append(ax)
            else:
                idx.append(0)
        arr = np.asarray(z[tuple(idx)])
        order = [keep.index("Y"), keep.index("X")] + [i for i, a in enumerate(keep) if a not in "YX"]
        return self._to_rgb(np.transpose(arr, order))

    def _float_range(self) -> float:
        """Float samples in [0, 1] (scale 1) or 0–255 (scale 1/255): SMaxSampleValue, else the smallest level."""
        top = self._colour["smax"]
        if top is None:
            z = self._levels[-1]
            top = float(np.nanmax(np.asarray(z[tuple(slice(0, 1024) for _ in z.shape)]))) if z.size else 1.0
        return 1.0 / 255.0 if top > 1.5 else 1.0

    def _to_rgb(self, arr: np.ndarray) -> np.ndarray:
        c = self._colour
        if c["photometric"] == "PALETTE" and c["colormap"] is not None and arr.ndim == 2:
            cmap = c["colormap"]
            lut = (cmap / 257.0 if cmap.max() > 255 else cmap).round().clip(0, 255).astype(np.uint8).T  # (n, 3)
            return lut[np.clip(arr.astype(np.int64), 0, len(lut) - 1)]
        if c["photometric"] == "SEPARATED" and arr.ndim == 3 and arr.shape[2] >= 4:
            v = arr[..., :4].astype(np.float64)
            v = v / (np.iinfo(arr.dtype).max / 255.0) if np.issubdtype(arr.dtype, np.integer) else v * 255.0
            rgb = 255.0 - np.minimum(255.0, v[..., :3] + v[..., 3:4])  # as PIL converts CMYK
            return rgb.round().clip(0, 255).astype(np.uint8)
        if self._float_scale != 1.0:
            arr = arr.astype(np.float64) * self._float_scale
        return _as_rgb(arr)

    def close(self):
        if not self._closed:
            self._tf.close()
        super().close()


# --------------------------------------------------------------------------- opening

_WSI_EXT = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".qptiff"}
_IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".jpe", ".jfif", ".ppm", ".pgm"}

BACKENDS: dict[str, type[Slide]] = {
    "openslide": OpenSlideSlide,
    "tiffslide": TiffSlideSlide,
    "tifffile": TifffileSlide,
    "pil": ImageSlide,
}


def _suffix(p: Path) -> str:
    name = p.name.lower()
    for s in (".ome.tiff", ".ome.tif"):
        if name.endswith(s):
            return s
    return p.suffix.lower()


def _candidates(p: Path) -> list[str]:
    """Backends to try, in order, for this file."""
    ext = _suffix(p)
    if ext in _IMAGE_EXT:
        return ["pil"]
    if ext in (".ome.tif", ".ome.tiff"):
        return ["tifffile", "tiffslide", "openslide"]
    if _is_tiff(p) or ext in _WSI_EXT:
        return ["openslide", "tiffslide", "tifffile", "pil"]
    return ["openslide", "pil"]


def _more_levels_elsewhere(slide: Slide) -> Slide:
    """OpenSlide reads SubIFD pyramids as one level; prefer tifffile when it finds more."""
    if slide.backend != "openslide" or slide.level_count > 1 or getattr(slide, "vendor", None) != "generic-tiff":
        return slide
    try:
        other = TifffileSlide(slide.path, mpp=slide._mpp_arg)
    except SlideError:
        return slide
    if other.level_count > 1:
        slide.close()
        return other
    other.close()
    return slide


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
            return _more_levels_elsewhere(BACKENDS[b](p, mpp=mpp))
        except SlideError as e:
            if e.fatal:
                raise
            reasons.append(f"{b}: {e.reason}")
    raise SlideError(p, "unsupported or corrupt slide (" + "; ".join(reasons) + ")")
