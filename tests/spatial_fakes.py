"""Tiny generated Space Ranger / Xenium output folders for reader, manifest and evaluation tests."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from PIL import Image

from deepspot.geometry.grid import GridSpec, make_grid


def write_10x_h5(path: Path, X: np.ndarray, barcodes, genes, feature_types=None) -> Path:
    """A 10x feature-barcode matrix (v3 layout) as Space Ranger and Xenium write it: genes × barcodes CSC."""
    m = sp.csr_matrix(np.asarray(X))  # barcodes × genes CSR == genes × barcodes CSC
    ft = feature_types or ["Gene Expression"] * len(genes)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array([len(genes), len(barcodes)], dtype=np.int32)
        fg = g.create_group("features")
        fg["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        fg["name"] = np.array(genes, dtype="S")
        fg["feature_type"] = np.array(ft, dtype="S")
        fg["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        fg["_all_tag_keys"] = np.array([b"genome"])
    return path


def tissue_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """An RGB image with H&E-like pink/purple blobs (so a random encoder sees texture)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.full((height, width, 3), (235, 200, 225), dtype=np.float32)
    for _ in range(40):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(10, 60)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - 0.6 * blob) + np.array(rng.choice([(120, 60, 150), (200, 90, 150)]), np.float32) * 0.6 * blob
    img += rng.normal(0, 8, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def counts_for(n: int, genes: list[str], seed: int, signal: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 2.0, size=len(genes))
    rate = np.broadcast_to(base[None, :] * (1.0 if signal is None else np.exp(signal)), (n, len(genes)))
    return rng.poisson(rate).astype(np.int64)


def spaceranger_folder(root: Path, name: str = "S1", width: int = 640, height: int = 560, mpp: float = 1.0,
                       genes: list[str] | None = None, seed: int = 0, header: bool = True, hires_scale: float = 0.25,
                       n_outside: int = 3) -> tuple[Path, Path, dict]:
    """A Space Ranger ``outs`` folder + a full-res image. Spots on a Visium hex grid (55 µm / 100 µm at
    ``mpp``); ``n_outside`` positions are marked out of tissue and have no counts (as in the filtered matrix)."""
    root = Path(root)
    out = root / name
    (out / "spatial").mkdir(parents=True, exist_ok=True)
    grid = make_grid(width, height, GridSpec(55.0, 100.0, unit="um").in_pixels(mpp))
    genes = genes or [f"G{i}" for i in range(30)]
    barcodes = [f"AC{i:04d}-1" for i in range(len(grid))]
    in_tissue = np.ones(len(grid), dtype=int)
    in_tissue[:n_outside] = 0
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue, "array_row": grid["array_row"],
                        "array_col": grid["array_col"], "pxl_row_in_fullres": grid["y"].round(1),
                        "pxl_col_in_fullres": grid["x"].round(1)})
    fname = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    pos.to_csv(out / "spatial" / fname, index=False, header=header)
    keep = in_tissue == 1
    sig = np.outer(np.sin(grid["x"].to_numpy() / 80.0), np.linspace(-1, 1, len(genes)))
    X = counts_for(len(grid), genes, seed, signal=sig)[keep]
    write_10x_h5(out / "filtered_feature_bc_matrix.h5", X, [b for b, k in zip(barcodes, keep) if k], genes)
    spot_px = 55.0 / mpp
    (out / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "tissue_hires_scalef": hires_scale, "tissue_lowres_scalef": hires_scale / 4,
        "spot_diameter_fullres": spot_px, "fiducial_diameter_fullres": spot_px * 1.6}))
    image = tissue_image(root / f"{name}_full.png", width, height, seed)
    with Image.open(image) as im:
        im.resize((round(width * hires_scale), round(height * hires_scale))).save(out / "spatial" / "tissue_hires_image.png")
    info = {"n_in_tissue": int(keep.sum()), "genes": genes, "barcodes": barcodes, "grid": grid, "X": X}
    return out, image, info


def xenium_folder(root: Path, name: str = "X1", n_cells: int = 60, genes: list[str] | None = None,
                  seed: int = 0, parquet: bool = False, width_um: float = 120.0, height_um: float = 100.0):
    """A Xenium output folder: cells table (µm centroids) + cell_feature_matrix.h5 (with a control probe)."""
    root = Path(root)
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    genes = genes or [f"G{i}" for i in range(12)]
    ids = [f"cell{i}" for i in range(n_cells)]
    xy = np.c_[rng.uniform(5, width_um - 5, n_cells), rng.uniform(5, height_um - 5, n_cells)]
    cells = pd.DataFrame({"cell_id": ids, "x_centroid": xy[:, 0], "y_centroid": xy[:, 1],
                          "transcript_counts": rng.integers(5, 50, n_cells)})
    if parquet:
        cells.to_parquet(out / "cells.parquet")
    else:
        cells.to_csv(out / "cells.csv.gz", index=False)
    X = counts_for(n_cells, genes + ["NegControlProbe_1"], seed)
    write_10x_h5(out / "cell_feature_matrix.h5", X, ids, genes + ["NegControlProbe_1"],
                 feature_types=["Gene Expression"] * len(genes) + ["Negative Control Probe"])
    (out / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125}))
    return out, xy, X[:, :len(genes)], genes
