"""Data-loss faults (issue D1–D7): deepspot never deletes or writes what it was not given.

Each test hashes the whole tree around the run before and after and checks that nothing changed
outside what the run itself wrote.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deepspot.config import SpotGeometry
from deepspot.geometry.grid import GridSpec
from deepspot.io.owner import RECORD_FILE, OutputFolder
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

from fixtures_cli import run_cli, tiny_vit_encoder

TINY = "test-vit-tiny-faults"
GENES = [f"G{i}" for i in range(5)]
_tiny = tiny_vit_encoder(TINY)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` -> sha256 of its bytes ('dir' for a folder)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _model(path: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    net = DeepSpot(32, len(GENES), hidden=8, n_ensemble=2, context="spot_neighbors").eval()
    geom = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    return save_checkpoint(path, net, {"model": "deepspot", "encoder": {"name": TINY, "dim": 32}, "genes": GENES,
                                       "geometry": geom.to_dict(), "scaler": None})


def _tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.array([180, 90, 160], np.float32) + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("ck") / "model")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    for i in range(2):
        Image.fromarray(_tissue(300, 300, seed=i)).save(d / f"s{i}.png")
    return d


def _predict(ck, slide, out, *extra):
    return ["predict", slide, "--model", ck, "--mpp", "1.0", "--out", out, "--no-progress", "--num-workers", "0",
            "--tissue", "none", "--plot-genes", "0", *extra]


# --------------------------------------------------------------------------- D1: train / convert-weights


def test_train_into_a_folder_with_user_files_is_refused_and_nothing_changes(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "thesis.txt").write_text("keep")
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "train", "--image", tmp_path / "he.png", "--adata", tmp_path / "a.h5ad",
                           "--out", out, "--no-progress")
    assert code == 1 and "thesis.txt" in err and "did not write" in err, err
    assert tree(tmp_path) == before


def test_save_checkpoint_keeps_user_files_and_dot_out(tmp_path, monkeypatch):
    out = tmp_path / "x"
    out.mkdir()
    (out / "thesis.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="thesis.txt"):
        _model(out)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]
    # --out . : the working directory is refused while it holds user files, written into when empty
    monkeypatch.chdir(out)
    with pytest.raises(FileExistsError, match="thesis.txt"):
        _model(Path("."))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    _model(Path("."))
    assert sorted(p.name for p in empty.iterdir()) == [RECORD_FILE, "config.json", "model.safetensors"]
    first = (empty / "model.safetensors").read_bytes()
    _model(Path("."), seed=2)  # a previous checkpoint is replaced: exactly its two files
    assert (empty / "model.safetensors").read_bytes() != first
    assert json.loads((empty / RECORD_FILE).read_text())["files"] == ["config.json", "model.safetensors"]


def test_convert_weights_into_a_folder_with_user_files_is_refused(tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    (out / "notes.md").write_text("keep")
    src = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, src)
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "convert-weights", src, out)
    assert code == 1 and "notes.md" in err, err
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- D2: predict-cohort --overwrite


def test_cohort_overwrite_removes_only_what_the_previous_run_recorded(ck, slides, tmp_path):
    from deepspot.inference.cohort import STATE_FILE, run_cohort

    (tmp_path / "m.csv").write_text(f"path,id\n{slides / 's0.png'},s1\n{slides / 's1.png'},s2\n")
    out = tmp_path / "a" / "b" / "out"
    kw = dict(backend="local", tissue="none", progress=False, echo=lambda *a, **k: None, device="cpu", mpp=1.0)
    assert run_cohort(tmp_path / "m.csv", ck, out, **kw).n_done == 2
    victim = tmp_path / "a" / "victim"
    (victim / "secret.zarr").mkdir(parents=True)
    for name in ("secret.h5ad", "secret_spots.csv", "secret.zarr/x"):
        (victim / name).write_text("keep")
    (out / "s1_genes.png").write_bytes(b"a user's figure")  # the run wrote no PNG (plot_genes 0)
    (out / "s2.zarr").mkdir()
    (out / "s2.zarr" / "mine").write_text("keep")
    with open(out / STATE_FILE, "a") as fh:
        fh.write(json.dumps({"id": "../../victim/secret", "status": "done", "outputs": ["../../victim/secret.h5ad"]})
                 + "\n")
    keep = {k: v for k, v in tree(tmp_path).items() if not k.startswith("a/b/out/")
            or k.split("/")[-1] in ("s1_genes.png",) or "/s2.zarr" in k}
    s = run_cohort(tmp_path / "m.csv", ck, out, overwrite=True, **kw)
    assert len(s.ran) == 2 and s.n_done == 2
    after = tree(tmp_path)
    assert {k: after.get(k) for k in keep} == keep


def test_cohort_into_a_folder_of_user_files_is_refused(ck, slides, tmp_path):
    from deepspot.inference.cohort import run_cohort

    (tmp_path / "m.csv").write_text(f"path,id\n{slides / 's0.png'},s1\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("keep")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="thesis.txt"):
        run_cohort(tmp_path / "m.csv", ck, out, backend="local", progress=False, echo=lambda *a, **k: None,
                   mpp=1.0)
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- D3: score / evaluate ids


@pytest.mark.parametrize("field, value", [("sample_id", "../../escape/p"), ("sample_id", "/abs/p"),
                                          ("patient_id", "../up"), ("sample_id", "-rf"), ("sample_id", "a/b"), ("sample_id", "..")])
def test_manifest_ids_that_are_paths_are_refused(tmp_path, field, value):
    from deepspot.io.spatial import SpatialDataError
    from deepspot.training.manifest import read_manifest

    (tmp_path / "he.png").write_bytes(b"")
    (tmp_path / "x.h5ad").write_bytes(b"")
    row = {"sample_id": "s", "patient_id": "p", "image": "he.png", "expression": "x.h5ad", field: value}
    pd.DataFrame([row]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(SpatialDataError, match=f"m.csv: {field} .*cannot name a file"):
        read_manifest(tmp_path / "m.csv")


def test_score_with_a_traversal_sample_id_writes_nothing_outside(ck, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    Image.fromarray(_tissue(64, 64)).save(work / "he.png")
    ad.AnnData(np.ones((2, 2), np.float32)).write_h5ad(work / "x.h5ad")
    pd.DataFrame([{"sample_id": "../../escape/p", "patient_id": "p", "image": "he.png",
                   "expression": "x.h5ad"}]).to_csv(work / "m.csv", index=False)
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "score", "--model", ck, "--manifest", work / "m.csv", "--out", work / "out",
                           "--no-progress")
    assert code == 1 and "sample_id" in err and "escape" in err, err
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- D4: tcga metadata


@pytest.fixture()
def tcga_source(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    a = ad.AnnData(np.ones((3, 2), np.float32))
    a.write_h5ad(tmp_path / "plain.h5ad")
    with open(tmp_path / "plain.h5ad", "rb") as fi, gzip.open(tmp_path / "secret.h5ad.gz", "wb") as fo:
        shutil.copyfileobj(fi, fo)
    shutil.copy(tmp_path / "secret.h5ad.gz", d / "ok.h5ad.gz")
    return d


@pytest.mark.parametrize("sample_id, file_path, needle", [
    ("../../escape/p", "ok.h5ad.gz", "sample_id"),
    ("/abs/p", "ok.h5ad.gz", "sample_id"),
    ("S1", "../secret.h5ad.gz", "file_path"),
    ("S1", "/etc/passwd", "file_path"),
])
def test_tcga_download_trusts_no_metadata_path(tcga_source, tmp_path, capsys, sample_id, file_path, needle):
    cols = ["dataset", "slide_type", "sample_id", "n_spots", "file_path"]
    pd.DataFrame([("T", "FFPE", sample_id, 3, file_path)], columns=cols).to_csv(
        tcga_source / "metadata_2025-01-11.csv", index=False)
    out = tmp_path / "out"
    out.mkdir()
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "tcga", "download", sample_id, "--source", tcga_source, "--out", out)
    assert code == 1 and needle in err, err
    assert tree(tmp_path) == before


def test_tcga_download_never_replaces_a_file_it_did_not_write(tcga_source, tmp_path, capsys):
    cols = ["dataset", "slide_type", "sample_id", "n_spots", "file_path"]
    pd.DataFrame([("T", "FFPE", "S1", 3, "ok.h5ad.gz")], columns=cols).to_csv(
        tcga_source / "metadata_2025-01-11.csv", index=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a shared folder")
    code, _, err = run_cli(capsys, "tcga", "download", "S1", "--source", tcga_source, "--out", out)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "a shared folder" and (out / "S1.h5ad").exists()
    code, _, err = run_cli(capsys, "tcga", "download", "S1", "--source", tcga_source, "--out", out)
    assert code == 0, err  # its own previous download: replaced
    (out / "S1.h5ad").unlink()
    (out / "S1.h5ad").write_text("the user's own file")
    code, _, err = run_cli(capsys, "tcga", "download", "S1", "--source", tcga_source, "--out", out)
    assert code == 1 and "S1.h5ad" in err
    assert (out / "S1.h5ad").read_text() == "the user's own file"


# --------------------------------------------------------------------------- D5: two predict runs, one folder


def test_interrupting_one_predict_keeps_the_other_runs_outputs(ck, slides, tmp_path, capsys, monkeypatch):
    import deepspot.inference.predict as P

    out = tmp_path / "new" / "out"
    real = P.spot_table
    state = {"nested": False}

    def second_run_then_interrupt(skel):
        if not state["nested"]:  # the first run, about to write: a second run finishes meanwhile
            state["nested"] = True
            code, _, err = run_cli(capsys, *_predict(ck, slides / "s1.png", out))
            assert code == 0, err
            raise KeyboardInterrupt
        return real(skel)

    monkeypatch.setattr(P, "spot_table", second_run_then_interrupt)
    code, _, err = run_cli(capsys, *_predict(ck, slides / "s0.png", out))
    assert code == 130, err
    assert sorted(p.name for p in out.iterdir()) == [RECORD_FILE, "s1.h5ad", "s1_spots.csv"]
    assert json.loads((out / RECORD_FILE).read_text())["files"] == ["s1.h5ad", "s1_spots.csv"]


def test_predict_into_a_folder_of_user_files_is_refused_before_compute(ck, slides, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("keep")
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, *_predict(ck, slides / "s0.png", out))
    assert code == 1 and "thesis.txt" in err, err
    assert tree(tmp_path) == before


def test_leftovers_of_a_killed_predict_are_removed_by_the_next(ck, slides, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".s0.work-abc123").mkdir()  # a killed run's work folder (no live lock)
    (out / ".s0.work-abc123" / "predictions.zarr").write_text("x")
    (out / ".s0.h5ad.k3j2.partial.h5ad").write_text("x")
    (out / ".s0_spots.csv.k3j2.partial.csv").write_text("x")
    code, _, err = run_cli(capsys, *_predict(ck, slides / "s0.png", out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [RECORD_FILE, "s0.h5ad", "s0_spots.csv"]


# --------------------------------------------------------------------------- D6: spatialdata rerun


def test_spatialdata_rerun_needs_overwrite(ck, slides, tmp_path, capsys):
    pytest.importorskip("spatialdata")
    out = tmp_path / "out"
    args = _predict(ck, slides / "s0.png", out, "--format", "spatialdata")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and "s0.zarr" in err and "--overwrite" in err, err
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- D7: a full disk


def test_full_disk_is_refused_before_compute_with_one_line(ck, slides, tmp_path, capsys, monkeypatch):
    import collections

    import deepspot.io.outputs as O

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    monkeypatch.setattr(O, "shutil", shutil, raising=False)
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, *_predict(ck, slides / "s0.png", tmp_path / "out"))
    assert code == 1 and "s0.h5ad" in err and "GB free" in err and "Traceback" not in err, err
    assert tree(tmp_path) == before


def test_file_size_limit_exits_with_one_line_not_a_segfault(ck, slides, tmp_path):
    """``ulimit -f`` below the h5ad's size: before, HDF5 crashed the interpreter (rc 139)."""
    out = tmp_path / "out"
    code = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
            f"from fixtures_cli import register_tiny_vit; register_tiny_vit({TINY!r}); "
            f"from deepspot.cli import main; main(sys.argv[1:])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(Path(__file__).parent)]), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *map(str, _predict(ck, slides / "s0.png", out))],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "file-size limit" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- the owner itself


def test_owner_refuses_another_commands_folder_and_abort_keeps_foreign_files(tmp_path):
    a = OutputFolder(tmp_path / "o", "score").open()
    with a.atomic("summary.csv") as t:
        t.write_text("x")
    with pytest.raises(FileExistsError, match="deepspot score result"):
        OutputFolder(tmp_path / "o", "evaluate").check()
    b = OutputFolder(tmp_path / "o", "score").open()
    assert b.previous == {"summary.csv"}
    (tmp_path / "o" / "later.txt").write_text("user")
    with b.atomic("per_gene.csv") as t:
        t.write_text("y")
    b.abort()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [RECORD_FILE, "later.txt", "summary.csv"]
    assert b.remove_previous() == ["summary.csv"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [RECORD_FILE, "later.txt"]


def test_a_crafted_record_cannot_point_outside(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep")
    (out / RECORD_FILE).write_text(json.dumps({"command": "score", "files": ["../victim.txt", "/etc/passwd"]}))
    owner = OutputFolder(out, "score").open()
    assert owner.remove_previous() == []
    assert (tmp_path / "victim.txt").read_text() == "keep"


def test_abort_removes_only_the_folders_it_made_when_empty(tmp_path):
    owner = OutputFolder(tmp_path / "a" / "b", "score").open()
    with owner.atomic("x.csv") as t:
        t.write_text("x")
    owner.abort()
    assert list(tmp_path.iterdir()) == []


def test_demo_into_a_folder_of_user_files_is_refused_before_any_work(tmp_path):
    """The demos own their folder like every command: user files are never overwritten or removed."""
    from deepspot.demo import run_demo, run_her2st_demo

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("keep")
    (out / "predictions.h5ad").write_text("my own file, same name as the demo's")
    before = tree(tmp_path)
    for run in (run_demo, run_her2st_demo):
        with pytest.raises(FileExistsError, match="did not write"):
            run(out, data_dir=tmp_path / "no-data-here")  # refused before the data is looked up
    assert tree(tmp_path) == before
