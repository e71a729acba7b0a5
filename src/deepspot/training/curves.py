"""``training_curves.png``: what a training run did, epoch by epoch (from the metrics Lightning logged).

Left: training and validation loss; right: validation Pearson (mean per-gene Pearson across the
validation spots, the early-stopping signal of the default recipe). The kept epoch is marked.
"""
from __future__ import annotations

from pathlib import Path

CURVES_FILE = "training_curves.png"


def plot_training_curves(history: list[dict], path: str | Path, best_epoch: int | None = None,
                         monitor: str | None = None, title: str | None = None) -> Path | None:
    """Draw ``history`` (one dict per epoch: epoch, train_loss, val_loss, val_pearson) into ``path``;
    None (nothing written) when the history is empty."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from deepspot.io.outputs import write_figure

    ep = [int(r["epoch"]) + 1 for r in history]  # 1-based, as the progress bar counts
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    for key, style in (("train_loss", "-o"), ("val_loss", "-s")):
        xs = [e for e, r in zip(ep, history) if key in r]
        if xs:
            a1.plot(xs, [r[key] for r in history if key in r], style, ms=3, label=key.replace("_", " "))
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.set_title("loss")
    a1.legend(frameon=False)
    xs = [e for e, r in zip(ep, history) if "val_pearson" in r]
    if xs:
        a2.plot(xs, [r["val_pearson"] for r in history if "val_pearson" in r], "-o", ms=3, color="C2")
    a2.set_xlabel("epoch"), a2.set_ylabel("mean per-gene Pearson"), a2.set_title("validation Pearson")
    if best_epoch is not None and best_epoch >= 0:
        for a in (a1, a2):
            a.axvline(best_epoch + 1, color="0.5", ls="--", lw=1)
        a2.text(best_epoch + 1, a2.get_ylim()[0], f" kept: epoch {best_epoch + 1}" +
                (f" (best {monitor.replace('_', ' ')})" if monitor else ""), va="bottom", fontsize=8, color="0.3")
    for a in (a1, a2):
        a.xaxis.get_major_locator().set_params(integer=True)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    try:
        return write_figure(fig, Path(path))
    finally:
        plt.close(fig)


def write_curves(checkpoint: str | Path, training: dict, n_genes: int = 0) -> Path | None:
    """``training_curves.png`` inside checkpoint folder ``checkpoint`` from its config's ``training``."""
    n = n_genes
    return plot_training_curves(training.get("history") or [], Path(checkpoint) / CURVES_FILE,
                                best_epoch=training.get("best_epoch"), monitor=training.get("monitor"),
                                title=f"{Path(checkpoint).name}: training curves" + (f" ({n} genes)" if n else ""))


__all__ = ["CURVES_FILE", "plot_training_curves", "write_curves"]
