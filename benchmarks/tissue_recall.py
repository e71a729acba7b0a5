"""Tissue filter against annotations: recall of annotated in-tissue spots and the share of background
spots it keeps, on the HER2ST sections (C2-C5) and the bundled NCBI858 image, in colour and as a
grayscale copy (L, written as RGB), for the filters ``otsu`` (predict's default) and ``mean_rgb``.

    python benchmarks/tissue_recall.py [--data-dir DIR]

HER2ST: the spots file lists the spots the authors selected as under tissue (array x, y and pixel
x, y). The whole ST array (x 1-33, y 1-35, 200 µm pitch) is placed on the image by the affine fit of
the selected spots' array to pixel coordinates; every array spot not selected is background. A spot
is kept as predict keeps it: ``tissue_spots`` on the 2000-px thumbnail, 100 µm spot disc, at least
10 % tissue. Columns: image | copy | filter | annotated | background | recall (annotated spots
kept) | background kept (share of background spots kept) | kept that is background. NCBI858 (Xenium, no spot annotation): a square grid of 120 px spots (the demo's);
a spot is in tissue when it holds at least one registered cell centre.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from deepspot.geometry.tissue import tissue_spots
from deepspot.io.slides import open_slide


def _kept(image: Path, grid: pd.DataFrame, spot_px: float, method: str) -> np.ndarray:
    with open_slide(image) as s:
        thumb = s.get_thumbnail(2000)
        return tissue_spots(s, grid, spot_px, method=method, min_fraction=0.1, view=thumb)


def _gray_copy(src: Path, d: Path) -> Path:
    out = d / f"{src.stem}_gray.png"
    Image.open(src).convert("L").convert("RGB").save(out)
    return out


def her2st_grid(spots_tsv: Path) -> tuple[pd.DataFrame, float]:
    """(every ST array spot with x, y px and 'annotated' = selected, spot diameter px)."""
    s = pd.read_csv(spots_tsv, sep="\t")
    s = s[s["selected"] == 1]
    a = np.c_[s["new_x"], s["new_y"], np.ones(len(s))]
    coef, *_ = np.linalg.lstsq(a, s[["pixel_x", "pixel_y"]].to_numpy(), rcond=None)
    pitch_px = float(np.hypot(*coef[0]))  # one array step = 200 µm
    ax, ay = np.meshgrid(np.arange(1, 34), np.arange(1, 36))
    xy = np.c_[ax.ravel(), ay.ravel(), np.ones(ax.size)] @ coef
    sel = set(zip(s["x"], s["y"]))
    grid = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1],
                         "annotated": [(x, y) in sel for x, y in zip(ax.ravel(), ay.ravel())]})
    return grid, pitch_px / 2.0  # ST spots are 100 µm across


def ncbi858_grid(data_dir) -> tuple[pd.DataFrame, float, Path]:
    from deepspot.io.datasets import ncbi858

    cells, image, _ = ncbi858(data_dir)
    w, h = Image.open(image).size
    spot = 120.0
    cx, cy = np.meshgrid(np.arange(spot / 2, w, spot), np.arange(spot / 2, h, spot))
    xy = np.asarray(cells.obsm["spatial"], float)[:, :2]
    col = np.floor((xy[:, 0]) / spot).astype(int)
    row = np.floor((xy[:, 1]) / spot).astype(int)
    occupied = set(zip(row, col))
    r, c = np.meshgrid(np.arange(cy.shape[0]), np.arange(cx.shape[1]), indexing="ij")
    grid = pd.DataFrame({"x": cx.ravel(), "y": cy.ravel(),
                         "annotated": [(a, b) in occupied for a, b in zip(r.ravel(), c.ravel())]})
    return grid, spot, image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    a = ap.parse_args()
    from deepspot.io.datasets import her2st

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for sec, f in her2st(data_dir=a.data_dir).items():
            grid, spot_px = her2st_grid(f["spots"])
            cases.append((f"HER2ST {sec}", f["image"], grid, spot_px))
        grid, spot_px, image = ncbi858_grid(a.data_dir)
        cases.append(("NCBI858", image, grid, spot_px))
        for name, image, grid, spot_px in cases:
            for colour, img in (("colour", image), ("grayscale", _gray_copy(image, Path(tmp)))):
                for method in ("otsu", "mean_rgb"):
                    keep = _kept(img, grid, spot_px, method)
                    ann = grid["annotated"].to_numpy()
                    rows.append({"image": name, "copy": colour, "filter": method,
                                 "annotated": int(ann.sum()), "background": int((~ann).sum()),
                                 "recall": keep[ann].mean(), "background kept": keep[~ann].mean(),
                                 "kept that is background": (keep & ~ann).sum() / max(keep.sum(), 1)})
                    r = rows[-1]
                    print(f"{name} | {colour} | {method} | {r['annotated']} | {r['background']} | "
                          f"{r['recall']:.3f} | {r['background kept']:.3f} | {r['kept that is background']:.3f}",
                          flush=True)
    df = pd.DataFrame(rows)
    print()
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
