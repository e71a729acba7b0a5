"""Training targets: counts -> normalize_total(1e4) -> log1p (scanpy), gene panel, optional scaler."""
from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp


def log_normalize(adata: ad.AnnData, target_sum: float = 1e4) -> np.ndarray:
    """Dense (N, G) float32 log1p(counts normalised to ``target_sum`` per spot). ``adata`` is not modified."""
    a = ad.AnnData(X=adata.X.astype(np.float32) if not sp.issparse(adata.X) else adata.X.astype(np.float32))
    sc.pp.normalize_total(a, target_sum=target_sum)
    sc.pp.log1p(a)
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    return X.astype(np.float32)


def select_genes(adata: ad.AnnData, n_top: int | None = None, genes: list[str] | None = None) -> list[str]:
    """A gene panel: a given list (checked), or the top-n highly variable genes (scanpy, on log data),
    or all genes expressed in at least one spot."""
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
    a = adata[:, expressed].copy()
    a.X = log_normalize(a)
    sc.pp.highly_variable_genes(a, n_top_genes=n_top, flavor="seurat")
    hv = a.var_names[a.var["highly_variable"].to_numpy()]
    return list(map(str, hv))
