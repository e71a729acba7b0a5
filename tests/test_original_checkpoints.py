"""Every checkpoint written by the original code (shared reference ``original-checkpoints``) converts, loads
through ``ds.load_model`` and gives the original's own outputs on the fixed inputs (``raw`` and, through the
model's scaler, ``inverse``) to 1e-5.

The original predicts a spot on its own, with only its real neighbours; DeepSpot2Cell's ``context_padded``
is True for padding (the reverse of our ``neighbor_mask``).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import deepspot as ds
from deepspot.models.convert import ConvertError, convert_checkpoint, read_gene_list, read_original
from shared_data import reference_dir

SPOT_CELL_FILES = ["deepspot_spot.pkl", "deepspot_spot_subspot.pkl", "deepspot_spot_neighbors.pkl",
                   "deepspot_spot_subspot_neighbors.pkl", "deepcell_cell.pkl", "deepcell_cell_neighbors.pkl"]
SPOT2CELL_FILE = "deepspot2cell_final_model.pt"
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def ref():
    return reference_dir("original-checkpoints")


@pytest.fixture(scope="module")
def manifest(ref):
    return json.loads((ref / "MANIFEST.json").read_text())


def genes_for(ref, name: str):
    return ref / ("deepcell_genes.txt" if name.startswith("deepcell") else
                  "deepspot2cell_genes.txt" if name.startswith("deepspot2cell") else "genes.txt")


def test_every_reference_file_is_tested(manifest):
    assert sorted(manifest) == sorted(SPOT_CELL_FILES + [SPOT2CELL_FILE])


def original_inference(model, inputs, context: str) -> np.ndarray:
    """The original's inference: one spot (or cell) at a time, only its real neighbours; raw outputs."""
    rows = []
    for i in range(len(inputs["spot"])):
        real = inputs["neighbor_index"][i][inputs["neighbor_mask"][i]]
        rows.append(model.predict_features(
            inputs["spot"][i:i + 1],
            subspots=inputs["subspot"][i:i + 1] if "subspot" in context else None,
            neighbors=inputs["spot"][real][None] if "neighbors" in context else None, raw=True))
    return np.concatenate(rows)


@pytest.mark.parametrize("name", SPOT_CELL_FILES)
def test_spot_and_cell_models_give_the_originals_outputs(ref, manifest, name, tmp_path):
    entry = manifest[name]
    out = convert_checkpoint(ref / name, tmp_path / "ckpt", genes=genes_for(ref, name), feature_dim=32)
    m = ds.load_model(out)
    assert m.config.model == entry["kind"].lower() and m.config.context == entry["context"]
    assert m.config.encoder.name == "external" and m.config.encoder.dim == entry["input_size"]
    assert len(m.genes) == entry["genes"] and m.network.hidden == entry["phi2rho_size"]
    assert m.network.n_ensemble == m.network.n_ensemble_rho == entry["n_ensemble"]
    inputs = dict(np.load(ref / "inputs.npz"))
    want = np.load(ref / name.replace(".pkl", ".expected.npz"))
    np.testing.assert_allclose(original_inference(m, inputs, entry["context"]), want["raw"], **TOL)
    # all spots at once, neighbours padded and masked: the same numbers
    ctx = entry["context"]
    batched = dict(subspots=inputs["subspot"] if "subspot" in ctx else None,
                   neighbors=inputs["spot"][inputs["neighbor_index"]] if "neighbors" in ctx else None,
                   neighbor_mask=inputs["neighbor_mask"] if "neighbors" in ctx else None)
    np.testing.assert_allclose(m.predict_features(inputs["spot"], raw=True, **batched), want["raw"], **TOL)
    np.testing.assert_allclose(m.predict_features(inputs["spot"], **batched), want["inverse"], **TOL)
    assert not np.allclose(want["raw"], want["inverse"])  # the scaler is really applied


def spot2cell_inputs(ref):
    z = np.load(ref / "deepspot2cell.inputs.npz")
    ctx, padded = z["context"], z["context_padded"]
    return z["cells"], z["cell_mask"] > 0, ctx[:, 0], ctx[:, 1:], ~padded[:, 1:]


def test_deepspot2cell_gives_the_originals_spot_and_cell_outputs(ref, manifest, tmp_path):
    entry = manifest[SPOT2CELL_FILE]
    out = convert_checkpoint(ref / SPOT2CELL_FILE, tmp_path / "ckpt", genes=genes_for(ref, SPOT2CELL_FILE),
                             kind="deepspot2cell", feature_dim=32)
    m = ds.load_model(out)
    assert m.config.model == "deepspot2cell" and len(m.genes) == entry["genes"]
    assert (m.network.hidden, m.network.n_ensemble) == (entry["phi2rho_size"], entry["n_ensemble"])
    cells, cell_mask, spot, neighbors, neighbor_mask = spot2cell_inputs(ref)
    want = np.load(ref / "deepspot2cell.expected.npz")
    got = m.predict_features(spot, neighbors=neighbors, neighbor_mask=neighbor_mask, cells=cells, cell_mask=cell_mask)
    np.testing.assert_allclose(got, want["spot"], **TOL)
    # every real cell, spot after spot, with its spot's context
    np.testing.assert_array_equal(cell_mask.sum(1), want["n_cells"])
    rows = np.repeat(np.arange(len(spot)), cell_mask.sum(1))
    per_cell = m.predict_features(spot[rows], neighbors=neighbors[rows], neighbor_mask=neighbor_mask[rows],
                                  cells=cells[cell_mask])
    np.testing.assert_allclose(per_cell, want["cells"], **TOL)
    # the original's padding convention read the wrong way round changes the answer (the test can fail)
    flipped = m.predict_features(spot, neighbors=neighbors, neighbor_mask=~neighbor_mask, cells=cells,
                                 cell_mask=cell_mask)
    assert np.abs(flipped - want["spot"]).max() > 1e-3


def _state_dict(ref, name):
    """The tensors of a reference file, read without running its pickle."""
    return read_original(ref / name).state


def _keep_rho_heads(state, heads):
    out = {k: v for k, v in state.items() if not k.startswith("rho.")}
    for new, old in enumerate(heads):
        out.update({k.replace(f"rho.{old}.", f"rho.{new}.", 1): v for k, v in state.items()
                    if k.startswith(f"rho.{old}.")})
    return out


@pytest.mark.parametrize("name", ["deepspot_spot_subspot_neighbors.pkl", SPOT2CELL_FILE])
def test_unequal_phi_and_rho_ensembles(ref, name, tmp_path):
    """rho's output is the mean over its heads: a 3-phi/2-rho model (heads 0, 1) and a 3-phi/1-rho model (head 2),
    both cut from the reference file, must give 2·a + b = 3 × the original's output."""
    state = _state_dict(ref, name)
    kind, ctx = ("deepspot", "spot_subspot_neighbors") if name.startswith("deepspot_") else ("deepspot2cell", None)
    outs = []
    for heads in ([0, 1], [2]):
        src = tmp_path / f"rho{len(heads)}.pt"
        torch.save(_keep_rho_heads(state, heads), src)
        m = ds.load_model(convert_checkpoint(src, tmp_path / f"c{len(heads)}", kind=kind, context=ctx,
                                             genes=genes_for(ref, name), feature_dim=32))
        assert (m.network.n_ensemble, m.network.n_ensemble_rho) == (3, len(heads))
        if kind == "deepspot":
            inputs = dict(np.load(ref / "inputs.npz"))
            outs.append(m.predict_features(inputs["spot"], inputs["subspot"], inputs["spot"][inputs["neighbor_index"]],
                                           inputs["neighbor_mask"], raw=True))
            want = np.load(ref / name.replace(".pkl", ".expected.npz"))["raw"]
        else:
            cells, cell_mask, spot, nb, nb_mask = spot2cell_inputs(ref)
            outs.append(m.predict_features(spot, neighbors=nb, neighbor_mask=nb_mask, cells=cells,
                                           cell_mask=cell_mask))
            want = np.load(ref / "deepspot2cell.expected.npz")["spot"]
    np.testing.assert_allclose(2 * outs[0] + outs[1], 3 * want, atol=3e-5, rtol=0)


def test_separate_phi_and_rho_dropouts_are_read(ref, tmp_path):
    """A Lightning checkpoint of the same weights with p_phi / p_rho set: both kept (they matter in training)."""
    ckpt = {"state_dict": _state_dict(ref, SPOT2CELL_FILE),
            "hyper_parameters": {"input_size": 32, "output_size": 8, "phi2rho_size": 16, "p": 0.3, "p_phi": 0.1,
                                 "p_rho": 0.45, "n_ensemble": 3}}
    torch.save(ckpt, tmp_path / "d2c.ckpt")
    out = convert_checkpoint(tmp_path / "d2c.ckpt", tmp_path / "c", feature_dim=32)
    args = ds.load_model(out).config.model_args
    assert (args["dropout"], args["dropout_rho"]) == (0.1, 0.45)
    ckpt["hyper_parameters"]["phi2rho_size"] = 32
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(ConvertError, match="phi2rho_size=32 but the weights say 16"):
        convert_checkpoint(tmp_path / "bad.ckpt", tmp_path / "c2", feature_dim=32)


def test_original_gene_table_gives_the_predicted_genes_in_file_order(ref, tmp_path):
    table = ref / "info_highly_variable_genes.csv"
    with table.open() as fh:
        rows = list(csv.DictReader(fh))
    predicted = [r["gene_name"] for r in rows if r["isPredicted"] == "True"]
    assert len(predicted) < len(rows)  # the table lists candidates that are not predicted
    assert read_gene_list(table) == predicted
    out = convert_checkpoint(ref / "deepspot_spot.pkl", tmp_path / "c", genes=table, feature_dim=32)
    assert ds.load_model(out).genes == predicted
    assert read_gene_list(ref / "genes.txt") == (ref / "genes.txt").read_text().split()


def test_gene_count_mismatch_names_both_counts_and_the_file(ref, tmp_path):
    with pytest.raises(ConvertError, match=r"predicts 10 genes but the gene list .*genes\.txt has 12"):
        convert_checkpoint(ref / "deepcell_cell.pkl", tmp_path / "c", genes=ref / "genes.txt", feature_dim=32)
    with pytest.raises(ConvertError, match=r"predicts 10 genes but the gene list .*info_highly_variable_genes\.csv has 12"):
        convert_checkpoint(ref / "deepcell_cell.pkl", tmp_path / "c", genes=ref / "info_highly_variable_genes.csv",
                           feature_dim=32)
    assert not (tmp_path / "c").exists()


def test_kind_and_feature_dim_are_checked(ref, tmp_path):
    with pytest.raises(ConvertError, match="--kind deepcell but the file holds a deepspot2cell"):
        convert_checkpoint(ref / SPOT2CELL_FILE, tmp_path / "c", kind="deepcell", feature_dim=32)
    with pytest.raises(ConvertError, match="--kind deepspot but the file holds a deepcell"):
        convert_checkpoint(ref / "deepcell_cell.pkl", tmp_path / "c", kind="deepspot", feature_dim=32)
    with pytest.raises(ConvertError, match="takes 32-d features, not --feature-dim 64"):
        convert_checkpoint(ref / "deepspot_spot.pkl", tmp_path / "c", feature_dim=64)
    with pytest.raises(ConvertError, match="--feature-dim 32"):  # 32-d fits no registered encoder
        convert_checkpoint(ref / "deepspot_spot.pkl", tmp_path / "c")


def run_cli(args, capsys):
    from deepspot.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_converts_and_a_feature_dim_model_refuses_a_slide(ref, tmp_path, capsys):
    from PIL import Image

    code, out, err = run_cli(["convert-weights", ref / "deepcell_cell_neighbors.pkl", tmp_path / "dc",
                              "--genes", ref / "deepcell_genes.txt", "--feature-dim", "32"], capsys)
    assert code == 0, err
    m = ds.load_model(tmp_path / "dc")
    assert m.config.extra["converted_from"]["class"] == "deepspot.cell.model.DeepCell"
    code, _, err = run_cli(["convert-weights", ref / SPOT2CELL_FILE, "--out", tmp_path / "s2c", "--kind",
                            "deepspot2cell", "--feature-dim", "32"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["convert-weights", ref / "deepspot_spot.pkl", "--out", tmp_path / "sp",
                            "--feature-dim", "32"], capsys)
    assert code == 0, err
    img = tmp_path / "slide.png"
    Image.fromarray(np.full((256, 256, 3), 120, np.uint8)).save(img)
    code, _, err = run_cli(["predict", img, "--model", tmp_path / "sp", "--mpp", "0.5", "--out", tmp_path / "p"],
                           capsys)
    assert code == 1 and "Traceback" not in err
    assert "--feature-dim" in err and "predict_features" in err and "cannot predict from a slide" in err
    with pytest.raises(Exception, match="predict_features"):
        ds.load_model(tmp_path / "sp").predict_slide(img, mpp=0.5)
