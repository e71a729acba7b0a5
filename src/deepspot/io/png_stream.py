"""Read a PNG band by band with memory of one band, however large the image.

PIL decodes a PNG only whole. :class:`PngBands` inflates the IDAT stream itself (``zlib``, bounded
output) and hands each band of scanlines to PIL as a small PNG of its own: the band's scanlines, still
filtered, after one unfiltered copy of the row above them (filter 0), so PIL's C code undoes the
filters exactly as it would for the whole file. A band costs its own pixels, nothing more.

Supported: non-interlaced, 8-bit gray, RGB, palette, gray+alpha and RGBA (what H&E exports are);
:meth:`PngBands.supported` says whether a file is one (else the caller decodes it whole with PIL).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

_SIG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class PngError(ValueError):
    """The PNG's structure is damaged (the message says where)."""


class PngBands:
    """A PNG's header and IDAT layout, read without decoding: ``width``, ``height``, ``depth``,
    ``color_type``, ``interlace``; :meth:`bands` yields (y0, PIL band image) top to bottom."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._idat: list[tuple[int, int]] = []  # (file offset, length) of every IDAT chunk's data
        self._extra: list[bytes] = []  # PLTE / tRNS chunks, copied into every band
        with open(self.path, "rb") as f:
            if f.read(8) != _SIG:
                raise PngError("not a PNG file")
            size = self.path.stat().st_size
            while True:
                head = f.read(8)
                if len(head) < 8:
                    raise PngError("file is truncated (no IEND chunk)")
                n, kind = struct.unpack(">I4s", head)
                pos = f.tell()
                if pos + n + 4 > size:
                    raise PngError(f"file is truncated ({kind.decode('latin-1')} chunk runs past the end)")
                if kind == b"IHDR":
                    (self.width, self.height, self.depth, self.color_type, _c, _f,
                     self.interlace) = struct.unpack(">IIBBBBB", f.read(13))
                    f.seek(pos)
                elif kind in (b"PLTE", b"tRNS") and not self._idat:
                    self._extra.append(_chunk(kind, f.read(n)))
                    f.seek(pos)
                elif kind == b"IDAT":
                    self._idat.append((pos, n))
                elif kind == b"IEND":
                    break
                f.seek(pos + n + 4)
        if not hasattr(self, "width") or not self._idat:
            raise PngError("no IHDR or no image data")

    @property
    def supported(self) -> bool:
        """Whether :meth:`bands` can read this file (8-bit, not interlaced, a known colour type)."""
        return self.depth == 8 and self.interlace == 0 and self.color_type in _CHANNELS

    @property
    def row_bytes(self) -> int:
        return self.width * _CHANNELS.get(self.color_type, 4)

    def _compressed(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            for off, n in self._idat:
                f.seek(off)
                for start in range(0, n, 1 << 20):
                    yield f.read(min(1 << 20, n - start))

    def _scanlines(self, rows: int) -> Iterator[bytes]:
        """Raw (filtered) scanlines, ``rows`` at a time (the last group may be shorter)."""
        want = rows * (1 + self.row_bytes)
        d = zlib.decompressobj()
        buf = bytearray()
        src = self._compressed()
        total = self.height * (1 + self.row_bytes)
        got = 0
        while got < total:
            need = min(want, total - got)
            while len(buf) < need:
                data = d.unconsumed_tail or next(src, None)
                if data is None:
                    raise PngError(f"image data ends after {got // (1 + self.row_bytes)} of {self.height} rows")
                try:
                    buf += d.decompress(data, need - len(buf))
                except zlib.error as e:
                    raise PngError(f"corrupt image data ({e})") from None
                if d.eof and len(buf) < need:
                    raise PngError(f"image data ends after {(got + len(buf)) // (1 + self.row_bytes)} of "
                                   f"{self.height} rows")
            out, buf = bytes(buf[:need]), buf[need:]
            got += need
            yield out

    def bands(self, rows: int = 512) -> Iterator[tuple[int, Image.Image]]:
        """(y0, band) for consecutive bands of ``rows`` rows (PIL images in the file's own mode)."""
        if not self.supported:
            raise PngError(f"{self.depth}-bit{' interlaced' if self.interlace else ''} PNG (colour type "
                           f"{self.color_type}) cannot be streamed")
        prev = bytes(self.row_bytes)  # the row above the first is zeros, as the PNG filters define
        y0 = 0
        for raw in self._scanlines(rows):
            n = len(raw) // (1 + self.row_bytes)
            ihdr = struct.pack(">IIBBBBB", self.width, n + 1, 8, self.color_type, 0, 0, 0)
            body = zlib.compress(b"\x00" + prev + raw, 0)
            png = _SIG + _chunk(b"IHDR", ihdr) + b"".join(self._extra) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")
            im = Image.open(io.BytesIO(png))
            im.load()
            band = im.crop((0, 1, self.width, n + 1))
            band.info.update(im.info)
            band.load()
            prev = band.crop((0, n - 1, self.width, n)).tobytes()
            yield y0, band
            y0 += n


def band_to_array(band: Image.Image) -> np.ndarray:
    """A band as uint8 (h, w) for gray, else (h, w, 3) RGB (alpha composited on white)."""
    if band.mode == "L":
        return np.asarray(band)
    if band.mode == "RGB":
        return np.asarray(band)
    rgba = band.convert("RGBA") if band.mode != "RGBA" else band
    a = np.asarray(rgba).astype(np.uint16)
    al = a[:, :, 3:4]
    return ((a[:, :, :3] * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
