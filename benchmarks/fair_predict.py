"""Whole-slide prediction against a FAIR reference: the original DeepSpot's algorithm with its own batching.

    OMP_NUM_THREADS=2 python benchmarks/fair_predict.py            # a few minutes on 2 idle cores
    python benchmarks/fair_predict.py --spots 12 --reps 2 --sweep-spots 12 --sweep 1 16 64
    python benchmarks/fair_predict.py --slide my_slide.tif --spot-px 110 --spacing-px 200 --device cuda

Everything runs in this one process, on the same spots, encoder (efficientnet-lite0 with its real
weights by default) and model (a DeepSpot of the published size, hidden 512 × 10 heads, random weights):

1. Reference, the original's way: one spot at a time, THREE encoder calls per spot — the spot crop at
   batch 1, its 9 sub-spot crops at batch 9, its K neighbours' crops (read from the slide and encoded
   again for every spot they neighbour) at batch K — then the model on that one bag.
   Ours: ``inference.predict.predict_plan`` — every crop encoded once, batched, slide reading in a
   DataLoader worker, neighbours looked up from the stored spot features; fast mode: one encoder pass
   per spot, sub-spots pooled from its feature map. The three run interleaved (ref, standard, fast, then
   fast, standard, ref, …), ``--reps`` rounds; medians and min–max are printed, the speed-ups are the
   medians of the per-round ratios. The reference's and our standard predictions must agree (≤ 1e-4).
2. Encoder batch-size sweep at equal work (the same ``--sweep-spots`` spots for every batch size b):
   the pipeline with b spots per batch and at most b crops per encoder forward, standard and fast, as
   crops/s next to the raw encoder on random crops of batch b (preprocess + forward: the physical limit
   of the encoder stage here).

The slide is a crop of the real HER2ST C3 H&E (found through the package's datasets helper; ``--slide``
takes any other) with a virtual Visium-like hex grid in pixels (``--spot-px``, ``--spacing-px``); the
reference comparison uses a compact cluster of ``--spots`` in-tissue spots treated as the whole slide
(neighbours inside it), so both sides compute exactly the same predictions.
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


# --------------------------------------------------------------------------- setup

def crop_slide(workdir: Path, side: int, data_dir=None) -> Path:
    """A side × side JPEG crop around the tissue centre of HER2ST C3 (built once in ``workdir``)."""
    from PIL import Image

    from deepspot.io.datasets import her2st

    out = workdir / f"her2st_C3_crop{side}.jpg"
    if out.exists():
        return out
    src = her2st(("C3",), data_dir)["C3"]["image"]
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(src) as im:
        im = im.convert("RGB")
        small = np.asarray(im.reduce(16)).astype(np.float32).mean(axis=2)
        ys, xs = np.nonzero(small < 200)  # tissue is darker than the glass
        cy, cx = int(np.median(ys)) * 16, int(np.median(xs)) * 16
        x0, y0 = max(0, min(cx - side // 2, im.width - side)), max(0, min(cy - side // 2, im.height - side))
        im.crop((x0, y0, x0 + side, y0 + side)).save(out, quality=90)
    return out


def synthetic_slide(workdir: Path, side: int, mpp: float, data_dir=None) -> Path:
    """A side × side pyramidal JPEG TIFF at ``mpp`` grown from the bundled NCBI858 H&E (built once)."""
    from deepspot.io.datasets import ncbi858_files
    from deepspot.io.synthetic import write_pyramidal_tiff

    out = workdir / f"he_{side}px_{mpp}mpp.tif"
    if not out.exists():
        t = time.perf_counter()
        write_pyramidal_tiff(out, ncbi858_files(data_dir)["image"], side, side, mpp=mpp)
        print(f"  built {out.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def full_slide(slide: Path, enc, models, args, out: list):
    """predict_slide (plan, encode, predict, write h5ad + CSV, no PNG) on the first ``--full-slide`` in-tissue
    spots of the whole slide, standard and fast; the whole slide's time extrapolated from spots/s."""
    from deepspot.features.extract import ExtractStats
    from deepspot.inference.predict import predict_slide

    out.append(f"\n[3] predict_slide on {slide.name}, first {args.full_slide} in-tissue spots, batch {args.batch}")
    out.append(f"{'mode':<10} {'spots':>6} {'of':>7} {'wall s':>8} {'spots/s':>9} {'encoder share':>13} "
               f"{'whole slide (extrapolated)':>27}")
    for m in ("standard", "fast"):
        model, cfg = models[m]
        st = ExtractStats()
        res = predict_slide(slide, model, cfg, enc, args.workdir / f"out-{m}", n_plot=0, batch_size=args.batch,
                            num_workers=args.workers, device=args.device, autocast_dtype=args.autocast,
                            progress=False, stats=st, max_spots=args.full_slide or None)
        total = int(next((n.split(" of ")[1].split()[0] for n in res.notes if n.startswith("capped")), res.n_spots))
        rate = res.n_spots / res.seconds
        out.append(f"{m:<10} {res.n_spots:>6} {total:>7} {res.seconds:>8.1f} {rate:>9.1f} "
                   f"{100 * st.seconds_encoder / res.seconds:>12.0f}% {total / rate / 60:>23.1f} min")


def make_model(dim: int, n_genes: int, mode: str, spot_px: float, spacing_px: float, seed: int = 0):
    from deepspot.config import GridSpec, ModelConfig, SpotGeometry
    from deepspot.models.deepsets import DeepSpot

    torch.manual_seed(seed)
    model = DeepSpot(dim, n_genes, hidden=512, n_ensemble=10).eval()  # the published size
    geom = SpotGeometry(GridSpec(spot_px, spacing_px, layout="hex", unit="px"), n_sub=3, neighbor_radius=1,
                        feature_mode=mode)
    cfg = ModelConfig.coerce({"model": "deepspot", "model_args": model.config(),
                              "encoder": {"name": "efficientnet-lite0", "dim": dim},
                              "genes": [f"gene{i}" for i in range(n_genes)], "geometry": geom.to_dict(),
                              "scaler": None})
    return model, cfg


def compact_cluster(plan, m: int):
    """The ``m`` in-tissue spots nearest the centre of the tissue, as a plan of their own (grid order)."""
    xy = plan.grid[["x", "y"]].to_numpy()
    pick = np.sort(np.argsort(np.linalg.norm(xy - np.median(xy, axis=0), axis=1), kind="stable")[:m])
    return replace(plan, grid=plan.grid.iloc[pick].reset_index(drop=True))


# --------------------------------------------------------------------------- the two sides

@torch.no_grad()
def reference(plan, model, encoder, device="cpu", autocast=None, n_sub: int = 3) -> tuple[np.ndarray, dict]:
    """The original's algorithm and batching: per spot, encoder calls at batch 1 (spot), 9 (sub-spots) and
    K (neighbour crops, read and encoded again), then the model on the one bag."""
    from deepspot.features.tiles import make_crops, read_size, spot_boxes
    from deepspot.io.slides import open_slide

    size = encoder.input_size
    px = read_size(plan.spec.spot_diameter, size, n_sub)
    boxes = spot_boxes(plan.grid[["x", "y"]].to_numpy(), plan.spec.spot_diameter)
    nidx, nmask = plan.neighbors()
    st = {"calls": 0, "crops": 0, "encoder_s": 0.0}
    preds = []
    t0 = time.perf_counter()

    def enc(crops):
        t = time.perf_counter()
        f = encoder.encode(crops, device=device, autocast_dtype=autocast, batch_size=len(crops))
        st["encoder_s"] += time.perf_counter() - t
        st["calls"] += 1
        st["crops"] += len(crops)
        return f.to(device)

    with open_slide(plan.slide_path) as slide:
        def region(k):
            x, y, w, h = (int(v) for v in boxes[k])
            return slide.read_scaled((x, y), (w, h), px)

        for i in range(len(boxes)):
            crops = make_crops(region(i), size, n_sub)  # (1 + 9, S, S, 3)
            spot, sub = enc(crops[:1]), enc(crops[1:])  # batch 1, batch 9
            near = nidx[i][nmask[i]]
            if len(near):  # batch K: every neighbour read and encoded again
                nb = enc(torch.stack([make_crops(region(int(j)), size, 0)[0] for j in near]))[None]
            else:
                nb = torch.zeros(1, 1, encoder.dim, device=device)
            nm = torch.full(nb.shape[:2], bool(len(near)), device=device)
            sm = torch.ones(1, sub.shape[0], dtype=torch.bool, device=device)
            preds.append(model(spot, sub[None], sm, nb, nm)[0].float().cpu().numpy())
    st["wall"] = time.perf_counter() - t0
    return np.stack(preds), st


def ours(plan, model, cfg, encoder, mode: str, batch: int, workers, device="cpu", autocast=None):
    from deepspot.features.extract import ExtractStats
    from deepspot.inference.predict import predict_plan

    st = ExtractStats()
    t0 = time.perf_counter()
    X = predict_plan(plan, model, cfg, encoder, mode=mode, batch_size=batch, num_workers=workers, progress=False,
                     stats=st, device=device, autocast_dtype=autocast)
    wall = time.perf_counter() - t0
    return X, {"wall": wall, "calls": None, "crops": st.n_forward, "encoder_s": st.seconds_encoder,
               "wait_s": st.seconds_waiting}


# --------------------------------------------------------------------------- sections

def med(xs):
    return statistics.median(xs)


def spread(xs, f="{:.1f}"):
    return f"{f.format(med(xs))} ({f.format(min(xs))}–{f.format(max(xs))})"


def compare(plan, enc, models, args, out: list):
    (model, cfg), (fmodel, fcfg) = models["standard"], models["fast"]
    sides = {
        "reference": lambda: reference(plan, model, enc, args.device, args.autocast),
        "standard": lambda: ours(plan, model, cfg, enc, "standard", args.batch, args.workers, args.device, args.autocast),
        "fast": lambda: ours(plan, fmodel, fcfg, enc, "fast", args.batch, args.workers, args.device, args.autocast),
    }
    runs = {k: [] for k in sides}
    preds = {}
    order = list(sides)
    for r in range(args.reps):
        for k in (order if r % 2 == 0 else order[::-1]):
            preds[k], st = sides[k]()
            runs[k].append(st)
            print(f"  round {r + 1} {k:<9} {st['wall']:6.1f} s, encoder {st['encoder_s']:6.1f} s, "
                  f"{st['crops']} crops", flush=True)
    n = len(plan.grid)
    diff = float(np.abs(preds["reference"] - preds["standard"]).max())
    k_mean = float(plan.neighbors()[1].sum(1).mean())
    ratio = {k: [runs["reference"][i]["wall"] / runs[k][i]["wall"] for i in range(args.reps)]
             for k in ("standard", "fast")}
    out.append(f"\n[1] {n} spots (mean {k_mean:.2f} neighbours), {args.reps} interleaved rounds; "
               f"encoder {enc.name}; model hidden 512 × 10 heads, {args.genes} genes")
    out.append(f"{'side':<34} {'wall s, median (min–max)':>26} {'spots/s':>8} {'crops/spot':>10} "
               f"{'encoder calls':>13} {'encoder share':>13} {'speed-up':>18}")
    for k, label in (("reference", "reference (original batching)"), ("standard", "ours, standard"),
                     ("fast", "ours, fast")):
        w = [s["wall"] for s in runs[k]]
        share = [s["encoder_s"] / s["wall"] for s in runs[k]]
        calls = runs[k][0]["calls"]
        sp = "1" if k == "reference" else spread(ratio[k], "{:.2f}") + "x"
        out.append(f"{label:<34} {spread(w):>26} {n / med(w):>8.2f} {runs[k][0]['crops'] / n:>10.1f} "
                   f"{('-' if calls is None else str(calls)):>13} {100 * med(share):>12.0f}% {sp:>18}")
    out.append(f"max |reference - standard| = {diff:.2e} (must be <= 1e-4: {'yes' if diff <= 1e-4 else 'NO'}"
               + (f"; under {args.autocast} autocast batch composition changes the rounding)" if args.autocast else ")"))
    return diff


def sweep(plan, enc, models, args, out: list):
    from deepspot.features import extract

    n = len(plan.grid)
    res = {(b, m): [] for b in args.sweep for m in ("standard", "fast")}
    raw = {b: [] for b in args.sweep}
    size = enc.input_size
    g = torch.Generator().manual_seed(0)
    n_raw = max(args.sweep)
    tiles = torch.randint(0, 256, (n_raw, size, size, 3), dtype=torch.uint8, generator=g)
    keep = dict(extract.FORWARD_BATCH)
    try:
        for r in range(args.sweep_reps):
            for b in (args.sweep if r % 2 == 0 else args.sweep[::-1]):
                extract.FORWARD_BATCH = {k: b for k in keep}
                for m in ("standard", "fast"):
                    model, cfg = models[m]
                    _, st = ours(plan, model, cfg, enc, m, b, args.workers, args.device, args.autocast)
                    res[(b, m)].append(st)
                reps = max(1, -(-args.raw_crops // b))  # equal work: about raw_crops crops per batch size
                t = time.perf_counter()
                for _ in range(reps):
                    enc.encode(tiles[:b], device=args.device, autocast_dtype=args.autocast, batch_size=b)
                raw[b].append(reps * b / (time.perf_counter() - t))
                print(f"  sweep round {r + 1} b={b:<4} standard {res[(b, 'standard')][-1]['wall']:6.1f} s, "
                      f"fast {res[(b, 'fast')][-1]['wall']:5.1f} s, raw {raw[b][-1]:6.1f} crops/s", flush=True)
    finally:
        extract.FORWARD_BATCH = keep
    out.append(f"\n[2] encoder batch-size sweep: {n} spots per run (equal work), b spots per batch and at most b "
               f"crops per forward; {args.sweep_reps} interleaved rounds, medians")
    out.append(f"{'b':>5} {'raw encoder crops/s':>20} {'standard crops/s':>17} {'std encoder share':>17} "
               f"{'std spots/s':>11} {'fast crops/s':>13} {'fast encoder share':>18} {'fast spots/s':>12}")
    best = {}
    for b in args.sweep:
        row = [f"{b:>5}", f"{med(raw[b]):>20.1f}"]
        for m in ("standard", "fast"):
            sts = res[(b, m)]
            w = med([s["wall"] for s in sts])
            cps = sts[0]["crops"] / w
            best.setdefault(m, []).append((n / w, b))
            share = 100 * med([s["encoder_s"] / s["wall"] for s in sts])
            w1, w2, w3 = (17, 17, 11) if m == "standard" else (13, 18, 12)
            row += [f"{cps:>{w1}.1f}", f"{share:>{w2 - 1}.0f}%", f"{n / w:>{w3}.2f}"]
        out.append(" ".join(row))
    for m, xs in best.items():
        out.append(f"fastest {m}: b = {max(xs)[1]} ({max(xs)[0]:.2f} spots/s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "deepspot-bench-fair")
    ap.add_argument("--slide", type=Path, default=None, help="default: a crop of HER2ST C3")
    ap.add_argument("--crop", type=int, default=3000, help="side of the HER2ST C3 crop, px")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--spot-px", type=float, default=145.0, help="spot diameter, px (C3: 55 µm)")
    ap.add_argument("--spacing-px", type=float, default=264.0, help="hex pitch, px (C3: 100 µm)")
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--random-init", action="store_true", help="random encoder weights (e.g. 'uni')")
    ap.add_argument("--spots", type=int, default=16, help="spots of the reference comparison")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="our spots per batch in [1]")
    ap.add_argument("--sweep", type=int, nargs="*", default=[1, 9, 16, 32, 64, 128])
    ap.add_argument("--sweep-spots", type=int, default=16)
    ap.add_argument("--sweep-reps", type=int, default=2)
    ap.add_argument("--raw-crops", type=int, default=128, help="crops per raw-encoder measurement")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None, help="reader processes (default: the package's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", default=None, help="bf16 / fp16 on a GPU")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--synthetic", type=int, default=0, help="use a generated SIDE² pyramidal TIFF at --mpp instead")
    ap.add_argument("--mpp", type=float, default=0.5, help="µm/px of --synthetic")
    ap.add_argument("--full-slide", type=int, default=-1, help="[3] predict_slide on the first N spots (0: all; "
                    "-1: skip)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from deepspot.config import GridSpec, SpotGeometry
    from deepspot.features.encoders import load_encoder
    from deepspot.inference.predict import plan_slide

    t_all = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        slide = synthetic_slide(args.workdir, args.synthetic, args.mpp, args.data_dir)
    else:
        slide = args.slide or crop_slide(args.workdir, args.crop, args.data_dir)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cores {os.cpu_count()}, load average "
          f"{os.getloadavg()[0]:.1f}; slide {slide.name}", flush=True)
    enc = load_encoder(args.encoder, random_init=args.random_init, device=args.device)
    models = {m: make_model(enc.dim, args.genes, m, args.spot_px, args.spacing_px) for m in ("standard", "fast")}
    for m, _ in models.values():
        m.to(args.device)
    geom = SpotGeometry(GridSpec(args.spot_px, args.spacing_px, layout="hex", unit="px"), n_sub=3, neighbor_radius=1)
    plan = plan_slide(slide, geom)
    print(f"  {len(plan.grid)} in-tissue spots of {plan.n_grid} on the {plan.dimensions[0]}×{plan.dimensions[1]} "
          f"crop", flush=True)
    enc.encode(torch.zeros(2, enc.input_size, enc.input_size, 3, dtype=torch.uint8), device=args.device)  # warm-up
    out: list[str] = []
    if not args.skip_compare:
        print("[1] reference vs ours, interleaved", flush=True)
        compare(compact_cluster(plan, args.spots), enc, models, args, out)
    if args.sweep:
        print("[2] encoder batch-size sweep", flush=True)
        sweep(compact_cluster(plan, args.sweep_spots), enc, models, args, out)
    if args.full_slide >= 0:
        print("[3] predict_slide", flush=True)
        full_slide(slide, enc, models, args, out)
    print("\n".join(out))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
