"""Pixel helpers shared by the backends: any array to uint8 RGB, size pairs, resizing, block means."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    """Any (h,w), (h,w,1), (h,w,3) or (h,w,4) array → uint8 (h,w,3) RGB.

    RGBA is composited on white (straight alpha).
    """
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        if a.dtype == np.bool_:
            a = a.astype(np.uint8) * 255
        elif np.issubdtype(a.dtype, np.integer):
            info = np.iinfo(a.dtype)
            a = (a.astype(np.float64) / info.max * 255.0).round().clip(0, 255).astype(np.uint8)
        else:  # float images are assumed in [0, 1]
            a = (np.nan_to_num(a.astype(np.float64)) * 255.0).round().clip(0, 255).astype(np.uint8)
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3:
        raise ValueError(f"expected an image array, got shape {a.shape}")
    c = a.shape[2]
    if c == 3:
        return np.ascontiguousarray(a)
    if c == 1:
        return np.repeat(a, 3, axis=2)
    if c == 2:  # grey + alpha
        a = np.concatenate([np.repeat(a[:, :, :1], 3, axis=2), a[:, :, 1:2]], axis=2)
        c = 4
    if c >= 4:
        rgb = a[:, :, :3]
        alpha = a[:, :, 3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        al = alpha.astype(np.uint16)[:, :, None]
        out = (rgb.astype(np.uint16) * al + 255 * (255 - al) + 127) // 255
        return out.astype(np.uint8)
    raise ValueError(f"unsupported channel count {c}")


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    return int(a), int(b)


def _resize(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Antialiased resize of a uint8 RGB array (PIL bilinear widens its kernel when shrinking)."""
    if img.shape[1] == out_w and img.shape[0] == out_h:
        return img
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((out_w, out_h), Image.BILINEAR))


def _block_reduce(img: np.ndarray, f: int) -> np.ndarray:
    """Mean over f×f blocks (img sides must be multiples of f)."""
    if f == 1:
        return img
    h, w = img.shape[:2]
    return (
        img.reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3), dtype=np.float32).round().astype(np.uint8)
    )
