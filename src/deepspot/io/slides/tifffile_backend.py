"""The ``tifffile`` backend: pyramidal and OME-TIFF (levels from SubIFDs / series levels)."""

from __future__ import annotations

import os

import numpy as np

from deepspot.io.slides.base import Slide
from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.integrity import _check_tiff_complete
from deepspot.io.slides.pixels import _as_rgb
from deepspot.io.slides.tiff_meta import _check_isotropic, _is_tiff, _tiff_colour, _tifffile_mpp

class TifffileSlide(Slide):
    """Pyramidal / OME-TIFF (levels from SubIFDs or series levels) and plain TIFFs via tifffile + zarr."""

    backend = "tifffile"
    extensions = frozenset({".ome.tif", ".ome.tiff"})  # chosen before openslide for these

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
