"""End to end through the real CLI on the bundled NCBI858 H&E, and bad input at the CLI boundary."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

DATA = Path("../shared/data")
IMAGE = DATA / "ncbi858" / "NCBI858.jpg"
pytestmark = pytest.mark.skipif(not IMAGE.exists(), reason="bundled data not found")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deepspot.cli.run", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=900)


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = run("demo", "--out", out, "--data-dir", DATA, "--spot-px", 200, "--spacing-px", 200, "--max-epochs", 8,
            "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_demo_writes_h5ad_png_checkpoint_and_scores(demo_out):
    out, stdout = demo_out
    for name in ("predictions.h5ad", "predicted_genes.png", "scores.csv", "spots.csv", "model/config.json",
                 "model/model.safetensors"):
        assert (out / name).exists(), name
    assert "deepspot" in stdout and "ridge" in stdout and "pixels" in stdout
    a = ad.read_h5ad(out / "predictions.h5ad")
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert list(a.var_names) == cfg["genes"] and a.n_obs > 10
    assert cfg["encoder"] == {"name": "efficientnet-lite0", "dim": 1280}
    assert np.isfinite(a.X).all()
    lib = next(iter(a.uns["spatial"]))
    sf = a.uns["spatial"][lib]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(200)
    xy = a.obsm["spatial"]
    assert xy[:, 0].max() < 1431 and xy[:, 1].max() < 1249  # (x, y) within the 1431 × 1249 image
    assert not list(out.glob("*.partial*")) and not list(out.glob(".*partial*"))


def test_squidpy_plots_the_prediction_unchanged(demo_out, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import squidpy as sq

    a = ad.read_h5ad(demo_out[0] / "predictions.h5ad")
    sq.pl.spatial_scatter(a, color=[a.var_names[0]], img_res_key="hires")
    plt.savefig(tmp_path / "sq.png")
    assert (tmp_path / "sq.png").stat().st_size > 1000


def test_predict_command_reuses_features_and_matches_demo(demo_out, tmp_path):
    out, _ = demo_out
    r = run("predict", IMAGE, "--model", out / "model", "--out", tmp_path, "--cache-dir", out / "features",
            "--genes", "VIM,FN1", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    a = ad.read_h5ad(tmp_path / "NCBI858.h5ad")
    b = ad.read_h5ad(out / "predictions.h5ad")
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_allclose(a.X, b.X, atol=1e-5)
    assert (tmp_path / "NCBI858_genes.png").exists() and (tmp_path / "NCBI858_spots.csv").exists()


def _one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    err = [l for l in r.stderr.strip().splitlines() if l.startswith("deepspot: error")]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], err[0]


def test_bad_input_missing_slide(demo_out, tmp_path):
    r = run("predict", tmp_path / "nope.svs", "--model", demo_out[0] / "model", "--out", tmp_path / "o")
    _one_line_error(r, "nope.svs", "not found")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_input_genes_not_in_model(demo_out, tmp_path):
    r = run("predict", IMAGE, "--model", demo_out[0] / "model", "--out", tmp_path / "o", "--genes", "NOTAGENE")
    _one_line_error(r, "NOTAGENE", "not predicted")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_bad_input_feature_dim_mismatch(demo_out, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(demo_out[0] / "model", ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["encoder"]["dim"] = 1024
    (ck / "config.json").write_text(json.dumps(cfg))
    r = run("predict", IMAGE, "--model", ck, "--out", tmp_path / "o")
    _one_line_error(r, str(ck), "encoder.dim is 1024")


def test_bad_input_unknown_encoder(tmp_path):
    r = run("demo", "--out", tmp_path / "d", "--data-dir", DATA, "--encoder", "nonexistent-net")
    _one_line_error(r, "nonexistent-net")


def test_bad_input_positions_outside_image(tmp_path):
    cells = ad.read_h5ad(DATA / "ncbi858" / "NCBI858.h5ad")
    cells.obsm["spatial"] = cells.obs[["y_pixel", "x_pixel"]].to_numpy() * 3  # wrong scale
    cells.write_h5ad(tmp_path / "cells.h5ad")
    r = run("train", "--image", IMAGE, "--adata", tmp_path / "cells.h5ad", "--out", tmp_path / "m", "--cells",
            "--unit", "px", "--spot-diameter", 120, "--spacing", 120)
    _one_line_error(r, "cells.h5ad", "outside")
    assert not (tmp_path / "m").exists()


def test_api_equals_cli_predict_at_the_same_spots(demo_out, tmp_path):
    """`deepspot predict` and the Python API give the same numbers: at the CLI's own spots
    (Model.predict_spots, features encoded afresh) and over the same virtual grid (Model.predict_slide)."""
    import deepspot as ds

    out, _ = demo_out
    r = run("predict", IMAGE, "--model", out / "model", "--out", tmp_path / "cli", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    cli = ad.read_h5ad(tmp_path / "cli" / "NCBI858.h5ad")
    m = ds.load_model(out / "model")
    assert m.genes == list(cli.var_names)
    spots = cli[::-1].copy()  # another order: the result must follow the input's
    spots.X = np.zeros(spots.shape, dtype=np.float32)
    got = m.predict_spots(spots, IMAGE, progress=False)
    assert list(got.obs_names) == list(spots.obs_names)
    np.testing.assert_allclose(got.X, cli[::-1].X, atol=1e-5)
    grid = m.predict_slide(IMAGE, cache_dir=tmp_path / "cache", progress=False)
    assert list(grid.obs_names) == list(cli.obs_names)
    np.testing.assert_allclose(grid.X, cli.X, atol=1e-5)
