"""The crop plan: one read per spot, spot crop + n×n sub-spot crops cut in memory."""
import numpy as np

from deepspot.features.tiles import make_crops, spot_boxes


def test_subspots_are_row_major_and_do_not_bleed():
    region = np.zeros((90, 90, 3), np.uint8)
    region[:30, 30:60] = 200  # top-middle square -> sub-spot index 1 (row 0, col 1)
    region[60:, :30] = 100    # bottom-left square -> sub-spot index 6 (row 2, col 0)
    crops = make_crops(region, 224, 3).numpy()
    assert crops.shape == (10, 224, 224, 3) and crops.dtype == np.uint8
    means = crops[1:].reshape(9, -1).mean(axis=1)
    np.testing.assert_allclose(means, [0, 200, 0, 0, 0, 0, 100, 0, 0])
    # the spot crop is the whole region resized: its mean is preserved (bilinear, area-weighted)
    assert abs(crops[0].mean() - region.mean()) < 2.0


def test_spot_only_and_uneven_sides():
    region = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(make_crops(region, 224, 0)[0].numpy(), region)  # no resampling needed
    assert make_crops(region[:100, :100], 64, 4).shape == (17, 64, 64, 3)  # 100 px split 4 ways


def test_spot_boxes_are_centred():
    boxes = spot_boxes(np.array([[100.0, 50.0], [10.4, 10.6]]), 20)
    np.testing.assert_array_equal(boxes, [[90, 40, 20, 20], [0, 1, 20, 20]])
