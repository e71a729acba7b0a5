"""Training over many samples without loading their features: bags read lazily (``StoreBags``) from the per-slide
zarr feature stores (features/store.py).

:class:`StoreBags` has the interface of :class:`deepspot.models.bags.Bags` that training and
prediction use (``len(bags)`` and ``bags.batch(ix)`` -> model inputs), so ``training.fit.fit`` and
``models.bags.predict_bags`` take it unchanged, on one process or under DDP. Spots are numbered
sample after sample; a batch reads only the store rows it needs (its spots and their neighbours)
and keeps recently decoded chunks in a bounded LRU cache, so memory stays flat in cohort size.
Targets (N, G) stay in memory (they are what ``fit`` takes); features — 10 crops × d floats per
spot, the bulk of a cohort — never are.

Reading is chunk by chunk (zarr decodes whole chunks): a batch of spots drawn uniformly from a
cohort much larger than the cache decodes about one chunk per spot. So ``fit`` shuffles StoreBags
spots with :meth:`StoreBags.epoch_order`: chunks are visited in a random order and spots shuffled
within groups of ``shuffle_window`` chunks, which decodes each chunk about once per epoch (a
shuffle buffer: batches mix ``shuffle_window`` chunks rather than the whole cohort).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepspot.features.store import match_centers, open_store, store_centers
from deepspot.geometry.neighbors import array_neighbors
from deepspot.io.datasets import DataError


@dataclass
class StoreSample:
    """The spots of one sample and the feature store that holds their features.

    centers: (N, 2) level-0 (x, y) px of the spots, rows in target order; array_row / array_col:
    the Visium array coordinates that define the neighbour context.
    """

    name: str
    store: Path
    centers: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray


class StoreBags:
    """Bags (spot, sub-spots, neighbours) of the spots of many samples, read from their stores on demand.

    ``neighbor_radius``: array-coordinate radius of the neighbour context (within a sample).
    ``use_subspots``: read sub-spot features (stores without them give none).
    ``cache_mb``: budget of the decoded-chunk cache (per process; at least the last chunk is kept).
    ``shuffle_window``: chunks mixed by :meth:`epoch_order` (None: a plain uniform shuffle).
    """

    def __init__(self, samples: list[StoreSample], neighbor_radius: int = 1, use_subspots: bool = True,
                 cache_mb: float = 512.0, shuffle_window: int | None = 8):
        if not samples:
            raise ValueError("StoreBags needs at least one sample")
        self.paths = [Path(s.store) for s in samples]
        self.names = [s.name for s in samples]
        rows, nidx, nmask, sizes, dims, has_sub, chunk_rows = [], [], [], [], set(), [], []
        offset = 0
        for s in samples:
            g = open_store(s.store)
            if g is None:
                raise DataError(f"{s.name}: no complete feature store at {s.store}")
            centers = np.asarray(s.centers, dtype=np.float64).reshape(-1, 2)
            r = match_centers(store_centers(s.store), centers)
            if (r < 0).any():
                raise DataError(f"{s.name}: {int((r < 0).sum())} of {len(r)} spots have no features in {s.store} "
                                f"(extract them first)")
            if len(np.asarray(s.array_row)) != len(centers) or len(np.asarray(s.array_col)) != len(centers):
                raise DataError(f"{s.name}: array_row/array_col must have one value per spot ({len(centers)})")
            i, m = array_neighbors(np.asarray(s.array_row), np.asarray(s.array_col), neighbor_radius)
            rows.append(r.astype(np.int64))
            nidx.append(i + offset)
            nmask.append(m)
            sizes.append(len(centers))
            dims.add(int(g["spot"].shape[1]))
            chunk_rows.append(min(int(g[k].chunks[0]) for k in ("spot", "subspot") if k in g))
            has_sub.append("subspot" in g)
            offset += len(centers)
        if len(dims) != 1:
            raise DataError(f"feature stores disagree on the feature dim ({sorted(dims)}): one encoder per run")
        self.dim = dims.pop()
        self.use_subspots = bool(use_subspots) and all(has_sub)
        if use_subspots and any(has_sub) and not all(has_sub):
            missing = [n for n, h in zip(self.names, has_sub) if not h]
            raise DataError(f"{missing[0]}: feature store has no sub-spot features (re-extract with n_sub > 0)")
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.store_rows = np.concatenate(rows)
        self.chunk_rows = np.asarray(chunk_rows, dtype=np.int64)  # rows per chunk (smallest array) per sample
        self.shuffle_window = shuffle_window
        k = max(a.shape[1] for a in nidx)
        self.neighbor_idx = np.zeros((offset, k), dtype=np.int64)
        self.neighbor_mask = np.zeros((offset, k), dtype=bool)
        for a, (i, m) in enumerate(zip(nidx, nmask)):
            lo, hi = self.offsets[a], self.offsets[a + 1]
            self.neighbor_idx[lo:hi, :i.shape[1]] = i
            self.neighbor_mask[lo:hi, :m.shape[1]] = m
        self.cache_bytes = int(cache_mb * 2**20)
        self._reset()

    # ---- process-local state (zarr handles, cache): rebuilt after pickling (DataLoader workers, DDP spawn)
    def _reset(self) -> None:
        self._groups: dict[int, object] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cached = 0
        self.chunks_read = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_groups", "_cache", "_cached", "chunks_read"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def sample_of(self) -> np.ndarray:
        """(N,) sample number of every spot."""
        return np.repeat(np.arange(len(self.paths)), np.diff(self.offsets))

    def _array(self, sample: int, name: str):
        g = self._groups.get(sample)
        if g is None:
            g = self._groups[sample] = open_store(self.paths[sample])
            if g is None:
                raise DataError(f"{self.names[sample]}: feature store {self.paths[sample]} vanished")
        return g[name]

    def _chunk(self, sample: int, name: str, c: int) -> np.ndarray:
        key = (sample, name, c)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        arr = self._array(sample, name)
        n = int(arr.chunks[0])
        block = arr[c * n:(c + 1) * n]
        self.chunks_read += 1
        self._cache[key] = block
        self._cached += block.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:  # evict least recently used
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return block

    def _gather(self, name: str, gids: np.ndarray) -> np.ndarray:
        """Rows of store array ``name`` for global spot ids ``gids`` (any order, repeats allowed)."""
        uniq, inv = np.unique(gids, return_inverse=True)
        samples = np.searchsorted(self.offsets, uniq, side="right") - 1
        rows = self.store_rows[uniq]
        out = None
        for s in np.unique(samples):
            sel = np.flatnonzero(samples == s)
            n = int(self._array(int(s), name).chunks[0])
            ch = rows[sel] // n
            for c in np.unique(ch):
                part = sel[ch == c]
                block = self._chunk(int(s), name, int(c))
                if out is None:
                    out = np.empty((len(uniq),) + block.shape[1:], dtype=block.dtype)
                out[part] = block[rows[part] - c * n]
        return out[inv]

    def epoch_order(self, index: np.ndarray, seed: int) -> np.ndarray:
        """A shuffled order of ``index`` (spot ids) for one epoch in which consecutive spots come from
        few store chunks: chunks in random order, spots shuffled within groups of ``shuffle_window``
        chunks. The same ``seed`` gives the same order (on every DDP rank)."""
        index = np.asarray(index, dtype=np.int64)
        rng = np.random.default_rng(seed)
        if not self.shuffle_window:
            return index[rng.permutation(len(index))]
        sample = np.searchsorted(self.offsets, index, side="right") - 1
        chunk = sample * (1 << 40) + self.store_rows[index] // self.chunk_rows[sample]
        keys, inv = np.unique(chunk, return_inverse=True)
        group = rng.permutation(len(keys))[inv] // self.shuffle_window
        return index[np.lexsort((rng.random(len(index)), group))]

    def batch(self, ix) -> dict:
        """Model inputs for spots ``ix`` (B,), as :meth:`deepspot.models.bags.Bags.batch`: spot (B,d),
        subspots (B,S,d) + subspot_mask, neighbors (B,K,d) + neighbor_mask (padding is zeros)."""
        ix = np.asarray(torch.as_tensor(ix).cpu(), dtype=np.int64).reshape(-1)
        nidx, nmask = self.neighbor_idx[ix], self.neighbor_mask[ix]
        spot_ids = np.concatenate([ix, nidx[nmask]])
        feats = self._gather("spot", spot_ids) if len(spot_ids) else np.zeros((0, self.dim), np.float32)
        spot = torch.from_numpy(np.ascontiguousarray(feats[:len(ix)]))
        neighbors = torch.zeros((len(ix), nidx.shape[1], self.dim), dtype=spot.dtype)
        neighbors[torch.from_numpy(nmask)] = torch.from_numpy(feats[len(ix):])
        out = {"spot": spot}
        if self.use_subspots:
            sub = torch.from_numpy(self._gather("subspot", ix)) if len(ix) else torch.zeros((0, 0, self.dim))
            out["subspots"] = sub
            out["subspot_mask"] = torch.ones(sub.shape[:2], dtype=torch.bool)
        out["neighbors"] = neighbors
        out["neighbor_mask"] = torch.from_numpy(nmask)
        return out


def build_stores(samples, encoder, geometry, cache_dir: str | Path, batch_size: int = 16, **run) -> list[StoreSample]:
    """Extract (or reuse) the feature store of every sample's spots and describe it as a StoreSample.

    samples: objects with ``sample_id``, ``image``, ``mpp`` and ``adata`` (obs array_row/array_col,
    obsm['spatial'] x, y px) — e.g. ``training.manifest.Sample``. geometry: an
    ``inference.predict.SpotGeometry`` (µm geometry needs each sample's mpp; its feature mode is used).
    Features stream into one store per slide under ``cache_dir``; none is held in memory. ``run``: the
    settings of this call (``num_workers``, default here 0: read in this process; ``device``, ``progress``),
    else :data:`deepspot.settings`.
    """
    from deepspot.features.extract import extract_to_store, store_path_for

    from deepspot.config.runtime import settings

    if "num_workers" not in run and settings.num_workers is None:
        run["num_workers"] = 0
    mode = geometry.feature_mode
    out = []
    for s in samples:
        a = s.adata
        if "array_row" not in a.obs or "array_col" not in a.obs:
            raise DataError(f"{s.sample_id}: obs needs array_row/array_col for the neighbour context")
        spec = geometry.grid.in_pixels(s.mpp) if geometry.grid.unit == "um" else geometry.grid
        path = store_path_for(cache_dir, s.image, encoder, spec.spot_diameter, geometry.n_sub, mode)
        extract_to_store(s.image, a.obsm["spatial"], spec.spot_diameter, encoder, path, n_sub=geometry.n_sub,
                         mode=mode, mpp=s.mpp, batch_size=batch_size, **run)
        out.append(StoreSample(s.sample_id, path, np.asarray(a.obsm["spatial"], dtype=np.float64),
                               a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()))
    return out
