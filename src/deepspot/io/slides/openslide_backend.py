"""The ``openslide`` backend: SVS, NDPI, MRXS, SCN, VMS, BIF, generic tiled TIFF (and the part it shares
with ``tiffslide``, whose library follows the same API)."""

from __future__ import annotations

import os

import numpy as np

from deepspot.io.slides.base import Slide
from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.integrity import _check_tiff_complete
from deepspot.io.slides.pixels import _as_rgb
from deepspot.io.slides.tiff_meta import _plausible_mpp

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
    extensions = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                            ".qptiff"})

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
