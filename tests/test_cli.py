"""End to end through the real CLI on the bundled NCBI858 H&E, and bad input at the CLI boundary."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import deepspot
from shared_data import HE as IMAGE, NCBI858, NCBI858_H5AD, needs_data

pytestmark = needs_data(*NCBI858)
SRC = str(Path(deepspot.__file__).resolve().parents[1])  # the package under test, whatever the cwd
# a pip user: no checkout folder next to the package, no network
AS_USER = ("import sys, pooch, deepspot.datasets as d; d.checkout_data_dir = lambda: None; "
           "pooch.HTTPDownloader.__call__ = lambda *a, **k: (_ for _ in ()).throw(OSError('offline')); "
           "from deepspot.cli import main; main(sys.argv[1:])")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "DEEPSPOT_DATA_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "deepspot", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=900, env=_env())


def run_as_user(*args, cwd, cache):
    return subprocess.run([sys.executable, "-c", AS_USER, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=900, env=_env(XDG_CACHE_HOME=str(cache)))


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """The demo as a pip user runs it: from an unrelated empty folder, offline, the example files placed by
    hand in the user cache, no --data-dir."""
    root = tmp_path_factory.mktemp("demo")
    cache, work = root / "cache", root / "work"
    (cache / "deepspot" / "ncbi858").mkdir(parents=True)
    work.mkdir()
    for name in NCBI858:
        shutil.copy(IMAGE.parent / Path(name).name, cache / "deepspot" / name)
    r = run_as_user("demo", "--quick", "--out", "demo", "--spot-px", 200, "--spacing-px", 200, "--max-epochs", 8,
                    "--no-progress", cwd=work, cache=cache)
    assert r.returncode == 0, r.stderr[-3000:]
    return work / "demo", r.stdout


def test_demo_offline_without_data_is_one_line_and_leaves_no_folder(tmp_path):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    r = run_as_user("demo", "--quick", "--out", "out/demo", cwd=work, cache=cache)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "ncbi858/NCBI858.h5ad" in lines[0] and "example_data/data/h5ad/NCBI858.h5ad" in lines[0]
    assert f"save it as {cache / 'deepspot' / 'ncbi858' / 'NCBI858.h5ad'}" in lines[0]
    assert list(work.iterdir()) == [] and not (cache / "deepspot").exists()  # (matplotlib keeps its font cache there)


def test_demo_failing_after_start_removes_the_folder_it_made(tmp_path, monkeypatch):
    import deepspot.demo as demo

    def boom(*a, cache_dir, **k):
        assert cache_dir.parent.is_dir()  # the output folder did exist meanwhile
        raise RuntimeError("training failed")

    monkeypatch.setattr(demo.api, "train", boom)  # the demo trains through the public API
    with pytest.raises(RuntimeError, match="training failed"):
        demo.run_demo(tmp_path / "a" / "b", echo=lambda *_: None, progress=False)
    assert list(tmp_path.iterdir()) == []
    keep = tmp_path / "kept"
    keep.mkdir()
    with pytest.raises(RuntimeError):
        demo.run_demo(keep, echo=lambda *_: None, progress=False)
    assert keep.is_dir() and list(keep.iterdir()) == []  # a folder the user already had is not removed
    # (a folder holding user files is refused before any work: tests/test_faults.py)


def test_demo_trains_and_predicts_through_the_public_api(tmp_path, monkeypatch):
    """The quick demo is written as a user would: ds.train, then Model.predict_slide on the model it returned."""
    import deepspot.demo as demo
    from deepspot.api import Model
    from fixtures_cli import encoder_registered, tiny_vit_spec

    calls = []
    real = Model.predict_slide

    def spy(self, slide, **kw):
        calls.append((self, Path(slide).name, kw.get("tissue")))
        return real(self, slide, **kw)

    monkeypatch.setattr(Model, "predict_slide", spy)
    with encoder_registered(tiny_vit_spec("demo-test-vit")):
        res = demo.run_demo(tmp_path / "d", encoder_name="demo-test-vit", spot_px=200, spacing_px=200, max_epochs=1,
                            patience=1, progress=False, echo=lambda *_: None, tissue="none")
    assert [(c[1], c[2]) for c in calls] == [(IMAGE.name, "none")]
    assert calls[0][0].result is not None  # the Model ds.train returned, not one rebuilt beside it
    assert res["adata"].n_obs > 10 and list(res["adata"].var_names) == calls[0][0].genes


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


@pytest.mark.needs_extra("test")  # squidpy
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
    r = run("demo", "--quick", "--out", tmp_path / "d", "--data-dir", IMAGE.parents[1], "--encoder", "nonexistent-net")
    _one_line_error(r, "nonexistent-net")
    assert not (tmp_path / "d").exists()


def test_bad_input_positions_outside_image(tmp_path):
    cells = ad.read_h5ad(NCBI858_H5AD)
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


def test_help_shows_extras_and_the_real_loss_default(capsys, monkeypatch):
    """Rich reads ``[spatialdata]`` as markup unless escaped (the help printed "(extra )"); the loss default
    in `train --help` is the one a checkpoint records (the spot recipe's)."""
    from deepspot.training.recipe import SpotRecipe
    from fixtures_cli import run_cli

    monkeypatch.setenv("COLUMNS", "250")
    for cmd in ("predict", "predict-cohort"):
        code, out, _ = run_cli(capsys, cmd, "--help")
        assert code == 0 and "extra [spatialdata]" in out, cmd
    code, out, _ = run_cli(capsys, "train", "--help")
    line = next(ln for ln in out.splitlines() if "--loss" in ln)
    assert code == 0 and f"spots: {SpotRecipe().loss}" in line
