"""The ``pil`` backend: JPG/PNG/BMP/GIF/WebP and other PIL formats (one level, no mpp)."""

from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image

from deepspot.io.slides.base import Slide
from deepspot.io.slides.budget import decode_budget
from deepspot.io.slides.decode_cache import _DECODED, _DECODED_LOCK, _PREVIEWS
from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.pixels import _as_rgb, _resize

#: Longest side of the reduced decode kept for thumbnails of a JPEG (PIL ``draft``: 1/2, 1/4 or 1/8 scale).
PREVIEW_SIZE = 2000  # the thumbnail predict takes
#: Images whose decode is at most this many bytes are decoded when opened (a corrupt one fails at open).
EAGER_DECODE_BYTES = 64 << 20
_PIL_LOCK = threading.Lock()

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
    extensions = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".jpe", ".jfif", ".ppm", ".pgm"})

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
