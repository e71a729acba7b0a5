"""Pictures of predictions: genes over the H&E thumbnail (matplotlib; squidpy-compatible AnnData)."""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

from deepspot.io.outputs import write_figure


def plot_genes(adata: ad.AnnData, genes: list[str] | None = None, path: str | Path | None = None,
               n_genes: int = 4, library_id: str | None = None, layer: str | None = None, title: str = ""):
    """One panel per gene: spots coloured by predicted expression on the H&E thumbnail.

    Without ``genes``, the ``n_genes`` genes with the highest spatial variance are shown.
    Writes ``path`` (PNG) atomically when given; returns the figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    X = adata.layers[layer] if layer else adata.X
    X = np.asarray(X.todense() if hasattr(X, "todense") else X)
    names = list(map(str, adata.var_names))
    if genes is None:
        var = X.var(axis=0) if len(X) else np.zeros(len(names))
        genes = [names[i] for i in np.argsort(-var)[:n_genes]]
    missing = [g for g in genes if g not in names]
    if missing:
        raise ValueError(f"genes not in the predictions: {missing}")
    lib = library_id or (next(iter(adata.uns.get("spatial", {})), None))
    img, scale, diam = None, 1.0, 10.0
    if lib is not None:
        info = adata.uns["spatial"][lib]
        img = info["images"].get("hires")
        scale = float(info["scalefactors"]["tissue_hires_scalef"])
        diam = float(info["scalefactors"]["spot_diameter_fullres"])
    xy = np.asarray(adata.obsm["spatial"], dtype=float) * scale
    n = len(genes)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    from matplotlib.collections import EllipseCollection

    d = diam * scale  # spot diameter in thumbnail pixels (data units)
    for ax, g in zip(axes[0], genes):
        if img is not None:
            ax.imshow(img)
        coll = EllipseCollection(widths=d, heights=d, angles=0, units="xy", offsets=xy,
                                 offset_transform=ax.transData, cmap="viridis", alpha=0.85, linewidths=0)
        coll.set_array(np.asarray(X[:, names.index(g)], dtype=float))
        ax.add_collection(coll)
        if img is None:
            ax.set_xlim(xy[:, 0].min() - d, xy[:, 0].max() + d)
            ax.set_ylim(xy[:, 1].max() + d, xy[:, 1].min() - d)
        ax.set_aspect("equal")
        ax.set_title(g)
        ax.set_axis_off()
        fig.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title)
    if path is not None:
        write_figure(fig, path)
    return fig
