"""Fault cases of issue 16 through the CLI, with the exit code, wall seconds and last stderr line of each.

    python benchmarks/faults.py WORKDIR          # uses the deepspot on PYTHONPATH

Inputs (made in WORKDIR): a 600 x 600 crop of the bundled H&E as PNG (spots at --mpp 1.0), random-weight
DeepSpot checkpoints on efficientnet-lite0 with 6 genes, and edited copies of one (4 genes for 6
outputs; duplicate and blank gene names). Cases: bad checkpoints, --out that is a file, a folder
holding a previous result, the mode of model.safetensors, predict-cohort rerun with another model
and with another --mpp, Ctrl-C during predict.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _make(d: Path) -> None:
    import torch
    from PIL import Image

    from deepspot.config import GridSpec, SpotGeometry
    from deepspot.datasets import locate
    from deepspot.models.checkpoint import save_checkpoint
    from deepspot.models.deepsets import DeepSpot

    d.mkdir(parents=True, exist_ok=True)
    he = np.asarray(Image.open(locate("ncbi858/NCBI858.jpg")).convert("RGB"))
    Image.fromarray(he[300:900, 300:900]).save(d / "he.png")
    Image.fromarray(he[200:500, 700:1000]).save(d / "he2.png")
    (d / "cohort.csv").write_text("path,id\nhe.png,a\nhe2.png,b\n")
    geometry = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    for name, seed in (("model", 0), ("model_b", 1)):
        torch.manual_seed(seed)
        net = DeepSpot(1280, 6, hidden=16, n_ensemble=2, context="spot_neighbors")
        cfg = {"model": "deepspot", "model_args": net.config(), "encoder": {"name": "efficientnet-lite0",
               "dim": 1280}, "genes": [f"G{i}" for i in range(6)], "geometry": geometry.to_dict(), "scaler": None}
        save_checkpoint(d / name, net, cfg)
    edits = {"genes4_weights6": lambda c: (c.update(genes=c["genes"][:4]), c["model_args"].update(n_genes=4)),
             "duplicate_genes": lambda c: c.update(genes=c["genes"][:5] + ["G0"]),
             "blank_gene": lambda c: c.update(genes=c["genes"][:5] + [" "])}
    for name, edit in edits.items():
        shutil.copytree(d / "model", d / name)
        cfg = json.loads((d / name / "config.json").read_text())
        edit(cfg)
        (d / name / "config.json").write_text(json.dumps(cfg))
    (d / "a_file").write_text("x")


def _run(args, cwd, sigint_after_work: Path | None = None):
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "deepspot", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if sigint_after_work is not None:
        while p.poll() is None and not list(sigint_after_work.glob(".*.work-*")):
            time.sleep(0.05)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
    out, err = p.communicate()
    lines = [ln for ln in (err.strip().splitlines() or out.strip().splitlines()) if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("deepspot: error")]
    line = errors[0] if errors else lines[-1] if lines else "(nothing printed)"
    return p.returncode, time.perf_counter() - t0, line[:220]


def main() -> None:
    d = Path(sys.argv[1]).resolve()
    if d.exists():
        shutil.rmtree(d)
    _make(d)
    base = ["--mpp", "1.0", "--no-progress", "--num-workers", "0"]
    cases = []
    for name in ("genes4_weights6", "duplicate_genes", "blank_gene"):
        cases.append((f"predict, checkpoint {name}", ["predict", "he.png", "--model", name, "--out", f"o_{name}", *base]))
    cases += [
        ("predict --out is an existing file", ["predict", "he.png", "--model", "model", "--out", "a_file", *base]),
        ("predict into an empty folder", ["predict", "he.png", "--model", "model", "--out", "prev", *base]),
        ("predict again into that folder", ["predict", "he.png", "--model", "model", "--out", "prev", *base]),
        ("predict-cohort, model A", ["predict-cohort", "cohort.csv", "--model", "model", "--out", "coh",
                                     "--backend", "local", "--mpp", "1.0", "--no-progress", "--device", "cpu"]),
        ("predict-cohort rerun, model B", ["predict-cohort", "cohort.csv", "--model", "model_b", "--out", "coh",
                                           "--backend", "local", "--mpp", "1.0", "--no-progress", "--device", "cpu"]),
        ("predict-cohort rerun, model A, --mpp 0.8", ["predict-cohort", "cohort.csv", "--model", "model", "--out",
                                                      "coh", "--backend", "local", "--mpp", "0.8", "--no-progress",
                                                      "--device", "cpu"]),
    ]
    print("case | exit | wall s | last line")
    for name, args in cases:
        code, secs, msg = _run(args, d)
        print(f"{name} | {code} | {secs:.1f} | {msg}", flush=True)
    mode = oct((d / "model" / "model.safetensors").stat().st_mode & 0o777)
    cmode = oct((d / "model" / "config.json").stat().st_mode & 0o777)
    print(f"mode of model.safetensors / config.json as saved | {mode} / {cmode} | - | -")
    code, secs, msg = _run(["predict", "he.png", "--model", "model", "--out", "sig", "--mpp", "0.25",
                            "--no-progress", "--num-workers", "0", "--tissue", "none"], d, sigint_after_work=d / "sig")
    left = sorted(p.name for p in (d / "sig").rglob("*")) if (d / "sig").exists() else "no folder"
    print(f"SIGINT during predict (encoding) | {code} | {secs:.1f} | {msg} | left: {left}")


if __name__ == "__main__":
    main()
