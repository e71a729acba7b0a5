"""Augmented views of crops (dihedral, HED stain jitter), training on them, test-time averaging."""
import numpy as np
import pytest
import torch
from PIL import Image

from deepspot.config import GridSpec, ModelConfig, SpotGeometry
from deepspot.features.extract import SpotCropDataset, extract_features
from deepspot.features.views import N_VIEWS, dihedral, hed_jitter, view_crops
from deepspot.models.bags import Bags, iter_predictions
from deepspot.models.deepsets import DeepSpot
from deepspot.training.augment import augment, augmented_rows, views_of


def test_the_eight_dihedral_views_are_distinct_and_form_the_group():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    views = [dihedral(img, v) for v in range(N_VIEWS)]
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(views[1], np.rot90(img, 1, axes=(0, 1)))
    assert np.array_equal(views[4], img[:, ::-1])
    t = torch.from_numpy(img)[None, None]  # (B, C, H, W, 3)
    assert all(np.array_equal(dihedral(t, v)[0, 0].numpy(), views[v]) for v in range(N_VIEWS))
    with pytest.raises(ValueError, match="0..7"):
        dihedral(img, 8)


def test_hed_jitter_is_seeded_per_spot_and_grows_with_sigma():
    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.integers(60, 230, size=(3, 2, 16, 16, 3), dtype=np.uint8))
    a = view_crops(crops, 0, 0.05, seed=1)
    assert a.shape == crops.shape and a.dtype == torch.uint8 and not torch.equal(a, crops)
    # the same spot gets the same jitter whatever batch it is in; another seed another jitter
    assert torch.equal(a[1:], view_crops(crops[1:], 0, 0.05, seed=1, start=1))
    assert not torch.equal(view_crops(crops, 0, 0.05, seed=2), a)
    assert torch.equal(view_crops(crops, 0, 0.0), crops)  # no jitter asked: the crops untouched
    one = crops.numpy()[0, 0]
    change = {s: np.mean([np.abs(hed_jitter(one, np.random.default_rng(i), s).astype(int) - one).mean()
                          for i in range(5)]) for s in (0.01, 0.05)}
    assert change[0.01] < change[0.05]


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from fixtures_cli import register_tiny_vit

    name = register_tiny_vit("test-tta-vit")
    from deepspot.features.encoders import load_encoder

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tta") / "slide.png"
    Image.fromarray(rng.integers(0, 255, (160, 200, 3), dtype=np.uint8)).save(path)
    return path, load_encoder(name)


def test_a_view_encodes_the_turned_crops(slide):
    path, enc = slide
    centers = np.array([[50.0, 50.0], [100.0, 70.0], [150.0, 100.0]])
    ds = SpotCropDataset(path, 1.0, centers, 40.0, enc.input_size, 2)
    for v in (0, 3, 6):
        f = extract_features(path, centers, 40.0, enc, n_sub=2, mpp=1.0, progress=False, view=v)
        for i in range(len(centers)):
            crops = dihedral(ds.crops(i), v)  # (C, H, W, 3): the spot crop and its 4 sub-spot crops
            direct = enc.encode(crops).numpy()
            assert np.allclose(f.spot[i], direct[0], atol=1e-4) and np.allclose(f.subspot[i], direct[1:], atol=1e-4)


def test_augmentation_keeps_crops_and_labels_aligned(slide):
    path, enc = slide
    rng = np.random.default_rng(1)
    centers = rng.uniform(30, 130, size=(6, 2))
    idx = np.array([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    mask = np.ones_like(idx, bool)

    def view_bags(v, sigma):
        f = extract_features(path, centers, 40.0, enc, n_sub=0, mpp=1.0, progress=False, view=v, stain_sigma=sigma,
                             view_seed=7)
        return Bags.from_numpy(f.spot, None, idx, mask)

    plain = view_bags(0, 0.0)
    y = rng.normal(size=(6, 3)).astype(np.float32)
    train = np.array([0, 2, 3, 5])
    copies = views_of(4, 0.0)
    bags, ys, rows = augment(plain, y, train, copies, view_bags)
    assert len(bags) == 6 * 4 and ys.shape == (24, 3)
    assert np.array_equal(rows, np.concatenate([train + k * 6 for k in range(4)]))
    for k, (v, s) in enumerate(copies):
        block = slice(k * 6, (k + 1) * 6)
        assert np.allclose(bags.spot[block].numpy(), view_bags(v, s).spot.numpy())  # the view's own crops
        assert np.array_equal(ys[block], y)  # the spot's own labels
        assert np.array_equal(bags.neighbor_idx[block].numpy(), idx + k * 6)  # neighbours in the same view
    # with stain jitter every training copy is jittered; the plain block stays for validation only
    copies = views_of(2, 0.05)
    bags, ys, rows = augment(plain, y, train, copies, view_bags)
    assert len(bags) == 18 and np.array_equal(rows, np.concatenate([train + 6, train + 12]))
    assert not np.allclose(bags.spot[6:12].numpy(), plain.spot.numpy())
    assert np.array_equal(augmented_rows(train, 6, [(0, 0.0)]), train)


def test_tta_prediction_is_the_mean_of_the_eight_single_view_predictions(slide, tmp_path):
    from deepspot.inference.predict import plan_slide, predict_plan

    path, enc = slide
    torch.manual_seed(0)
    geometry = SpotGeometry(GridSpec(40.0, 50.0, unit="um"), n_sub=2, neighbor_radius=1)
    model = DeepSpot(enc.dim, 4, hidden=8, n_ensemble=3, context="spot_subspot_neighbors").eval()
    config = ModelConfig.from_dict({"model": "deepspot", "model_args": model.config(),
                                    "encoder": {"name": enc.name, "dim": enc.dim}, "genes": list("ABCD"),
                                    "geometry": geometry.to_dict(), "scaler": None})
    plan = plan_slide(path, geometry, mpp=1.0, tissue="none")
    tta = predict_plan(plan, model, config, enc, mpp=1.0, progress=False, tta=True, cache_dir=tmp_path)
    centers = plan.grid[["x", "y"]].to_numpy()
    nidx, nmask = plan.neighbors()
    singles = []
    for v in range(N_VIEWS):
        f = extract_features(path, centers, plan.spec.spot_diameter, enc, n_sub=2, mpp=1.0, progress=False, view=v)
        singles.append(np.concatenate([p for _, p in iter_predictions(model, f, nidx, nmask)]))
    assert np.allclose(tta, np.mean(singles, axis=0), atol=1e-5)
    assert not np.allclose(singles[0], singles[5], atol=1e-4)  # the views differ, so the mean is not trivial
    again = predict_plan(plan, model, config, enc, mpp=1.0, progress=False, tta=True, cache_dir=tmp_path)
    assert np.allclose(again, tta)  # the eight per-view stores are reused
    assert len(list(tmp_path.glob("*.zarr"))) == N_VIEWS
