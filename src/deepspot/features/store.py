"""Per-slide feature stores (zarr): spot features (N,d) and sub-spot features (N,S,d).

A store is written row by row as features are made (whole chunks, bounded memory),
under a temporary name renamed when complete, so a crash never leaves a store that
looks finished. The key records everything the features depend on (slide file,
encoder, crop geometry, feature mode); rows are matched by centre. Readers load
only the rows a prediction chunk needs (:class:`StoredFeatures`).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from deepspot.features.tiles import CROP_VERSION
from deepspot.io.atomic import replace_dir


def slide_fingerprint(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{int(st.st_mtime)}"


def feature_key(slide_path, encoder: str, tile_px: float, n_sub: int, mode: str = "standard",
                subspot_rule: str = "split") -> str:
    """Key of a store: everything a crop's features depend on except its centre. ``tile_px``: one side, or one
    per crop (N,) (cells cropped by their polygon's box): then the sides, in order, are part of the key."""
    h = hashlib.sha1()
    if np.ndim(tile_px):
        sides = np.round(np.asarray(tile_px, np.float64) * 100).astype(np.int64)
        side_key = ["sides", len(sides), hashlib.sha1(sides.tobytes()).hexdigest()]
    else:
        side_key = round(float(tile_px), 4)
    key = [slide_fingerprint(slide_path), encoder, side_key, int(n_sub), mode, CROP_VERSION]
    if subspot_rule != "split":  # the default rule keeps the keys stores were written under
        key.append(subspot_rule)
    h.update(json.dumps(key).encode())
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
    """Features of N spots in memory. spot: (N,d); subspot: (N,S,d) or None.

    Like :class:`StoredFeatures` it is a *feature source*: ``spot_rows(rows)`` and
    ``subspot_range(a, b)`` give the rows a chunked predictor needs.
    """

    spot: np.ndarray
    subspot: np.ndarray | None

    @property
    def dim(self) -> int:
        return int(self.spot.shape[1])

    def __len__(self) -> int:
        return int(self.spot.shape[0])

    def spot_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.spot[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    def subspot_range(self, a: int, b: int) -> np.ndarray | None:
        return None if self.subspot is None else np.asarray(self.subspot[a:b], dtype=np.float32)


def chunk_rows(row_bytes: int, target_bytes: int = 8 << 20) -> int:
    """Rows per zarr chunk so that one chunk holds about ``target_bytes``."""
    return int(max(16, min(65536, target_bytes // max(1, row_bytes))))


class RowWriter:
    """Writes an (N, ...) zarr array strictly in row order, buffering rows until a whole chunk is
    full, so every chunk is encoded once (no read-modify-write of partial chunks)."""

    def __init__(self, group: zarr.Group, name: str, shape: tuple, dtype: str = "float32", rows: int | None = None):
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        self.rows = rows or chunk_rows(row_bytes)
        self.array = group.create_array(name, shape=shape, dtype=dtype,
                                        chunks=(max(1, min(self.rows, shape[0])), *shape[1:]))
        self.buf = np.zeros((self.rows, *shape[1:]), dtype=dtype)
        self.start, self.fill, self.n = 0, 0, shape[0]

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        i = 0
        while i < len(x):
            k = min(len(x) - i, self.rows - self.fill)
            self.buf[self.fill:self.fill + k] = x[i:i + k]
            self.fill += k
            i += k
            if self.fill == self.rows:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            self.array[self.start:self.start + self.fill] = self.buf[:self.fill]
            self.start += self.fill
            self.fill = 0

    @property
    def written(self) -> int:
        return self.start + self.fill


class FeatureWriter:
    """Streams features, in row order, into ``<path>.partial-<unique>`` and renames it to ``path`` on close.

    Memory is one chunk per array whatever the number of spots. Each writer has its own temporary
    folder, so two jobs filling one cache never write into each other's store.
    """

    def __init__(self, path: str | Path, n: int, dim: int, n_sub: int, attrs: dict):
        from deepspot.io.owner import hold, remove_stale

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path.parent, glob.escape(self.path.name) + ".partial-*")  # a killed run's store
        self.tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".partial-", dir=self.path.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp's 0700 would make the finished cache private
        self.group = zarr.open_group(str(self.tmp), mode="w")  # (may recreate the folder: lock it after)
        self._lock = hold(self.tmp)
        self.group.attrs.update(attrs)
        self.centers = RowWriter(self.group, "centers", (n, 2), "float64")
        self.spot = RowWriter(self.group, "spot", (n, dim))
        self.subspot = RowWriter(self.group, "subspot", (n, n_sub, dim)) if n_sub > 0 else None
        self.n = n

    def write(self, start: int, centers: np.ndarray, spot: np.ndarray, subspot: np.ndarray | None) -> None:
        """Rows ``start:start+len(spot)``; rows must come in order."""
        if start != self.spot.written:
            raise ValueError(f"feature rows must be written in order: got row {start}, expected {self.spot.written}")
        self.centers.append(centers)
        self.spot.append(spot)
        if self.subspot is not None and subspot is not None:
            self.subspot.append(subspot)

    def close(self) -> Path:
        for w in (self.centers, self.spot, self.subspot):
            if w is not None:
                w.flush()
        if self.spot.written != self.n:
            raise ValueError(f"{self.path}: {self.spot.written} of {self.n} feature rows written")
        self.group.attrs["complete"] = True
        self._release()
        try:  # replaces an older store (now extended) or one another job finished meanwhile
            replace_dir(self.tmp, self.path)
        except OSError:  # another job put a store there in between: keep that one if it is whole
            if open_store(self.path) is None:
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.path

    def _release(self) -> None:
        self._lock.close()

    def abort(self) -> None:
        self._release()
        shutil.rmtree(self.tmp, ignore_errors=True)


class StoredFeatures:
    """Features of N spots in a finished store, read lazily: only the rows a chunk needs are loaded.

    ``rows`` (N,) maps spot i to its row in the store (None: the store's own order).
    """

    def __init__(self, path: str | Path, rows: np.ndarray | None = None):
        self.path = Path(path)
        g = open_store(self.path)
        if g is None:
            raise FileNotFoundError(f"{path}: no complete feature store")
        self._spot = g["spot"]
        self._sub = g["subspot"] if "subspot" in g else None
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is not None and len(self.rows) and self.rows.min() < 0:
            raise ValueError(f"{path}: some spots are not in the store")

    @property
    def dim(self) -> int:
        return int(self._spot.shape[1])

    def __len__(self) -> int:
        return int(self._spot.shape[0] if self.rows is None else len(self.rows))

    def _take(self, arr, rows: np.ndarray) -> np.ndarray:
        try:
            return self._take_rows(arr, rows)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a damaged chunk (decompression, truncated file): name the cache, not the codec
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{self.path}: feature cache is damaged ({type(e).__name__}{': ' + msg if msg else ''}); "
                             f"delete that folder and it is rebuilt") from None

    @staticmethod
    def _take_rows(arr, rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=np.float32)
        uniq, inv = np.unique(rows, return_inverse=True)
        if uniq[-1] - uniq[0] + 1 == len(uniq):  # a contiguous block: one slice
            block = arr[int(uniq[0]):int(uniq[-1]) + 1]
        else:
            block = arr.get_orthogonal_selection((uniq,) + (slice(None),) * (arr.ndim - 1))
        return np.asarray(block[inv], dtype=np.float32)

    def spot_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        return self._take(self._spot, rows if self.rows is None else self.rows[rows])

    def subspot_range(self, a: int, b: int) -> np.ndarray | None:
        if self._sub is None:
            return None
        rows = np.arange(a, b) if self.rows is None else self.rows[a:b]
        return self._take(self._sub, rows)

    def load(self) -> Features:
        """All rows in memory (small slides only)."""
        idx = np.arange(len(self))
        return Features(spot=self.spot_rows(idx), subspot=self.subspot_range(0, len(self)))


def open_store(path: str | Path) -> zarr.Group | None:
    """The finished store at ``path`` or None (missing or incomplete)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        g = zarr.open_group(str(path), mode="r")
        whole = g.attrs.get("complete") and all(k in g for k in ("centers", "spot"))
    except Exception:
        return None
    return g if whole else None


def load_features(path: str | Path, rows: np.ndarray | None = None) -> Features:
    """Features of a store, all rows or the given rows (in that order), in memory."""
    return StoredFeatures(path, rows).load()


def store_centers(path: str | Path) -> np.ndarray:
    g = open_store(path)
    return np.zeros((0, 2)) if g is None else g["centers"][:]
