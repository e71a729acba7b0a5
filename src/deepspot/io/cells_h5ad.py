"""An h5ad of cells written while its rows arrive in blocks, in any order, never held whole.

``predict-cells`` predicts cells in blocks that follow the slide (a Z curve), not the input table, while the
h5ad keeps the table's order. Writing each block's rows straight into their places of an HDF5 dataset would
rewrite every compressed chunk for every block (a block's rows are spread over the whole table). Instead the
rows are spilled, as they come, into one pair of files per *slab* (a run of ``rows_per_slab`` consecutive
rows of the output, 16 MB of float32); at the end each slab is read back, put in order (every row checked
to be written exactly once) and written to ``X`` whole. Memory: one block and one slab, whatever the number of
cells; disk: the spill files, about the size of X, removed afterwards.

The file is anndata's on-disk format: obs, var, obsm and uns written by anndata itself (the AnnData without
X), then ``X`` as a dense float32 dataset (encoding ``array`` 0.2.0), filled slab by slab.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np

from deepspot.io.outputs import h5_writing
from deepspot.io.owner import hold, new_temp_dir, remove_stale

SLAB_BYTES = 16 << 20  # float32 values of one slab of output rows (twice this in memory at the end)
SPILL_PREFIX = ".cells-blocks.work-"  # the spill folder's name (a leftover name to the output owner)
CHUNK_BYTES = 1 << 20  # one HDF5 chunk of X (compressed one by one; a reader of a few rows reads one chunk)


class BlockedRows:
    """Rows (N, G) float32 received in blocks (``write(rows, values)``, any order, each row once), written
    to an h5ad by :meth:`finish`. ``mean`` / ``variance`` per column over all rows come free (for picking
    the genes of a figure without reading X back)."""

    def __init__(self, n: int, n_cols: int, spill_dir: str | Path, slab_bytes: int | None = None,
                 chunk_bytes: int | None = None):
        self.n, self.g = int(n), int(n_cols)
        row = 4 * max(1, self.g)
        # X's chunks: about CHUNK_BYTES each; a slab is a whole number of them, so each chunk is written once
        self.chunk_rows = max(1, min(self.n, int(chunk_bytes or CHUNK_BYTES) // row))
        self.rows_per_slab = max(1, int(slab_bytes or SLAB_BYTES) // row // self.chunk_rows) * self.chunk_rows
        # a work folder as the spot writer's (``.<name>.work-<random>``, held while alive): the output owner
        # passes over it, and a killed run's is removed by the next one instead of blocking its folder
        remove_stale(Path(spill_dir), f"{SPILL_PREFIX}*")
        self.dir = new_temp_dir(Path(spill_dir), SPILL_PREFIX)
        self._lock = hold(self.dir)
        self.sum = np.zeros(self.g, np.float64)
        self.sumsq = np.zeros(self.g, np.float64)
        self.count = 0

    def _files(self, slab: int) -> tuple[Path, Path]:
        return self.dir / f"{slab}.rows", self.dir / f"{slab}.values"

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if values.shape != (len(rows), self.g):
            raise ValueError(f"a block of {len(rows)} rows has values of shape {values.shape}, expected "
                             f"({len(rows)}, {self.g})")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise ValueError(f"rows outside 0..{self.n - 1}")
        for a in range(0, len(rows), 2048):  # float64 sums, a few rows at a time (no float64 copy of the block)
            part = values[a:a + 2048].astype(np.float64)
            self.sum += part.sum(axis=0)
            self.sumsq += np.einsum("ij,ij->j", part, part)
        self.count += len(rows)
        slab = rows // self.rows_per_slab
        order = np.argsort(slab, kind="stable")
        slab = slab[order]
        cuts = np.flatnonzero(np.diff(slab)) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(slab)]):
            rpath, vpath = self._files(int(slab[a]))
            pick = order[a:b]
            with open(rpath, "ab") as fr, open(vpath, "ab") as fv:
                fr.write(rows[pick].tobytes())
                fv.write(values[pick].tobytes())

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.sumsq / max(self.count, 1) - self.mean ** 2, 0.0)

    def finish(self, path: str | Path, skeleton: ad.AnnData, target: str | Path | None = None) -> Path:
        """Write ``skeleton`` (an AnnData without X, shape (N, G)) to ``path`` with X = the rows received.
        ``path`` is written as it is: callers that need it atomic pass a temp path (``target``: the final
        name, for the messages)."""
        import h5py

        if skeleton.shape != (self.n, self.g):
            raise ValueError(f"the AnnData is {skeleton.shape[0]} x {skeleton.shape[1]}, the rows {self.n} x {self.g}")
        if skeleton.X is not None:
            raise ValueError("the AnnData given to finish() must have no X (X is the rows received)")
        name = target or path
        with h5_writing(path, target):
            skeleton.write_h5ad(path, compression="gzip")
            with h5py.File(path, "a") as f:
                x = f.create_dataset("X", shape=(self.n, self.g), dtype="float32", compression="gzip",
                                     chunks=(self.chunk_rows, max(self.g, 1)))
                x.attrs["encoding-type"], x.attrs["encoding-version"] = "array", "0.2.0"
                for a in range(0, self.n, self.rows_per_slab):
                    b = min(a + self.rows_per_slab, self.n)
                    rpath, vpath = self._files(a // self.rows_per_slab)
                    rows = np.fromfile(rpath, dtype=np.int64) if rpath.exists() else np.zeros(0, np.int64)
                    vals = (np.fromfile(vpath, dtype=np.float32).reshape(-1, self.g) if vpath.exists() else
                            np.zeros((0, self.g), np.float32))
                    seen = np.bincount(rows - a, minlength=b - a)
                    if len(vals) != len(rows) or not (seen == 1).all():
                        first = int(np.flatnonzero(seen != 1)[0]) if (seen != 1).any() else 0
                        raise RuntimeError(f"{name}: row {a + first} was written {int(seen[first])} times, not once")
                    slab = np.empty((b - a, self.g), np.float32)
                    slab[rows - a] = vals
                    x[a:b] = slab
        self.close()
        return Path(path)

    def close(self) -> None:
        """Remove the spill files (also after an error)."""
        self._lock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["BlockedRows", "CHUNK_BYTES", "SLAB_BYTES"]
