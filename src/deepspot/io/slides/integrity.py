"""TIFF integrity checks made before a backend opens a file: truncated data, a broken directory chain,
tiles or strips too large to decode within the budget."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np

from deepspot.io.slides.budget import decode_budget
from deepspot.io.slides.errors import SlideError
from deepspot.io.slides.tiff_meta import _is_tiff

_MIN_CHUNK_CHECK = 1 << 28  # TIFF tiles/strips up to 256 MB decoded are never refused


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
