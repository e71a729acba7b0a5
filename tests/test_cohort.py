"""Cohort prediction: manifest checks, kill -9 + resume, one bad slide among good ones, the Ray path.

Slides are small crops of the bundled H&E (PNG with the mpp in the manifest, pyramidal TIFF with the
mpp in the file) so that the real efficientnet-lite0 encoder runs on a few spots each; the model is
a DeepSpot with random weights saved as a real checkpoint. "Same output" is checked honestly: the
spots CSV byte for byte, and the h5ad's X, obs and obsm exactly (h5ad bytes can differ by
timestamps). A run is killed with SIGKILL part-way and resumed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from deepspot.cli import main as cli_main
from deepspot.geometry.grid import GridSpec
from deepspot.inference.cohort import STATE_FILE, SUMMARY_FILE, read_cohort, run_cohort
from deepspot.config import SpotGeometry
from deepspot.io.synthetic import write_pyramidal_tiff
from deepspot.models.checkpoint import save_checkpoint
from deepspot.models.deepsets import DeepSpot

from shared_data import HE, in_ci, needs_data  # noqa: E402

pytestmark = needs_data("ncbi858/NCBI858.jpg")
GOOD = ["png0", "png1", "png2", "tif0", "tif1"]
RUN = dict(tissue="none", progress=False, echo=lambda *a, **k: None)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """5 small good slides (3 PNG + 2 pyramidal TIFF, 3 spots each at 1 µm/px) + 1 corrupt file,
    a manifest and a random-weight DeepSpot checkpoint on efficientnet-lite0."""
    d = tmp_path_factory.mktemp("cohort")
    src = np.asarray(Image.open(HE).convert("RGB"))
    rows = ["path,id,mpp"]
    for i in range(3):
        Image.fromarray(src[100 + 150 * i:300 + 150 * i, 200 + 200 * i:360 + 200 * i]).save(d / f"s{i}.png")
        rows.append(f"s{i}.png,png{i},1.0")
    for i in range(2):
        write_pyramidal_tiff(d / f"t{i}.tif", src[300:812, 300 + 300 * i:812 + 300 * i], 160, 200, mpp=1.0,
                             tile=64, levels=2)
        rows.append(f"{d / f't{i}.tif'},tif{i},")  # absolute path, mpp from the file
    (d / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg " * 20)
    rows.append("bad.jpg,corrupt,1.0")
    (d / "manifest.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    net = DeepSpot(1280, 6, hidden=16, n_ensemble=2, dropout=0.3, context="spot_neighbors")
    geometry = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    save_checkpoint(d / "model", net, {"model": "deepspot", "encoder": {"name": "efficientnet-lite0", "dim": 1280},
                                       "genes": [f"G{i}" for i in range(6)], "geometry": geometry.to_dict(),
                                       "scaler": None})
    return d


@pytest.fixture(scope="module")
def reference(cohort):
    """An uninterrupted run (local backend, in-process)."""
    out = cohort / "ref"
    s = run_cohort(cohort / "manifest.csv", cohort / "model", out, backend="local", **RUN)
    assert [r.id for r in s.ran if r.ok] == GOOD
    assert [f["id"] for f in s.failures] == ["corrupt"]
    return out


def _state(out: Path) -> list[dict]:
    """Every complete record of the state file, in order (a line cut short by a kill is skipped)."""
    records = []
    for line in (out / STATE_FILE).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert line == '{"id": "png2", "sta'  # only the one the test cut short
    return records


def assert_same_output(a: Path, b: Path, sid: str, exact: bool = True):
    assert (a / f"{sid}_spots.csv").read_bytes() == (b / f"{sid}_spots.csv").read_bytes()
    x, y = ad.read_h5ad(a / f"{sid}.h5ad"), ad.read_h5ad(b / f"{sid}.h5ad")
    assert x.n_obs == 3 and list(x.var_names) == list(y.var_names)
    if exact:
        np.testing.assert_array_equal(x.X, y.X)
    else:  # another process with another thread count may sum in another order
        np.testing.assert_allclose(x.X, y.X, rtol=1e-5, atol=1e-6)
    pd.testing.assert_frame_equal(x.obs, y.obs)
    np.testing.assert_array_equal(x.obsm["spatial"], y.obsm["spatial"])
    assert list(x.uns["spatial"]) == [sid]  # the slide id is the library id


def _cli(*args) -> int:
    try:
        cli_main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_bad_manifest_and_output_are_refused_before_any_work(cohort, tmp_path, capsys):
    good = (cohort / "manifest.csv").read_text().splitlines()
    cases = {
        "missing": (good[:2] + ["nowhere.svs,ghost,0.5"], "line 3: slide file nowhere.svs not found"),
        "dup": (good[:3] + [good[1]], "line 4: id 'png0' duplicates line 2"),
        "nocol": (["file,id", "s0.png,a"], "needs a 'path' column"),
        "badmpp": (["path,id,mpp", "s0.png,a,-1"], "line 2: mpp must be a positive number"),
        "badid": (["path,id", "s0.png,../x"], "is not a safe file name"),
    }
    for name, (lines, expect) in cases.items():
        m = cohort / f"bad_{name}.csv"
        m.write_text("\n".join(lines) + "\n")
        out = tmp_path / name
        rc = _cli("predict-cohort", m, "--model", cohort / "model", "--out", out, "--backend", "local")
        err = capsys.readouterr().err
        assert rc == 1, name
        assert f"bad_{name}.csv" in err and expect in err, (name, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists(), name  # refused before anything was written
    # an output folder that cannot be created (its parent is a file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = _cli("predict-cohort", cohort / "manifest.csv", "--model", cohort / "model", "--out", blocker / "out",
              "--backend", "local")
    err = capsys.readouterr().err
    assert rc == 1 and "output folder is not writable" in err and str(blocker / "out") in err
    # a folder that is not a checkpoint
    rc = _cli("predict-cohort", cohort / "manifest.csv", "--model", tmp_path, "--out", tmp_path / "o2",
              "--backend", "local")
    assert rc == 1 and "not a deepspot checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    # relative paths come from the manifest's folder, ids default to the file stem
    (cohort / "stems.csv").write_text("path\ns0.png\ns1.png\n")
    jobs = read_cohort(cohort / "stems.csv", default_mpp=0.5)
    assert [(j.id, j.path, j.mpp) for j in jobs] == [("s0", cohort / "s0.png", 0.5), ("s1", cohort / "s1.png", 0.5)]


def test_sigkill_then_resume_gives_the_uninterrupted_result(cohort, reference):
    out = cohort / "killed"
    cmd = [sys.executable, "-m", "deepspot", "predict-cohort", str(cohort / "manifest.csv"), "--model",
           str(cohort / "model"), "--out", str(out), "--backend", "local", "--tissue", "none", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = out / STATE_FILE
        if state.exists() and sum('"done"' in x for x in state.read_text().splitlines()) >= 2:
            break
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {r["id"] for r in _state(out)}
    assert first == {"png0", "png1"}
    kept = {sid: (out / f"{sid}.h5ad").stat().st_mtime_ns for sid in first}
    assert not (out / "png2.h5ad").exists()
    # what a kill during a write leaves behind (io/outputs.atomic_path's temp name) and a cut-off state line
    stale = out / ".png2.h5ad.k1ll3d.partial.h5ad"
    stale.write_bytes(b"half an h5ad")
    (out / ".png2.work-k1ll3d" / "features.zarr").mkdir(parents=True, exist_ok=True)  # a slide's work folder
    with open(out / STATE_FILE, "a") as fh:
        fh.write('{"id": "png2", "sta')

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 1, res.stdout + res.stderr  # the corrupt slide failed
    assert "2 already done" in res.stdout and "4 to run" in res.stdout
    assert "leftovers of a killed run" in res.stdout
    assert "corrupt: SlideError" in res.stdout and "bad.jpg" in res.stdout

    records = _state(out)
    done = [r["id"] for r in records if r["status"] == "done"]
    assert sorted(done) == sorted(GOOD)  # every good slide completed exactly once over both runs
    assert [r["id"] for r in records if r["status"] == "failed"] == ["corrupt"]
    assert {sid: (out / f"{sid}.h5ad").stat().st_mtime_ns for sid in first} == kept  # not redone
    for sid in GOOD:
        assert_same_output(out, reference, sid)
    assert not [p.name for p in out.iterdir() if "partial" in p.name or ".work-" in p.name]
    assert sorted(p.name for p in out.glob("*.h5ad")) == sorted(f"{s}.h5ad" for s in GOOD)
    summary = pd.read_csv(out / SUMMARY_FILE, index_col="id")
    assert summary.loc["corrupt", "status"] == "failed" and "corrupt slide" in summary.loc["corrupt", "error"]
    assert (summary.loc[GOOD, "status"] == "done").all() and (summary.loc[GOOD, "n_spots"] == 3).all()

    # a third run has nothing to do; failures are kept (and reported) unless retried
    s = run_cohort(cohort / "manifest.csv", cohort / "model", out, backend="local", **RUN)
    assert s.ran == [] and sorted(s.skipped_done) == sorted(GOOD)
    assert [f["id"] for f in s.failures] == ["corrupt"] and "corrupt slide" in s.failures[0]["error"]
    s = run_cohort(cohort / "manifest.csv", cohort / "model", out, backend="local", retry_failed=True, **RUN)
    assert [(r.id, r.status) for r in s.ran] == [("corrupt", "failed")]
    # an output deleted by hand is produced again
    (out / "tif1.h5ad").unlink()
    s = run_cohort(cohort / "manifest.csv", cohort / "model", out, backend="local", **RUN)
    assert [(r.id, r.status) for r in s.ran] == [("tif1", "done")]
    assert_same_output(out, reference, "tif1")


@pytest.mark.needs_extra("cohort")
def test_ray_backend_matches_local(cohort, reference):
    ray = __import__("ray") if in_ci() else pytest.importorskip("ray")  # [test] installs ray: CI must run this
    lines = (cohort / "manifest.csv").read_text().splitlines()
    m = cohort / "ray.csv"
    m.write_text("\n".join([lines[0], lines[1], lines[4], lines[6]]) + "\n")  # png0, tif0, corrupt
    out = cohort / "ray_out"
    s = run_cohort(m, cohort / "model", out, backend="ray", num_cpus=2, plot_genes=2, **RUN)
    assert not ray.is_initialized()  # the local Ray it started is shut down
    assert sorted(r.id for r in s.ran if r.ok) == ["png0", "tif0"]
    assert [f["id"] for f in s.failures] == ["corrupt"] and "SlideError" in s.failures[0]["error"]
    workers = {r.worker for r in s.ran}
    assert len(workers) == 1 and f":{os.getpid()}" not in workers.pop()  # one worker process, not this one
    for sid in ("png0", "tif0"):
        assert_same_output(out, reference, sid, exact=False)
        assert (out / f"{sid}_genes.png").stat().st_size > 0
    assert sorted(next(r for r in s.ran if r.id == "png0").outputs) == ["png0.h5ad", "png0_genes.png",
                                                                        "png0_spots.csv"]
    assert {r["id"]: r["status"] for r in _state(out)} == {"png0": "done", "tif0": "done", "corrupt": "failed"}
