"""Patch features other tools wrote (TRIDENT / CLAM / HEST .h5 layouts): read, matched to spots, trained and
predicted on, and refused where they do not fit."""
import h5py
import numpy as np
import pytest

from deepspot.config import CheckpointError
from deepspot.features.external import ExternalFeatureError, match_spots, read_patch_features, spot_features
from fixtures_cli import run_cli
from spatial_fakes import spaceranger_folder


def write_trident(path, coords_topleft, feats, patch_level0=None, layout="trident", barcodes=None, encoder=None):
    """A patch-feature file as TRIDENT writes it (features + coords with patching attributes on coords), as
    CLAM wrote its coords (patch_size, patch_level, custom_downsample), or as HEST-Bench embeds patches
    (embeddings, coords, barcode)."""
    with h5py.File(path, "w") as f:
        key = "embeddings" if layout == "hest" else "features"
        f[key] = np.asarray(feats, np.float32)
        c = f.create_dataset("coords", data=np.asarray(coords_topleft, np.int64))
        if encoder:
            f[key].attrs["encoder"] = encoder
        if layout == "trident":
            c.attrs.update({"patch_size": int(patch_level0 // 2), "patch_size_level0": int(patch_level0),
                            "level0_magnification": 40, "target_magnification": 20, "overlap": 0, "name": "s1"})
        elif layout == "clam":
            c.attrs.update({"patch_size": int(patch_level0 // 2), "patch_level": 1, "custom_downsample": 1})
        if barcodes is not None:
            f["barcode"] = np.array(barcodes, dtype="S")[:, None]
    return path


def test_read_the_three_layouts(tmp_path):
    xy = np.array([[0, 0], [512, 0], [0, 512]])
    f = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = read_patch_features(write_trident(tmp_path / "t.h5", xy, f, 512))
    assert t.patch_px == 512 and t.dim == 4
    np.testing.assert_array_equal(t.centers, xy + 256)
    c = read_patch_features(write_trident(tmp_path / "c.h5", xy, f, 512, layout="clam"))
    assert c.patch_px == 512  # 256 px at level 1 (downsample 2)
    h = read_patch_features(write_trident(tmp_path / "h.h5", xy, f, None, layout="hest", barcodes=["a", "b", "c"]),
                            patch_px=224)
    assert h.patch_px == 224 and list(h.barcodes) == ["a", "b", "c"]
    np.testing.assert_array_equal(h.features, f)
    with pytest.raises(ExternalFeatureError, match="patch size is not recorded"):
        read_patch_features(tmp_path / "h.h5").centers
    with pytest.raises(ExternalFeatureError, match="file says patches of 512 px at level 0, --patch-px 224"):
        read_patch_features(tmp_path / "t.h5", patch_px=224)
    with h5py.File(tmp_path / "bad.h5", "w") as g:
        g["feats"] = f
    with pytest.raises(ExternalFeatureError, match="needs datasets 'features'.*has \\['feats'\\]"):
        read_patch_features(tmp_path / "bad.h5")


def test_spots_matched_by_position_within_tolerance(tmp_path):
    rng = np.random.default_rng(0)
    top = np.array([[x, y] for y in range(0, 1000, 100) for x in range(0, 1000, 100)])
    feats = rng.normal(size=(len(top), 6))
    pf = read_patch_features(write_trident(tmp_path / "t.h5", top, feats, 100))
    order = rng.permutation(len(top))[:30]
    spots = top[order] + 50 + rng.uniform(-20, 20, size=(30, 2))  # centres off by up to 20 px (< 25 px)
    np.testing.assert_array_equal(match_spots(pf, spots), order)
    np.testing.assert_allclose(spot_features(pf, spots, 100.0).spot, feats[order], rtol=1e-6)
    from deepspot.features.external import patch_spots

    lattice, step = patch_spots(pf)  # TRIDENT's square patch grid -> square array coordinates
    assert step == 100 and lattice["array_col"].tolist() == (top[:, 0] // 100).tolist()
    assert lattice["array_row"].tolist() == (top[:, 1] // 100).tolist()
    far = np.vstack([spots, [[2000.0, 2000.0]]])
    with pytest.raises(ExternalFeatureError, match="1 of 31 spots have no patch centred within 25.0 px"):
        match_spots(pf, far)
    with pytest.raises(ExternalFeatureError, match="patches of 100 px = 50.0 µm at level 0, but the model's spot "
                                                   "crop is 220.0 px = 110.0 µm"):
        spot_features(pf, spots, 220.0, mpp=0.5)
    with pytest.raises(ExternalFeatureError, match="no sub-spot features"):
        spot_features(pf, spots, 100.0, n_sub=3)


def test_train_and_predict_from_a_trident_file(tmp_path, capsys):
    import deepspot as ds

    outs, image, info = spaceranger_folder(tmp_path, mpp=1.0)  # Visium spots: 55 µm = 55 px
    a = ds.read.visium(outs, image=image)
    xy = np.asarray(a.obsm["spatial"])
    # features that carry the spots' signal (x position, as in the counts) plus noise, one 55 px patch per spot
    rng = np.random.default_rng(1)
    sig = np.sin(xy[:, 0] / 80.0)
    feats = np.c_[sig, -sig, rng.normal(size=(len(xy), 6)) * 0.3]
    h5 = write_trident(tmp_path / "S1.h5", np.round(xy - 27.5), feats, 55, encoder="my-encoder")
    m = ds.train(a, image=image, out=tmp_path / "m", encoder="my-encoder", features_h5=h5, context="spot_neighbors",
                 genes=info["genes"][:8], max_epochs=3, progress=False, mpp=1.0)
    assert m.config.encoder.name == "my-encoder" and m.config.encoder.dim == 8
    code, out, err = run_cli(capsys, "predict", image, "--model", tmp_path / "m", "--features-h5", h5,
                             "--out", tmp_path / "pred", "--mpp", 1, "--no-progress")
    assert code == 0, err
    import anndata as ad

    pred = ad.read_h5ad(tmp_path / "pred" / f"{image.stem}.h5ad")
    assert pred.n_obs == len(xy) and list(pred.var_names) == info["genes"][:8]
    np.testing.assert_allclose(np.sort(pred.obsm["spatial"], axis=0), np.sort(np.round(xy - 27.5) + 27.5, axis=0))
    # the patch lattice gives each spot the neighbours it had in training (Visium's hex array): the file's
    # predictions are the trained model's predictions at its own training spots
    np.testing.assert_allclose(np.asarray(pred.X), m.result.pred, rtol=1e-4, atol=1e-5)
    # patches of another size, or of another encoder, are refused before any prediction
    big = write_trident(tmp_path / "big.h5", np.round(xy - 55), feats, 110)
    code, _, err = run_cli(capsys, "predict", image, "--model", tmp_path / "m", "--features-h5", big,
                           "--out", tmp_path / "p2", "--mpp", 1, "--no-progress")
    assert code != 0
    other = write_trident(tmp_path / "o.h5", np.round(xy - 27.5), np.c_[feats, feats], 55)
    with pytest.raises(CheckpointError, match="expects 8-d features from encoder 'my-encoder'.*16-d"):
        from deepspot.inference.external import predict_patch_file

        predict_patch_file(ds.load_model(tmp_path / "m"), other, mpp=1.0)
    with pytest.raises(ExternalFeatureError, match="patches of 110 px"):
        predict_patch_file(ds.load_model(tmp_path / "m"), big, mpp=1.0)
    # score: the manifest's sample scored with its file (named by sample id) instead of the encoder
    import shutil

    import pandas as pd

    from deepspot.evaluation.metrics import pearson_per_gene
    from deepspot.training.targets import log_normalize

    (tmp_path / "feats").mkdir()
    shutil.copy(h5, tmp_path / "feats" / "S1.h5")
    pd.DataFrame([{"sample_id": "S1", "patient_id": "p1", "image": image, "expression": outs, "mpp": 1.0,
                   "format": "spaceranger"}]).to_csv(tmp_path / "man.csv", index=False)
    code, out, err = run_cli(capsys, "score", "--model", tmp_path / "m", "--manifest", tmp_path / "man.csv",
                             "--out", tmp_path / "score", "--features-h5", tmp_path / "feats", "--no-progress")
    assert code == 0, err
    got = pd.read_csv(tmp_path / "score" / "per_gene.csv").set_index("gene")["pearson"]
    want = pearson_per_gene(m.result.pred, log_normalize(a, genes=m.genes))
    np.testing.assert_allclose(got.loc[m.genes].to_numpy(), want, rtol=1e-4, atol=1e-5)


def _cohort_of_feature_files(root, n=3):
    """``n`` Visium samples (55 µm spots at 1 µm/px) with a TRIDENT file each: one 55 px patch per spot plus
    patches between the spots (TRIDENT patches all the tissue), in shuffled order; the features carry the
    counts' signal. Returns the manifest rows (paths relative to ``root``) and each sample's spot features."""
    import deepspot as ds

    rows, want = [], {}
    for i in range(n):
        name = f"S{i + 1}"
        outs, image, _ = spaceranger_folder(root, name=name, mpp=1.0, seed=i)
        xy = np.asarray(ds.read.visium(outs, image=image).obsm["spatial"])
        rng = np.random.default_rng(10 + i)
        sig = np.sin(xy[:, 0] / 80.0)
        spot = np.c_[sig, -sig, rng.normal(size=(len(xy), 6)) * 0.3].astype(np.float32)
        between = xy + [50.0, 0.0]  # 50 px off every spot: never the nearest patch of one
        top = np.round(np.vstack([xy, between]) - 27.5)
        feats = np.vstack([spot, rng.normal(size=(len(xy), 8))])
        order = rng.permutation(len(top))
        write_trident(root / f"{name}.h5", top[order], feats[order], 55, encoder="my-encoder")
        rows.append({"sample_id": name, "patient_id": f"p{i + 1}", "image": image.name, "expression": outs.name,
                     "mpp": 1.0, "format": "spaceranger", "features_h5": f"{name}.h5"})
        want[name] = spot
    return rows, want


def test_train_a_manifest_from_feature_files(tmp_path, capsys):
    """`train --manifest` whose rows name their TRIDENT files: no encoder runs (the encoder only names the
    features), each sample's spots get their own patches matched by position, and a row that does not fit
    is refused naming the row and the file."""
    import pandas as pd

    import deepspot as ds
    from deepspot.io.spatial import SpatialDataError

    rows, want = _cohort_of_feature_files(tmp_path)
    man = tmp_path / "cohort.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    genes = [f"G{i}" for i in range(8)]
    m = ds.train(man, out=tmp_path / "m", encoder="my-encoder", context="spot_neighbors", genes=genes,
                 max_epochs=2, patience=2, progress=False)
    assert (m.config.encoder.name, m.config.encoder.dim) == ("my-encoder", 8)
    assert m.config.training["samples"] == ["S1", "S2", "S3"]
    np.testing.assert_array_equal(m.result.features.spot, np.vstack([want[s] for s in ("S1", "S2", "S3")]))
    # the command line: the same manifest trains with no encoder weights anywhere
    code, out, err = run_cli(capsys, "train", "--manifest", man, "--encoder", "my-encoder", "--context",
                             "spot_neighbors", "--genes", ",".join(genes), "--max-epochs", 1, "--out",
                             tmp_path / "m_cli", "--no-progress")
    assert code == 0, err
    assert "3 samples (S1, S2, S3)" in out

    def refused(edit, exc, match, context="spot_neighbors"):
        bad = pd.DataFrame(rows)
        edit(bad)
        bad.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(exc, match=match):
            ds.train(tmp_path / "bad.csv", encoder="my-encoder", context=context, genes=genes, max_epochs=1,
                     progress=False)

    xy = np.asarray(ds.read.visium(tmp_path / "S2", image=tmp_path / "S2_full.png").obsm["spatial"])
    write_trident(tmp_path / "big.h5", np.round(xy - 55), want["S2"], 110, encoder="my-encoder")
    refused(lambda d: d.__setitem__("features_h5", ["S1.h5", "big.h5", "S3.h5"]), ExternalFeatureError,
            r"manifest row S2: .*big\.h5: patches of 110 px")
    write_trident(tmp_path / "other.h5", np.round(xy - 27.5), want["S2"], 55, encoder="uni")
    refused(lambda d: d.__setitem__("features_h5", ["S1.h5", "other.h5", "S3.h5"]), ExternalFeatureError,
            r"manifest row S2: .*other\.h5: made by encoder 'uni'")
    write_trident(tmp_path / "wide.h5", np.round(xy - 27.5), np.c_[want["S2"], want["S2"]], 55)
    refused(lambda d: d.__setitem__("features_h5", ["S1.h5", "wide.h5", "S3.h5"]), ExternalFeatureError,
            r"manifest row S2: .*wide\.h5: 16-d features, but the model is trained on 8-d")
    write_trident(tmp_path / "shifted.h5", np.round(xy - 27.5 + 30), want["S2"], 55)  # patches of other positions
    refused(lambda d: d.__setitem__("features_h5", ["S1.h5", "shifted.h5", "S3.h5"]), ExternalFeatureError,
            r"manifest row S2: .*shifted\.h5: 33 of 33 spots have no patch centred within 13.8 px")
    refused(lambda d: d.__setitem__("features_h5", ["S1.h5", "", "S3.h5"]), SpatialDataError,
            r"features_h5 is given for 2 of 3 samples; rows S2 have none")
    refused(lambda d: d.__setitem__("features_h5", ["S1.h5", "gone.h5", "S3.h5"]), SpatialDataError,
            r"bad\.csv, row S2: features_h5 file not found .*gone\.h5")
    refused(lambda d: None, SpatialDataError, r"no sub-spot features, so context 'spot_subspot_neighbors'",
            context="spot_subspot_neighbors")


def test_a_one_row_manifest_trains_from_its_feature_file(tmp_path):
    import pandas as pd

    import deepspot as ds

    rows, want = _cohort_of_feature_files(tmp_path, n=1)
    pd.DataFrame(rows).to_csv(tmp_path / "one.csv", index=False)
    m = ds.train(tmp_path / "one.csv", encoder="my-encoder", context="spot_neighbors",
                 genes=[f"G{i}" for i in range(8)], max_epochs=1, progress=False)
    assert m.config.encoder.dim == 8
    np.testing.assert_array_equal(m.result.features.spot, want["S1"])


def test_score_reads_the_manifests_feature_files(tmp_path, capsys, monkeypatch):
    """`score` on a manifest whose rows name their TRIDENT files scores from those files (no encoder runs) and
    gives the same per-gene table as the files given as a folder; the CLI needs no --features-h5 for it."""
    import pandas as pd

    import deepspot as ds
    from deepspot.features import extract

    rows, _ = _cohort_of_feature_files(tmp_path)
    man = tmp_path / "cohort.csv"
    pd.DataFrame(rows).to_csv(man, index=False)
    m = ds.train(man, out=tmp_path / "m", encoder="my-encoder", context="spot_neighbors",
                 genes=[f"G{i}" for i in range(8)], max_epochs=2, patience=2, progress=False)

    def no_encoding(*a, **k):
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(extract, "encode_spots", no_encoding)
    by_column, _ = ds.load_model(tmp_path / "m").score(man, progress=False)
    by_folder, _ = ds.load_model(tmp_path / "m").score(pd.DataFrame(rows).drop(columns="features_h5")
                                                      .pipe(lambda d: d.to_csv(tmp_path / "plain.csv", index=False)
                                                            or tmp_path / "plain.csv"),
                                                      features_h5=tmp_path, progress=False)
    assert len(by_column) == 3 * 8 and by_column["pearson"].notna().any()
    pd.testing.assert_frame_equal(by_column.reset_index(drop=True), by_folder.reset_index(drop=True))
    code, out, err = run_cli(capsys, "score", "--model", tmp_path / "m", "--manifest", man, "--out",
                             tmp_path / "score", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "score" / "per_gene.csv").is_file()
