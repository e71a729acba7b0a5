"""The original's layouts mapped onto our models: which kind a checkpoint holds (:func:`detect_kind`), its
stacked heads checked against the original's layer order, and the DeepSpot / DeepCell / DeepSpot2Cell module
(:func:`to_model`) with its target scaler."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from deepspot.config import MODEL_KINDS
from deepspot.models.convert.original import OriginalCheckpoint, _thaw
from deepspot.models.convert.unpickle import ConvertError, Stub


KINDS = tuple(k for k in MODEL_KINDS if not k.endswith("-pooled"))  # the original's three (the pooled one is ours)
_CONTEXT_BY_M = {1: "spot", 3: "spot_subspot_neighbors"}
_CELL_CONTEXT_BY_M = {1: "cell", 2: "cell_neighbors"}
# the original's head layouts (a trailing Dropout(0.1) after rho is allowed: a no-op at inference)
_LAYOUTS = {
    "deepspot": {"phi": ["Linear", "Dropout", "ReLU"], "rho": ["Dropout", "ReLU", "Linear"]},
    "deepspot2cell": {"phi": ["Linear", "Dropout", "ReLU", "Linear", "Dropout", "ReLU"],
                      "rho": ["Dropout", "Linear", "ReLU", "Linear", "ReLU"]},
}
_LAYOUTS["deepcell"] = _LAYOUTS["deepspot"]


def _layout_positions(layout: list[str]) -> list[int]:
    return [i for i, name in enumerate(layout) if name == "Linear"]


def _stacked_heads(state: dict[str, torch.Tensor], group: str, path: Path) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """The Linear layers of every head ``<group>.<i>.…``, stacked over heads: [(weight (E,out,in), bias (E,out))]
    in layer order, and their positions in the head's Sequential."""
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = re.fullmatch(rf"(?:model\.)?{group}\.(\d+)\.(.+)", k)
        if m:
            heads.setdefault(int(m.group(1)), {})[m.group(2)] = v
    if not heads or sorted(heads) != list(range(len(heads))):
        raise ConvertError(f"{path}: no '{group}' ensemble heads found (keys: {sorted(state)[:4]}...)")
    layouts = []
    for i in range(len(heads)):
        names = [n[: -len(".weight")] for n, t in heads[i].items() if n.endswith("weight") and t.ndim == 2]
        if not names or any(f"{n}.bias" not in heads[i] for n in names):
            raise ConvertError(f"{path}: head {group}.{i} holds no Linear layers with biases ({sorted(heads[i])})")
        pos = {n: int(re.findall(r"\d+", n)[-1]) if re.findall(r"\d+", n) else 0 for n in names}
        layouts.append(sorted(names, key=lambda n: pos[n]))
        if i and layouts[i] != layouts[0]:
            raise ConvertError(f"{path}: heads {group}.0 and {group}.{i} have different layers")
    first = layouts[0]
    layers = []
    for n in first:
        ws = [heads[i][f"{n}.weight"].float() for i in range(len(heads))]
        if len({tuple(w.shape) for w in ws}) != 1:
            raise ConvertError(f"{path}: '{group}' heads differ in shape")
        layers.append((torch.stack(ws), torch.stack([heads[i][f"{n}.bias"].float() for i in range(len(heads))])))
    positions = [int(re.findall(r"\d+", n)[-1]) if re.findall(r"\d+", n) else 0 for n in first]
    return layers, positions


def _check_layout(orig: OriginalCheckpoint, kind: str, group: str, role: str, positions: list[int]) -> None:
    """The head's layers must be the original ``kind``'s (pickled modules: layer classes; state dicts: where
    the Linear layers sit)."""
    want = _LAYOUTS[kind][role]
    seen = orig.layers.get(group)
    if seen is not None:
        names = [n for n, _ in seen]
        if role == "rho" and names[-1:] == ["Dropout"] and names[:-1] == want:
            names = names[:-1]
        if names != want:
            raise ConvertError(f"{orig.path}: {group} heads are {'-'.join(names)}, not the {kind} layout "
                               f"{'-'.join(want)}; this version of the original model is not supported")
    elif positions != _layout_positions(want):
        raise ConvertError(f"{orig.path}: {group} heads have Linear layers at positions {positions}, not the {kind} "
                           f"layout {'-'.join(want)}")


def _dropouts(orig: OriginalCheckpoint, kind: str, phi_group: str) -> tuple[float, float]:
    """(phi dropout, rho dropout): stored p_phi / p_rho, else p, else the layers' own, else the original default."""
    hp = orig.hparams
    default = {"deepspot": 0.3, "deepcell": 0.2, "deepspot2cell": 0.3}[kind]

    def from_layers(group):
        ps = [p for name, p in orig.layers.get(group, []) if name == "Dropout" and isinstance(p, (int, float))]
        return ps[0] if ps else None

    out = []
    for key, group in (("p_phi", phi_group), ("p_rho", "rho")):
        v = hp.get(key)
        v = hp.get("p") if v is None else v
        v = from_layers(group) if v is None else v
        out.append(float(default if v is None else v))
    return out[0], out[1]


def detect_kind(orig: OriginalCheckpoint, kind: str | None = None) -> str:
    """deepspot | deepcell | deepspot2cell: from the pickled class, else from the head names; ``kind`` (the
    user's --kind) must agree with what the file says."""
    if kind is not None and kind not in KINDS:
        raise ConvertError(f"unknown --kind {kind!r}; choose {', '.join(KINDS)}")
    cls = orig.class_name.rsplit(".", 1)[-1]
    by_class = {"DeepSpot": "deepspot", "DeepCell": "deepcell", "DeepSpot2Cell": "deepspot2cell"}.get(cls)
    groups = {g for g in ("phi_spot", "phi_cell") if any(re.match(rf"(?:model\.)?{g}\.\d+\.", k) for k in orig.state)}
    by_keys = {frozenset({"phi_spot"}): "deepspot", frozenset({"phi_cell"}): "deepcell",
               frozenset({"phi_spot", "phi_cell"}): "deepspot2cell"}.get(frozenset(groups))
    said = by_class or by_keys
    if kind is not None and said is not None and kind != said:
        what = f"class {orig.class_name}" if by_class else f"heads {', '.join(sorted(groups))}"
        raise ConvertError(f"{orig.path}: --kind {kind} but the file holds a {said} ({what})")
    kind = kind or said
    if kind is None:
        raise ConvertError(f"{orig.path}: cannot tell which model this is (class {orig.class_name}, no phi_spot / "
                           f"phi_cell heads); pass --kind {' | '.join(KINDS)}")
    return kind


def _check_hparams(orig: OriginalCheckpoint, **found) -> None:
    hp = orig.hparams
    for key, val in found.items():
        if isinstance(hp.get(key), int) and not isinstance(hp.get(key), bool) and hp[key] != val:
            raise ConvertError(f"{orig.path}: hyper-parameter {key}={hp[key]} but the weights say {val}")
    if "n_ensemble" in hp and hp.get("n_ensemble_phi") is None and isinstance(hp["n_ensemble"], int):
        if hp["n_ensemble"] != found.get("n_ensemble_phi", hp["n_ensemble"]):
            raise ConvertError(f"{orig.path}: hyper-parameter n_ensemble={hp['n_ensemble']} but the weights have "
                               f"{found['n_ensemble_phi']} phi heads")


def _one_linear(orig, kind, group, role):
    layers, pos = _stacked_heads(orig.state, group, orig.path)
    _check_layout(orig, kind, group, role, pos)
    return layers[0]


def _to_deepsets(orig: OriginalCheckpoint, kind: str, context: str | None):
    """DeepSpot or DeepCell: one Linear per phi head and per rho head."""
    from deepspot.models.deepcell import CELL_CONTEXTS, DeepCell
    from deepspot.models.deepsets import CONTEXTS, POOLS, DeepSpot

    phi_group = "phi_spot" if kind == "deepspot" else "phi_cell"
    phi_w, phi_b = _one_linear(orig, kind, phi_group, "phi")  # (E, h, d), (E, h)
    rho_w, rho_b = _one_linear(orig, kind, "rho", "rho")      # (E, G, m*h), (E, G)
    e_phi, hidden, in_dim = phi_w.shape
    e_rho, n_genes, rho_in = rho_w.shape
    if rho_in % hidden:
        raise ConvertError(f"{orig.path}: rho input {rho_in} is not a multiple of the phi width {hidden}")
    m = rho_in // hidden
    hp = orig.hparams
    if kind == "deepspot":
        stored, known, by_m = hp.get("spot_context") or hp.get("type_model") or hp.get("context"), CONTEXTS, _CONTEXT_BY_M
    else:
        stored, known, by_m = hp.get("cell_context") or hp.get("context"), CELL_CONTEXTS, _CELL_CONTEXT_BY_M
    ctx = context or stored or by_m.get(m)
    if ctx is None:
        raise ConvertError(f"{orig.path}: context mode not stored and ambiguous from shapes; pass --context "
                           f"spot_subspot or spot_neighbors")
    if ctx not in known:
        raise ConvertError(f"{orig.path}: unknown {kind} context mode {ctx!r}; choose {', '.join(known)}")
    if context and stored and context != stored:
        raise ConvertError(f"{orig.path}: --context {context} contradicts the stored mode {stored}")
    uses = 1 + ("subspot" in ctx) + ("neighbors" in ctx)
    if uses != m:
        raise ConvertError(f"{orig.path}: context {ctx!r} does not fit rho input {rho_in} = {m} x {hidden}")
    _check_hparams(orig, input_size=int(in_dim), output_size=int(n_genes), phi2rho_size=int(hidden),
                   n_ensemble_phi=int(e_phi), n_ensemble_rho=int(e_rho))
    p_phi, p_rho = _dropouts(orig, kind, phi_group)
    common = dict(hidden=int(hidden), n_ensemble=int(e_phi), dropout=p_phi, n_ensemble_rho=int(e_rho),
                  dropout_rho=p_rho)
    if kind == "deepspot":
        model = DeepSpot(int(in_dim), int(n_genes), context=ctx, **common)
    else:
        pool = str(hp.get("agg_neighbors") or "max")
        if pool not in POOLS:
            raise ConvertError(f"{orig.path}: neighbour aggregation {pool!r} is not one of {', '.join(POOLS)}")
        model = DeepCell(int(in_dim), int(n_genes), context=ctx, neighbor_pool=pool, **common)
    model.load_state_dict({
        "phi.linear.weight": phi_w.transpose(1, 2).contiguous(), "phi.linear.bias": phi_b,
        "rho.linear.weight": rho_w.transpose(1, 2).contiguous(), "rho.linear.bias": rho_b,
    }, strict=True)
    return model.eval(), {"context": ctx, "in_dim": int(in_dim), "n_genes": int(n_genes)}


def _to_spot2cell(orig: OriginalCheckpoint):
    """DeepSpot2Cell: two Linear layers per phi_cell / phi_spot / rho head."""
    from deepspot.models.spot2cell import DeepSpot2Cell

    ours, shapes = {}, {}
    for group, role, name in (("phi_cell", "phi", "phi_cell"), ("phi_spot", "phi", "phi_spot"), ("rho", "rho", "rho")):
        layers, pos = _stacked_heads(orig.state, group, orig.path)
        _check_layout(orig, "deepspot2cell", group, role, pos)
        for j, (w, b) in enumerate(layers, start=1):
            ours[f"{name}.linear{j}.weight"] = w.transpose(1, 2).contiguous()
            ours[f"{name}.linear{j}.bias"] = b
        shapes[group] = [tuple(w.shape) for w, _ in layers]
    (e_phi, d, d_in), (_, hidden, _) = shapes["phi_cell"]
    if shapes["phi_spot"] != shapes["phi_cell"]:
        raise ConvertError(f"{orig.path}: phi_spot heads {shapes['phi_spot']} differ from phi_cell heads "
                           f"{shapes['phi_cell']}")
    (e_rho, r_out, r_in), (_, n_genes, r2_in) = shapes["rho"]
    if d != d_in or r_in != 3 * hidden or r_out != r_in or r2_in != r_in:
        raise ConvertError(f"{orig.path}: layer shapes {shapes} are not a DeepSpot2Cell's (phi d->d->h, rho 3h->3h->G)")
    _check_hparams(orig, input_size=int(d), output_size=int(n_genes), phi2rho_size=int(hidden),
                   n_ensemble_phi=int(e_phi), n_ensemble_rho=int(e_rho))
    p_phi, p_rho = _dropouts(orig, "deepspot2cell", "phi_cell")
    model = DeepSpot2Cell(int(d), int(n_genes), hidden=int(hidden), n_ensemble=int(e_phi), dropout=p_phi,
                          n_ensemble_rho=int(e_rho), dropout_rho=p_rho)
    model.load_state_dict(ours, strict=True)
    return model.eval(), {"context": "cell_spot_neighbors", "in_dim": int(d), "n_genes": int(n_genes)}


def to_model(orig: OriginalCheckpoint, kind: str | None = None, context: str | None = None):
    """Our model holding the original's weights: (kind, model in eval mode, info dict)."""
    kind = detect_kind(orig, kind)
    if kind == "deepspot2cell":
        if context:
            raise ConvertError(f"{orig.path}: --context does not apply to a DeepSpot2Cell")
        model, info = _to_spot2cell(orig)
    else:
        model, info = _to_deepsets(orig, kind, context)
    return kind, model, info


def to_deepspot(orig: OriginalCheckpoint, context: str | None = None):
    """Our :class:`DeepSpot` / :class:`DeepCell` / DeepSpot2Cell holding the original's weights: (model, info)."""
    _, model, info = to_model(orig, None, context)
    return model, info


def _scaler_config(scaler) -> dict | None:
    """scikit-learn scaler placeholder -> {'kind', 'a', 'b'} with y_scaled = (y - a) / b."""
    if scaler is None:
        return None
    if not isinstance(scaler, Stub) or not isinstance(scaler.state, dict):
        raise ConvertError(f"unsupported target scaler {scaler!r}")
    kind = scaler._global.rsplit(".", 1)[-1]
    st = {k: _thaw(v) for k, v in scaler.state.items()}

    def arr(key, default):
        v = st.get(key)
        return default if v is None else np.asarray(v, dtype=np.float64)

    if kind == "StandardScaler":
        a, b = arr("mean_", 0.0), arr("scale_", 1.0)
    elif kind == "RobustScaler":
        a, b = arr("center_", 0.0), arr("scale_", 1.0)
    elif kind == "MaxAbsScaler":
        a, b = 0.0, arr("scale_", 1.0)
    elif kind == "MinMaxScaler":  # y_s = y * scale + min  ->  a = -min/scale, b = 1/scale
        s, mn = arr("scale_", 1.0), arr("min_", 0.0)
        a, b = -mn / s, 1.0 / s
    else:
        raise ConvertError(f"unsupported target scaler {kind}")
    n = max(np.size(a), np.size(b))
    a = np.broadcast_to(np.asarray(a, dtype=np.float64), (n,))
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), (n,))
    return {"kind": kind, "a": a.tolist(), "b": b.tolist()}

