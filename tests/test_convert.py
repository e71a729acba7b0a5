import importlib
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from deepspot.models.convert import ConvertError, convert_deepspot, load_restricted, read_gene_list, read_original
from deepspot.models.checkpoint import load_checkpoint

# The four published context modes are checked against files the original code wrote, in
# tests/test_original_checkpoints.py. This stand-in covers what those files do not: a malicious payload
# inside a pickled module, the plain-Sequential layout with ``type_model``, bare state dicts whose shapes
# leave the context open, MinMax scalers and encoder inference by feature size.
# A stand-in for the original package, written as real Python modules so that torch.save pickles
# references to its classes (as the published files do). Converted with the alias "dsorig" -> "deepspot",
# i.e. the converter sees "deepspot.spot.model.DeepSpot" etc., a module that does not exist here.
ORIG_MODEL = '''
import lightning as L
import torch
from torch import nn
from .loss import loss_mse_function


class Phi(nn.Module):
    def __init__(self, i, o, p):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(i, o), nn.Dropout(p=p), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.model(x)


class Rho(nn.Module):
    def __init__(self, i, o, p):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=p), nn.ReLU(inplace=True), nn.Linear(i, o), nn.Dropout(p=0.1))

    def forward(self, x):
        return self.model(x)


MULT = {"spot": 1, "spot_subspot": 2, "spot_neighbors": 2, "spot_subspot_neighbors": 3}


class DeepSpot(L.LightningModule):
    """Layout of the published Lightning module (phi_spot / rho ModuleLists of wrapped Sequentials)."""

    def __init__(self, input_size, output_size, loss_func="mse", p=0.3, n_ensemble=10, phi2rho_size=512,
                 scaler=None, spot_context="spot_subspot_neighbors"):
        super().__init__()
        self.save_hyperparameters()
        self.scaler = scaler
        self.loss_func = loss_mse_function
        self.training_loss = [0.5, 0.25]
        self.phi_spot = nn.ModuleList([Phi(input_size, phi2rho_size, p) for _ in range(n_ensemble)])
        self.rho = nn.ModuleList([Rho(phi2rho_size * MULT[spot_context], output_size, p) for _ in range(n_ensemble)])
        self._forward_fn = self._forward_any

    def _forward_any(self, x):
        return x


class PlainDeepSpot(nn.Module):
    """The simpler layout: Sequentials directly in the ModuleLists, context stored as type_model."""

    def __init__(self, input_size, output_size, n_ensemble, phi2rho_size, type_model, dropout=0.3):
        super().__init__()
        self.input_size, self.output_size, self.type_model = input_size, output_size, type_model
        self.phi_spot = nn.ModuleList([nn.Sequential(nn.Linear(input_size, phi2rho_size), nn.Dropout(dropout),
                                                     nn.ReLU()) for _ in range(n_ensemble)])
        self.rho = nn.ModuleList([nn.Sequential(nn.Dropout(dropout), nn.ReLU(),
                                                nn.Linear(phi2rho_size * MULT[type_model], output_size),
                                                nn.Dropout(0.1)) for _ in range(n_ensemble)])
'''
ORIG_LOSS = '''
import torch


def loss_mse_function(pred, target):
    return torch.nn.functional.mse_loss(pred, target)
'''
ALIASES = {"dsorig": "deepspot"}


@pytest.fixture(scope="module")
def orig(tmp_path_factory):
    root = tmp_path_factory.mktemp("origpkg")
    pkg = root / "dsorig" / "spot"
    pkg.mkdir(parents=True)
    (root / "dsorig" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .model import DeepSpot, PlainDeepSpot\n")
    (pkg / "model.py").write_text(textwrap.dedent(ORIG_MODEL))
    (pkg / "loss.py").write_text(textwrap.dedent(ORIG_LOSS))
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("dsorig.spot.model")
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "dsorig" or m.startswith("dsorig.")]:
            del sys.modules[name]


def original_forward(m, ctx, spot, subspots, neighbors):
    """The published forward math: median over phi heads, sum over sub-spots, max over neighbours,
    concatenation, mean over rho heads."""
    def phi(x):
        return torch.stack([head(x) for head in m.phi_spot], dim=0).median(dim=0).values

    parts = [phi(spot)]
    if "subspot" in ctx:
        parts.append(phi(subspots).sum(dim=1))
    if "neighbors" in ctx:
        parts.append(phi(neighbors).max(dim=1).values)
    z = torch.cat(parts, dim=-1)
    return torch.stack([head(z) for head in m.rho], dim=0).mean(dim=0)


def _inputs(d, seed=0, b=5, s=9, k=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, s, d, generator=g), torch.randn(b, k, d, generator=g)


def _ours_forward(model, spot, sub, nb):
    with torch.no_grad():
        return model(spot, subspots=sub, neighbors=nb)


def test_encoder_must_be_named_when_dim_is_ambiguous(orig, tmp_path):
    torch.manual_seed(3)
    for d, hint in ((16, "NAME"), (1024, "uni")):  # 16-d fits no encoder; 1024-d fits several
        m = orig.DeepSpot(d, 3, n_ensemble=2, phi2rho_size=8, spot_context="spot").eval()
        src = tmp_path / f"m{d}.pkl"
        torch.save(m, src)
        with pytest.raises(ConvertError, match=f"say which encoder.*{hint}"):
            convert_deepspot(src, tmp_path / "ckpt", genes=list("abc"), module_aliases=ALIASES)
    out = convert_deepspot(src, tmp_path / "ckpt", genes=list("abc"), encoder="uni", module_aliases=ALIASES)
    assert json.loads((out / "config.json").read_text())["encoder"] == {"name": "uni", "dim": 1024}


def test_plain_layout_and_type_model(orig, tmp_path):
    torch.manual_seed(5)
    m = orig.PlainDeepSpot(1536, 4, n_ensemble=3, phi2rho_size=16, type_model="spot_neighbors").eval()
    src = tmp_path / "plain.pt"
    torch.save(m, src)
    o = read_original(src, module_aliases=ALIASES)
    assert o.hparams["type_model"] == "spot_neighbors"
    out = convert_deepspot(src, tmp_path / "ckpt", genes=["a", "b", "c", "d"], module_aliases=ALIASES)
    model, cfg = load_checkpoint(out)
    assert cfg.encoder.name == "hoptimus0" and cfg.context == "spot_neighbors"
    spot, sub, nb = _inputs(1536, b=3)
    with torch.no_grad():
        want = original_forward(m, "spot_neighbors", spot, sub, nb)
    torch.testing.assert_close(_ours_forward(model, spot, None, nb), want, atol=1e-5, rtol=1e-5)


def test_state_dict_needs_context_when_ambiguous(orig, tmp_path):
    torch.manual_seed(6)
    m = orig.PlainDeepSpot(768, 3, n_ensemble=2, phi2rho_size=8, type_model="spot_subspot").eval()
    src = tmp_path / "sd.pt"
    torch.save(m.state_dict(), src)
    with pytest.raises(ConvertError, match="--context"):
        convert_deepspot(src, tmp_path / "c1", genes=["x", "y", "z"])
    with pytest.raises(ConvertError, match="does not fit"):
        convert_deepspot(src, tmp_path / "c2", genes=["x", "y", "z"], context="spot_subspot_neighbors")
    out = convert_deepspot(src, tmp_path / "c3", genes=["x", "y", "z"], context="spot_subspot")
    model, _ = load_checkpoint(out)
    spot, sub, nb = _inputs(768)
    with torch.no_grad():
        want = original_forward(m, "spot_subspot", spot, sub, nb)
    torch.testing.assert_close(_ours_forward(model, spot, sub, None), want, atol=1e-5, rtol=1e-5)


def test_scaler_and_gene_checks(orig, tmp_path):
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    from deepspot.config import invert_scaler

    rng = np.random.default_rng(0)
    y = rng.gamma(2.0, size=(50, 5))
    for scaler in (StandardScaler().fit(y), MinMaxScaler().fit(y)):
        m = orig.DeepSpot(768, 5, n_ensemble=2, phi2rho_size=8, scaler=scaler, spot_context="spot").eval()
        src = tmp_path / "s.pkl"
        torch.save(m, src)
        out = convert_deepspot(src, tmp_path / "ck", genes=list("abcde"), module_aliases=ALIASES)
        cfg = json.loads((out / "config.json").read_text())
        ys = scaler.transform(y)
        np.testing.assert_allclose(invert_scaler(ys.astype(np.float32), cfg["scaler"]), y, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConvertError, match="5 genes but the gene list given has 2"):
        convert_deepspot(src, tmp_path / "x", genes=["a", "b"], module_aliases=ALIASES)
    with pytest.raises(ConvertError, match="encoder 'uni' gives 1024-d"):
        convert_deepspot(src, tmp_path / "x", genes=list("abcde"), encoder="uni", module_aliases=ALIASES)
    out = convert_deepspot(src, tmp_path / "nog", module_aliases=ALIASES)  # no genes: placeholders + flag
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["genes"][0] == "gene_0" and cfg["converted_from"]["genes_are_placeholders"] is True


def test_gene_list_formats(tmp_path):
    (tmp_path / "g.csv").write_text("gene,mean\nA,1\nB,2\n")
    (tmp_path / "g.json").write_text(json.dumps(["A", "B"]))
    (tmp_path / "g.txt").write_text("A\n\nB\n")
    (tmp_path / "idx.csv").write_text(",gene_name,mean\n0,A,1\n1,B,2\n")  # pandas' index column first
    (tmp_path / "table.tsv").write_text("gene_name\tisPredicted\nX\tFalse\nA\tTrue\nB\t1\n")  # the original's table
    (tmp_path / "noext").write_text("gene_name,isPredicted\nB,True\nA,True\n")  # detected from the content
    for f in ("g.csv", "g.json", "g.txt", "idx.csv", "table.tsv"):
        assert read_gene_list(tmp_path / f) == ["A", "B"], f
    assert read_gene_list(tmp_path / "noext") == ["B", "A"]
    (tmp_path / "bad.csv").write_text("gene_name,isPredicted\nA,maybe\n")
    with pytest.raises(ConvertError, match="bad.csv: line 2: isPredicted is 'maybe'"):
        read_gene_list(tmp_path / "bad.csv")


# ---------------------------------------------------------------- safety


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_reduce_is_refused_and_not_run(orig, tmp_path):
    marker = tmp_path / "pwned"
    m = orig.DeepSpot(768, 3, n_ensemble=2, phi2rho_size=8, spot_context="spot")
    m.payload = Evil(marker)  # hides in the module's __dict__, as a tampered download would
    src = tmp_path / "evil.pkl"
    torch.save(m, src)
    with pytest.raises(ConvertError) as ei:
        convert_deepspot(src, tmp_path / "out", genes=list("abc"), module_aliases=ALIASES)
    assert "system" in str(ei.value) and "refusing" in str(ei.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()

    src2 = tmp_path / "evil2.pkl"
    torch.save({"x": EvalEvil()}, src2)
    with pytest.raises(ConvertError, match="builtins.eval"):
        load_restricted(src2)


def test_unknown_class_is_refused_without_alias(orig, tmp_path):
    m = orig.DeepSpot(768, 3, n_ensemble=2, phi2rho_size=8, spot_context="spot")
    src = tmp_path / "m.pkl"
    torch.save(m, src)
    with pytest.raises(ConvertError, match="dsorig.spot.model.DeepSpot"):
        read_original(src)


def test_not_a_torch_archive(tmp_path):
    f = tmp_path / "x.pkl"
    f.write_bytes(b"not a zip")
    with pytest.raises(ConvertError, match="not a torch zip archive"):
        read_original(f)


def test_cli_refuses_malicious_pickle_with_one_line(orig, tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    m = orig.DeepSpot(768, 3, n_ensemble=2, phi2rho_size=8, spot_context="spot")
    m.payload = Evil(marker)
    src = tmp_path / "evil.pkl"
    torch.save(m, src)
    r = subprocess.run([sys.executable, "-m", "deepspot", "convert-weights", str(src), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "evil.pkl" in r.stderr and "refusing" in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- DeepSpot2Cell pickled whole

D2C_MODEL = '''
from torch import nn


def _phi(i, h, p):
    return nn.Sequential(nn.Linear(i, i), nn.Dropout(p), nn.ReLU(inplace=True), nn.Linear(i, h), nn.Dropout(p),
                         nn.ReLU(inplace=True))


class Phi(nn.Module):
    def __init__(self, i, h, p):
        super().__init__()
        self.model = _phi(i, h, p)


class Rho(nn.Module):
    def __init__(self, i, o, p):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p), nn.Linear(i, i), nn.ReLU(inplace=True), nn.Linear(i, o),
                                   nn.ReLU(inplace=True), nn.Dropout(0.1))


class DeepSpot2Cell(nn.Module):
    """The module layout (class path deepspot2cell.model.DeepSpot2Cell) with phi_spot, phi_cell and rho heads."""

    def __init__(self, input_size, output_size, phi2rho_size, n_ensemble_phi, n_ensemble_rho, p_phi, p_rho):
        super().__init__()
        self.p_phi, self.p_rho, self.n_ensemble_phi, self.n_ensemble_rho = p_phi, p_rho, n_ensemble_phi, n_ensemble_rho
        self.phi_spot = nn.ModuleList([Phi(input_size, phi2rho_size, p_phi) for _ in range(n_ensemble_phi)])
        self.phi_cell = nn.ModuleList([Phi(input_size, phi2rho_size, p_phi) for _ in range(n_ensemble_phi)])
        self.rho = nn.ModuleList([Rho(3 * phi2rho_size, output_size, p_rho) for _ in range(n_ensemble_rho)])
'''


def test_whole_pickled_deepspot2cell_with_the_reference_weights(tmp_path):
    """A DeepSpot2Cell saved whole (torch.save(model)) is read like the state dict: the reference file's weights
    in that layout give the reference outputs; a head with another layout is refused."""
    import deepspot as ds
    from shared_data import reference_dir

    ref = reference_dir("original-checkpoints")
    root = tmp_path / "pkg"
    (root / "d2corig").mkdir(parents=True)
    (root / "d2corig" / "__init__.py").write_text("from .model import DeepSpot2Cell\n")
    (root / "d2corig" / "model.py").write_text(textwrap.dedent(D2C_MODEL))
    sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module("d2corig.model")
        m = mod.DeepSpot2Cell(32, 8, 16, 3, 3, 0.25, 0.35)
        m.load_state_dict(read_original(ref / "deepspot2cell_final_model.pt").state)
        torch.save(m, tmp_path / "whole.pkl")
        m.rho[0].model[2] = torch.nn.Tanh()  # not the published layout
        torch.save(m, tmp_path / "other.pkl")
    finally:
        sys.path.remove(str(root))
        for name in [k for k in sys.modules if k.split(".")[0] == "d2corig"]:
            del sys.modules[name]
    aliases = {"d2corig": "deepspot2cell"}
    out = convert_deepspot(tmp_path / "whole.pkl", tmp_path / "ck", genes=ref / "deepspot2cell_genes.txt",
                           feature_dim=32, module_aliases=aliases)
    model = ds.load_model(out)
    assert model.config.extra["converted_from"]["class"] == "deepspot2cell.model.DeepSpot2Cell"
    assert (model.network.dropout_p, model.network.dropout_rho) == (0.25, 0.35)
    z = np.load(ref / "deepspot2cell.inputs.npz")
    got = model.predict_features(z["context"][:, 0], neighbors=z["context"][:, 1:],
                                 neighbor_mask=~z["context_padded"][:, 1:], cells=z["cells"], cell_mask=z["cell_mask"] > 0)
    np.testing.assert_allclose(got, np.load(ref / "deepspot2cell.expected.npz")["spot"], atol=1e-5, rtol=0)
    with pytest.raises(ConvertError, match="rho heads are Dropout-Linear-Tanh-Linear-ReLU-Dropout, not the deepspot2cell layout"):
        convert_deepspot(tmp_path / "other.pkl", tmp_path / "ck2", feature_dim=32, module_aliases=aliases)


def test_the_old_import_path_still_works():
    import deepspot.convert as old
    import deepspot.models.convert as new

    assert set(new.__all__) <= set(dir(old))
    assert old.convert_checkpoint is new.convert_checkpoint and old.ConvertError is new.ConvertError
