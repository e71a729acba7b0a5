"""Grids, neighbour sets and pseudo-spot pooling."""
import anndata as ad
import numpy as np
import pytest

from deepspot.geometry.grid import GridSpec, make_grid, pool_cells
from deepspot.geometry.neighbors import array_neighbors, knn_neighbors, radius_neighbors


def test_hex_grid_spacing_in_microns():
    spec = GridSpec(55, 100, unit="um").in_pixels(0.5)  # 110 px spots, 200 px pitch
    assert spec.spot_diameter == pytest.approx(110) and spec.spacing == pytest.approx(200)
    g = make_grid(2000, 2000, spec)
    xy = g[["x", "y"]].to_numpy()
    d, _ = __import__("scipy.spatial", fromlist=["cKDTree"]).cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(d[:, 1], 200.0, rtol=1e-9)  # every spot's nearest neighbour is one pitch away
    assert ((g.array_row % 2) == (g.array_col % 2)).all()  # Visium parity
    assert (xy - 55 >= -1e-9).all() and (xy[:, 0] + 55 <= 2000).all() and (xy[:, 1] + 55 <= 2000).all()
    with pytest.raises(ValueError, match="--mpp"):
        GridSpec(55, 100, unit="um").in_pixels(None)


def test_hex_neighbors_are_the_four_diagonals():
    g = make_grid(3000, 3000, GridSpec(50, 100, unit="px"))
    idx, mask = array_neighbors(g.array_row.to_numpy(), g.array_col.to_numpy(), 1)
    rc = g[["array_row", "array_col"]].to_numpy()
    i = int(np.flatnonzero((g.array_row == 6) & (g.array_col == 10))[0])
    got = {tuple(rc[j]) for j in idx[i][mask[i]]}
    assert got == {(5, 9), (5, 11), (7, 9), (7, 11)}
    # corner spot (0,0) has one neighbour: (1,1)
    c = int(np.flatnonzero((g.array_row == 0) & (g.array_col == 0))[0])
    assert {tuple(rc[j]) for j in idx[c][mask[c]]} == {(1, 1)}
    # radius 2 in array coords: brute force agrees
    idx2, mask2 = array_neighbors(g.array_row.to_numpy(), g.array_col.to_numpy(), 2)
    for i in range(0, len(g), 37):
        brute = {j for j in range(len(g)) if j != i and np.abs(rc[j] - rc[i]).max() <= 2}
        assert set(idx2[i][mask2[i]].tolist()) == brute


def test_knn_and_radius_match_brute_force():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 100, size=(200, 2))
    D = np.linalg.norm(pts[:, None] - pts[None], axis=2)
    idx, mask = knn_neighbors(pts, 5)
    assert mask.all() and idx.shape == (200, 5)
    for i in range(200):
        assert set(idx[i]) == set(np.argsort(D[i])[1:6])
    idx, mask = radius_neighbors(pts, 12.0)
    for i in range(200):
        assert set(idx[i][mask[i]]) == set(np.flatnonzero((D[i] <= 12.0) & (np.arange(200) != i)))


def test_pool_cells_sums_counts_of_cells_in_each_disc():
    spec = GridSpec(40, 100, unit="px")
    cells_xy = np.array([[20, 20], [25, 30], [120, 20], [60, 60], [500, 500]], float)  # (x,y)
    X = np.arange(15, dtype=np.float32).reshape(5, 3)
    cells = ad.AnnData(X=X)
    cells.obsm["spatial"] = cells_xy
    spots, c2s = pool_cells(cells, 200, 200, spec)
    # spot centres at (20,20) and (120,20) (row 0) and (70, 106.6) (row 1): cells 0,1 -> first, 2 -> second
    assert spots.n_obs == 2
    np.testing.assert_array_equal(spots.X[0], X[0] + X[1])
    np.testing.assert_array_equal(spots.X[1], X[2])
    assert c2s.tolist() == [0, 0, 1, -1, -1]
    assert spots.obs.n_cells.tolist() == [2, 1]
    np.testing.assert_allclose(spots.obsm["spatial"], [[20, 20], [120, 20]])


def test_lattice_coords_recover_a_rotated_jittered_visium_array():
    """Positions alone (a 3° rotation, 3 % jitter, 40 % of the spots missing) give back Visium's array
    coordinates up to a shift, hence the same four diagonal neighbours; a square ST array is told apart."""
    from deepspot.geometry.neighbors import array_neighbors, lattice_coords

    rng = np.random.default_rng(0)
    r, c = np.meshgrid(np.arange(24), np.arange(50), indexing="ij")
    on = ((r + c) % 2 == 0) & (rng.random(r.shape) < 0.6)
    r, c = r[on], c[on]
    x, y = c * 50.0, r * 50.0 * np.sqrt(3)  # pitch 100 px: array_col steps 2 per spot along a row
    th = np.radians(3)
    xy = np.stack([x * np.cos(th) - y * np.sin(th), x * np.sin(th) + y * np.cos(th)], 1)
    xy += rng.normal(0, 3, xy.shape) + 400
    row, col, layout, pitch = lattice_coords(xy)
    assert layout == "hex" and abs(pitch - 100) < 1
    assert (row == r - r.min()).all() and (col == c - c.min()).all()
    i, m = array_neighbors(row, col)
    assert m.sum(1).max() == 4
    sq = np.stack(np.meshgrid(np.arange(9), np.arange(7)), -1).reshape(-1, 2) * 200.0
    assert lattice_coords(sq + rng.normal(0, 10, sq.shape))[2] == "square"
