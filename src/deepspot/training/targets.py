"""Training targets: counts -> normalize_total(1e4) -> log1p (scanpy), gene panel, optional scaler."""
from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from deepspot.config import Scaler
from deepspot.io.spatial import SpatialDataError
from deepspot.training.recipe import HVG_FLAVORS

log = logging.getLogger(__name__)


def log_normalize(adata: ad.AnnData, target_sum: float = 1e4, genes: list[str] | None = None) -> np.ndarray:
    """Dense (N, G) float32 log1p(counts normalised to ``target_sum`` per spot). ``adata`` is not modified.

    The same numbers as scanpy's ``normalize_total(target_sum)`` + ``log1p`` (spots without counts stay 0),
    computed directly (no copy of the whole matrix). ``genes``: normalise each spot by its library size
    over ALL genes of ``adata``, then return only these genes' columns, in this order. (Normalising
    ``adata[:, panel]`` instead would rescale each spot to ``target_sum`` within the panel.)"""
    X = adata.X
    lib = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    if genes is not None:
        pos = pd.Index(list(map(str, adata.var_names))).get_indexer(list(genes))
        if (pos < 0).any():
            missing = [g for g, p in zip(genes, pos) if p < 0][:5]
            raise ValueError(f"genes not in the data: {missing}")
        X = X[:, pos]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    scale = np.where(lib > 0, target_sum / np.where(lib > 0, lib, 1.0), 0.0)
    return np.log1p(X.astype(np.float64) * scale[:, None]).astype(np.float32)


def select_genes(adata: ad.AnnData, n_top: int | None = None, genes: list[str] | None = None,
                 flavor: str = "seurat", add: list[str] | None = None) -> list[str]:
    """A gene panel: a given list (checked), or the top-n highly variable genes (scanpy ``flavor``: seurat
    on log data, seurat_v3 on counts), or all genes expressed in at least one spot. ``add``: genes (markers)
    appended to that panel where it lacks them (checked as ``genes``)."""
    if add:
        panel = select_genes(adata, n_top, genes, flavor)
        return panel + select_genes(adata, genes=[g for g in dict.fromkeys(add) if g not in set(panel)])
    names = list(map(str, adata.var_names))
    if genes is not None:
        missing = [g for g in genes if g not in set(names)]
        if missing:
            raise ValueError(f"{len(missing)} requested genes are not in the data, e.g. {missing[:5]}")
        return list(genes)
    X = adata.X
    expressed = np.asarray((X > 0).sum(axis=0)).ravel() > 0
    if n_top is None or n_top >= int(expressed.sum()):
        return [g for g, e in zip(names, expressed) if e]
    ranked = set(rank_hvgs({"sample": adata[:, expressed]}, n_top, flavor=flavor))
    return [g for g in names if g in ranked]  # in var order, as before


# --------------------------------------------------------------------------- panels across samples


def common_genes(samples: dict[str, ad.AnnData]) -> list[str]:
    """Genes present in every sample, in the order of the first one."""
    names = list(samples)
    if not names:
        raise ValueError("no samples given")
    keep = set(map(str, samples[names[0]].var_names))
    for n in names[1:]:
        keep &= set(map(str, samples[n].var_names))
    return [g for g in map(str, samples[names[0]].var_names) if g in keep]


def rank_hvgs(samples: dict[str, ad.AnnData], n_top: int, flavor: str = "seurat",
              min_fraction: float = 0.0) -> list[str]:
    """The top-``n_top`` highly variable genes across ``samples`` (scanpy, ``batch_key`` = sample when
    there are several), best first. Uses the genes common to all samples. ``flavor`` 'seurat': counts are
    log-normalised (normalize_total 1e4 + log1p) per spot first; order: number of samples in which a gene
    is highly variable, then mean normalised dispersion (scanpy's own ranking). 'seurat_v3' (the
    original's): on the counts themselves, in scanpy's ``highly_variable_rank`` order. Genes detected
    in fewer than ``min_fraction`` of all spots are left out."""
    if flavor not in HVG_FLAVORS:
        raise ValueError(f"unknown HVG flavor {flavor!r}; choose {' or '.join(HVG_FLAVORS)}")
    genes = common_genes(samples)
    parts = []
    for name, a in samples.items():
        if flavor == "seurat_v3":
            X = a[:, genes].X
            X = X.astype(np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
        else:
            X = log_normalize(a, genes=genes)
        b = ad.AnnData(X=X, var=pd.DataFrame(index=genes))
        b.obs["sample"] = name
        b.obs_names = [f"{name}:{o}" for o in a.obs_names]
        parts.append(b)
    a = ad.concat(parts, axis=0) if len(parts) > 1 else parts[0]
    detected = np.asarray((a.X > 0).sum(axis=0)).ravel()
    a = a[:, (detected > 0) & (detected >= min_fraction * a.n_obs)].copy()
    n_top = int(min(n_top, a.n_vars))
    batch_key = "sample" if len(samples) > 1 else None
    if batch_key:
        a.obs["sample"] = a.obs["sample"].astype("category")
    df = sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor=flavor, batch_key=batch_key, inplace=False)
    df.index = a.var_names
    if flavor == "seurat_v3":
        df = df[df["highly_variable"]].sort_values("highly_variable_rank", kind="stable")
        return list(map(str, df.index[:n_top]))
    if "highly_variable_nbatches" not in df:
        df["highly_variable_nbatches"] = 1
    df = df.sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last",
                        kind="stable")
    return list(map(str, df.index[:n_top]))


def check_panel(panel: list[str], samples: dict[str, ad.AnnData], on_missing: str = "error") -> list[str]:
    """Every panel gene must be in every sample. ``on_missing='error'``: a SpatialDataError naming the
    sample and the genes; ``'intersect'``: drop those genes from the panel with a logged warning."""
    if on_missing not in ("error", "intersect"):
        raise ValueError(f"on_missing must be 'error' or 'intersect', got {on_missing!r}")
    out = list(panel)
    for name, a in samples.items():
        have = set(map(str, a.var_names))
        missing = [g for g in out if g not in have]
        if not missing:
            continue
        if on_missing == "error":
            raise SpatialDataError(f"{name}: {len(missing)} panel genes are missing from this sample "
                                   f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        log.warning("%s: %d panel genes missing (%s); dropped from the panel", name, len(missing),
                    ", ".join(missing[:5]))
        out = [g for g in out if g in have]
    if not out:
        raise SpatialDataError("no panel gene is present in every sample")
    return out


def select_panel(train: dict[str, ad.AnnData], n_top: int | None = None, genes: list[str] | None = None,
                 others: dict[str, ad.AnnData] | None = None, on_missing: str = "error",
                 min_fraction: float = 0.1, flavor: str = "seurat", add: list[str] | None = None) -> list[str]:
    """The gene panel of a training run, decided on the training samples only. ``add``: genes (markers)
    appended to the panel where it lacks them.

    ``genes`` given: that list (order kept). Else the top-``n_top`` HVGs across the training samples
    (:func:`rank_hvgs`, among genes detected in at least ``min_fraction`` of the training spots — the
    dispersion ranking otherwise favours genes seen in a handful of spots — and present in ``others``
    too, so the panel can be scored there: gene names only, no values of ``others`` are used), or all common genes expressed in training when
    ``n_top`` is None. The panel is then checked on all samples (:func:`check_panel`)."""
    everything = {**train, **(others or {})}
    if genes is None:
        universe = set(common_genes(everything))
        pool = {n: a[:, [g for g in map(str, a.var_names) if g in universe]] for n, a in train.items()}
        if n_top is None:
            g0 = common_genes(pool)
            tot = sum(np.asarray(pool[n][:, g0].X.sum(axis=0)).ravel() for n in pool)
            genes = [g for g, t in zip(g0, tot) if t > 0]
        else:
            genes = rank_hvgs(pool, n_top, flavor=flavor, min_fraction=min_fraction)
    genes = list(genes) + [g for g in dict.fromkeys(add or ()) if g not in set(genes)]
    return check_panel(list(genes), everything, on_missing)


# --------------------------------------------------------------------------- target scaler

def fit_scaler(y: np.ndarray, kind: str | None) -> dict | None:
    """Per-gene scaler fitted on (training) targets y (N, G), in its stored form ``{'kind', 'a', 'b'}``
    (``y_scaled = (y - a) / b``; :class:`deepspot.config.Scaler`), or None for ``kind`` None/'none'."""
    scaler = Scaler.fit(y, kind)
    return None if scaler is None else scaler.to_dict()


def apply_scaler(y: np.ndarray, scaler: dict | None) -> np.ndarray:
    """Targets (N, G) through an optional stored scaler, float32."""
    if not scaler:
        return np.asarray(y, dtype=np.float32)
    return Scaler.from_dict(scaler).transform(y)
