"""Views of a crop for augmentation and test-time augmentation (TTA).

- The 8 **dihedral views** (:data:`N_VIEWS`): view k = ``k % 4`` quarter turns, then a left-right flip
  when ``k >= 4``; view 0 is the crop as read. A view is applied to every crop of a spot (the spot crop
  and its sub-spot crops) and to every spot of a slide; DeepSpot pools sub-spots and neighbours with a
  permutation-invariant pool, so turning each crop is the same as turning the whole tissue.
- **HED stain jitter** (Tellez et al. 2018, "Whole-slide mitosis detection in H&E breast histology using
  PHH3 as a reference to train distilled stain-invariant convolutional networks"): in the
  haematoxylin-eosin-DAB space of Ruifrok & Johnston (``skimage.color.rgb2hed``), each channel is
  scaled by ``1 + a`` and shifted by ``b``, a and b uniform in ``±sigma`` (0.05 in the literature), drawn
  per crop from a seeded generator.

Each view is one more encoder pass per crop: features of a view are their own feature store (the view
is part of its key).
"""
from __future__ import annotations

import numpy as np
import torch

N_VIEWS = 8
STAIN_SIGMA = 0.05


def check_view(view: int) -> int:
    view = int(view)
    if not 0 <= view < N_VIEWS:
        raise ValueError(f"view must be in 0..{N_VIEWS - 1} (the 8 dihedral views), got {view}")
    return view


def dihedral(crops, view: int, axes: tuple[int, int] = (-3, -2)):
    """View ``view`` of image(s) ``crops`` (numpy or torch, channels last by default: ``axes`` are the
    (row, column) axes): ``view % 4`` quarter turns counter-clockwise, then a left-right flip if
    ``view >= 4``."""
    view = check_view(view)
    if isinstance(crops, torch.Tensor):
        out = torch.rot90(crops, view % 4, dims=axes)
        return torch.flip(out, dims=(axes[1],)).contiguous() if view >= 4 else out.contiguous()
    out = np.rot90(crops, view % 4, axes=axes)
    return np.ascontiguousarray(np.flip(out, axis=axes[1]) if view >= 4 else out)


def hed_jitter(crops: np.ndarray, rng: np.random.Generator, sigma: float = STAIN_SIGMA) -> np.ndarray:
    """uint8 RGB crops (..., H, W, 3) with their stain jittered in HED space, one draw per crop."""
    from skimage.color import hed2rgb, rgb2hed

    crops = np.asarray(crops)
    flat = crops.reshape(-1, *crops.shape[-3:])
    out = np.empty_like(flat)
    for i, c in enumerate(flat):
        hed = rgb2hed(c)
        a = rng.uniform(-sigma, sigma, size=3)
        b = rng.uniform(-sigma, sigma, size=3)
        rgb = hed2rgb(hed * (1 + a) + b)
        out[i] = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return out.reshape(crops.shape)


def view_crops(crops: torch.Tensor, view: int = 0, stain_sigma: float = 0.0, seed: int | None = None,
               start: int = 0) -> torch.Tensor:
    """uint8 crops (B, C, H, W, 3) of a batch seen as ``view``, with HED stain jitter of ``stain_sigma``
    (0: none) drawn per spot from ``seed`` and the spot's position ``start + i`` (so a spot gets the same
    jitter whatever the batch it falls in)."""
    out = dihedral(crops, view) if view else crops
    if stain_sigma:
        arr = out.numpy().copy()
        for i in range(len(arr)):
            rng = np.random.default_rng([int(seed or 0), int(view), int(start + i)])
            arr[i] = hed_jitter(arr[i], rng, stain_sigma)
        out = torch.from_numpy(arr)
    return out


def view_tag(view: int = 0, stain_sigma: float = 0.0, seed: int | None = None) -> str:
    """The part of a feature-store name that says which view it holds ('' for the crop as read)."""
    tag = f"-v{check_view(view)}" if view else ""
    if stain_sigma:
        tag += f"-hed{stain_sigma:g}s{int(seed or 0)}"
    return tag


__all__ = ["N_VIEWS", "STAIN_SIGMA", "check_view", "dihedral", "hed_jitter", "view_crops", "view_tag"]
