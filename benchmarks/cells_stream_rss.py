"""Peak memory of `predict_cells` on 10k / 100k / 1M generated cells: in blocks (the default) against the
whole table at once (``block_size`` = N, what predict-cells did before: every cell's features in memory).

Generated inputs, nothing read from disk but what this writes: a 2,000 x 2,000 RGB PNG of noise, N cell
centroids uniform on it, a random-weight DeepCell (kNN k = 8, hidden 16, 2 heads, 10 genes). The encoder is
a cheap registered stand-in (``bench-pool``: 4 x 4 average pool of a 16 px crop -> fixed random Linear to
``--dim`` features, 256 by default): with a real encoder 1M cells take hours on a CPU, and the memory that
grows with N is the features (N x dim floats), which this keeps at a realistic width. Each case runs in a fresh
child process; peak RSS is the child's ``ru_maxrss``.

By default a first child writes the N cells' features into the feature store (random numbers, in chunks,
through the store's own writer, in the order predict_cells stores cells) and the prediction children find
them there, so they measure the prediction path: on 2 shared CPU cores, encoding 1M crops even with the stand-in encoder takes
about an hour. Encoding into the store was already streamed (extract_to_store: one chunk in memory);
``--encode`` runs the whole path, encoder included.

Every prediction child also writes the cells h5ad, as predict-cells does: block by block into the file (now)
or, for comparison, the whole AnnData in memory then ``write_h5ad`` (before). ``--genes``: the model's genes
(the output is cells x genes).

    python benchmarks/cells_stream_rss.py [--cells 10000,100000,1000000] [--dim 256] [--genes 10]
                                          [--whole-max 100000] [--encode]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def register(dim: int) -> str:
    import torch
    from torch import nn

    from deepspot.features.encoders import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec, register_encoder

    def build(_path=None):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, dim))

    register_encoder(EncoderSpec("bench-pool", dim, 16, IMAGENET_MEAN, IMAGENET_STD, build,
                                 "benchmark stand-in: average pool + fixed random projection", False, arch=build),
                     overwrite=True)
    return "bench-pool"


def prefill(store_dir: Path, slide: Path, enc, tile: float, xy: np.ndarray, dim: int) -> None:
    """The cells' features written into the store predict_cells will look in (random, in chunks)."""
    from deepspot.features.extract import store_path_for
    from deepspot.features.store import FeatureWriter

    from deepspot.inference.predict_cells import spatial_order

    xy = xy[spatial_order(xy)]  # the order predict_cells encodes (and stores) cells in
    rng = np.random.default_rng(1)
    attrs = {"encoder": enc.name, "tile_px": float(tile), "n_sub": 0, "mode": "standard", "slide": str(slide),
             "subspot_rule": "split"}
    w = FeatureWriter(store_path_for(store_dir, slide, enc, tile, 0), len(xy), dim, 0, attrs)
    for a in range(0, len(xy), 8192):
        b = min(a + 8192, len(xy))
        w.write(a, xy[a:b], rng.standard_normal(size=(b - a, dim), dtype=np.float32), None)
    w.close()


def child(n: int, block: int, dim: int, work: Path, encode: bool = False, genes: int = 10,
          stream: bool = False) -> dict:
    import torch

    from deepspot.config import CellGeometry, EncoderRef, ModelConfig
    from deepspot.features.encoders import load_encoder
    from deepspot.inference.predict_cells import predict_cells
    from deepspot.models.deepcell import DeepCell

    enc = load_encoder(register(dim))
    rng = np.random.default_rng(0)
    xy = rng.uniform(10, 1990, size=(n, 2))
    torch.manual_seed(0)
    geom = CellGeometry(16.0, neighbors="knn", k=8)
    model = DeepCell(dim, genes, hidden=16, n_ensemble=2, context="cell_neighbors").eval()
    cfg = ModelConfig("deepcell", model.config(), EncoderRef(enc.name, dim), [f"g{i}" for i in range(genes)], geom)
    if block == 0:  # the prefill alone, in a process of its own (the store's writer has its own footprint)
        prefill(work / f"store-{n}", work / "slide.png", enc, geom.tile_px(None), xy, dim)
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with tempfile.TemporaryDirectory(dir=work) as store:
        if not encode:
            store = work / f"store-{n}"
        t0 = time.perf_counter()
        h5 = work / f"cells-{n}.h5ad"
        # the h5ad is written either way, as predict-cells writes it: streamed block by block (now), or the
        # whole AnnData in memory then write_h5ad (before)
        out = predict_cells(work / "slide.png", xy, model, cfg, enc, progress=False, cache_dir=store,
                            block_size=block, batch_size=512, predict_batch=4096, out=h5 if stream else None)
        if not stream:
            from deepspot.io.outputs import write_h5ad

            write_h5ad(out, h5)
        seconds = time.perf_counter() - t0
        h5.unlink()
    return {"cells": n, "block": block, "seconds": seconds, "genes": out.n_vars,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--block", type=int, default=16384)
    ap.add_argument("--whole-max", type=int, default=100000, help="largest N also run as one whole block")
    ap.add_argument("--encode", action="store_true", help="encode the crops too (slow) instead of prefilling the store")
    ap.add_argument("--genes", type=int, default=10, help="genes the model predicts (the output is cells x genes)")
    ap.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, type=int, metavar=("N", "BLOCK", "DIM"), help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, Path(args.work), args.encode, args.genes, args.stream)))
        return
    from PIL import Image

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(2000, 2000, 3), dtype=np.uint8)).save(
            work / "slide.png")
        print("cells | mode | peak RSS (MB) | seconds (prediction%s + writing the h5ad; %d genes)"
              % (" with encoding" if args.encode else "", args.genes), flush=True)
        for n in [int(v) for v in args.cells.split(",")]:
            if not args.encode:
                r = subprocess.run([sys.executable, __file__, "--child", str(n), "0", str(args.dim), "--work",
                                    str(work)], capture_output=True, text=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{n:,} | (writing the store, its own process) | {res['peak_rss_mb']:.0f} | -", flush=True)
            modes = [("blocks of %d, h5ad written block by block" % args.block, args.block, True),
                     ("blocks of %d, AnnData in memory then written" % args.block, args.block, False)]
            modes += [("whole table, AnnData in memory then written", n, False)] if n <= args.whole_max else []
            for label, block, stream in modes:
                r = subprocess.run([sys.executable, __file__, "--child", str(n), str(block), str(args.dim),
                                    "--work", str(work), "--genes", str(args.genes)]
                                   + (["--encode"] if args.encode else []) + (["--stream"] if stream else []),
                                   capture_output=True, text=True)
                if r.returncode:
                    print(f"{n} | {label} | failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{n:,} | {label} | {res['peak_rss_mb']:.0f} | {res['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
