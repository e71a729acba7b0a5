"""Pictures of predictions (``ds.pl``): genes over the H&E thumbnail, on squidpy-compatible AnnData.

Every function returns the matplotlib Axes it drew on and never changes the global backend. Given
``axes`` it draws there; given ``path`` it draws on a stand-alone :class:`matplotlib.figure.Figure`
(no pyplot state) and writes the PNG atomically; with neither it makes a pyplot figure, so that a
notebook shows it inline.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.io.outputs import write_figure


def _figure(n_rows: int, n_cols: int, size: tuple[float, float], to_file: bool):
    """(figure, axes (n_rows, n_cols)): a bare Figure for file output, else a pyplot one."""
    figsize = (size[0] * n_cols, size[1] * n_rows)
    if to_file:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, np.atleast_2d(np.asarray(fig.subplots(n_rows, n_cols, squeeze=False)))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False)
    return fig, axes


def missing_genes_message(missing: list[str], names: list[str]) -> str:
    """'genes not in the predictions' with, per gene, the panel gene it may be (other case, close spelling)
    and what to do when it is not in the model's panel at all."""
    import difflib

    lower = {n.lower(): n for n in names}
    hints = []
    for g in missing:
        near = [lower[g.lower()]] if g.lower() in lower else difflib.get_close_matches(g, names, n=2, cutoff=0.8)
        if near:
            hints.append(f"{g}: did you mean {' or '.join(near)}?")
    msg = f"genes not in the predictions: {', '.join(missing)}"
    if hints:
        msg += " (" + "; ".join(hints) + ")"
    if len(hints) < len(missing):
        msg += (f". The model predicts its training panel ({len(names)} genes: the top HVGs unless chosen); to "
                f"predict a marker, train with `deepspot train --add-genes GENE,...` (added to the HVGs) or "
                f"`--genes` (the whole panel)")
    return msg


def _dense(X) -> np.ndarray:
    return np.asarray(X.todense() if hasattr(X, "todense") else X)


def nice_length(span: float) -> float:
    """A round length (1, 2 or 5 × 10^k) of about a fifth of ``span`` (for a scale bar)."""
    if not span > 0:
        return 0.0
    target = span / 5.0
    k = 10.0 ** np.floor(np.log10(target))
    return float(max(m * k for m in (1, 2, 5) if m * k <= target))


def add_scale_bar(ax, um_per_unit: float, span_units: float) -> float:
    """A scale bar (lower right) on ``ax`` whose data units are ``um_per_unit`` µm; returns its length (µm)."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    um = nice_length(span_units * um_per_unit)
    if um <= 0:
        return 0.0
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"
    ax.add_artist(AnchoredSizeBar(ax.transData, um / um_per_unit, label, "lower right", pad=0.4, color="black",
                                  frameon=True, size_vertical=max(span_units / 150.0, 1.0), fontproperties={"size": 8}))
    return um


def spatial(adata: ad.AnnData, genes: list[str] | None = None, n_genes: int = 4, library_id: str | None = None,
            layer: str | None = None, title: str = "", axes=None, path: str | Path | None = None,
            units: str | None = None, mpp: float | None = None, scale_bar: bool = True, crop: bool = False,
            titles: dict | None = None, alpha: float = 0.85, ncols: int | None = None) -> list:
    """One panel per gene: spots coloured by (predicted) expression on the H&E thumbnail, drawn as discs of
    their true diameter, each panel with its colour bar (labelled ``units``, default the prediction's
    ``uns['deepspot']['values']``) and, when the µm per pixel is known (``mpp`` or the prediction's), a
    scale bar.

    adata: spots × genes with obsm['spatial'] (x, y) full-resolution px and, optionally,
    uns['spatial'][library_id] (thumbnail 'hires' + scalefactors). Without ``genes``, the ``n_genes``
    most reliable genes (var 'reliable', by 'val_pearson'), else those with the highest variance, are
    shown. ``crop``: zoom to the spots (plus one spot of margin).
    ``titles``: gene -> panel title; ``ncols``: panels per row (default: all in one row). Returns the list
    of Axes (one per gene).
    """
    from matplotlib.collections import EllipseCollection

    X = _dense(adata.layers[layer] if layer else adata.X)
    names = list(map(str, adata.var_names))
    if genes is None:
        genes = reliable_genes(adata)[:n_genes]
    if not genes:
        var = X.var(axis=0) if len(X) else np.zeros(len(names))
        genes = [names[i] for i in np.argsort(-var, kind="stable")[:n_genes]]
    missing = [g for g in genes if g not in names]
    if missing:
        raise ValueError(missing_genes_message(missing, names))
    lib = library_id or (next(iter(adata.uns.get("spatial", {})), None))
    img, scale, diam = None, 1.0, 10.0
    if lib is not None:
        info = adata.uns["spatial"][lib]
        img = info["images"].get("hires")
        scale = float(info["scalefactors"]["tissue_hires_scalef"])
        diam = float(info["scalefactors"]["spot_diameter_fullres"])
    xy = np.asarray(adata.obsm["spatial"], dtype=float) * scale
    if axes is None:
        cols = max(1, min(ncols or len(genes), len(genes)))
        fig, grid = _figure(-(-len(genes) // cols), cols, (4.2, 4.2), path is not None)
        axes = list(grid.ravel())
        for ax in axes[len(genes):]:
            ax.set_axis_off()
    else:
        axes = list(np.ravel(axes))
        if len(axes) < len(genes):
            raise ValueError(f"{len(genes)} genes need {len(genes)} axes, got {len(axes)}")
        fig = axes[0].figure
    d = diam * scale  # spot diameter in thumbnail pixels (data units)
    info = adata.uns.get("deepspot", {})
    units = units if units is not None else info.get("values")
    if mpp is None and float(info.get("mpp", -1) or -1) > 0:
        mpp = float(info["mpp"])
    for ax, g in zip(axes, genes):
        if img is not None:
            ax.imshow(img)
        coll = EllipseCollection(widths=d, heights=d, angles=0, units="xy", offsets=xy,
                                 offset_transform=ax.transData, cmap="viridis", alpha=alpha, linewidths=0)
        coll.set_array(np.asarray(X[:, names.index(g)], dtype=float))
        ax.add_collection(coll)
        if (img is None or crop) and len(xy):
            ax.set_xlim(xy[:, 0].min() - d, xy[:, 0].max() + d)
            ax.set_ylim(xy[:, 1].max() + d, xy[:, 1].min() - d)
        ax.set_aspect("equal")
        ax.set_title((titles or {}).get(g, g), fontsize=10)
        ax.set_axis_off()
        bar = fig.colorbar(coll, ax=ax, fraction=0.046, pad=0.02)
        if units:
            bar.set_label(units, fontsize=8)
        if scale_bar and mpp:
            x0, x1 = ax.get_xlim()
            add_scale_bar(ax, mpp / scale, abs(x1 - x0))
    if title:
        fig.suptitle(title)
    if path is not None:
        write_figure(fig, path)
    return axes[:len(genes)]


def reliable_genes(adata: ad.AnnData) -> list[str]:
    """The genes marked var['reliable'], highest var['val_pearson'] first ([] when the prediction has no
    reliability, e.g. from a converted published model)."""
    if "reliable" not in adata.var or "val_pearson" not in adata.var:
        return []
    v = adata.var
    ok = v[v["reliable"].fillna(False).astype(bool)]
    return list(map(str, ok.sort_values("val_pearson", ascending=False, kind="stable").index))


def uncertainty(adata: ad.AnnData, gene: str | None = None, axes=None, path: str | Path | None = None,
                **spatial_options) -> list:
    """For one gene (default: the most reliable, else the most variable), the predicted map next to the
    width of its conformal interval (layers 'upper' − 'lower', same units): where the width is large
    the prediction is loose. Returns the two Axes. Needs a prediction with interval layers (a model
    trained with a validation, ``interval`` not None)."""
    if "lower" not in adata.layers or "upper" not in adata.layers:
        raise ValueError("the prediction has no interval (layers 'lower' / 'upper'): its model carries no "
                         "validation, or it was predicted with --interval 0")
    names = list(map(str, adata.var_names))
    if gene is None:
        rel = reliable_genes(adata)
        if rel:
            gene = rel[0]
        else:
            X = _dense(adata.X)
            gene = names[int(np.argmax(X.var(axis=0)))] if len(X) else names[0]
    if gene not in names:
        raise ValueError(f"gene not in the predictions: {gene}")
    j = names.index(gene)
    width = _dense(adata.layers["upper"])[:, j] - _dense(adata.layers["lower"])[:, j]
    level = adata.uns.get("deepspot", {}).get("interval")
    wname = f"{gene}: {'' if level is None else f'{float(level):.0%} '}interval width"
    two = ad.AnnData(X=np.column_stack([_dense(adata.X)[:, j], width]).astype(np.float32), obs=adata.obs[[]],
                     var=pd.DataFrame(index=[gene, wname]), obsm={"spatial": np.asarray(adata.obsm["spatial"])},
                     uns={k: adata.uns[k] for k in ("spatial", "deepspot") if k in adata.uns})
    if axes is None:
        fig, grid = _figure(1, 2, (4.2, 4.2), path is not None)
        axes = list(grid.ravel())
    axes = list(np.ravel(axes))
    title = ""
    if "val_pearson" in adata.var:
        vp = adata.var["val_pearson"].iloc[j]
        title = f"{gene}: validation Pearson {vp:.2f}" if np.isfinite(vp) else f"{gene}: no validation"
    spatial(two, genes=[gene], axes=axes[:1], titles={gene: title or gene}, **spatial_options)
    spatial(two, genes=[wname], axes=axes[1:2], units="interval width (same units)", **spatial_options)
    if path is not None:
        write_figure(axes[0].figure, path)
    return axes[:2]


def gene_panel(table, ax=None, path: str | Path | None = None, top: int | None = 50) -> object:
    """The gene panel as bars of validation Pearson (``val_pearson``; reliable genes coloured), highest
    first, with each gene's shuffled-prediction noise band (``noise_band``) drawn over its bar.
    ``table``: a model's ``gene_table`` (DataFrame), a model, or a prediction AnnData (its var).
    ``top``: show at most this many genes (None: all). Returns the Axes."""
    if hasattr(table, "gene_table"):
        table = table.gene_table
    elif isinstance(table, ad.AnnData):
        table = table.var
    t = pd.DataFrame(table)
    if "val_pearson" not in t or t["val_pearson"].isna().all():
        raise ValueError("no validation Pearson to draw: the model carries no validation (e.g. a converted "
                         "published model)")
    t = t.sort_values("val_pearson", ascending=False, kind="stable")
    t = t if top is None else t.iloc[:top]
    x = np.arange(len(t))
    if ax is None:
        fig, grid = _figure(1, 1, (max(4.0, 0.16 * len(t) + 1.5), 3.6), path is not None)
        ax = grid[0, 0]
    rel = t["reliable"].fillna(False).astype(bool).to_numpy() if "reliable" in t else np.zeros(len(t), bool)
    ax.bar(x, t["val_pearson"].to_numpy(float), color=np.where(rel, "#3b75af", "#bbbbbb"), width=0.8)
    if "noise_band" in t:
        nb = t["noise_band"].to_numpy(float)
        ax.hlines(nb, x - 0.4, x + 0.4, color="#d62728", lw=1.2, label="noise band (shuffled, 95 %)")
        ax.hlines(-nb, x - 0.4, x + 0.4, color="#d62728", lw=0.6, alpha=0.5)
        ax.legend(fontsize=8, loc="upper right")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, list(map(str, t.index)), rotation=90, fontsize=6 if len(t) > 30 else 8)
    ax.set_ylabel("validation Pearson")
    ax.set_title(f"{int(rel.sum())} of {len(t)} genes shown above their noise band (blue: reliable)", fontsize=10)
    if path is not None:
        write_figure(ax.figure, path)
    return ax


def spatial_columns(skeleton: ad.AnnData, X, genes: list[str], path, max_side: int = 600,
                    title: str | None = None) -> list:
    """PNG of ``genes`` over the thumbnail of ``skeleton`` (an AnnData without X), reading only those
    columns of ``X`` (N, G; zarr, h5py or numpy) and a thumbnail of at most ``max_side`` px."""
    names = list(skeleton.var_names)
    cols = [names.index(g) for g in genes]
    vals = np.concatenate([np.asarray(X[a:a + 8192])[:, cols] for a in range(0, skeleton.n_obs, 8192)])
    lib, info = next(iter(skeleton.uns["spatial"].items()))
    img = info["images"]["hires"]
    # a panel is 4.2 in at 120 dpi (~500 px): a larger thumbnail is only resampled down again, twice per save
    k = max(1, int(np.ceil(max(img.shape[:2]) / max_side)))
    sf = dict(info["scalefactors"], tissue_hires_scalef=info["scalefactors"]["tissue_hires_scalef"] / k)
    small = ad.AnnData(X=vals.astype(np.float32), obs=skeleton.obs[[]].copy(), var=pd.DataFrame(index=genes),
                       obsm={"spatial": skeleton.obsm["spatial"]},
                       uns={"spatial": {lib: {"images": {"hires": img[::k, ::k]}, "scalefactors": sf}},
                            "deepspot": dict(skeleton.uns.get("deepspot", {}))})  # mpp and units for the bars
    if title is None:
        title = f"DeepSpot predictions on {lib}: {skeleton.n_obs} in-tissue spots"
    return spatial(small, genes=genes, title=title, path=path, crop=True)


def cell_predictions(xy: np.ndarray, values: dict, genes: list[str], var_names: list[str],
                     image: np.ndarray | None = None, scale: float = 1.0, cell_px: float = 20.0,
                     pearson: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                     path: str | Path | None = None, title: str = "") -> np.ndarray:
    """Predicted vs true expression over cells: one row per entry of ``values`` (name -> (N, G) array; the
    first row is the truth the others are compared with), one column per gene. Cells are discs of
    ``cell_px`` level-0 px (enlarged to stay visible on a large crop) at ``xy`` (N, 2) level-0 (x, y), over
    ``image`` (a thumbnail at ``scale``), cropped to the cells the first row has. Rows may hold NaN for
    cells they do not score (drawn as grey rings). Each panel has its own colour scale; with ``pearson``
    (per-gene r of (N, 1) pred vs true, e.g. ``evaluation.metrics.pearson_per_gene``) the panels of the
    later rows are titled with r against the first row over the cells both have. Returns the Axes
    (rows × genes)."""
    from matplotlib.collections import EllipseCollection

    names = list(map(str, var_names))
    missing = [g for g in genes if g not in names]
    if missing:
        raise ValueError(missing_genes_message(missing, names))
    cols = [names.index(g) for g in genes]
    rows = list(values)
    ref = np.asarray(values[rows[0]], dtype=float)[:, cols]
    pts = np.asarray(xy, dtype=float) * scale
    shown = np.isfinite(ref).all(axis=1)
    lo, hi = pts[shown].min(axis=0), pts[shown].max(axis=0)
    d = max(cell_px * scale, 0.025 * float((hi - lo).max()))  # true cell size, but visible on a large crop
    lo, hi = lo - 2 * d, hi + 2 * d
    fig, axes = _figure(len(rows), len(genes), (3.2, 3.0), path is not None)
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
                                      linewidths=0.3, alpha=0.7 if image is not None else 1.0)  # H&E shows
            discs.set_array(v[ok, j])
            ax.add_collection(discs)
            fig.colorbar(discs, ax=ax, fraction=0.046, pad=0.02)
            both = ok & np.isfinite(ref[:, j])
            label = g
            if i and pearson is not None:
                label = f"{g}  r={pearson(v[both, j:j + 1], ref[both, j:j + 1])[0]:.2f}"
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
    return axes


def score_panels(xy: np.ndarray, pred: np.ndarray, truth: np.ndarray, genes: list[str], pearson: np.ndarray,
                 title: str, path) -> Path:
    """One held-out sample's scores as a PNG: the histogram of per-gene Pearson, then the best-predicted
    gene's truth and prediction at the spots on ONE colour scale (so the compressed range of the
    predictions shows; the panel titles give both ranges). xy (N,2) px, pred/truth (N,G), pearson (G,)."""
    fig, axes = _figure(1, 3, (4.2, 4.0), to_file=True)
    ax = axes[0, 0]
    ok = np.isfinite(pearson)
    ax.hist(pearson[ok], bins=30, color="#3b75af")
    ax.axvline(float(np.mean(pearson[ok])) if ok.any() else 0.0, color="black", lw=1)
    ax.set_xlabel("per-gene Pearson across spots")
    ax.set_ylabel("genes")
    ax.set_title(f"{title}: mean {np.mean(pearson[ok]):.3f} over {int(ok.sum())} genes" if ok.any() else title,
                 fontsize=9)
    if ok.any():
        j = int(np.nanargmax(np.where(ok, pearson, -np.inf)))
        lo = float(min(np.min(truth[:, j]), np.min(pred[:, j])))
        hi = float(max(np.max(truth[:, j]), np.max(pred[:, j])))
        for ax, values, name in ((axes[0, 1], truth[:, j], "measured"), (axes[0, 2], pred[:, j], "predicted")):
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=12, cmap="viridis", vmin=lo, vmax=hi)
            ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{genes[j]} {name}: {np.min(values):.1f}–{np.max(values):.1f}"
                         + (f" (r = {pearson[j]:.2f})" if name == "predicted" else ""), fontsize=9)
            fig.colorbar(sc, ax=ax, shrink=0.7, label="log1p(counts per 10k)")
        fig.suptitle("best gene, measured and predicted on one colour scale", fontsize=9)
    return write_figure(fig, path)
