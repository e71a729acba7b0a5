"""A published checkpoint read without executing it: the object tree of :mod:`.unpickle` turned into
weights, hyper-parameters, the target scaler and the head layers (:class:`OriginalCheckpoint`)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from deepspot.models.convert.unpickle import ConvertError, MethodRef, Stub, _array_from_stub, _ArrayStub, load_restricted


def _thaw(x, seen=None):
    """Turn numpy placeholders into arrays and AttributeDicts into dicts (recursively, cycle-safe)."""
    seen = {} if seen is None else seen
    if id(x) in seen:
        return seen[id(x)]
    if isinstance(x, _ArrayStub):
        out = _array_from_stub(x)
    elif isinstance(x, Stub) and x._global.endswith(".AttributeDict"):
        out = {}
        seen[id(x)] = out
        out.update({k: _thaw(v, seen) for k, v in dict.items(x)})
        if isinstance(x.state, dict):
            out.update({k: _thaw(v, seen) for k, v in x.state.items() if k not in out})
    elif isinstance(x, (dict, OrderedDict)) and not isinstance(x, Stub):
        out = type(x)()
        seen[id(x)] = out
        for k, v in x.items():
            out[k] = _thaw(v, seen)
    elif isinstance(x, (list, tuple)):
        out = type(x)(_thaw(v, seen) for v in x)
    else:
        out = x
    seen[id(x)] = out
    return out


def _module_tensors(mod, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of a placeholder nn.Module tree: walk ``_parameters``/``_buffers``/``_modules``."""
    out: dict[str, torch.Tensor] = {}
    st = mod.state if isinstance(mod, Stub) else {}
    if not isinstance(st, dict):
        return out
    skip = set(st.get("_non_persistent_buffers_set") or ())
    for k, v in (st.get("_parameters") or {}).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
    for k, v in (st.get("_buffers") or {}).items():
        if isinstance(v, torch.Tensor) and k not in skip:
            out[prefix + k] = v
    for k, child in (st.get("_modules") or {}).items():
        if child is not None:
            out.update(_module_tensors(child, f"{prefix}{k}."))
    return out


@dataclass
class OriginalCheckpoint:
    """What a published checkpoint holds, read without executing it."""

    path: Path
    class_name: str                      # e.g. "deepspot.spot.model.DeepSpot" ("state_dict" for plain dicts)
    state: dict[str, torch.Tensor]
    hparams: dict = field(default_factory=dict)
    scaler: Any = None                   # placeholder of a scikit-learn scaler, or None
    globals_seen: list[str] = field(default_factory=list)
    layers: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)  # group -> head 0's (layer class, p)


def _head_layers(obj: Stub, group: str) -> list[tuple[str, Any]] | None:
    """The layers (class name, dropout p) of head 0 of ensemble ``group`` of a pickled module, or None."""
    mods = obj.state.get("_modules") or {}
    node = mods.get(group)
    node = (node.state.get("_modules") or {}).get("0") if isinstance(node, Stub) else None
    for _ in range(3):  # the head itself, or a wrapper holding one Sequential
        if not isinstance(node, Stub) or not isinstance(node.state, dict):
            return None
        if node._global.endswith(".Sequential"):
            break
        children = [c for c in (node.state.get("_modules") or {}).values() if c is not None]
        if len(children) != 1:
            return None
        node = children[0]
    else:
        return None
    return [(c._global.rsplit(".", 1)[-1], c.state.get("p") if isinstance(c.state, dict) else None)
            for c in (node.state.get("_modules") or {}).values() if isinstance(c, Stub)]


def read_original(path: str | Path, module_aliases: dict[str, str] | None = None,
                  extra_allowed: Iterable[str] = ()) -> OriginalCheckpoint:
    """Read a published DeepSpot/DeepCell/DeepSpot2Cell checkpoint (whole pickled module, Lightning ``.ckpt``
    or a plain state dict) safely."""
    path = Path(path)
    obj, seen = load_restricted(path, module_aliases, extra_allowed)
    if isinstance(obj, Stub) and isinstance(obj.state, dict) and "_modules" in obj.state:
        st = obj.state
        hp = _thaw(st.get("_hparams") or {})
        hp = dict(hp) if isinstance(hp, dict) else {}
        for k in ("spot_context", "cell_context", "type_model", "phi2rho_size", "n_ensemble_phi", "n_ensemble_rho",
                  "p_phi", "p_rho", "agg_neighbors"):
            if k in st and hp.get(k) is None and not isinstance(st[k], (Stub, MethodRef)):
                hp[k] = _thaw(st[k])
        scaler = st.get("scaler", hp.get("scaler"))
        layers = {g: lay for g in ("phi_spot", "phi_cell", "rho") if (lay := _head_layers(obj, g)) is not None}
        return OriginalCheckpoint(path, obj._global, _module_tensors(obj), hp, _thaw(scaler), seen, layers)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):  # Lightning .ckpt
        hp = _thaw(obj.get("hyper_parameters") or {})
        sd = {k: v for k, v in obj["state_dict"].items() if isinstance(v, torch.Tensor)}
        return OriginalCheckpoint(path, "lightning-checkpoint", sd, dict(hp), _thaw(hp.get("scaler")), seen)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return OriginalCheckpoint(path, "state_dict", dict(obj), {}, None, seen)
    kind = obj._global if isinstance(obj, Stub) else type(obj).__name__
    raise ConvertError(f"{path}: holds a {kind}, not a DeepSpot model or state dict")

