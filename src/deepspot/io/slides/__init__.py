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

Rooms: ``base`` (the interface), one file per backend (``pil_backend``, ``openslide_backend``,
``tiffslide_backend``, ``tifffile_backend``; each declares the extensions it is chosen first for),
``opening`` (``open_slide``), ``integrity`` (TIFF checks before opening), ``budget`` (memory and decode
budget), ``decode_cache`` (the shared decodes), ``tiff_meta`` (TIFF tags), ``pixels`` and ``errors``.
"""

from __future__ import annotations

from deepspot.io.slides.base import MAX_SCAN_PIXELS, Slide
from deepspot.io.slides.budget import DECODE_FRACTION, available_memory, decode_budget
from deepspot.io.slides.decode_cache import clear_decode_cache
from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.opening import BACKENDS, open_slide
from deepspot.io.slides.openslide_backend import OpenSlideSlide
from deepspot.io.slides.pil_backend import EAGER_DECODE_BYTES, PREVIEW_SIZE, ImageSlide
from deepspot.io.slides.pixels import _as_rgb
from deepspot.io.slides.tifffile_backend import TifffileSlide
from deepspot.io.slides.tiffslide_backend import TiffSlideSlide

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
