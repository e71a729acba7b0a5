"""Encoder throughput on CPU: crops/s per encoder (preprocess + forward, uint8 tiles in).

    python benchmarks/encoders.py                      # default set, < 3 min on 2 cores
    python benchmarks/encoders.py --encoders uni hoptimus0 --crops 4
    python benchmarks/encoders.py --device cuda --autocast bf16 --crops 512

efficientnet-lite0 runs with its real (packaged) weights; every other encoder is built with
RANDOM weights (same architecture, same cost) because their weights are gated downloads.
Throughput does not depend on the weight values.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from deepspot.features.encoders import get_spec, list_encoders, load_encoder

# crops per run by default: small for the big ViTs so the whole run stays short on a laptop CPU
DEFAULT_CROPS = {"efficientnet-lite0": 32, "resnet50": 16, "densenet121": 16, "inception-v3": 16,
                 "phikon": 8, "uni": 4, "phikon-v2": 4, "hoptimus0": 2}
DEFAULT_SET = ["efficientnet-lite0", "resnet50", "densenet121", "inception-v3", "phikon", "uni"]


def timed(enc, tiles, batch: int, autocast: str | None, repeats: int) -> float:
    """Best crops/s over ``repeats`` passes, after one warm-up batch."""
    enc.encode(tiles[:2], autocast_dtype=autocast)  # warm-up (and compile)
    best = 0.0
    for _ in range(repeats):
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        enc.encode(tiles, autocast_dtype=autocast, batch_size=batch)
        if enc.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, len(tiles) / (time.perf_counter() - t0))
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", nargs="+", default=DEFAULT_SET, help=f"any of: {', '.join(list_encoders())}")
    ap.add_argument("--crops", type=int, default=None, help="crops per encoder (default: per-encoder, small for ViTs)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tile", type=int, default=112, help="input tile side in px (resized to the encoder input)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", nargs="+", default=["fp32", "bf16"],
                    help="fp32 | bf16 | fp16 | auto, one run each")
    ap.add_argument("--channels-last", action="store_true", help="also time channels_last for the CNNs")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (slow first batch)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per setting; the best is shown")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"batch={args.batch} tile={args.tile}px")
    print(f"{'encoder':<20}{'weights':<9}{'mode':<18}{'crops':>6}{'crops/s':>10}{'build s':>9}")
    for name in args.encoders:
        spec = get_spec(name)
        crops = args.crops or DEFAULT_CROPS.get(name, 16)
        cnn = name in ("efficientnet-lite0", "resnet50", "densenet121", "inception-v3")
        t0 = time.perf_counter()
        enc = load_encoder(name, random_init=spec.needs_download, device=args.device, compile=args.compile)
        build = time.perf_counter() - t0
        tiles = np.random.default_rng(0).integers(0, 256, size=(crops, args.tile, args.tile, 3), dtype=np.uint8)
        layouts = [False, True] if (args.channels_last and cnn) else [False]
        for cl in layouts:
            if cl:
                enc.optimize(channels_last=True)
            for ac in args.autocast:
                rate = timed(enc, tiles, min(args.batch, crops), None if ac == "fp32" else ac, args.repeats)
                mode = ac + (" +chlast" if cl else "") + (" +compile" if args.compile else "")
                print(f"{name:<20}{'random' if spec.needs_download else 'real':<9}{mode:<18}{crops:>6}"
                      f"{rate:>10.2f}{build:>9.1f}", flush=True)
        del enc


if __name__ == "__main__":
    main()
