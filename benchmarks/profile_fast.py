"""Where the wall time of a fast-mode whole-slide prediction goes, on the real HER2ST C3 H&E (9.3k × 9.9k JPEG).

    OMP_NUM_THREADS=1 python benchmarks/profile_fast.py            # ~5 min on 2 cores
    python benchmarks/profile_fast.py --slide my.svs --spot-px 110 --spacing-px 200 --mode standard

One process, as ``deepspot predict --fast`` runs it (efficientnet-lite0 with its real weights, a DeepSpot of
the published size with random weights, 1000 genes):

A. a first slide: the imports (torch, the package), building the encoder, then ``predict_slide`` with the
   PNG of 4 genes (the CLI default) — what one ``deepspot predict`` pays;
B. the same slide again in the same process with the encoder reused and no PNG (``--plot-genes 0``) — what
   each further slide of a cohort pays (``predict-cohort`` builds the encoder once per process).

``predict_slide`` runs under cProfile, so its stages (plan: open, thumbnail, tissue filter; encoding;
model; h5ad, CSV, PNG) are cumulative times of their functions in the main process; slide reading and
cropping in the DataLoader worker overlap with encoding and show as "waiting for crops".
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

STAGES = [  # (label, function name in the package; cumulative seconds in the main process)
    ("plan: open + grid + thumbnail + tissue", "plan_slide"),
    ("  thumbnail", "get_thumbnail"),
    ("  tissue filter", "tissue_spots"),
    ("encode (main process)", "encode_spots"),
    ("model (chunked bags)", "iter_predictions"),
    ("h5ad", "write_h5ad_chunked"),
    ("spots CSV", "to_csv"),
    ("PNG", "spatial_columns"),
]


def cumulative(prof: cProfile.Profile) -> dict[str, float]:
    st = pstats.Stats(prof)
    out: dict[str, float] = {}
    for (_file, _line, name), (_cc, _nc, _tt, ct, _callers) in st.stats.items():
        out[name] = max(out.get(name, 0.0), ct)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, default=None, help="default: HER2ST C3 (datasets helper)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--spot-px", type=float, default=145.0)
    ap.add_argument("--spacing-px", type=float, default=264.0)
    ap.add_argument("--mode", default="fast", choices=["fast", "standard"])
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "deepspot-profile-fast")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    t = time.perf_counter()
    import torch

    from deepspot.config import GridSpec, ModelConfig, SpotGeometry
    from deepspot.features.encoders import load_encoder
    from deepspot.features.extract import ExtractStats
    from deepspot.inference.predict import predict_slide
    from deepspot.io.datasets import her2st
    from deepspot.models.deepsets import DeepSpot

    t_import = time.perf_counter() - t
    slide = args.slide or her2st(("C3",), args.data_dir)["C3"]["image"]
    t = time.perf_counter()
    enc = load_encoder("efficientnet-lite0")
    t_load = time.perf_counter() - t
    torch.manual_seed(0)
    model = DeepSpot(enc.dim, args.genes, hidden=512, n_ensemble=10).eval()
    geom = SpotGeometry(GridSpec(args.spot_px, args.spacing_px, layout="hex", unit="px"), n_sub=3,
                        feature_mode=args.mode)
    cfg = ModelConfig.coerce({"model": "deepspot", "model_args": model.config(),
                              "encoder": {"name": enc.name, "dim": enc.dim},
                              "genes": [f"gene{i}" for i in range(args.genes)], "geometry": geom.to_dict(),
                              "scaler": None})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
          f"{slide.name}, {args.mode} mode", flush=True)
    runs = {}
    for label, n_plot in (("A", 4), ("B", 0)):
        st = ExtractStats()
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        res = predict_slide(slide, model, cfg, enc, args.out / label, n_plot=n_plot, num_workers=args.workers,
                            progress=False, stats=st)
        prof.disable()
        wall = time.perf_counter() - t
        runs[label] = (wall, st, cumulative(prof), res)
        print(f"  {label}: {res.n_spots} spots in {wall:.1f} s", flush=True)

    wa, sa, ca, ra = runs["A"]
    wb, sb, cb, rb = runs["B"]
    total_a = t_import + t_load + wa
    rows = [("imports (torch + package)", t_import, None), ("build the encoder", t_load, None)]
    rows += [(lab, ca.get(fn, 0.0), cb.get(fn, 0.0)) for lab, fn in STAGES]
    rows += [("  of which encoder forward (+ preprocess, pooling)", sa.seconds_encoder, sb.seconds_encoder),
             ("  of which waiting for crops from the reader", sa.seconds_waiting, sb.seconds_waiting),
             ("predict_slide wall", wa, wb)]
    print(f"\n{rb.n_spots} spots ({rb.n_grid} on the grid), {sa.n_forward} encoder images; seconds (share of the total)")
    print(f"{'stage':<52} {'A: first slide, PNG':>22} {'B: next slide, no PNG':>22}")
    for lab, a, b in rows:
        fa = f"{a:.1f} ({100 * a / total_a:.0f}%)"
        fb = "-" if b is None else f"{b:.1f} ({100 * b / wb:.0f}%)"
        print(f"{lab:<52} {fa:>22} {fb:>22}")
    print(f"{'total':<52} {total_a:>22.1f} {wb:>22.1f}")
    print(f"{'encoder share':<52} {100 * sa.seconds_encoder / total_a:>21.0f}% {100 * sb.seconds_encoder / wb:>21.0f}%")


if __name__ == "__main__":
    main()
