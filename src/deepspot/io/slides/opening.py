"""``open_slide``: pick the backend a file's extension and content call for, falling back in order."""

from __future__ import annotations

import math
import os
from pathlib import Path

from deepspot.io.slides.base import Slide
from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.openslide_backend import OpenSlideSlide
from deepspot.io.slides.pil_backend import ImageSlide
from deepspot.io.slides.tiff_meta import _is_tiff
from deepspot.io.slides.tifffile_backend import TifffileSlide
from deepspot.io.slides.tiffslide_backend import TiffSlideSlide

_WSI_EXT = OpenSlideSlide.extensions
_IMAGE_EXT = ImageSlide.extensions

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
    if ext in ImageSlide.extensions:
        return ["pil"]
    if ext in TifffileSlide.extensions:
        return ["tifffile", "tiffslide", "openslide"]
    if _is_tiff(p) or ext in OpenSlideSlide.extensions:
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
