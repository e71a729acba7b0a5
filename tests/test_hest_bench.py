"""`deepspot bench hest` on a tiny task folder written in HEST-Bench's published layout."""
import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from deepspot.evaluation.hest_bench import BenchError, leaderboard_figure, read_splits, run_task
from fixtures_cli import register_tiny_vit, run_cli


def write_task(root, n_samples=3, side=7, n_genes=6, seed=0, shuffle_counts=False):
    """``root`` laid out as a HEST-Bench task: splits/train_i.csv + test_i.csv (leave one sample out),
    patches/<id>.h5 (img (N,224,224,3) uint8, barcode (N,1), coords (N,2) level-0 top-left of 224 px patches
    on a hex lattice), adata/<id>.h5ad (raw counts; more spots than patches, in another order) and
    var_50genes.json. Counts follow each patch's stain intensity (what an encoder sees)."""
    rng = np.random.default_rng(seed)
    genes = [f"GENE{j}" for j in range(n_genes)]
    w = np.linspace(-1.5, 1.5, n_genes)
    (root / "patches").mkdir(parents=True)
    (root / "adata").mkdir()
    (root / "splits").mkdir()
    ids = [f"TENX{i}" for i in range(n_samples)]
    for sid in ids:
        rows, cols = np.divmod(np.arange(side * side), side)
        xy = np.c_[cols * 200 + (rows % 2) * 100, rows * 173].astype(np.int64)  # hex lattice, 200 px pitch
        v = rng.uniform(0, 1, len(xy))
        img = np.empty((len(xy), 224, 224, 3), np.uint8)
        for i, t in enumerate(v):
            base = np.array([230, 190, 220]) * (1 - t) + np.array([90, 40, 130]) * t
            img[i] = np.clip(base + rng.normal(0, 10, (224, 224, 3)), 0, 255).astype(np.uint8)
        bc = [f"{sid}_{r}x{c}" for r, c in zip(rows, cols)]
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = img
            f["barcode"] = np.array(bc, dtype="S")[:, None]
            f["coords"] = xy
        counts = rng.poisson(np.exp(1.5 + np.outer(v - 0.5, w) * 2)).astype(np.float32)
        if shuffle_counts:
            counts = counts[rng.permutation(len(counts))]
        extra = rng.poisson(3, size=(5, n_genes)).astype(np.float32)  # spots without a patch
        X = np.vstack([counts, extra])
        names = bc + [f"{sid}_extra{i}" for i in range(5)]
        order = rng.permutation(len(names))
        a = ad.AnnData(X[order], obs=pd.DataFrame(index=np.array(names)[order]),
                       var=pd.DataFrame(index=genes + []))
        a.write_h5ad(root / "adata" / f"{sid}.h5ad")
    for k, test in enumerate(ids):
        row = lambda s: {"sample_id": s, "patches_path": f"patches/{s}.h5", "expr_path": f"adata/{s}.h5ad"}  # noqa: E731
        pd.DataFrame([row(s) for s in ids if s != test]).to_csv(root / "splits" / f"train_{k}.csv", index=False)
        pd.DataFrame([row(test)]).to_csv(root / "splits" / f"test_{k}.csv", index=False)
    (root / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("bench") / "IDC")


def test_bench_hest_cli_runs_every_fold(task, tmp_path, capsys):
    enc = register_tiny_vit("tiny-vit-bench")
    code, out, err = run_cli(capsys, "bench", "hest", "--root", task, "--encoder", enc, "--max-epochs", "3",
                             "--out", tmp_path / "res")
    assert code == 0, err
    print(out)  # the run, for the record (pytest -s)
    folds = pd.read_csv(tmp_path / "res" / "folds.csv")
    assert folds["fold"].tolist() == [0, 1, 2] and (folds["n_test"] == 49).all() and (folds["n_train"] == 98).all()
    # the counts follow the patches' stain: matched by barcode, ridge on the embeddings recovers it
    assert (folds["ridge"] > 0.5).all(), folds
    assert folds["deepspot"].notna().all()
    per_gene = pd.read_csv(tmp_path / "res" / "per_gene.csv")
    assert len(per_gene) == 3 * 6
    assert "ridge (HEST protocol)" in out and "no published figure for tiny-vit-bench on IDC" in out


def test_counts_not_matching_the_patches_score_at_noise(tmp_path):
    enc = register_tiny_vit("tiny-vit-bench")
    from deepspot.features.encoders import load_encoder

    root = write_task(tmp_path / "IDC", shuffle_counts=True)
    res = run_task(root, load_encoder(enc), deepspot=False)
    assert abs(res.summary["ridge"]) < 0.25 and "deepspot" not in res.summary


def test_layout_errors_and_leaderboard(tmp_path):
    assert leaderboard_figure("IDC", "uni") == 0.5702 and leaderboard_figure("LYMPH_IDC", "hoptimus0") == 0.2595
    assert leaderboard_figure("IDC", "efficientnet-lite0") is None
    (tmp_path / "t").mkdir()
    with pytest.raises(BenchError, match="no splits/ folder"):
        read_splits(tmp_path / "t")
    (tmp_path / "t" / "splits").mkdir()
    (tmp_path / "t" / "splits" / "train_0.csv").write_text("sample_id,patches_path,expr_path\n")
    with pytest.raises(BenchError, match="fold 0 has no splits/test_0.csv"):
        read_splits(tmp_path / "t")
