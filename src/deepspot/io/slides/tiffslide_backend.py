"""The ``tiffslide`` backend: pure-Python fallback for SVS / tiled TIFF."""

from __future__ import annotations

import math
import os

from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.integrity import _check_tiff_complete
from deepspot.io.slides.openslide_backend import _OpenSlideAPISlide
from deepspot.io.slides.pixels import _as_rgb
from deepspot.io.slides.tiff_meta import _check_isotropic, _is_tiff, _plausible_mpp, _special_colour, _tiff_colour

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
    # none of its own: the fallback after openslide for every TIFF (after tifffile for OME-TIFF)
    extensions = frozenset()

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
