"""Readers of real spatial outputs (Space Ranger, Xenium, HEST, h5ad, HER2ST ST) and the training manifest,
on tiny generated folders and on the bundled HER2ST sections; bad input gives one clear error."""
import json
import logging
import shutil

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from spatial_fakes import spaceranger_folder, tissue_image, write_10x_h5, xenium_folder

from deepspot.geometry.neighbors import array_neighbors
from deepspot.io.spatial import (SpatialDataError, read_her2st, read_hest, read_spaceranger, read_spatial_h5ad,
                                 read_xenium)
from deepspot.training.manifest import as_spots, detect_format, load_sample, read_manifest

from shared_data import HER2ST as _HER2ST_FILES, data_file, needs_data  # noqa: E402

HER2ST = data_file("her2st/C2_HE.jpg").parent
needs_her2st = needs_data(*_HER2ST_FILES)


# --------------------------------------------------------------------------- Space Ranger


@pytest.mark.parametrize("header", [True, False])
def test_spaceranger_folder(tmp_path, header):
    out, image, info = spaceranger_folder(tmp_path, header=header, mpp=1.0)
    a = read_spaceranger(out, image=image, mpp=1.0)
    assert a.n_obs == info["n_in_tissue"] and list(a.var_names) == info["genes"]
    grid = info["grid"].iloc[3:]  # the first 3 positions are outside tissue
    np.testing.assert_allclose(a.obsm["spatial"], grid[["x", "y"]].to_numpy(), atol=0.06)  # (x = col, y = row)
    np.testing.assert_array_equal(a.obs["array_row"], grid["array_row"])
    np.testing.assert_array_equal(np.asarray(a.X.todense()), info["X"])
    assert a.uns["source"] == {"format": "spaceranger", "sample": "S1", "mpp": 1.0, "spot_diameter_um": 55.0}
    sp = a.uns["spatial"]["S1"]
    assert sp["images"]["hires"].shape[:2] == (140, 160) and sp["scalefactors"]["tissue_hires_scalef"] == 0.25
    # hex grid neighbours of the real array coordinates: inner spots have 4 diagonal neighbours at radius 1
    idx, mask = array_neighbors(a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy(), 1)
    assert mask.sum(1).max() == 4


def test_spaceranger_counts_without_position_are_dropped_with_a_warning(tmp_path, caplog):
    out, image, info = spaceranger_folder(tmp_path)
    pos = pd.read_csv(out / "spatial" / "tissue_positions.csv")
    pos.drop(index=[5, 6]).to_csv(out / "spatial" / "tissue_positions.csv", index=False)  # 2 in-tissue spots
    with caplog.at_level(logging.WARNING):
        a = read_spaceranger(out, image=image)
    assert a.n_obs == info["n_in_tissue"] - 2
    assert "S1: 2 of" in caplog.text and "have no position" in caplog.text


def test_spaceranger_in_tissue_positions_without_counts_warn(tmp_path, caplog):
    out, image, info = spaceranger_folder(tmp_path)
    h5 = out / "filtered_feature_bc_matrix.h5"
    keep = slice(4, None)  # drop 4 in-tissue barcodes from the counts
    write_10x_h5(h5, info["X"][keep], [b for b in info["barcodes"][3:]][keep], info["genes"])
    with caplog.at_level(logging.WARNING):
        a = read_spaceranger(out, image=image)
    assert a.n_obs == info["n_in_tissue"] - 4
    assert "S1: 4 barcodes in the positions have no counts" in caplog.text  # out-of-tissue ones are expected


def test_spaceranger_duplicated_barcodes(tmp_path):
    out, image, _ = spaceranger_folder(tmp_path)
    pos = pd.read_csv(out / "spatial" / "tissue_positions.csv")
    pos.loc[10, "barcode"] = pos.loc[11, "barcode"]
    pos.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(SpatialDataError, match=r"^S1: duplicated barcodes in the positions"):
        read_spaceranger(out, image=image)


@pytest.mark.parametrize("bad,msg", [(np.nan, "NaN"), (-3.0, "negative")])
def test_spaceranger_bad_counts(tmp_path, bad, msg):
    out, image, info = spaceranger_folder(tmp_path)
    h5 = out / "filtered_feature_bc_matrix.h5"
    with h5py.File(h5, "r+") as f:  # float data with one bad value, as a corrupted matrix would have
        data = f["matrix/data"][:].astype(np.float32)
        data[3] = bad
        del f["matrix/data"]
        f["matrix/data"] = data
    with pytest.raises(SpatialDataError, match=f"^S1: counts contain {msg}"):
        read_spaceranger(out, image=image)


def test_spaceranger_positions_outside_image(tmp_path):
    out, image, _ = spaceranger_folder(tmp_path, width=640, height=560)
    small = tissue_image(tmp_path / "small.png", 320, 280)  # e.g. a downscaled export given as the full-res image
    with pytest.raises(SpatialDataError, match=r"^S1 \(small.png\): \d+ of \d+ positions lie outside the 320x280 image"):
        read_spaceranger(out, image=small)


def test_spaceranger_scalefactors_mismatch(tmp_path):
    out, image, _ = spaceranger_folder(tmp_path)
    sf = json.loads((out / "spatial" / "scalefactors_json.json").read_text())
    sf["tissue_hires_scalef"] = 0.125  # hires PNG 160 px wide now implies a 1280 px full-res image
    (out / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    with pytest.raises(SpatialDataError, match=r"^S1: scalefactors mismatch: .*1280x1120 px.* 640x560 px"):
        read_spaceranger(out, image=image)


def test_spaceranger_missing_pieces(tmp_path):
    out, image, _ = spaceranger_folder(tmp_path)
    with pytest.raises(SpatialDataError, match="^nowhere: Space Ranger folder not found"):
        read_spaceranger(tmp_path / "nowhere")
    (out / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(SpatialDataError, match="^S1: no spatial/tissue_positions.csv"):
        read_spaceranger(out)


# --------------------------------------------------------------------------- Xenium


@pytest.mark.parametrize("parquet", [False, True])
def test_xenium_folder(tmp_path, parquet):
    out, xy_um, X, genes = xenium_folder(tmp_path, parquet=parquet)
    a = read_xenium(out)
    assert list(a.var_names) == genes  # the control probe is not a gene
    np.testing.assert_array_equal(np.asarray(a.X.todense()), X)
    np.testing.assert_allclose(a.obsm["spatial_um"], xy_um)
    np.testing.assert_allclose(a.obsm["spatial"], xy_um / 0.2125)  # morphology-image pixels
    assert a.uns["source"]["mpp"] == 0.2125


def test_xenium_alignment_maps_into_the_he(tmp_path):
    out, xy_um, _, _ = xenium_folder(tmp_path)
    # H&E at 0.5 µm/px, shifted by (30, 20) px: H&E px -> Xenium px is scale 0.5/0.2125 plus offset
    s = 0.5 / 0.2125
    m = np.array([[s, 0, -30 * s], [0, s, -20 * s], [0, 0, 1]])
    np.savetxt(tmp_path / "align.csv", m, delimiter=",")
    image = tissue_image(tmp_path / "he.png", 400, 300)
    a = read_xenium(out, image=image, alignment=tmp_path / "align.csv", mpp=0.5)
    np.testing.assert_allclose(a.obsm["spatial"], xy_um / 0.5 + [30, 20], atol=1e-6)
    np.savetxt(tmp_path / "singular.csv", np.zeros((3, 3)), delimiter=",")
    with pytest.raises(SpatialDataError, match="^X1: alignment .* not an invertible 3x3"):
        read_xenium(out, alignment=tmp_path / "singular.csv")


def test_xenium_cells_pooled_into_spots_for_training(tmp_path):
    out, xy_um, X, genes = xenium_folder(tmp_path, n_cells=80, width_um=200, height_um=150)
    image = tissue_image(tmp_path / "he.png", int(200 / 0.2125) + 1, int(150 / 0.2125) + 1)
    pd.DataFrame({"sample_id": ["X1"], "patient_id": ["P1"], "image": ["he.png"], "expression": ["X1"]}).to_csv(
        tmp_path / "m.csv", index=False)
    spec = read_manifest(tmp_path / "m.csv")[0]
    assert spec.format == "xenium"
    s = as_spots(load_sample(spec))
    assert "array_row" in s.adata.obs and s.spot_diameter_um == 55.0 and s.mpp == 0.2125
    assert s.adata.X.sum() <= X.sum() and s.adata.X.sum() > 0  # cells inside the spot discs, summed
    assert abs(s.spot_px - 55.0 / 0.2125) < 1e-9


def test_xenium_missing_cell_table_columns(tmp_path):
    out, *_ = xenium_folder(tmp_path)
    df = pd.read_csv(out / "cells.csv.gz").drop(columns=["y_centroid"])
    df.to_csv(out / "cells.csv.gz", index=False)
    with pytest.raises(SpatialDataError, match=r"^X1: cells table \S+/cells.csv.gz lacks columns \['y_centroid'\]"):
        read_xenium(out)


# --------------------------------------------------------------------------- HEST / h5ad


def test_hest_sample_and_plain_h5ad(tmp_path):
    rng = np.random.default_rng(0)
    xy = rng.uniform(20, 180, size=(25, 2))
    a = ad.AnnData(X=rng.poisson(2.0, size=(25, 8)).astype(np.float32),
                   obs=pd.DataFrame({"array_row": np.arange(25) // 5, "array_col": np.arange(25) % 5 * 2},
                                    index=[f"b{i}" for i in range(25)]))
    a.obsm["spatial"] = xy
    (tmp_path / "st").mkdir()
    (tmp_path / "metadata").mkdir()
    a.write_h5ad(tmp_path / "st" / "TENX1.h5ad")
    (tmp_path / "metadata" / "TENX1.json").write_text(json.dumps(
        {"pixel_size_um_estimated": 0.27, "spot_diameter": 55.0, "st_technology": "Visium"}))
    image = tissue_image(tmp_path / "wsi.png", 200, 200)
    h = read_hest(tmp_path / "st" / "TENX1.h5ad", image=image, metadata=tmp_path / "metadata" / "TENX1.json")
    assert h.uns["source"]["mpp"] == 0.27 and h.uns["source"]["spot_diameter_um"] == 55.0
    np.testing.assert_allclose(h.obsm["spatial"], xy)
    g = read_spatial_h5ad(tmp_path / "st" / "TENX1.h5ad", image=image, mpp=0.5, spot_diameter_um=55.0)
    assert g.uns["source"]["format"] == "h5ad" and g.uns["source"]["mpp"] == 0.5
    # manifest: format detected from the st/ folder, metadata found beside it
    pd.DataFrame({"sample_id": ["T1"], "patient_id": ["P"], "image": ["wsi.png"],
                  "expression": ["st/TENX1.h5ad"]}).to_csv(tmp_path / "m.csv", index=False)
    s = load_sample(read_manifest(tmp_path / "m.csv")[0])
    assert s.spec.format == "hest" and s.mpp == 0.27 and s.spot_px == pytest.approx(55.0 / 0.27)
    small = tissue_image(tmp_path / "small.png", 100, 100)
    with pytest.raises(SpatialDataError, match=r"^TENX1 \(small.png\): .* lie outside"):
        read_hest(tmp_path / "st" / "TENX1.h5ad", image=small)


# --------------------------------------------------------------------------- HER2ST legacy ST


@needs_her2st
def test_her2st_section_join_coordinates_and_scale(caplog):
    with caplog.at_level(logging.WARNING):
        a = read_her2st(HER2ST / "C3_counts.tsv.gz", image=HER2ST / "C3_HE.jpg")
    assert "C3: 2 spots in the positions have no counts" in caplog.text
    assert a.n_obs == 180 and a.n_vars > 15000
    spots = pd.read_csv(HER2ST / "C3_spots.tsv", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots.x, spots.y)]
    s = spots.loc[a.obs_names]
    np.testing.assert_allclose(a.obsm["spatial"], s[["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(a.obs["array_row"], s["y"])  # y is the vertical array axis
    np.testing.assert_array_equal(a.obs["array_col"], s["x"])
    # ≈ 0.686 µm/px from the 200 µm pitch; 100 µm spots are ≈ 146 px
    assert a.uns["source"]["mpp"] == pytest.approx(0.686, abs=0.005)
    assert 100.0 / a.uns["source"]["mpp"] == pytest.approx(146, abs=1.5)
    # radius-1 array neighbours are the adjacent spots: at most 8, nearer than 2 pitches (the next ring;
    # spot centres jitter around the ideal grid in the published pixel positions)
    idx, mask = array_neighbors(a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy(), 1)
    assert mask.sum(1).max() == 8 and mask.sum(1).min() >= 1
    d = np.linalg.norm(a.obsm["spatial"][idx] - a.obsm["spatial"][:, None], axis=-1)[mask]
    pitch = 200.0 / a.uns["source"]["mpp"]
    assert d.max() < 1.75 * pitch and d.min() > 0.7 * pitch


@needs_her2st
def test_her2st_bad_inputs(tmp_path):
    counts = pd.read_csv(HER2ST / "C2_counts.tsv.gz", sep="\t", index_col=0, nrows=30).iloc[:, :50]
    spots = pd.read_csv(HER2ST / "C2_spots.tsv", sep="\t")
    spots.to_csv(tmp_path / "Z_spots.tsv", sep="\t", index=False)
    c = counts.copy()
    c.iloc[2, 3] = -1
    c.to_csv(tmp_path / "Z_counts.tsv.gz", sep="\t")
    with pytest.raises(SpatialDataError, match="^Z: counts contain negative values"):
        read_her2st(tmp_path / "Z_counts.tsv.gz")
    c = pd.concat([counts, counts.iloc[:1]])  # a spot twice
    c.to_csv(tmp_path / "Z_counts.tsv.gz", sep="\t")
    with pytest.raises(SpatialDataError, match=r"^Z: duplicated spots in the count matrix, e.g. \['10x21'\]"):
        read_her2st(tmp_path / "Z_counts.tsv.gz")
    counts.to_csv(tmp_path / "Z_counts.tsv.gz", sep="\t")
    spots.assign(pixel_x=spots.pixel_x * 4).to_csv(tmp_path / "Z_spots.tsv", sep="\t", index=False)
    with pytest.raises(SpatialDataError, match=r"^Z \(C2_HE.jpg\): \d+ of 30 positions lie outside"):
        read_her2st(tmp_path / "Z_counts.tsv.gz", image=HER2ST / "C2_HE.jpg")
    (tmp_path / "Z_spots.tsv").unlink()
    with pytest.raises(SpatialDataError, match="^Z: spots table not found"):
        read_her2st(tmp_path / "Z_counts.tsv.gz")


# --------------------------------------------------------------------------- manifest


@needs_her2st
def test_manifest_rows_paths_and_errors(tmp_path):
    out, image, _ = spaceranger_folder(tmp_path, name="A", mpp=0.5)
    shutil.copy(HER2ST / "C2_spots.tsv", tmp_path / "spots.tsv")
    m = pd.DataFrame({"sample_id": ["A", "C2"], "patient_id": ["p1", "p2"],
                      "image": [image.name, str((HER2ST / "C2_HE.jpg").resolve())],
                      "expression": ["A", str((HER2ST / "C2_counts.tsv.gz").resolve())],
                      "mpp": ["0.5", ""], "format": ["", "her2st"], "positions": ["", "spots.tsv"]})
    m.to_csv(tmp_path / "m.csv", index=False)
    specs = read_manifest(tmp_path / "m.csv")
    assert [s.format for s in specs] == ["spaceranger", "her2st"] and specs[0].mpp == 0.5 and specs[1].mpp is None
    assert specs[0].expression == tmp_path / "A" and specs[1].positions == tmp_path / "spots.tsv"
    a = load_sample(specs[0])
    assert a.mpp == 0.5 and a.spot_px == pytest.approx(110.0)
    assert detect_format(HER2ST / "C2_counts.tsv.gz") == "her2st"
    for change, msg in [({"sample_id": ["A", "A"]}, r"duplicated sample_id \['A'\]"),
                        ({"image": ["missing.png", image.name]}, r"^A: image not found"),
                        ({"mpp": ["-1", ""]}, "^A: mpp must be positive"),
                        ({"mpp": ["abc", ""]}, "^A: mpp 'abc' is not a number"),
                        ({"format": ["visium-hd", "her2st"]}, "^A: unknown format 'visium-hd'")]:
        m.assign(**change).to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(SpatialDataError, match=msg):
            read_manifest(tmp_path / "bad.csv")
    m.drop(columns=["patient_id"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(SpatialDataError, match=r"lacks columns \['patient_id'\]"):
        read_manifest(tmp_path / "bad.csv")
