"""Visium HD: Space Ranger's binned outputs read as spots; train and predict at 16 µm and 8 µm bins."""
import numpy as np
import pytest

from deepspot.io.spatial import SpatialDataError
from deepspot.io.visium_hd import bin_folder, read_visium_hd, visium_hd_geometry
from fixtures_cli import register_tiny_vit
from hd_fakes import visium_hd_outs


@pytest.fixture(scope="module")
def hd(tmp_path_factory):
    return visium_hd_outs(tmp_path_factory.mktemp("hd"))


@pytest.mark.parametrize("bin_um", [8, 16])
def test_read_visium_hd_bins(hd, bin_um):
    outs, image, info = hd
    a = read_visium_hd(outs, bin_um, image=image, sample="hd")
    want = info["counts"][bin_um]
    assert a.n_obs == len(want["X"]) and a.n_vars == len(info["genes"])
    np.testing.assert_array_equal(np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X), want["X"])
    np.testing.assert_array_equal(a.obs["array_row"].to_numpy(), want["rows"])
    side = want["side_px"]
    # bin centres in full-resolution px: (col + 0.5, row + 0.5) bin sides
    np.testing.assert_allclose(a.obsm["spatial"], np.c_[(want["cols"] + 0.5) * side, (want["rows"] + 0.5) * side])
    src = a.uns["source"]
    assert src["format"] == "visium_hd" and src["mpp"] == info["mpp"] and src["spot_diameter_um"] == bin_um
    assert a.obs_names[0].startswith(f"s_{bin_um:03d}um_")


def test_16um_bins_hold_the_sum_of_their_8um_bins(hd):
    outs, _, _ = hd
    a8, a16 = read_visium_hd(outs, 8), read_visium_hd(outs, 16)
    x8 = np.asarray(a8.X.todense())
    r, c = a8.obs["array_row"].to_numpy() // 2, a8.obs["array_col"].to_numpy() // 2
    for i in range(0, a16.n_obs, 7):
        rr, cc = a16.obs["array_row"].iloc[i], a16.obs["array_col"].iloc[i]
        np.testing.assert_array_equal(x8[(r == rr) & (c == cc)].sum(axis=0), np.asarray(a16.X.todense())[i])


def test_reader_errors_name_what_is_missing(hd, tmp_path):
    outs, _, _ = hd
    with pytest.raises(SpatialDataError, match="square_002um.*found square_008um, square_016um"):
        bin_folder(outs, 2)
    with pytest.raises(SpatialDataError, match="Space Ranger writes 2, 8, 16"):
        bin_folder(outs, 4)
    assert bin_folder(outs / "binned_outputs" / "square_016um") == outs / "binned_outputs" / "square_016um"


def test_geometry_in_um():
    g16, g8 = visium_hd_geometry(16), visium_hd_geometry(8)
    assert (g16.grid.spot_diameter, g16.grid.spacing, g16.grid.layout, g16.grid.unit) == (16, 16, "square", "um")
    assert (g16.n_sub, g16.neighbor_radius) == (2, 2)  # 8 µm sub-spots; neighbours within 32 µm
    assert (g8.n_sub, g8.neighbor_radius) == (1, 4)
    assert g16.grid.in_pixels(0.5).spot_diameter == 32


@pytest.mark.parametrize("bin_um", [16, 8])
def test_train_and_predict_on_bins(hd, tmp_path, bin_um):
    import deepspot as ds

    outs, image, info = hd
    enc = register_tiny_vit("tiny-vit-hd")
    a = read_visium_hd(outs, bin_um, image=image)
    geo = visium_hd_geometry(bin_um)
    m = ds.train(a, image=image, out=tmp_path / "m", encoder=enc, geometry=geo, context="spot_neighbors",
                 genes=info["genes"], max_epochs=2, progress=False, mpp=info["mpp"])
    assert m.config.geometry.grid.spot_diameter == bin_um and m.config.geometry.grid.layout == "square"
    assert set(m.scores) == {"deepspot", "ridge"}  # scored on the held-out side of the bins, next to ridge
    assert (tmp_path / "m" / "training_curves.png").exists()
    back = ds.load_model(tmp_path / "m")
    pred = back.predict_slide(image, mpp=info["mpp"], progress=False, tissue="none", num_workers=0)
    d = pred.uns["deepspot"]
    side = bin_um / info["mpp"]
    assert d["spot_diameter_px"] == pytest.approx(side) and d["spacing_px"] == pytest.approx(side)
    n = int(320 // side)
    assert pred.n_obs == n * n  # one prediction per bin of the virtual square grid
    assert np.isfinite(np.asarray(pred.X)).all() and pred.n_vars == len(info["genes"])


def test_train_cli_reads_hd_bins(hd, tmp_path, capsys):
    from fixtures_cli import run_cli

    outs, image, info = hd
    enc = register_tiny_vit("tiny-vit-hd")
    code, out, err = run_cli(capsys, "train", "--image", image, "--adata", outs, "--hd-bin", 16, "--encoder", enc,
                             "--context", "spot_neighbors", "--max-epochs", 2, "--out", tmp_path / "m",
                             "--no-progress")
    assert code == 0, err
    n = len(info["counts"][16]["X"])
    assert f"Visium HD: {n} in-tissue bins of 16 µm; 2x2 sub-spots, neighbours within 2 bins" in out
    import deepspot as ds

    g = ds.load_model(tmp_path / "m").config.geometry
    assert (g.grid.spot_diameter, g.grid.layout, g.n_sub, g.neighbor_radius) == (16, "square", 2, 2)
