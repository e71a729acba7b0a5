"""The target scaler a checkpoint stores, and its inverse on predictions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepspot.config.constants import SCALERS
from deepspot.config.fields import _Fields


# --------------------------------------------------------------------------- target scaler


@dataclass(frozen=True, eq=False)
class Scaler:
    """Per-gene target scaler: ``y_scaled = (y - a) / b``; a, b (G,) float32.

    standard: a = mean, b = std; minmax: a = min, b = max - min; constant genes get b = 1. Stored in
    the checkpoint as ``{'kind', 'a', 'b'}`` (lists), plus ``lo``, ``hi`` (G,) when set: the range of
    each gene in the training targets, to which :meth:`inverse` clips predictions, so that a tile
    unlike any training tile (glass, pen, a slide edge) cannot predict expression far outside what
    was ever measured (a network extrapolates linearly there).
    """

    kind: str
    a: np.ndarray
    b: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    @classmethod
    def fit(cls, y: np.ndarray, kind: str | None) -> "Scaler | None":
        """Fit on (training) targets y (N, G); ``kind`` None or 'none' gives None (no scaling)."""
        if kind in (None, "none"):
            return None
        y = np.asarray(y, dtype=np.float64)
        if kind == "standard":
            a, b = y.mean(axis=0), y.std(axis=0)
        elif kind == "minmax":
            a, b = y.min(axis=0), y.max(axis=0) - y.min(axis=0)
        else:
            raise ValueError(f"unknown scaler {kind!r}; choose {', '.join(SCALERS)} or none")
        b = np.where(b > 1e-12, b, 1.0)
        return cls(kind, a.astype(np.float32), b.astype(np.float32), y.min(axis=0).astype(np.float32),
                   y.max(axis=0).astype(np.float32))

    def transform(self, y: np.ndarray) -> np.ndarray:
        """(N, G) targets -> scaled targets, float32."""
        return ((np.asarray(y, dtype=np.float32) - self.a) / self.b).astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """(N, G) scaled predictions -> target space (clipped to the training range when known), float32."""
        out = y * self.b + self.a
        if self.lo is not None and self.hi is not None:
            out = np.clip(out, self.lo, self.hi)
        return out

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "a": self.a.tolist(), "b": self.b.tolist()}
        if self.lo is not None and self.hi is not None:
            d.update(lo=self.lo.tolist(), hi=self.hi.tolist())
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", prefix: str = "scaler.",
                  n_genes: int | None = None) -> "Scaler":
        f = _Fields(d, source, prefix)
        kind = f.get("kind", "standard", str)
        arrays = []
        keys = ("a", "b", "lo", "hi") if ("lo" in d or "hi" in d) else ("a", "b")
        for key in keys:
            v = f.get(key, types=list, name="a list of numbers")
            try:
                arr = np.asarray(v, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                f.fail(key, "must be a list of numbers")
            if n_genes is not None and len(arr) != n_genes:
                f.fail(key, f"has {len(arr)} values for {n_genes} genes")
            if not np.all(np.isfinite(arr)):
                bad = int(np.flatnonzero(~np.isfinite(arr))[0])
                f.fail(key, f"has a NaN or infinite value (first at position {bad}); the gene would be all NaN")
            arrays.append(arr)
        if not np.all(arrays[1] != 0):
            f.fail("b", "has zeros (division by zero)")
        return cls(kind, *arrays)


def invert_scaler(pred: np.ndarray, scaler: "Scaler | dict | None") -> np.ndarray:
    """Undo an optional target scaler (a :class:`Scaler` or its stored dict form) on predictions (N, G)."""
    if not scaler:
        return pred
    return (scaler if isinstance(scaler, Scaler) else Scaler.from_dict(scaler)).inverse(pred)
