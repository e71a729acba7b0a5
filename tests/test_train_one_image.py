"""The one-image `train` form reads what the data records, as `--manifest` does: the spot geometry its
reader wrote in uns['source'] (diameter; pitch and layout from the array) and the same default HVG panel;
markers can be added to that panel."""
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures_cli import register_tiny_vit, run_cli
from shared_data import HER2ST, require_data


def _st_like(tmp_path, n_genes=40, seed=0):
    """A 1100×900 px image and 80 spots on a square array (pitch 100 px, mpp 2 µm/px: 200 µm), counts
    following the redness of each spot's patch, saved as an h5ad whose uns['source'] records 100 µm spots
    and the mpp (what ds.read.her2st writes)."""
    rng = np.random.default_rng(seed)
    img = np.full((900, 1100, 3), 235, np.uint8)
    rows, cols = np.meshgrid(np.arange(8), np.arange(10), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    xy = np.stack([100 + 100 * cols, 100 + 100 * rows], 1).astype(float) + rng.normal(0, 4, (80, 2))
    red = rng.uniform(0, 1, 80)
    for (x, y), v in zip(xy.astype(int), red):
        img[y - 30:y + 30, x - 30:x + 30] = (int(120 + 120 * v), 60, int(200 - 120 * v))
    Image.fromarray(img).save(tmp_path / "he.png")
    counts = rng.poisson(np.exp(1 + np.outer(red, rng.normal(size=n_genes))))
    a = ad.AnnData(X=counts.astype(np.float32), var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
                   obs=pd.DataFrame({"array_row": rows, "array_col": cols}, index=[f"s{i}" for i in range(80)]))
    a.obsm["spatial"] = xy
    a.uns["source"] = {"format": "her2st", "sample": "S", "mpp": 2.0, "spot_diameter_um": 100.0}
    a.write_h5ad(tmp_path / "spots.h5ad")
    return tmp_path / "he.png", tmp_path / "spots.h5ad"


def test_one_image_train_takes_the_recorded_geometry_and_the_manifest_panel(tmp_path, capsys):
    from deepspot.training.manifest import read_manifest, load_sample
    from deepspot.training.multi_sample import samples_geometry

    image, h5 = _st_like(tmp_path)
    enc = register_tiny_vit("tiny-one-image")
    code, out, err = run_cli(capsys, "train", "--image", image, "--adata", h5, "--out", tmp_path / "m",
                             "--encoder", enc, "--context", "spot_neighbors", "--max-epochs", "1",
                             "--n-top-genes", "10", "--add-genes", "G39,G0", "--no-progress")
    assert code == 0, err
    assert "geometry from spots.h5ad: square array, spot 100 µm" in out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    grid = cfg["geometry"]["grid"]
    # the manifest form's geometry from the same files
    (tmp_path / "m.csv").write_text("sample_id,patient_id,image,expression,format\n"
                                    f"S,p,{image},{h5},h5ad\n")
    manifest = samples_geometry([load_sample(read_manifest(tmp_path / "m.csv")[0])]).grid
    assert (grid["layout"], grid["spot_diameter"], grid["unit"]) == ("square", 100.0, "um")
    assert grid["spacing"] == pytest.approx(manifest.spacing) and grid["spacing"] == pytest.approx(200.0, rel=0.02)
    genes = cfg["genes"]
    assert len(genes) in (11, 12) and genes[-1] == "G39" and "G0" in genes  # 10 HVGs, then the markers they lack


def test_one_image_panel_defaults_to_250_hvgs_like_the_manifest(tmp_path):
    """No --genes / --n-top-genes: the top 250 HVGs, as for several samples (it was every gene: 15,194 on
    HER2ST and a 162 MB checkpoint)."""
    import deepspot as ds

    image, h5 = _st_like(tmp_path, n_genes=400, seed=1)
    enc = register_tiny_vit("tiny-one-image")
    model = ds.train(ds.read.counts(h5, image=image), image=image, encoder=enc, context="spot_neighbors",
                     max_epochs=1, progress=False)
    assert len(model.genes) == 250 and model.config.geometry.grid.spot_diameter == 100.0


def test_her2st_reader_geometry_is_the_manifest_geometry():
    """`ds.read.her2st` records 100 µm spots and the mpp from the 200 µm array; the one-image form's
    geometry from that AnnData is the geometry `--manifest` decides for the same section."""
    require_data(*HER2ST)
    import deepspot as ds
    from deepspot.datasets import her2st
    from deepspot.training.manifest import her2st_manifest, load_sample
    from deepspot.training.multi_sample import recorded_geometry, samples_geometry

    f = her2st(("C2",))["C2"]
    a = ds.read.her2st(f["counts"], spots=f["spots"])
    one = recorded_geometry(a)
    many = samples_geometry([load_sample(her2st_manifest(sections=("C2",))[0], check_image=False)])
    assert one == many and one.grid.spot_diameter == 100.0 and one.grid.layout == "square"
    assert one.grid.spacing == pytest.approx(200.0, rel=0.005)


def test_train_takes_its_request_and_the_keywords_give_the_same_model(tmp_path):
    """ds.train(TrainJob) (what `deepspot train` passes) and ds.train(keywords) are the same run: same
    weights at the same seed; a request with keywords beside it, or a manifest option on one sample, is refused."""
    import torch

    import deepspot as ds
    from deepspot.training.request import TrainJob

    image, h5 = _st_like(tmp_path, seed=2)
    enc = register_tiny_vit("tiny-one-image")
    data = ds.read.counts(h5, image=image)
    kw = dict(encoder=enc, context="spot_neighbors", max_epochs=2, n_top_genes=8, seed=11)
    a = ds.train(data, image=image, progress=False, **kw)
    b = ds.train(TrainJob(data, image=image, encoder=enc, n_top_genes=8,
                          recipe={"context": "spot_neighbors", "max_epochs": 2, "seed": 11}), progress=False)
    for (k, x), (_, y) in zip(a.network.state_dict().items(), b.network.state_dict().items()):
        assert torch.equal(x, y), k
    assert a.genes == b.genes
    with pytest.raises(TypeError, match="not as keywords"):
        ds.train(TrainJob(data, image=image, encoder=enc), max_epochs=1)
    with pytest.raises(ValueError, match=r"\['lr'\] apply to training on several samples"):
        ds.train(data, image=image, encoder=enc, lr=1e-2, progress=False)


def test_features_h5_beside_a_manifest_is_refused(tmp_path, capsys):
    """`train --manifest M --features-h5 X` ignored X; `score` with a manifest that names its files in the
    features_h5 column ignored one of the two: both are refused in one line, before anything is read."""
    image, h5 = _st_like(tmp_path)
    (tmp_path / "x.h5").write_bytes(b"")
    (tmp_path / "m.csv").write_text("sample_id,patient_id,image,expression,format\n"
                                    f"S,p,{image},{h5},h5ad\n")
    code, out, err = run_cli(capsys, "train", "--manifest", tmp_path / "m.csv", "--features-h5", tmp_path / "x.h5",
                             "--out", tmp_path / "m")
    assert code == 1 and "manifest's features_h5 column" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
    (tmp_path / "f.csv").write_text("sample_id,patient_id,image,expression,format,features_h5\n"
                                    f"S,p,{image},{h5},h5ad,x.h5\n")
    code, out, err = run_cli(capsys, "score", "--model", tmp_path / "m", "--manifest", tmp_path / "f.csv",
                             "--features-h5", tmp_path, "--out", tmp_path / "s")
    assert code == 1 and "features_h5 column" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
