"""Helpers shared by the hard-input test modules (test_slide_decode, test_convert_slide,
test_checks_before_compute, test_cohort_fingerprint, test_interrupt): random-weight DeepSpot checkpoints
on a tiny registered ViT, tissue-like images, huge sparse TIFFs, the one-line error check and a fresh
decode cache around every test (import ``_fresh_cache`` into a module to turn it on there)."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from deepspot.config import GridSpec, SpotGeometry
from deepspot.io import slides as slides_mod
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

from fixtures_cli import run_cli, tiny_vit_encoder

TINY = "test-vit-tiny-robust"
GENES = [f"G{i}" for i in range(6)]
_tiny_vit = tiny_vit_encoder(TINY)  # autouse in every module that imports it


def _checkpoint(path: Path, seed: int = 1, encoder: str = TINY, dim: int = 32) -> Path:
    torch.manual_seed(seed)
    model = DeepSpot(dim, len(GENES), hidden=8, n_ensemble=2, context="spot_neighbors").eval()
    geom = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    cfg = {"model": "deepspot", "model_args": model.config(), "encoder": {"name": encoder, "dim": dim},
           "genes": GENES, "geometry": geom.to_dict(), "scaler": None}
    return save_checkpoint(path, model, cfg)


@pytest.fixture(autouse=True)
def _fresh_cache():
    slides_mod.clear_decode_cache()
    yield
    slides_mod.clear_decode_cache()


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Pink-purple texture (passes the tissue filter) as uint8 (h, w, 3)."""
    rng = np.random.default_rng(seed)
    base = np.array([180, 90, 160], np.float32)
    return (base + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


_cli = run_cli


def _one_line(err: str, *needles) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("deepspot: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _sparse_tiff(path: Path, w: int, h: int, tile: int = 1024, rowsperstrip: int | None = None) -> Path:
    import tifffile

    if rowsperstrip:
        data = np.full((h, w, 3), 255, np.uint8)
        tifffile.imwrite(path, data, rowsperstrip=rowsperstrip, photometric="rgb", compression="zlib",
                         resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
        return path
    enc = zlib.compress(np.full((tile, tile, 3), 255, np.uint8).tobytes())
    n = (-(-w // tile)) * (-(-h // tile))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write((enc for _ in range(n)), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                 photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
    return path


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "model")
