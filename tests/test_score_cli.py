"""`deepspot train --manifest` then `deepspot score` through the CLI, on small generated samples."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deepspot.cli import main


def _sample(tmp_path, name, seed):
    """A 700×600 px image of coloured patches and 20 spots (a 5×4 square array, pitch 100 px) whose
    counts follow the redness of their patch."""
    rng = np.random.default_rng(seed)
    img = np.full((600, 700, 3), 235, np.uint8)
    red = rng.uniform(0, 1, size=(4, 5))
    rows, cols = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    xy = np.stack([100 + 100 * cols, 100 + 100 * rows], 1).astype(float)
    for (x, y), v in zip(xy.astype(int), red.ravel()):
        img[y - 40:y + 40, x - 40:x + 40] = (int(120 + 120 * v), 60, int(200 - 120 * v))
    Image.fromarray(img).save(tmp_path / f"{name}.png")
    w = rng.normal(size=30)
    counts = rng.poisson(np.exp(2 + np.outer(red.ravel(), w)))
    a = ad.AnnData(X=counts.astype(np.float32), var=pd.DataFrame(index=[f"g{i}" for i in range(30)]),
                   obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"{name}_{i}" for i in range(20)]))
    a.obsm["spatial"] = xy
    a.write_h5ad(tmp_path / f"{name}.h5ad")
    return f"{name},p_{name},{name}.png,{name}.h5ad,h5ad,1.0,55\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    head = "sample_id,patient_id,image,expression,format,mpp,spot_diameter_um\n"
    (root / "train.csv").write_text(head + _sample(root, "A", 1) + _sample(root, "B", 2))
    (root / "test.csv").write_text(head + _sample(root, "C", 3))
    main(["train", "--manifest", str(root / "train.csv"), "--out", str(root / "model"), "--context",
          "spot_neighbors", "--max-epochs", "3", "--n-top-genes", "12", "--no-progress"])
    return root


def test_score_writes_the_tables_and_prints_the_summary(trained, capsys):
    out = trained / "scores"
    main(["score", "--model", str(trained / "model"), "--manifest", str(trained / "test.csv"), "--out", str(out),
          "--baseline", "ridge", "--no-progress"])
    printed = capsys.readouterr().out
    per_gene, summary = pd.read_csv(out / "per_gene.csv"), pd.read_csv(out / "summary.csv")
    assert list(per_gene.columns[:5]) == ["sample_id", "gene", "pearson", "spearman", "n_spots"]
    assert len(per_gene) == 12 and set(per_gene["sample_id"]) == {"C"} and (per_gene["n_spots"] == 20).all()
    assert {"pearson_mean_model_genes", "pearson_mean_top50_hvg", "ridge_pearson_mean_model_genes"} <= set(summary)
    assert summary.loc[0, "sample_id"] == "C" and np.isfinite(summary.loc[0, "ridge_pearson_mean_model_genes"])
    assert "pearson_mean_model_genes" in printed and "wrote" in printed
    assert (out / "C_score.png").stat().st_size > 5_000


def test_score_baseline_ridge_needs_the_recorded_manifest(trained, capsys, tmp_path):
    """A model moved away from its training manifest: --baseline ridge says so in one line."""
    import json
    import shutil

    moved = tmp_path / "model"
    shutil.copytree(trained / "model", moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["training"]["manifest"] = str(tmp_path / "gone.csv")
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        main(["score", "--model", str(moved), "--manifest", str(trained / "test.csv"), "--out",
              str(tmp_path / "s"), "--baseline", "ridge", "--no-progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deepspot: error: {moved}: --baseline ridge needs the training manifest, which this checkpoint "
                   f"does not record ({tmp_path / 'gone.csv'} is gone); give its path instead"]
