"""Every check made before compute (one line naming file and field): bad checkpoints, an --out that is a
file, genes and slide checked before counts or the encoder, a previous result kept unless --overwrite.

Models are random-weight DeepSpots on a tiny registered ViT, saved as real checkpoints.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from fixtures_hard_inputs import GENES, _cli, _fresh_cache, _tiny_vit, _one_line, _sparse_tiff, _tissue, ck  # noqa: F401
from fixtures_cli import edited_checkpoint
# (_fresh_cache: autouse; ck: the module's checkpoint fixture)


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory):
    p = tmp_path_factory.mktemp("slide") / "he.png"
    Image.fromarray(_tissue(700, 700)).save(p)
    return p


@pytest.fixture()
def no_encoder(monkeypatch):
    """Fail loudly if anything builds an encoder (the checks must all come before)."""
    import deepspot.api

    def boom(*a, **k):
        raise AssertionError("encoder built before the checks")
    monkeypatch.setattr(deepspot.api, "load_encoder", boom)




@pytest.mark.parametrize("case, edit, needles", [
    ("genes vs weights", lambda c: (c.update(genes=GENES[:4]), c["model_args"].update(n_genes=4)),
     ["model.safetensors", "cannot load weights"]),
    ("genes vs n_genes", lambda c: c.update(genes=GENES[:4]), ["config.json", "model_args.n_genes"]),
    ("duplicate gene", lambda c: c.update(genes=GENES[:5] + ["G0"]), ["config.json", "genes", "'G0'"]),
    ("empty gene name", lambda c: c.update(genes=GENES[:5] + [" "]), ["config.json", "genes", "empty name"]),
    ("feature dim vs encoder", lambda c: (c.update(encoder={"name": "efficientnet-lite0", "dim": 32})),
     ["config.json", "encoder.dim", "1280"]),
    ("unknown encoder", lambda c: c["encoder"].update(name="no-such-encoder"), ["encoder.name", "no-such-encoder"]),
])
def test_bad_checkpoint_is_one_line_before_compute(ck, slide_png, tmp_path, capsys, no_encoder, case, edit, needles):
    bad = edited_checkpoint(ck, tmp_path, edit)
    code, _, err = _cli(capsys, "predict", slide_png, "--model", bad, "--mpp", "0.5", "--out", tmp_path / "o",
                        "--no-progress")
    assert code == 1
    _one_line(err, *needles)
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_first(ck, slide_png, tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("x")
    (tmp_path / "m.csv").write_text(f"path,id\n{slide_png},a\n")
    for cmd in (["predict", slide_png, "--model", tmp_path / "nope"],
                ["predict-cells", tmp_path / "cells.csv", "--image", slide_png, "--model", tmp_path / "nope"],
                ["train", "--image", slide_png, "--adata", tmp_path / "nope.h5ad"],
                ["predict-cohort", tmp_path / "m.csv", "--model", ck, "--backend", "local"]):
        code, _, err = _cli(capsys, *cmd, "--out", f)
        assert code == 1
        _one_line(err, "taken", "existing file")  # (predict, train: before the missing model / data is looked at)
    assert f.read_text() == "x"


def test_train_checks_genes_and_slide_before_reading_counts(slide_png, tmp_path, capsys):
    missing = tmp_path / "nope.h5ad"  # never read: the checks come first
    code, _, err = _cli(capsys, "train", "--image", slide_png, "--adata", missing, "--out", tmp_path / "m",
                        "--genes", "A,B,A")
    assert code == 1
    _one_line(err, "--genes", "repeated", "A")
    # a grid in µm given on the command line needs the slide's mpp, checked before the counts are read
    # (left to the data, the grid may take the mpp its reader recorded: checked once the counts are read)
    code, _, err = _cli(capsys, "train", "--image", slide_png, "--adata", missing, "--out", tmp_path / "m",
                        "--spot-diameter", "55")
    assert code == 1
    _one_line(err, "he.png", "--mpp")
    assert not (tmp_path / "m").exists()


def test_slide_and_mpp_are_checked_before_the_encoder(ck, slide_png, tmp_path, capsys, no_encoder):
    code, _, err = _cli(capsys, "predict", slide_png, "--model", ck, "--out", tmp_path / "o", "--no-progress")
    assert code == 1
    _one_line(err, "he.png", "--mpp")
    bad = tmp_path / "bad.png"
    bad.write_bytes(slide_png.read_bytes()[:200])
    code, _, err = _cli(capsys, "predict", bad, "--model", ck, "--mpp", "0.5", "--out", tmp_path / "o",
                        "--no-progress")
    assert code == 1
    _one_line(err, "bad.png", "truncated")
    flat = _sparse_tiff(tmp_path / "flat.tif", 60_000, 50_000)
    code, _, err = _cli(capsys, "predict", flat, "--model", ck, "--out", tmp_path / "o", "--no-progress")
    assert code == 1
    _one_line(err, "flat.tif", "convert-slide")
    assert not (tmp_path / "o").exists()


def test_predict_into_a_folder_with_a_previous_result_needs_overwrite(ck, slide_png, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["predict", slide_png, "--model", ck, "--mpp", "0.5", "--out", out, "--no-progress", "--num-workers", "0"]
    code, _, err = _cli(capsys, *args)
    assert code == 0, err
    first = (out / "he_spots.csv").read_bytes()
    mode = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(mode.values()) == {0o666 & ~umask}, mode
    code, _, err = _cli(capsys, *args)
    assert code == 1
    _one_line(err, "previous result", "he.h5ad", "--overwrite")
    code, _, err = _cli(capsys, *args, "--overwrite")
    assert code == 0, err
    assert (out / "he_spots.csv").read_bytes() == first


def test_checkpoint_files_get_the_usual_permissions(ck):
    umask = os.umask(0)
    os.umask(umask)
    for f in ("model.safetensors", "config.json"):
        assert (ck / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
