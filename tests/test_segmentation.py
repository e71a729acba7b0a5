"""Cells from segmentations: GeoJSON polygons (HEST / CellViT layouts) and Xenium cell boundaries give each
cell's area centroid and the side of the square around its bounding box (the original's cell crop)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from deepspot.io.segmentation import polygon_geometry, read_geojson_cells, read_segmentation, read_xenium_boundaries
from deepspot.io.spatial import SpatialDataError, read_cell_table

SQUARE = [[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]  # closed, centroid (20, 20), side 20
RECT = [[100, 50], [140, 50], [140, 60], [100, 60]]  # open ring, centroid (120, 55), side 40
# an L: area centroid differs from the vertex mean and from the bounding-box centre
ELL = [[0, 0], [30, 0], [30, 10], [10, 10], [10, 30], [0, 30]]


def test_polygon_geometry_by_hand():
    rings = [np.array(SQUARE), np.array(RECT), np.array(ELL)]
    xy, side = polygon_geometry(np.concatenate(rings), np.cumsum([0] + [len(r) for r in rings[:-1]]))
    # the L: a 30x10 bar (centre 15,5; area 300) + a 10x20 bar (centre 5,20; area 200) -> (11, 11)
    np.testing.assert_allclose(xy, [[20, 20], [120, 55], [11, 11]], atol=1e-9)
    np.testing.assert_allclose(side, [20, 40, 30])
    flat = polygon_geometry(np.array([[0, 0], [4, 0], [8, 0]]), np.array([0]))  # no area: vertex mean
    np.testing.assert_allclose(flat[0], [[4, 0]])


def feature(geom_type, coords, **props):
    return {"type": "Feature", "geometry": {"type": geom_type, "coordinates": coords}, "properties": props}


def test_geojson_polygons_hest_layout(tmp_path):
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        feature("Polygon", [SQUARE], cell_id="a"), feature("Polygon", [RECT, [[110, 52], [112, 52], [112, 54]]],
                                                           cell_id="b")]}))
    seg = read_geojson_cells(path)
    assert list(seg.ids) == ["a", "b"]
    np.testing.assert_allclose(seg.xy, [[20, 20], [120, 55]])  # a hole does not move the crop
    np.testing.assert_allclose(seg.side, [20, 40])
    ids, xy = read_cell_table(path)  # predict-cells reads the same file
    assert list(ids) == ["a", "b"] and np.allclose(xy, seg.xy)


def test_geojson_multipolygons_cellvit_layout(tmp_path):
    path = tmp_path / "cell_detection.geojson"
    path.write_text(json.dumps([feature("MultiPolygon", [[SQUARE], [ELL]], classification={"name": "Neoplastic"}),
                                feature("MultiPolygon", [[RECT]])]))
    seg = read_segmentation(path)
    assert len(seg) == 3 and list(seg.ids) == ["cell_0", "cell_1", "cell_2"]  # no ids given: numbered
    np.testing.assert_allclose(seg.xy, [[20, 20], [11, 11], [120, 55]], atol=1e-9)
    np.testing.assert_allclose(seg.side, [20, 30, 40])
    bad = tmp_path / "points.geojson"
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [feature("Point", [1, 2])]}))
    with pytest.raises(SpatialDataError, match="not a Polygon"):
        read_geojson_cells(bad)


def test_xenium_cell_boundaries(tmp_path):
    rows = [("c1", x, y) for x, y in SQUARE] + [("c2", x, y) for x, y in RECT]
    df = pd.DataFrame(rows, columns=["cell_id", "vertex_x", "vertex_y"])
    path = tmp_path / "cell_boundaries.parquet"
    df.to_parquet(path)
    seg = read_segmentation(path, um_per_px=0.5)  # µm -> px: twice the numbers
    assert list(seg.ids) == ["c1", "c2"]
    np.testing.assert_allclose(seg.xy, [[40, 40], [240, 110]])
    np.testing.assert_allclose(seg.side, [40, 80])
    with pytest.raises(ValueError, match="µm per pixel"):
        read_xenium_boundaries(path, None)
    df.iloc[[0, 5, 1, 2, 3, 4, 6, 7, 8]].to_csv(tmp_path / "cell_boundaries.csv.gz", index=False)
    with pytest.raises(SpatialDataError, match="not consecutive"):
        read_xenium_boundaries(tmp_path / "cell_boundaries.csv.gz", 1.0)
    # the one Xenium table reader (io/xenium.py, as for the cells table): the file and the column named
    df.drop(columns=["vertex_y"]).to_csv(tmp_path / "no_y.csv", index=False)
    with pytest.raises(SpatialDataError, match=r"^cell boundaries \S+/no_y.csv lacks columns \['vertex_y'\]"):
        read_xenium_boundaries(tmp_path / "no_y.csv", 1.0)
    df.assign(vertex_x=["a"] + list(df.vertex_x[1:])).to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(SpatialDataError, match=r"text.csv has missing or non-numeric values in column 'vertex_x'"):
        read_xenium_boundaries(tmp_path / "text.csv", 1.0)


def test_centroid_table_has_no_boxes(tmp_path):
    path = tmp_path / "cells.csv"
    pd.DataFrame({"cell_id": ["x", "y"], "x": [1.0, 2.0], "y": [3.0, 4.0]}).to_csv(path, index=False)
    seg = read_segmentation(path)
    assert seg.side is None and list(seg.ids) == ["x", "y"]
