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


def plot_cell_predictions(xy: np.ndarray, values: dict, genes: list[str], var_names: list[str],
                          image: np.ndarray | None = None, scale: float = 1.0, cell_px: float = 20.0,
                          path: str | Path | None = None, title: str = ""):
    """Predicted vs true expression over cells: one row per entry of ``values`` (name -> (N, G) array; the
    first row is the truth the others are compared with), one column per gene. Cells are discs of
    ``cell_px`` level-0 px (enlarged to stay visible on a large crop) at ``xy`` (N, 2) level-0 (x, y), over
    ``image`` (a thumbnail at ``scale``), cropped to the cells the first row has. Rows may hold NaN for cells they do not score (drawn as grey rings).
    Each panel has its own colour scale and is titled with the per-gene Pearson r against the first
    row over the cells both have. Writes ``path`` (PNG) atomically when given; returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection

    from deepspot.evaluation.metrics import pearson_per_gene

    names = list(map(str, var_names))
    missing = [g for g in genes if g not in names]
    if missing:
        raise ValueError(f"genes not in the predictions: {missing}")
    cols = [names.index(g) for g in genes]
    rows = list(values)
    ref = np.asarray(values[rows[0]], dtype=float)[:, cols]
    pts = np.asarray(xy, dtype=float) * scale
    shown = np.isfinite(ref).all(axis=1)
    lo, hi = pts[shown].min(axis=0), pts[shown].max(axis=0)
    d = max(cell_px * scale, 0.025 * float((hi - lo).max()))  # true cell size, but visible on a large crop
    lo, hi = lo - 2 * d, hi + 2 * d
    fig, axes = plt.subplots(len(rows), len(genes), figsize=(3.2 * len(genes), 3.0 * len(rows)), squeeze=False)
    for i, name in enumerate(rows):
        v = np.asarray(values[name], dtype=float)[:, cols]
        for j, g in enumerate(genes):
            ax = axes[i, j]
            if image is not None:
                ax.imshow(image)
            ok = np.isfinite(v[:, j])
            rings = EllipseCollection(widths=d, heights=d, angles=0, units="xy", offsets=pts[~ok],
                                      offset_transform=ax.transData, facecolors="none", edgecolors="0.5",
                                      linewidths=0.6)
            ax.add_collection(rings)
            discs = EllipseCollection(widths=d, heights=d, angles=0, units="xy", offsets=pts[ok],
                                      offset_transform=ax.transData, cmap="viridis", edgecolors="white",
                                      linewidths=0.3)
            discs.set_array(v[ok, j])
            ax.add_collection(discs)
            fig.colorbar(discs, ax=ax, fraction=0.046, pad=0.02)
            both = ok & np.isfinite(ref[:, j])
            label = g if i == 0 else f"{g}  r={pearson_per_gene(v[both, j:j + 1], ref[both, j:j + 1])[0]:.2f}"
            ax.set_title(label, fontsize=9)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(hi[1], lo[1])
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        write_figure(fig, path)
    return fig
