"""What a TIFF's tags say: is it a TIFF, its resolution (µm/px), how it stores colour."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from deepspot.io.slides.errors import SlideError

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
