"""Peak memory and time of `deepspot predict` (and `convert-slide`) on images too big to decode whole.

    python benchmarks/big_images.py make DIR      # the inputs (streamed: never a whole image in memory)
    python benchmarks/big_images.py run DIR [--label after] [--timeout 180]

``make`` writes into DIR:

- ``png30k.png``: 30,000 x 30,000 RGB PNG, white with the bottom-right corner of the bundled H&E
  (``[1000:2000, 1000:2000]`` of a 1431 x 1249 image: 249 x 431 px, nearly all background, so
  predict finds no tissue, as in the issue) at (14000, 14000); written row by row through zlib (a hand-made IHDR/IDAT/IEND stream, filter 0), so building it
  needs one row of memory;
- ``gray30k.png``: the same as 8-bit grayscale;
- ``tiff200k.tif``: 200,000 x 200,000 single-level tiled BigTIFF (1024 px tiles, zlib), every tile the
  same white tile encoded once and written as bytes by tifffile (sparse, ~100 MB, seconds);
- ``model/``: a random-weight DeepSpot checkpoint on efficientnet-lite0 (55 µm spots).

``run`` runs each case under ``/usr/bin/time -v`` (python's resource.getrusage of the child when that
is missing) with the interpreter and PYTHONPATH of the caller, and prints case | exit | seconds |
wall and CPU (user + system) seconds | peak RSS | last line of stderr. Cases are killed at ``--timeout`` seconds (reported as exit 'killed').
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np


def _chunk(f, kind: bytes, data: bytes) -> None:
    f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png_streaming(path: Path, w: int, h: int, patch: np.ndarray, at: tuple[int, int], gray: bool) -> None:
    """A w x h PNG, white except ``patch`` (uint8 (ph, pw, 3)) with its top-left at ``at`` (x, y)."""
    px = 1 if gray else 3
    if gray:
        patch = patch.mean(axis=2).round().astype(np.uint8)[:, :, None]
    white = b"\xff" * (w * px)
    x0, y0 = at
    ph, pw = patch.shape[:2]
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        _chunk(f, b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if gray else 2, 0, 0, 0))
        z = zlib.compressobj(6)
        pending = []
        for y in range(h):
            if y0 <= y < y0 + ph:
                row = bytearray(white)
                row[x0 * px:(x0 + pw) * px] = patch[y - y0].tobytes()
                data = z.compress(b"\x00" + bytes(row))
            else:
                data = z.compress(b"\x00" + white)
            if data:
                pending.append(data)
            if sum(map(len, pending)) > 1 << 20:
                _chunk(f, b"IDAT", b"".join(pending))
                pending = []
        pending.append(z.flush())
        _chunk(f, b"IDAT", b"".join(pending))
        _chunk(f, b"IEND", b"")


def write_sparse_tiff(path: Path, side: int, tile: int = 1024, mpp: float = 0.5) -> None:
    """A side x side single-level tiled RGB BigTIFF of white tiles (one encoded tile written n times)."""
    import tifffile

    enc = zlib.compress(np.full((tile, tile, 3), 255, np.uint8).tobytes(), 6)
    n = (-(-side // tile)) ** 2
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write((enc for _ in range(n)), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                 compression="zlib", photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp),
                 resolutionunit="CENTIMETER", metadata=None)


def make(d: Path) -> None:
    import torch
    from PIL import Image

    from deepspot.config import GridSpec, SpotGeometry
    from deepspot.datasets import locate
    from deepspot.models.checkpoint import save_checkpoint
    from deepspot.models.deepsets import DeepSpot

    d.mkdir(parents=True, exist_ok=True)
    he = np.asarray(Image.open(locate("ncbi858/NCBI858.jpg")).convert("RGB"))[1000:2000, 1000:2000]
    for name, gray in (("png30k.png", False), ("gray30k.png", True)):
        t = time.perf_counter()
        write_png_streaming(d / name, 30_000, 30_000, he, (14_000, 14_000), gray)
        print(f"{name}: {(d / name).stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    write_sparse_tiff(d / "tiff200k.tif", 200_000)
    print(f"tiff200k.tif: {(d / 'tiff200k.tif').stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.0f} s")
    torch.manual_seed(0)
    net = DeepSpot(1280, 6, hidden=16, n_ensemble=2, context="spot_neighbors")
    geometry = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    cfg = {"model": "deepspot", "model_args": net.config(), "encoder": {"name": "efficientnet-lite0", "dim": 1280},
           "genes": [f"G{i}" for i in range(6)], "geometry": geometry.to_dict(), "scaler": None}
    save_checkpoint(d / "model", net, cfg)


def _measure(cmd: list[str], timeout: float) -> tuple[str, float, float, float, str]:
    """(exit, wall seconds, CPU seconds, peak RSS GiB, last stderr line) of ``cmd``, killed after ``timeout`` s (exit 137):
    ``/usr/bin/time -v timeout -s KILL T cmd`` (time reports the largest RSS of the process tree it
    waited for), else python's resource.getrusage of the children."""
    timer = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None
    wrapped = ["timeout", "--foreground", "-s", "KILL", str(int(timeout)), *cmd]
    t0 = time.perf_counter()
    if timer:
        p = subprocess.run([timer, "-v", *wrapped], capture_output=True, text=True)
        err, out = p.stderr, p.stdout
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
        rss = int(m.group(1)) / 2 ** 20 if m else float("nan")
        cpu = sum(float(v) for v in re.findall(r"(?:User|System) time \(seconds\): ([0-9.]+)", err))
        m = re.search(r"Exit status: (\d+)", err)
        code = m.group(1) if m else str(p.returncode)
        err = err.split("\tCommand being timed")[0]
    else:  # pragma: no cover - no GNU time
        import resource

        p = subprocess.run(wrapped, capture_output=True, text=True)
        err, out, code = p.stderr, p.stdout, str(p.returncode)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss, cpu = ru.ru_maxrss / 2 ** 20, ru.ru_utime + ru.ru_stime
    secs = time.perf_counter() - t0
    if code in ("137", "124"):
        code += " (killed at the timeout)"
    lines = [ln for ln in (err + out).strip().splitlines() if ln.strip() and "Command exited" not in ln]
    return code, secs, cpu, rss, (lines[-1] if lines else "")[:200]


def run(d: Path, timeout: float, label: str, cases: list[str] | None) -> None:
    py = [sys.executable, "-m", "deepspot"]
    all_cases = {
        "png30k predict": [*py, "predict", str(d / "png30k.png"), "--model", str(d / "model"), "--mpp", "0.5",
                           "--out", str(d / f"out-{label}-png"), "--no-progress", "--num-workers", "0"],
        "gray30k predict": [*py, "predict", str(d / "gray30k.png"), "--model", str(d / "model"), "--mpp", "0.5",
                            "--out", str(d / f"out-{label}-gray"), "--no-progress", "--num-workers", "0"],
        "tiff200k predict": [*py, "predict", str(d / "tiff200k.tif"), "--model", str(d / "model"),
                             "--out", str(d / f"out-{label}-tiff"), "--no-progress", "--num-workers", "0"],
        "png30k convert-slide": [*py, "convert-slide", str(d / "png30k.png"), str(d / f"png30k-{label}.tif"),
                                 "--mpp", "0.5"],
        "converted png30k predict": [*py, "predict", str(d / f"png30k-{label}.tif"), "--model", str(d / "model"),
                                     "--out", str(d / f"out-{label}-conv"), "--no-progress", "--num-workers", "0"],
    }
    print(f"case | {label}: exit | wall s | CPU s | peak RSS GiB | message")
    for name, cmd in all_cases.items():
        if cases and name not in cases:
            continue
        code, secs, cpu, rss, msg = _measure(cmd, timeout)
        print(f"{name} | {code} | {secs:.1f} | {cpu:.1f} | {rss:.2f} | {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make").add_argument("dir", type=Path)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--label", default="after")
    r.add_argument("--timeout", type=float, default=180.0)
    r.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.dir)
    else:
        run(a.dir, a.timeout, a.label, a.cases.split(",") if a.cases else None)


if __name__ == "__main__":
    main()
