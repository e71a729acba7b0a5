"""This process's last full-resolution image decode and last reduced JPEG decode, shared by every
slide object of the same file (one image at a time)."""

from __future__ import annotations

import threading

import numpy as np

_DECODED: dict[tuple, object] = {}  # the last full decode of this process: key -> ndarray or PIL image
_DECODED_LOCK = threading.Lock()
_PREVIEWS: dict[tuple, np.ndarray] = {}  # the last reduced JPEG decode: key -> (h', w', 3)


def clear_decode_cache() -> None:
    """Drop this process's cached full-resolution image decode."""
    with _DECODED_LOCK:
        _DECODED.clear()
        _PREVIEWS.clear()
