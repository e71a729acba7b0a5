"""Cohort throughput: slides/hour for one 20k × 20k px slide at 0.5 µm/px, and storage per spot.

    python benchmarks/cohort.py                       # about 5-10 min on 2 CPU cores
    python benchmarks/cohort.py --size 20000 --genes 5000 --work /tmp/deepspot-bench
    python benchmarks/cohort.py --full                # + efficientnet-lite0 over the whole slide (hours on CPU)

Everything runs through the cohort runner (``inference.cohort.run_cohort``, local backend: the same
per-slide function the Ray tasks run), on a synthetic pyramidal TIFF grown from the bundled H&E
(io/synthetic.py, JPEG tiles, 0.5 µm/px), Visium geometry (55 µm spots, 100 µm apart, 3×3 sub-spots,
radius-1 neighbours: 10 crops per spot), Otsu tissue filter, a DeepSpot with random weights and a
``--genes``-gene panel (weights do not change the cost).

What is measured, and how the figure is put together:
  A. the whole 20k slide end to end with a near-free encoder (mean colour -> linear, same 224 px crops):
     slide opening, grid, tissue mask, crop reading/resizing, the DeepSpot model on every spot and the
     h5ad/CSV writes; i.e. everything but encoder compute;
  B. efficientnet-lite0 (real packaged weights) and the free encoder on 224 px crops of the slide: crops/s;
  slides/hour = 3600 / (A + crops × (1/B_effnet − 1/B_free)).
  C. a check of that sum: a small slide cut from the same mosaic run end to end with efficientnet-lite0,
     measured against the same formula; its feature store (zarr) gives the feature bytes per spot.
  Storage: predicted h5ad bytes per spot (gzip, float32, ``--genes`` genes), with and without the slide's
  thumbnail. ``--full`` runs efficientnet-lite0 end to end over the whole slide instead of projecting.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch

from deepspot.features import encoders as E
from deepspot.geometry.grid import GridSpec
from deepspot.inference.cohort import run_cohort
from deepspot.config import SpotGeometry
from deepspot.io.datasets import data_dir
from deepspot.io.slides import open_slide
from deepspot.io.synthetic import write_pyramidal_tiff
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

FREE = "bench-free-encoder"
CROPS_PER_SPOT = 10  # spot + 3×3 sub-spots


def register_free_encoder(dim: int) -> None:
    """An encoder that costs next to nothing (global mean colour -> linear) on the same 224 px crops."""
    E.register_encoder(E.EncoderSpec(
        FREE, dim, 224, (0.5,) * 3, (0.25,) * 3, source="benchmark", needs_download=False,
        builder=lambda p: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                              torch.nn.Linear(3, dim))), overwrite=True)


def make_checkpoint(path: Path, encoder: str, n_genes: int, dim: int = 1280) -> Path:
    torch.manual_seed(0)
    net = DeepSpot(dim, n_genes)  # published defaults: hidden 512, ensemble of 10
    geometry = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    return save_checkpoint(path, net, {"model": "deepspot", "encoder": {"name": encoder, "dim": dim},
                                       "genes": [f"GENE{i}" for i in range(n_genes)],
                                       "geometry": geometry.to_dict(), "scaler": None})


def run_one(slide: Path, model: Path, out: Path, cache_dir: Path | None = None, threads: int | None = None):
    """One slide through the cohort runner; returns (seconds, spots, h5ad path)."""
    manifest = out.parent / f"{out.name}.csv"
    manifest.write_text(f"path,id\n{slide},{slide.stem}\n")
    s = run_cohort(manifest, model, out, backend="local", tissue="otsu", device="cpu", cache_dir=cache_dir,
                   progress=False, echo=lambda *a, **k: None)
    r = s.ran[0] if s.ran else None
    if r is None or not r.ok:
        raise SystemExit(f"benchmark slide failed: {r.error if r else 'not run'}")
    return r.seconds, r.n_spots, out / f"{slide.stem}.h5ad"


def crops_per_second(name: str, tiles: np.ndarray, batch: int = 16 * CROPS_PER_SPOT) -> float:
    """Best of two timed passes; ``batch`` = what extraction hands the encoder (16 spots × 10 crops)."""
    enc = E.load_encoder(name)
    enc.encode(tiles[:2])
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        enc.encode(tiles, batch_size=batch)
        best = max(best, len(tiles) / (time.perf_counter() - t0))
    return best


def slide_tiles(slide: Path, n: int, side: int = 224) -> np.ndarray:
    """n crops from the slide's level 0 (a diagonal walk, so they hold tissue like the real ones)."""
    with open_slide(slide) as s:
        w, h = s.dimensions
        xs = np.linspace(side, min(w, h) - 2 * side, n).astype(int)
        return np.stack([s.read_region((int(x), int(x)), 0, (side, side)) for x in xs])


def h5ad_bytes_per_spot(h5: Path, work: Path) -> tuple[float, float]:
    """(bytes per spot of the whole h5ad, bytes per spot of X + obs + obsm alone, i.e. without the thumbnail)."""
    a = ad.read_h5ad(h5)
    bare = ad.AnnData(X=np.asarray(a.X), obs=a.obs, var=a.var)
    bare.obsm["spatial"] = a.obsm["spatial"]
    p = work / "bare.h5ad"
    bare.write_h5ad(p, compression="gzip")
    return h5.stat().st_size / a.n_obs, p.stat().st_size / a.n_obs


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=20000, help="slide side in px (level 0)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--genes", type=int, default=5000, help="gene panel size of the model")
    ap.add_argument("--check-size", type=int, default=1536, help="side of the small end-to-end check slide")
    ap.add_argument("--crops", type=int, default=160, help="crops for the encoder throughput")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder); slides are reused")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with ncbi858/ (default: the bundled data)")
    ap.add_argument("--full", action="store_true", help="also run efficientnet-lite0 end to end on the big slide")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    work = args.work or Path(tempfile.mkdtemp(prefix="deepspot-cohort-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()} work={work}")

    big = work / f"slide{args.size}.tif"
    small = work / f"check{args.check_size}.tif"
    for path, side in ((big, args.size), (small, args.check_size)):
        if not path.exists():
            t0 = time.perf_counter()
            write_pyramidal_tiff(path, data_dir(args.data_dir) / "ncbi858" / "NCBI858.jpg", side, side, mpp=args.mpp)
            print(f"wrote {path.name}: {side}×{side} px, {args.mpp} µm/px, {path.stat().st_size / 2**20:.0f} MiB "
                  f"in {time.perf_counter() - t0:.0f} s")

    register_free_encoder(1280)
    free_model = make_checkpoint(work / "model-free", FREE, args.genes)
    eff_model = make_checkpoint(work / "model-effnet", "efficientnet-lite0", args.genes)

    # B: encoder throughput on crops of this slide
    tiles = slide_tiles(big, args.crops)
    r_eff, r_free = crops_per_second("efficientnet-lite0", tiles), crops_per_second(FREE, tiles)
    extra = 1.0 / r_eff - 1.0 / r_free  # seconds per crop that efficientnet-lite0 adds to run A
    print(f"B  encoder on 224 px crops: efficientnet-lite0 {r_eff:.1f} crops/s, free encoder {r_free:.0f} crops/s")

    # A: the whole big slide, everything but encoder compute
    t_a, n_a, h5 = run_one(big, free_model, work / "out-free")
    per_h5, per_x = h5ad_bytes_per_spot(h5, work)
    print(f"A  {big.name}: {n_a} in-tissue spots ({n_a * CROPS_PER_SPOT} crops), end to end with the free "
          f"encoder {t_a:.0f} s ({n_a / t_a:.0f} spots/s: reading, cropping, model, writing)")

    # C: check the sum on a small slide, end to end with efficientnet-lite0 (+ its feature store)
    t_cf, n_c, _ = run_one(small, free_model, work / "check-free")
    t_ce, n_ce, _ = run_one(small, eff_model, work / "check-effnet", cache_dir=work / "check-features")
    pred_c = t_cf + n_c * CROPS_PER_SPOT * extra
    store_b = du(work / "check-features") / max(n_ce, 1)
    print(f"C  {small.name}: {n_c} spots; efficientnet-lite0 end to end {t_ce:.1f} s, projected {pred_c:.1f} s "
          f"(measured/projected {t_ce / pred_c:.2f})")

    t_proj = t_a + n_a * CROPS_PER_SPOT * extra
    print()
    print(f"slides/hour, {args.size}×{args.size} px @ {args.mpp} µm/px, {n_a} spots, efficientnet-lite0, "
          f"CPU, this machine: {3600 / t_proj:.2f}  ({t_proj / 60:.0f} min per slide = A {t_a:.0f} s + "
          f"{n_a * CROPS_PER_SPOT} crops / {r_eff:.1f} crops/s)")
    print(f"slides/hour with encoder compute taken away (the ceiling of everything else): {3600 / t_a:.1f}")
    if args.full:
        t_b, n_b, _ = run_one(big, eff_model, work / "out-effnet")
        print(f"slides/hour, measured end to end with efficientnet-lite0: {3600 / t_b:.2f} ({n_b} spots, {t_b:.0f} s)")
    print(f"storage: predicted h5ad ({args.genes} genes, float32, gzip) {per_h5 / 1024:.1f} KiB/spot with the "
          f"thumbnail, {per_x / 1024:.1f} KiB/spot without (raw float32: {4 * args.genes / 1024:.1f} KiB); "
          f"feature store (zarr, 1280-d × {CROPS_PER_SPOT} crops) {store_b / 1024:.1f} KiB/spot "
          f"(raw: {4 * 1280 * CROPS_PER_SPOT / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
