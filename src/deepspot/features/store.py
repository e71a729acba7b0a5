"""Per-slide feature stores (zarr): spot features (N,d) and sub-spot features (N,S,d).

A store is written under a temporary name and renamed when complete, so a crash
never leaves a store that looks finished. The key records everything the
features depend on (slide file, encoder, crop geometry, centres).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr


def slide_fingerprint(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}"


def feature_key(slide_path, encoder: str, tile_px: float, n_sub: int, mode: str = "standard") -> str:
    """Key of a store: everything a crop's features depend on except its centre."""
    h = hashlib.sha1()
    h.update(json.dumps([slide_fingerprint(slide_path), encoder, round(float(tile_px), 4), int(n_sub),
                         mode]).encode())
    return h.hexdigest()[:16]


def center_keys(centers: np.ndarray) -> np.ndarray:
    """Centres rounded to 1/100 px as int64 pairs packed into one int64-pair view for matching."""
    c = np.round(np.asarray(centers, dtype=np.float64).reshape(-1, 2) * 100.0).astype(np.int64)
    return c[:, 0] * (1 << 31) + c[:, 1]


def match_centers(stored: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each wanted centre in ``stored`` or -1: (M,2),(N,2) -> (N,)."""
    ks, kw = center_keys(stored), center_keys(wanted)
    order = np.argsort(ks, kind="stable")
    pos = np.searchsorted(ks[order], kw)
    pos = np.clip(pos, 0, max(len(ks) - 1, 0))
    found = (len(ks) > 0) & (ks[order][pos] == kw) if len(ks) else np.zeros(len(kw), bool)
    return np.where(found, order[pos] if len(ks) else -1, -1)


@dataclass
class Features:
    """Features of N spots. spot: (N,d); subspot: (N,S,d) or None."""

    spot: np.ndarray
    subspot: np.ndarray | None

    @property
    def dim(self) -> int:
        return int(self.spot.shape[1])

    def __len__(self) -> int:
        return int(self.spot.shape[0])


class FeatureWriter:
    """Streams batches of features into ``<path>.partial`` and renames to ``path`` on close."""

    def __init__(self, path: str | Path, n: int, dim: int, n_sub: int, attrs: dict, chunk: int = 1024):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.group = zarr.open_group(str(self.tmp), mode="w")
        self.group.attrs.update(attrs)
        self.centers = self.group.create_array("centers", shape=(n, 2), dtype="float64",
                                               chunks=(min(chunk * 16, max(n, 1)), 2))
        self.spot = self.group.create_array("spot", shape=(n, dim), dtype="float32",
                                            chunks=(min(chunk, max(n, 1)), dim))
        self.subspot = None
        if n_sub > 0:
            self.subspot = self.group.create_array("subspot", shape=(n, n_sub, dim), dtype="float32",
                                                   chunks=(min(chunk, max(n, 1)), n_sub, dim))
        self.n = n

    def write(self, start: int, centers: np.ndarray, spot: np.ndarray, subspot: np.ndarray | None) -> None:
        self.centers[start:start + len(spot)] = centers
        self.spot[start:start + len(spot)] = spot
        if self.subspot is not None and subspot is not None:
            self.subspot[start:start + len(spot)] = subspot

    def close(self) -> Path:
        self.group.attrs["complete"] = True
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_store(path: str | Path) -> zarr.Group | None:
    """The finished store at ``path`` or None (missing or incomplete)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        g = zarr.open_group(str(path), mode="r")
    except Exception:
        return None
    return g if g.attrs.get("complete") else None


def load_features(path: str | Path, rows: np.ndarray | None = None) -> Features:
    """Features of a store, all rows or the given rows (in that order)."""
    g = open_store(path)
    if g is None:
        raise FileNotFoundError(f"{path}: no complete feature store")
    if rows is None:
        return Features(spot=g["spot"][:], subspot=g["subspot"][:] if "subspot" in g else None)
    uniq, inv = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    spot = g["spot"].get_orthogonal_selection((uniq, slice(None)))[inv]
    sub = None
    if "subspot" in g:
        sub = g["subspot"].get_orthogonal_selection((uniq, slice(None), slice(None)))[inv]
    return Features(spot=spot, subspot=sub)


def store_centers(path: str | Path) -> np.ndarray:
    g = open_store(path)
    return np.zeros((0, 2)) if g is None else g["centers"][:]
