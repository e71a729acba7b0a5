"""Training one model over several samples, geometry from the data, scoring on held-out samples."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import deepspot as ds

from deepspot.evaluation.score import score_samples
from deepspot.features.store import Features
from deepspot.io.spatial import SpatialDataError
from deepspot.training.multi_sample import samples_geometry, train_samples
from deepspot.training.targets import log_normalize
from shared_data import HER2ST as HER2ST_FILES, her2st_with_signal


@pytest.fixture(autouse=True)
def _no_progress():
    """Training and scoring read the progress bars from ds.settings."""
    with ds.settings.override(progress=False):
        yield


@pytest.fixture(scope="module")
def her2st():
    """Four bundled sections (real counts) with features carrying expression signal (no encoding)."""
    return her2st_with_signal()


def test_geometry_from_the_data_and_mismatch_refused(her2st):
    samples, _ = her2st
    g = samples_geometry(samples[:3])
    assert g.grid.layout == "square" and g.grid.unit == "um" and g.grid.spot_diameter == 100.0
    assert 170 < g.grid.spacing < 210  # the ST pitch (200 µm nominal), measured from the positions
    odd = dataclasses.replace(samples[1], spot_diameter_um=55.0)
    with pytest.raises(SpatialDataError, match=r"disagree on the spot diameter: C2 100.0 µm vs C3 55.0 µm"):
        samples_geometry([samples[0], odd])


def test_train_on_many_then_score_held_out(her2st, tmp_path):
    samples, feats = her2st
    res = train_samples(samples[:3], encoder=_Enc(), features=feats, n_top_genes=30,
                        max_epochs=6, patience=6, hidden=16, n_ensemble=2, input_proj=12)
    tr, va, _ = res.split
    owner = np.repeat(np.arange(3), [s.adata.n_obs for s in samples[:3]])
    assert set(owner[tr]) == set(owner[va]) == {0, 1, 2}  # every sample trains and gives a validation block
    assert res.config.training["samples"] == ["C2", "C3", "C4"]
    assert res.config.training["recipe"]["input_proj"] == 12 and res.config.scaler is not None
    per_gene, summary, preds = score_samples(res.model, res.config, None, [samples[3]], features=feats,
                                             ridge_train=samples[:3])
    assert {"ridge_pearson_mean_model_genes", "ridge_pearson_mean_top50_hvg"} <= set(summary.columns)
    assert summary.loc[0, "ridge_pearson_mean_model_genes"] > 0.05  # the planted signal is linear: ridge finds it
    assert list(per_gene.columns[:5]) == ["sample_id", "gene", "pearson", "spearman", "n_spots"]
    assert {"sample_id", "pearson_mean_model_genes", "pearson_mean_top50_hvg"} <= set(summary.columns)
    assert len(per_gene) == 30 and summary.loc[0, "pearson_mean_model_genes"] > 0.05
    from deepspot import plotting

    png = plotting.score_panels(np.asarray(samples[3].adata.obsm["spatial"]), preds["C5"],
                                log_normalize(samples[3].adata, genes=res.config.genes), res.config.genes,
                                per_gene["pearson"].to_numpy(), "C5", tmp_path / "C5_score.png")
    assert png.stat().st_size > 10_000
    # the same spots in another order: the same per-gene values
    c5 = samples[3]
    perm = np.random.default_rng(1).permutation(c5.adata.n_obs)
    shuffled = dataclasses.replace(c5, adata=c5.adata[perm].copy())
    f = feats["C5"]
    pg2, _, _ = score_samples(res.model, res.config, None, [shuffled],
                              features={"C5": Features(f.spot[perm], f.subspot[perm])})
    np.testing.assert_allclose(pg2["pearson"], per_gene["pearson"], rtol=1e-5, atol=1e-6)
    # a sample lacking a panel gene: one clear error naming it
    gene = res.config.genes[0]
    lacking = dataclasses.replace(c5, adata=c5.adata[:, [g for g in c5.adata.var_names if g != gene]].copy())
    with pytest.raises(SpatialDataError, match=rf"C5: 1 panel genes are missing from this sample \({gene}\)"):
        score_samples(res.model, res.config, None, [lacking], features=feats)


class _Enc:
    name, dim = "synthetic", 24


def test_mixed_formats_one_geometry_and_whole_validation_samples(her2st, tmp_path):
    """A manifest mixing the legacy ST reader and an h5ad written from another section: both read, one
    geometry (square layout from the array coordinates, not from the format); --val-samples holds a
    whole sample out of training."""
    import anndata as ad

    from deepspot.training.manifest import load_sample, read_manifest
    from deepspot.training.multi_sample import array_layout
    from shared_data import data_file

    samples, feats = her2st
    c3 = samples[1]
    a = ad.AnnData(X=c3.adata.X, obs=c3.adata.obs[["array_row", "array_col"]].copy(), var=c3.adata.var[[]].copy())
    a.obsm["spatial"] = np.asarray(c3.adata.obsm["spatial"])
    a.write_h5ad(tmp_path / "C3.h5ad")
    root = data_file("her2st/C2_HE.jpg").parent
    (tmp_path / "m.csv").write_text(
        "sample_id,patient_id,image,expression,positions,format,mpp,spot_diameter_um\n"
        f"C2,p1,{root / 'C2_HE.jpg'},{root / 'C2_counts.tsv.gz'},{root / 'C2_spots.tsv'},her2st,,\n"
        f"C3,p2,{root / 'C3_HE.jpg'},{tmp_path / 'C3.h5ad'},,h5ad,{c3.mpp},100\n")
    mixed = [load_sample(s, check_image=False) for s in read_manifest(tmp_path / "m.csv")]
    assert [s.spec.format for s in mixed] == ["her2st", "h5ad"]
    assert [array_layout(s) for s in mixed] == ["square", "square"]
    assert samples_geometry(mixed).grid.layout == "square"
    res = train_samples(samples[:3], encoder=_Enc(), features=feats, n_top_genes=20,
                        max_epochs=2, patience=2, hidden=8, n_ensemble=2, val_samples=["C4"])
    tr, va, _ = res.split
    owner = np.repeat(np.arange(3), [s.adata.n_obs for s in samples[:3]])
    assert set(owner[va]) == {2} and set(owner[tr]) == {0, 1}
    assert res.config.training["split"] == "validation: whole samples C4"
    by_patient = train_samples(samples[:3], encoder=_Enc(), features=feats, n_top_genes=20,
                               max_epochs=1, patience=1, hidden=8, n_ensemble=2, val_patients=["section_C4"])
    assert by_patient.config.training["split"] == "validation: whole samples C4"
    with pytest.raises(ValueError, match=r"--val-patients \['nobody'\] are not in the manifest"):
        train_samples(samples[:3], encoder=_Enc(), features=feats, n_top_genes=20,
                      max_epochs=1, val_patients=["nobody"])
    with pytest.raises(ValueError, match=r"--val-samples \['C9'\] are not in the manifest"):
        train_samples(samples[:3], encoder=_Enc(), features=feats, n_top_genes=20,
                      max_epochs=1, val_samples=["C9"])
    # trainer settings that training on several samples does not take are refused, not dropped
    with pytest.raises(ValueError, match=r"options \['loggers'\]: training on several samples takes precision"):
        ds.train(samples[:3], loggers="tensorboard", features=feats)


def test_neighbour_sets_equal_in_training_and_prediction(her2st):
    """The same spots of one slide: the neighbours a spot has in training (stacked bags) are the ones the
    predictor gives it (plan of the annotated spots, the rule and radius of the checkpoint geometry)."""
    from deepspot.inference.predict import plan_spots
    from deepspot.training.multi_sample import stack_bags

    samples, feats = her2st
    s = samples[0]
    geometry = samples_geometry([s])
    bags, _ = stack_bags([s], feats, geometry.neighbor_radius)
    plan = plan_spots(s.image, s.adata, geometry, mpp=s.mpp, thumbnail_size=256)
    idx, mask = plan.neighbors()
    train_sets = [set(r[m]) for r, m in zip(bags.neighbor_idx.numpy(), bags.neighbor_mask.numpy())]
    pred_sets = [set(r[m]) for r, m in zip(idx, mask)]
    assert train_sets == pred_sets
    assert max(len(x) for x in train_sets) == 8  # the square ST grid: the 8 adjacent spots


def test_bad_manifest_row_fails_before_any_encoding(tmp_path):
    """A row pointing at a missing file, or at a counts table that cannot be read: one error naming the
    row (sample id), the file and the reason — raised while reading, before any encoder is built."""
    import deepspot as ds
    from shared_data import data_file, require_data

    require_data(*HER2ST_FILES)
    root = data_file("her2st/C2_HE.jpg").parent
    good = f"C2,p1,{root / 'C2_HE.jpg'},{root / 'C2_counts.tsv.gz'},{root / 'C2_spots.tsv'},her2st\n"
    head = "sample_id,patient_id,image,expression,positions,format\n"
    (tmp_path / "missing.csv").write_text(head + good + f"C9,p9,{root / 'C2_HE.jpg'},{tmp_path / 'nope.tsv.gz'},,her2st\n")
    with pytest.raises(Exception, match=r"C9: expression not found \(.*nope.tsv.gz\)"):
        ds.train(tmp_path / "missing.csv", encoder="no-such-encoder")  # an encoder would fail later, not first
    (tmp_path / "junk.tsv.gz").write_bytes(b"not gzip at all")
    (tmp_path / "junk.csv").write_text(head + good + f"C8,p8,{root / 'C2_HE.jpg'},{tmp_path / 'junk.tsv.gz'},"
                                                     f"{root / 'C2_spots.tsv'},her2st\n")
    with pytest.raises(Exception, match=r"C8: cannot read counts .*junk.tsv.gz"):
        ds.train(tmp_path / "junk.csv", encoder="no-such-encoder")


def test_h5ad_of_spot_positions_only_stays_spots(her2st, tmp_path, caplog):
    """An h5ad with positions but no array_row/array_col is spot data: read as the same spots (not pooled
    into pseudo-spots), array coordinates from the lattice of the positions, logged, and the same
    neighbour sets as the legacy reader's real array coordinates. ``cells=True`` pools it instead; cell-like
    positions without ``cells`` fail naming the sample and the flag."""
    import logging

    import anndata as ad

    from deepspot.geometry.neighbors import array_neighbors
    from deepspot.training.manifest import as_spots, load_sample, read_manifest
    from shared_data import data_file

    samples, _ = her2st
    c3 = samples[1]
    a = ad.AnnData(X=c3.adata.X, var=c3.adata.var[[]].copy())
    a.obs_names = c3.adata.obs_names
    a.obsm["spatial"] = np.asarray(c3.adata.obsm["spatial"])
    a.write_h5ad(tmp_path / "C3.h5ad")
    image = data_file("her2st/C3_HE.jpg")
    (tmp_path / "m.csv").write_text("sample_id,patient_id,image,expression,format,mpp,spot_diameter_um\n"
                                    f"C3,p,{image},{tmp_path / 'C3.h5ad'},h5ad,{c3.mpp},100\n")
    spec = read_manifest(tmp_path / "m.csv")[0]
    with caplog.at_level(logging.INFO, logger="deepspot"):
        s = load_sample(spec, check_image=False)
    assert "no array coordinates in C3.h5ad; spots placed on the square lattice" in caplog.text
    assert s.adata.n_obs == c3.adata.n_obs and as_spots(s) is s and s.spot_diameter_um == 100.0
    nb = lambda x: [set(i[m]) for i, m in zip(*array_neighbors(x.obs["array_row"], x.obs["array_col"]))]  # noqa
    assert nb(s.adata) == nb(c3.adata)
    assert samples_geometry([s, samples[0]]).grid.layout == "square"
    pooled = as_spots(load_sample(spec, check_image=True, cells=True))
    assert pooled.extra.get("pooled") and pooled.adata.n_obs != c3.adata.n_obs
    rng = np.random.default_rng(0)
    a.obsm["spatial"] = rng.uniform(500, 3000, size=(a.n_obs, 2))  # scattered like cells, on no lattice
    a.write_h5ad(tmp_path / "C3.h5ad")
    with pytest.raises(SpatialDataError, match=r"C3: C3.h5ad has no array_row/array_col .*pass --cells"):
        load_sample(spec, check_image=False)


def _lattice_sample(layout: str, pitch_px: float, jitter_px: float, seed: int = 0):
    """A Sample whose spots lie on a square or (Visium-convention) hex array of ``pitch_px``, rotated by
    7 degrees, each position jittered by N(0, jitter_px) as spot detection does; mpp 0.5."""
    import anndata as ad
    import pandas as pd

    from deepspot.training.manifest import Sample, SampleSpec

    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(14), np.arange(16), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if layout == "hex":
        keep = (rows % 2) == (cols % 2)
        rows, cols = rows[keep], cols[keep]
        x, y = cols * pitch_px / 2, rows * pitch_px * np.sqrt(3) / 2
    else:
        x, y = cols * pitch_px, rows * pitch_px
    t = np.radians(7.0)
    xy = np.c_[x * np.cos(t) - y * np.sin(t), x * np.sin(t) + y * np.cos(t)] + 500 + rng.normal(0, jitter_px, (len(x), 2))
    a = ad.AnnData(np.ones((len(x), 3), np.float32), obs=pd.DataFrame({"array_row": rows, "array_col": cols},
                                                                       index=[f"s{i}" for i in range(len(x))]))
    a.obsm["spatial"] = xy
    spec = SampleSpec("L", "p", Path("none.jpg"), Path("none.h5ad"), "h5ad")
    return Sample(spec, a, 0.5, 55.0)


@pytest.mark.parametrize("layout", ["square", "hex"])
def test_pitch_is_the_array_step_not_the_jittered_nearest_neighbour(layout):
    """Positions jittered by 7 % of the pitch: the nearest of a spot's neighbours is nearer than the pitch
    (the bias that made the HER2ST prediction grid 7 % denser than its array); the fit on the array
    coordinates gives the array's pitch, and the geometry (the prediction grid) takes it."""
    from scipy.spatial import cKDTree

    from deepspot.training.multi_sample import sample_pitch_um

    s = _lattice_sample(layout, 290.0, 20.0)
    d, _ = cKDTree(s.adata.obsm["spatial"]).query(s.adata.obsm["spatial"], k=2)
    assert np.median(d[:, 1]) < 0.97 * 290.0  # the biased estimate this replaces
    assert sample_pitch_um(s) == pytest.approx(145.0, rel=0.01)  # 290 px × 0.5 µm/px
    g = samples_geometry([s])
    assert g.grid.layout == layout and g.grid.spacing == pytest.approx(145.0, rel=0.01)


def test_her2st_training_and_prediction_grids_have_the_same_pitch():
    """On the bundled HER2ST sections the model's grid (what `predict` lays over a slide) has the pitch of
    the array the model trained on: 200 µm (the ST design), the px per array step of the spot table."""
    from deepspot.geometry.grid import make_grid
    from deepspot.io.spatial import st_pitch_px
    from deepspot.training.manifest import her2st_manifest, load_sample
    from shared_data import require_data

    require_data(*HER2ST_FILES)
    samples = [load_sample(s, check_image=False) for s in her2st_manifest()]
    g = samples_geometry(samples)
    assert g.grid.spacing == pytest.approx(200.0, rel=0.005)
    for s in samples:
        obs = s.adata.obs
        array_step = st_pitch_px(obs[["array_col", "array_row"]].to_numpy(float), s.adata.obsm["spatial"])
        grid = make_grid(3000, 3000, g.grid.in_pixels(s.mpp))
        step = np.diff(np.sort(grid["x"].unique())).mean()
        assert step == pytest.approx(array_step, rel=0.005), s.sample_id
