"""Encoder crops/s of a UNI-sized ViT-L/16 (timm, RANDOM weights: same cost) per precision, batch size and
speed-up (eager, channels_last, torch.compile). Part of benchmarks/gpu.sh.

    python benchmarks/gpu_encoders.py --device cuda                       # ~3 min on one GPU
    python benchmarks/gpu_encoders.py --device cpu --batches 2 --crops 4 --dtypes fp32 bf16 --no-compile

Crops are uint8 224 px tiles already on the device (preprocess + forward are timed, as the pipeline runs
them; the host-to-device copy of crops is not). Each setting: one warm-up pass (and the compile), then
the best of ``--repeats`` timed passes over ``--crops`` crops. torch.compile is timed at bf16 for the
batch sizes in ``--compile-batches`` only (each shape compiles anew).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rate(enc, tiles, batch: int, dtype: str, repeats: int) -> float:
    ac = None if dtype == "fp32" else dtype
    enc.encode(tiles[:batch], autocast_dtype=ac, batch_size=batch)  # warm-up (compiles when compiled)
    best = 0.0
    for _ in range(repeats):
        sync(enc.device)
        t = time.perf_counter()
        enc.encode(tiles, autocast_dtype=ac, batch_size=batch)
        sync(enc.device)
        best = max(best, len(tiles) / (time.perf_counter() - t))
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--encoder", default="uni", help="a registered encoder; built with random weights")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--crops", type=int, default=1024, help="crops per timed pass (at least the batch)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compile-batches", type=int, nargs="*", default=[256])
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from deepspot.features.encoders import load_encoder

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would be a fourth precision)
        torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.encoder} (random init) on {name}, torch {torch.__version__}; {args.crops} crops per pass, best of "
          f"{args.repeats}", flush=True)
    g = torch.Generator().manual_seed(0)
    n = max(args.crops, max(args.batches))
    rows = []
    enc = load_encoder(args.encoder, random_init=True, device=dev)
    tiles = torch.randint(0, 256, (n, enc.input_size, enc.input_size, 3), dtype=torch.uint8, generator=g).to(dev)
    for variant in ("eager", "channels_last"):
        if variant == "channels_last":
            enc.optimize(channels_last=True)
        for dt in args.dtypes:
            for b in args.batches:
                r = rate(enc, tiles, b, dt, args.repeats)
                rows.append((variant, dt, b, r))
                print(f"  {variant:<14} {dt:<5} batch {b:>4}: {r:9.1f} crops/s", flush=True)
    if not args.no_compile and args.compile_batches:
        del enc
        enc = load_encoder(args.encoder, random_init=True, device=dev, compile=True)
        for b in args.compile_batches:
            t = time.perf_counter()
            r = rate(enc, tiles, b, "bf16" if "bf16" in args.dtypes else args.dtypes[0], args.repeats)
            rows.append(("torch.compile", "bf16" if "bf16" in args.dtypes else args.dtypes[0], b, r))
            print(f"  torch.compile  batch {b:>4}: {r:9.1f} crops/s (with the compile: {time.perf_counter() - t:.0f} s)",
                  flush=True)
    print(f"\n{'variant':<15} {'precision':<9} " + " ".join(f"{'b=' + str(b):>9}" for b in args.batches))
    for variant in dict.fromkeys(v for v, *_ in rows):
        for dt in dict.fromkeys(d for v, d, *_ in rows if v == variant):
            got = {b: r for v, d, b, r in rows if v == variant and d == dt}
            print(f"{variant:<15} {dt:<9} " + " ".join(f"{got[b]:>9.1f}" if b in got else f"{'-':>9}"
                                                       for b in args.batches))
    best = max(rows, key=lambda r: r[3])
    print(f"fastest: {best[0]} {best[1]} batch {best[2]}: {best[3]:.1f} crops/s")


if __name__ == "__main__":
    main()
