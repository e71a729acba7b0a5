"""Patch features another tool wrote (TRIDENT, HEST, CLAM-style .h5), used in place of the encoder.

Layout read (TRIDENT's ``features_<encoder>/<slide>.h5``; HEST's patch-embedding files):

- ``features`` (N, d) float (``embeddings`` is read too, as HEST-Bench writes it);
- ``coords`` (N, 2): the top-left corner (x, y) of each patch in level-0 pixels;
- the patch side in level-0 pixels from ``coords``' attributes: ``patch_size_level0`` (TRIDENT), else
  ``patch_size`` × 2^``patch_level`` × ``custom_downsample`` (CLAM; level downsample assumed 2 per
  level), else ``patch_size`` with ``level0_magnification`` / ``target_magnification``;
- optional ``barcode`` / ``barcodes`` (N,) (HEST: the spot each patch was cut around).

A patch stands for the spot whose centre is nearest its centre, within ``tolerance`` × the patch side;
its side must be the model's spot crop (within ``size_tolerance``), else the features describe another
field of view and are refused, naming both sizes. The features are the spot features of DeepSpot's
``spot`` and ``spot_neighbors`` contexts (neighbours are other spots' patches); there are no
sub-spot features in such files, so a ``spot_subspot_neighbors`` model cannot use them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepspot.features.store import Features

log = logging.getLogger(__name__)

FEATURE_KEYS = ("features", "embeddings")
TOLERANCE = 0.25  # of the patch side: how far a patch centre may lie from its spot centre
SIZE_TOLERANCE = 0.1  # relative difference of patch side vs the model's spot crop that is refused


class ExternalFeatureError(ValueError):
    """A patch-feature file that cannot be used as it is; the message says why and what to do."""


@dataclass
class PatchFeatures:
    """Patch features read from a file: ``features`` (N, d), ``coords`` (N, 2) top-left level-0 px,
    ``patch_px`` the patch side in level-0 px (None when the file does not say)."""

    path: Path
    features: np.ndarray
    coords: np.ndarray
    patch_px: float | None
    attrs: dict = field(default_factory=dict)
    barcodes: np.ndarray | None = None
    encoder: str | None = None

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def centers(self) -> np.ndarray:
        """Patch centres (x, y) in level-0 px."""
        if self.patch_px is None:
            raise ExternalFeatureError(f"{self.path}: the patch size is not recorded (no patch_size_level0 or "
                                       f"patch_size attribute on coords); pass it (--patch-px)")
        return self.coords + self.patch_px / 2.0


def _attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.size == 1:
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def patch_side_level0(attrs: dict) -> float | None:
    """The patch side in level-0 px from TRIDENT / CLAM / HEST attributes (None when not recorded)."""
    if attrs.get("patch_size_level0") is not None:
        return float(attrs["patch_size_level0"])
    ps = attrs.get("patch_size")
    if ps is None:
        return None
    if attrs.get("level0_magnification") and attrs.get("target_magnification"):
        return float(ps) * float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    level = int(attrs.get("patch_level", 0) or 0)
    return float(ps) * (2.0 ** level) * float(attrs.get("custom_downsample", 1) or 1)


def read_patch_features(path: str | Path, patch_px: float | None = None) -> PatchFeatures:
    """Read a patch-feature .h5 (layout in the module doc). ``patch_px``: the patch side in level-0 px when
    the file does not record it (checked against it when it does)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ExternalFeatureError(f"{path}: not an HDF5 file ({str(e).splitlines()[0][:100]})") from None
    with f:
        key = next((k for k in FEATURE_KEYS if k in f), None)
        if key is None or "coords" not in f:
            raise ExternalFeatureError(f"{path}: needs datasets 'features' (or 'embeddings') and 'coords' "
                                       f"(TRIDENT / HEST patch features); has {sorted(f.keys())}")
        feats = np.asarray(f[key][:], dtype=np.float32)
        coords = np.asarray(f["coords"][:], dtype=np.float64)
        attrs = {**{k: _attr(v) for k, v in f.attrs.items()}, **{k: _attr(v) for k, v in f["coords"].attrs.items()}}
        fattrs = {k: _attr(v) for k, v in f[key].attrs.items()}
        bkey = next((k for k in ("barcode", "barcodes") if k in f), None)
        barcodes = None
        if bkey is not None:
            barcodes = np.asarray([b.decode() if isinstance(b, bytes) else str(b)
                                   for b in np.asarray(f[bkey][:]).reshape(-1)])
    if feats.ndim == 3 and feats.shape[0] == 1:  # (1, N, d) as some writers batch it
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(feats):
        raise ExternalFeatureError(f"{path}: '{key}' {feats.shape} and 'coords' {coords.shape} must be (N, d) "
                                   f"and (N, 2) with the same N")
    if not np.isfinite(feats).all():
        raise ExternalFeatureError(f"{path}: '{key}' holds NaN or infinite values")
    side = patch_side_level0(attrs)
    if side is not None and patch_px is not None and abs(side - patch_px) > 1e-6 * max(side, 1.0):
        raise ExternalFeatureError(f"{path}: the file says patches of {side:g} px at level 0, --patch-px {patch_px:g}")
    enc = fattrs.get("encoder") or attrs.get("encoder")
    return PatchFeatures(path, feats, coords, side if side is not None else patch_px, attrs, barcodes,
                         None if enc is None else str(enc))


def check_patch_size(pf: PatchFeatures, spot_px: float, mpp: float | None = None, what: str = "the model's spot crop",
                     size_tolerance: float = SIZE_TOLERANCE) -> None:
    """The file's patches must be the crops the model was (or will be) trained on."""
    if pf.patch_px is None:
        pf.centers  # noqa: B018  (raises the error that says the size is unknown)
    side = float(pf.patch_px)
    if abs(side - spot_px) > size_tolerance * spot_px:
        if mpp:
            raise ExternalFeatureError(
                f"{pf.path}: patches of {side:g} px = {side * mpp:.1f} µm at level 0, but {what} is {spot_px:.1f} px "
                f"= {spot_px * mpp:.1f} µm: features of another field of view do not fit this geometry (extract "
                f"patches of {spot_px:.0f} px, or train with a spot diameter of {side * mpp:.1f} µm)")
        raise ExternalFeatureError(f"{pf.path}: patches of {side:g} px at level 0, but {what} is {spot_px:.1f} px: "
                                   f"features of another field of view do not fit this geometry")


def match_spots(pf: PatchFeatures, centers: np.ndarray, tolerance: float = TOLERANCE) -> np.ndarray:
    """Row of ``pf`` for each spot centre (N, 2) level-0 px: the patch whose centre is nearest, within
    ``tolerance`` × the patch side. A spot without one is an error that says how many and the worst gap."""
    from scipy.spatial import cKDTree

    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    if len(pf.features) == 0:
        raise ExternalFeatureError(f"{pf.path}: no patches")
    d, rows = cKDTree(pf.centers).query(centers, k=1)
    tol = tolerance * pf.patch_px
    bad = d > tol
    if bad.any():
        raise ExternalFeatureError(
            f"{pf.path}: {int(bad.sum())} of {len(centers)} spots have no patch centred within {tol:.1f} px "
            f"({tolerance:g} × the {pf.patch_px:g} px patch; farthest {float(d.max()):.1f} px away, e.g. the spot at "
            f"({centers[bad][0][0]:.0f}, {centers[bad][0][1]:.0f})): the file was not made for these spots")
    return rows


def spot_features(pf: PatchFeatures, centers: np.ndarray, spot_px: float, n_sub: int = 0, mpp: float | None = None,
                  tolerance: float = TOLERANCE) -> Features:
    """The spot features (N, d) of ``centers`` from the file (no sub-spots: ``n_sub`` must be 0)."""
    if n_sub:
        raise ExternalFeatureError(f"{pf.path}: patch-feature files hold one feature per patch, no sub-spot "
                                   f"features; use a context without sub-spots (spot or spot_neighbors)")
    check_patch_size(pf, spot_px, mpp)
    rows = match_spots(pf, centers, tolerance)
    return Features(pf.features[rows], None)


def patch_feature_dim(path: str | Path) -> int:
    """The feature width of a patch-feature file, read from its shape (the features are not loaded)."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            key = next((k for k in FEATURE_KEYS if k in f), None)
            if key is None:
                raise ExternalFeatureError(f"{path}: needs a dataset 'features' (or 'embeddings'); has {sorted(f.keys())}")
            shape = f[key].shape
    except OSError as e:
        raise ExternalFeatureError(f"{path}: not an HDF5 file ({str(e).splitlines()[0][:100]})") from None
    if len(shape) not in (2, 3):
        raise ExternalFeatureError(f"{path}: '{key}' has shape {shape}, expected (N, d)")
    return int(shape[-1])


def file_spot_features(path: str | Path, centers: np.ndarray, spot_px: float, encoder_name: str, encoder_dim: int,
                       n_sub: int = 0, mpp: float | None = None, tolerance: float = TOLERANCE) -> Features:
    """The spot features of ``centers`` (N, 2, level-0 px) from file ``path``, made by the encoder the model is
    trained for: its width must be ``encoder_dim`` and, where the file names its encoder, the name
    ``encoder_name``; its patches must be the spot crop (``spot_px``) and lie on the spots
    (:func:`spot_features`)."""
    pf = read_patch_features(path)
    if pf.dim != int(encoder_dim):
        raise ExternalFeatureError(f"{pf.path}: {pf.dim}-d features, but the model is trained on {int(encoder_dim)}-d "
                                   f"features of encoder '{encoder_name}'")
    if pf.encoder and pf.encoder.strip().lower() != str(encoder_name).strip().lower():
        raise ExternalFeatureError(f"{pf.path}: made by encoder '{pf.encoder}', but the model is trained on "
                                   f"'{encoder_name}' features (pass --encoder {pf.encoder})")
    return spot_features(pf, centers, spot_px, n_sub=n_sub, mpp=mpp, tolerance=tolerance)


def _axis_step(v: np.ndarray, min_gap: float) -> float | None:
    """The lattice step along one axis: the median gap between neighbouring distinct positions."""
    u = np.unique(np.round(np.asarray(v, dtype=np.float64), 1))
    g = np.diff(u)
    g = g[g > min_gap]
    return float(np.median(g)) if len(g) else None


def patch_spots(pf: PatchFeatures):
    """The patches as spots: a DataFrame x, y (centres, level-0 px), array_row, array_col (the patch lattice:
    positions over the step between neighbouring distinct rows / columns, so a square patch grid gives
    square array coordinates and a Visium-like hex layout Visium's) and the centre-to-centre step (px)."""
    import pandas as pd

    c = pf.centers
    row, col, step = lattice_coordinates(c, default_step=float(pf.patch_px))
    return pd.DataFrame({"x": c[:, 0], "y": c[:, 1], "array_row": row, "array_col": col}), step


def lattice_coordinates(centers: np.ndarray, default_step: float = 1.0) -> tuple[np.ndarray, np.ndarray, float]:
    """(array_row, array_col, centre-to-centre step) of positions (N, 2) x, y on a square or hex lattice."""
    from scipy.spatial import cKDTree

    c = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    step = float(default_step)
    if len(c) > 1:
        d, _ = cKDTree(c).query(c, k=2)
        step = float(np.median(d[:, 1]))
    tol = 0.25 * step
    sx, sy = _axis_step(c[:, 0], tol) or step, _axis_step(c[:, 1], tol) or step
    origin = c.min(axis=0) if len(c) else np.zeros(2)
    col = np.rint((c[:, 0] - origin[0]) / sx).astype(int)
    row = np.rint((c[:, 1] - origin[1]) / sy).astype(int)
    return row, col, step


__all__ = ["ExternalFeatureError", "PatchFeatures", "check_patch_size", "file_spot_features", "match_spots",
           "patch_feature_dim", "patch_side_level0",
           "lattice_coordinates", "patch_spots", "read_patch_features", "spot_features"]
