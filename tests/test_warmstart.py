"""Training from a checkpoint (--init-from): what is kept, what is refused, what --freeze phi holds still."""
import numpy as np
import pytest
import torch

from deepspot.config import CheckpointError, EncoderRef, ModelConfig, Scaler, SpotGeometry
from deepspot.geometry.neighbors import array_neighbors
from deepspot.models.bags import Bags, predict_bags
from deepspot.models.checkpoint import save_checkpoint
from deepspot.training.recipe import SpotRecipe, build_spot_model, fit_spot_model
from deepspot.training.warmstart import read_init

GENES = ["a", "b", "c", "d"]


def _bags(n=120, d=10, g=4, seed=0):
    rng = np.random.default_rng(seed)
    spot = rng.normal(size=(n, d)).astype(np.float32)
    r, c = np.divmod(np.arange(n), 12)
    idx, m = array_neighbors(r, c, 1)
    y = (spot @ rng.normal(size=(d, g)) / 3 + 2).astype(np.float32)
    return Bags.from_numpy(spot, None, idx, m), y


def _checkpoint(path, encoder="enc-a", dim=10):
    bags, y = _bags()
    recipe = SpotRecipe(hidden=8, n_ensemble=2, context="spot_neighbors", max_epochs=3, patience=3)
    model, scaler, _ = fit_spot_model(recipe, bags, y, np.arange(90), np.arange(90, 120), progress=False)
    cfg = ModelConfig("deepspot", model.config(), EncoderRef(encoder, dim), GENES, SpotGeometry(), scaler,
                      training={"recipe": recipe.to_dict()})
    save_checkpoint(path, model, cfg)
    return model, scaler, bags, y


def test_same_genes_continue_whole_network_in_new_order(tmp_path):
    model, scaler, bags, _ = _checkpoint(tmp_path / "m")
    init = read_init(tmp_path / "m", "ENC-A", 10)
    order = ["c", "a", "d", "b"]
    assert init.continues(order)
    warm = init.build(order).eval()
    before = predict_bags(model, bags)[:, [GENES.index(g) for g in order]]
    np.testing.assert_allclose(predict_bags(warm, bags), before, rtol=1e-5, atol=1e-5)
    s = init.scaler(order, fitted=None)  # the checkpoint's scaler, rows in the new order
    np.testing.assert_array_equal(s.a, scaler.a[[2, 0, 3, 1]])
    # the recipe takes the checkpoint's architecture, whatever was asked
    r = init.recipe(SpotRecipe(hidden=256, n_ensemble=5, context="spot_subspot_neighbors"))
    assert (r.hidden, r.n_ensemble, r.context) == (8, 2, "spot_neighbors")


def test_other_genes_keep_phi_and_start_a_new_head(tmp_path):
    model, _, _, _ = _checkpoint(tmp_path / "m")
    init = read_init(tmp_path / "m", "enc-a", 10)
    for genes in (["a", "b", "x"], ["a", "b"]):  # a new gene; fewer genes
        assert not init.continues(genes)
        net = init.build(genes)
        assert torch.equal(net.phi.linear.weight, model.phi.linear.weight)
        assert net.rho.linear.weight.shape[-1] == len(genes)
        fitted = Scaler.fit(np.ones((3, len(genes))), "standard")
        assert init.scaler(genes, fitted) is fitted  # a new head: the scaler of the new data


def test_encoder_must_match_and_names_both(tmp_path):
    _checkpoint(tmp_path / "m")
    with pytest.raises(CheckpointError, match="trained on encoder 'enc-a' \\(10-d\\), this run uses 'uni' "
                                              "\\(1024-d\\)"):
        read_init(tmp_path / "m", "uni", 1024)
    with pytest.raises(CheckpointError, match="'enc-a' \\(10-d\\), this run uses 'enc-a' \\(12-d\\)"):
        read_init(tmp_path / "m", "enc-a", 12)
    with pytest.raises(ValueError, match="--freeze 'rho'"):
        read_init(tmp_path / "m", "enc-a", 10, freeze="rho")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        read_init(tmp_path / "nothing", "enc-a", 10)


def test_freeze_phi_trains_only_the_head_and_is_recorded(tmp_path):
    model, _, bags, y = _checkpoint(tmp_path / "m")
    bags2, y2 = _bags(seed=1)  # other data, other genes
    recipe = SpotRecipe(max_epochs=3, patience=3)
    for freeze in ("phi", "none"):
        init = read_init(tmp_path / "m", "enc-a", 10, freeze=freeze)
        genes = ["p", "q", "r", "s"]
        net, _, summary = fit_spot_model(init.recipe(recipe), bags2, y2, np.arange(90), np.arange(90, 120),
                                         progress=False, init=init, genes=genes)
        same_phi = torch.equal(net.phi.linear.weight, model.phi.linear.weight)
        assert same_phi == (freeze == "phi")
        assert summary["init_from"]["kept"] == "phi" and summary["init_from"]["freeze"] == freeze


def test_build_spot_model_is_untouched_without_init():
    m = build_spot_model(SpotRecipe(hidden=8, n_ensemble=2), 10, 3, np.zeros((20, 10), np.float32))
    assert all(p.requires_grad for p in m.parameters())


def test_cli_init_from_freeze_phi_and_encoder_refusal(tmp_path, capsys):
    from fixtures_cli import register_tiny_vit, run_cli
    from spatial_fakes import spaceranger_folder

    import deepspot as ds
    from deepspot.io.outputs import write_h5ad

    outs, image, info = spaceranger_folder(tmp_path, mpp=1.0)
    write_h5ad(ds.read.visium(outs, image=image), tmp_path / "s1.h5ad")
    enc = register_tiny_vit("tiny-vit-warm")
    common = ["--image", image, "--adata", tmp_path / "s1.h5ad", "--mpp", 1, "--context", "spot_neighbors",
              "--max-epochs", 2, "--no-progress"]
    code, _, err = run_cli(capsys, "train", *common, "--encoder", enc, "--genes", ",".join(info["genes"][:6]),
                           "--out", tmp_path / "base")
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", *common, "--encoder", enc, "--genes", ",".join(info["genes"][3:9]),
                           "--init-from", tmp_path / "base", "--freeze", "phi", "--out", tmp_path / "tuned")
    assert code == 0, err
    base, tuned = ds.load_model(tmp_path / "base"), ds.load_model(tmp_path / "tuned")
    assert torch.equal(base.network.phi.linear.weight, tuned.network.phi.linear.weight)
    assert tuned.genes == info["genes"][3:9]
    assert tuned.config.training["init_from"] == {"path": str(tmp_path / "base"), "encoder": enc, "kept": "phi",
                                                  "freeze": "phi", "genes_before": 6, "genes_after": 6}
    code, _, err = run_cli(capsys, "train", *common, "--encoder", "efficientnet-lite0", "--init-from",
                           tmp_path / "base", "--out", tmp_path / "other")
    assert code == 1 and f"trained on encoder '{enc}' (32-d), this run uses 'efficientnet-lite0' (1280-d)" in err
    assert not (tmp_path / "other").exists()


def test_converted_published_checkpoint_is_a_starting_point(tmp_path):
    """A checkpoint converted from the original code's pickle starts a run: its encoder name ('external' for a
    pickle that does not name one) must be given; same genes keep its outputs, other genes keep its phi."""
    from shared_data import reference_dir

    from deepspot.convert import convert_checkpoint

    ref = reference_dir("original-checkpoints")
    out = convert_checkpoint(ref / "deepspot_spot_neighbors.pkl", tmp_path / "conv", genes=ref / "genes.txt",
                             feature_dim=32)
    with pytest.raises(CheckpointError, match="trained on encoder 'external' \\(32-d\\)"):
        read_init(out, "efficientnet-lite0", 1280)
    init = read_init(out, "external", 32)
    genes = list(init.config.genes)
    inputs = dict(np.load(ref / "inputs.npz"))
    nb = inputs["spot"][inputs["neighbor_index"]]
    kw = dict(neighbors=torch.as_tensor(nb), neighbor_mask=torch.as_tensor(inputs["neighbor_mask"]))
    same = init.build(genes[::-1]).eval()
    with torch.no_grad():
        a = init.network.eval()(torch.as_tensor(inputs["spot"]), **kw).numpy()
        b = same(torch.as_tensor(inputs["spot"]), **kw).numpy()
    np.testing.assert_allclose(b, a[:, ::-1], atol=1e-5)
    other = init.build(genes[:3] + ["NEW"])
    assert torch.equal(other.phi.linear.weight, init.network.phi.linear.weight) and other.n_genes == 4
