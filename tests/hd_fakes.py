"""A tiny generated Space Ranger HD ``outs`` folder (binned_outputs/square_008um and square_016um)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from spatial_fakes import tissue_image, write_10x_h5


def visium_hd_outs(root: Path, size_px: int = 320, mpp: float = 0.5, n_genes: int = 12, seed: int = 0,
                   bins=(8, 16)) -> tuple[Path, Path, dict]:
    """``root/outs`` + the full-resolution H&E ``root/hd_full.png`` (``size_px`` square at ``mpp``).

    Counts are drawn per 8 µm bin from the darkness of the image under the bin (a signal an encoder can
    see); a 16 µm bin holds the sum of its four 8 µm bins, as Space Ranger bins 2 µm squares up. Bin
    barcodes are ``s_0XXum_RRRRR_CCCCC-1``; each bin folder has filtered_feature_bc_matrix.h5,
    spatial/tissue_positions.parquet and spatial/scalefactors_json.json (bin_size_um, microns_per_pixel,
    spot_diameter_fullres = the bin side in px). A column of bins is marked out of tissue (no counts)."""
    root = Path(root)
    image = tissue_image(root / "hd_full.png", size_px, size_px, seed)
    gray = np.asarray(Image.open(image).convert("L"), dtype=np.float64)
    rng = np.random.default_rng(seed)
    genes = [f"HD{i}" for i in range(n_genes)]
    side8 = 8.0 / mpp
    n8 = int(size_px // side8)
    dark = np.zeros((n8, n8))
    for r in range(n8):
        for c in range(n8):
            y0, x0 = int(r * side8), int(c * side8)
            dark[r, c] = 1.0 - gray[y0:int(y0 + side8), x0:int(x0 + side8)].mean() / 255.0
    z = (dark - dark.mean()) / dark.std()
    w = np.linspace(-1.0, 1.0, n_genes)
    counts8 = rng.poisson(np.exp(1.0 + 0.8 * z[..., None] * w)).astype(np.int64)  # (n8, n8, G)
    info = {"genes": genes, "mpp": mpp, "counts": {}}
    for b in bins:
        k = b // 8
        nb = n8 // k
        cb = counts8[:nb * k, :nb * k].reshape(nb, k, nb, k, n_genes).sum(axis=(1, 3))
        side = b / mpp
        rows, cols = np.divmod(np.arange(nb * nb), nb)
        barcodes = [f"s_{b:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)]
        in_tissue = (cols != nb - 1).astype(int)  # the right-most column lies outside the tissue
        folder = root / "outs" / "binned_outputs" / f"square_{b:03d}um"
        (folder / "spatial").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue, "array_row": rows, "array_col": cols,
                      "pxl_row_in_fullres": (rows + 0.5) * side, "pxl_col_in_fullres": (cols + 0.5) * side}
                     ).to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        X = cb.reshape(nb * nb, n_genes)
        keep = in_tissue == 1
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", X[keep], [x for x, k_ in zip(barcodes, keep) if k_],
                     genes)
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps({
            "spot_diameter_fullres": side, "bin_size_um": float(b), "microns_per_pixel": mpp,
            "regist_target_img_scalef": 1.0, "tissue_lowres_scalef": 0.05, "tissue_hires_scalef": 0.2,
            "fiducial_diameter_fullres": side * 10}))
        info["counts"][b] = {"X": X[keep], "rows": rows[keep], "cols": cols[keep], "side_px": side}
    return root / "outs", image, info
