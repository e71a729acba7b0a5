"""``deepspot tcga`` / ``ds.datasets.tcga`` against a local folder laid out like the Hugging Face dataset
(metadata CSVs + one gzipped h5ad, written here), and the one-line message when the hub is out of reach."""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import deepspot as ds
from deepspot.io.datasets import DataError

SID = "TCGA-D9-A3Z3-06Z-00-DX1.C4820632-C64D-4661-94DD-9F27F75519C3"
OTHER = "TCGA-BF-AAP6-01Z-00-DX1.EFF1D6E1-CDBC-4401-A10B-000000000000"
REL = f"TCGA_SKCM/FFPE/{SID}.h5ad.gz"
SRC = str(Path(ds.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("tcga")
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.random((30, 5)).astype(np.float32),
                   obs=pd.DataFrame({"predicted_label": pd.Categorical(rng.choice(["tumor", "stroma"], 30))},
                                    index=[f"spot{i}" for i in range(30)]),
                   var=pd.DataFrame(index=["SOX10", "CD37", "COL1A1", "MLANA", "PMEL"]))
    a.obsm["spatial"] = rng.random((30, 2)) * 1000
    (d / "TCGA_SKCM" / "FFPE").mkdir(parents=True)
    plain = d / "plain.h5ad"
    a.write_h5ad(plain)
    with open(plain, "rb") as fi, gzip.open(d / REL, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    plain.unlink()
    rows = [("TCGA_SKCM", "FFPE", SID, 30, REL), ("TCGA_SKCM", "FFPE", OTHER, 12, f"TCGA_SKCM/FFPE/{OTHER}.h5ad.gz"),
            ("TCGA_KIRC", "FROZEN", "TCGA-A3-3306-01A-01-BS1.X", 7, "TCGA_KIRC/FROZEN/TCGA-A3-3306-01A-01-BS1.X.h5ad.gz")]
    cols = ["dataset", "slide_type", "sample_id", "n_spots", "file_path"]
    pd.DataFrame(rows, columns=cols).to_csv(d / "metadata_2025-01-11.csv")  # with an index column, as published
    pd.DataFrame(rows[:1], columns=cols).to_csv(d / "metadata_2024-06-01.csv", index=False)  # an older one
    return d, a


def test_metadata_takes_the_latest_csv_and_checks_columns(source, tmp_path):
    d, _ = source
    meta = ds.datasets.tcga.metadata(local_dir=d)
    assert len(meta) == 3 and list(meta.columns) == list(ds.datasets.tcga.COLUMNS)
    assert meta.attrs["source"].endswith("metadata_2025-01-11.csv")
    assert len(ds.datasets.tcga.metadata(local_dir=d, filename="metadata_2024-06-01.csv")) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"sample_id": ["x"]}).to_csv(bad / "metadata_x.csv", index=False)
    with pytest.raises(DataError, match=r"metadata lacks columns \['dataset', 'slide_type'"):
        ds.datasets.tcga.metadata(local_dir=bad)


def test_read_one_sample_by_id_or_barcode_prefix(source, tmp_path):
    d, a = source
    got = ds.datasets.tcga.read(SID, local_dir=d)
    np.testing.assert_array_equal(got.X, a.X)
    assert list(got.var_names) == list(a.var_names) and "spatial" in got.obsm
    prefix = ds.datasets.tcga.read("TCGA-D9-A3Z3", local_dir=d, out=tmp_path / "x.h5ad")
    np.testing.assert_array_equal(prefix.X, a.X)
    assert (tmp_path / "x.h5ad").is_file() and [p.name for p in tmp_path.iterdir()] == ["x.h5ad"]
    with pytest.raises(DataError, match="TCGA-ZZ: no such sample"):
        ds.datasets.tcga.read("TCGA-ZZ", local_dir=d)
    with pytest.raises(DataError, match=r"matches 3 samples \(TCGA-D9-A3Z3-06Z"):
        ds.datasets.tcga.read("TCGA-", local_dir=d)
    with pytest.raises(DataError, match=f"{OTHER}.h5ad.gz: not found in the local copy"):
        ds.datasets.tcga.read(OTHER, local_dir=d)


def _cli(*args, env=None, cwd=None):
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])]),
         **(env or {})}
    return subprocess.run([sys.executable, "-m", "deepspot", "tcga", *map(str, args)], capture_output=True,
                          text=True, env=e, cwd=cwd, timeout=300)


def test_cli_list_and_download_from_a_local_copy(source, tmp_path):
    d, a = source
    r = _cli("list", "--source", d)
    assert r.returncode == 0, r.stderr
    assert "3 slides, 49 spots" in r.stdout and "TCGA_KIRC" in r.stdout and SID in r.stdout
    r = _cli("download", "TCGA-D9-A3Z3", "--source", d, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "30 spots × 5 genes" in r.stdout and "predicted_label" in r.stdout
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / f"{SID}.h5ad").X, a.X)


def test_offline_without_a_cached_copy_is_one_line(tmp_path):
    r = _cli("list", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, cwd=tmp_path)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert "nonchev/TCGA_digital_spatial_transcriptomics/metadata_2025-01-11.csv" in err[0]
    assert "offline, and not in the Hugging Face cache" in err[0] and "--source DIR" in err[0]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.csv"))
