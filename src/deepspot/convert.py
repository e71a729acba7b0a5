"""Convert published DeepSpot, DeepCell and DeepSpot2Cell checkpoints (pickled whole Lightning modules,
Lightning ``.ckpt`` files or state dicts) into our format.

The published models were saved with ``torch.save(model)``: a zip archive whose
``data.pkl`` is a pickle of the original package's objects. Unpickling such a
file normally imports those classes and can run arbitrary code. This module
never does that: it reads the zip archive itself and unpickles ``data.pkl``
with a restricted unpickler that

* rebuilds tensors from the archive's raw storages with our own code,
* turns a fixed list of known classes (the original DeepSpot/DeepCell modules,
  ``torch.nn`` layers, Lightning's ``AttributeDict``, numpy arrays, scikit-learn
  scalers) into inert placeholder objects that only hold their pickled state,
* refuses every other global (``os.system``, ``builtins.eval``, ...) with a
  :class:`ConvertError` naming it, before anything is called.

The weights, hyper-parameters and scaler found are mapped onto
:class:`deepspot.models.deepsets.DeepSpot`, :class:`deepspot.models.cells.DeepCell` or
:class:`deepspot.models.spot2cell.DeepSpot2Cell` (head layouts checked against the original's) and written with
:func:`deepspot.models.checkpoint.save_checkpoint` (``model.safetensors`` +
``config.json``).
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from deepspot.config import SpotGeometry

log = logging.getLogger(__name__)


class ConvertError(Exception):
    """A published checkpoint that cannot be (safely) converted; one line, names file and reason."""


# --------------------------------------------------------------------------------------
# Inert placeholders
# --------------------------------------------------------------------------------------


class Stub(dict):
    """Stands in for an object of an allowed class: records constructor args, pickled state,
    and dict/list items. Never imports or calls the class it stands for."""

    _global = "?"

    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)

    def __new__(cls, *args, **kwargs):
        obj = dict.__new__(cls)
        object.__setattr__(obj, "args", args)
        object.__setattr__(obj, "kwargs", kwargs)
        object.__setattr__(obj, "state", {})
        object.__setattr__(obj, "items_", [])
        return obj

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        object.__setattr__(self, "state", state)

    def __setattr__(self, name, value):  # pickle's BUILD fallback must not touch our slots
        self.state[name] = value

    def append(self, item):
        self.items_.append(item)

    def extend(self, items):
        self.items_.extend(items)

    def __reduce__(self):  # pragma: no cover - stubs are never re-pickled
        raise TypeError("placeholder objects cannot be pickled")

    def __repr__(self):
        return f"<placeholder {self._global}>"


_STUB_CLASSES: dict[str, type] = {}


def _stub_class(qualname: str) -> type:
    if qualname not in _STUB_CLASSES:
        _STUB_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (Stub,), {"_global": qualname})
    return _STUB_CLASSES[qualname]


@dataclass
class MethodRef:
    """What ``getattr(obj, name)`` stood for in the pickle (a bound method); nothing is looked up."""

    obj: Any
    name: str


class _NDArrayMarker:  # numpy.ndarray as passed to numpy's _reconstruct
    pass


class _ArrayStub(Stub):
    _global = "numpy.ndarray"


class _DTypeStub(Stub):
    _global = "numpy.dtype"

    def to_numpy(self) -> np.dtype:
        spec = self.args[0] if self.args else None
        if not isinstance(spec, str) or not re.fullmatch(r"[a-zA-Z]\d*|[biufcSUV]\d+", spec):
            raise ConvertError(f"unsupported numpy dtype {spec!r} in the pickle")
        dt = np.dtype(spec)
        state = self.state
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">"):
            dt = dt.newbyteorder(state[1])
        if isinstance(state, tuple) and len(state) > 3 and state[3] is not None:
            raise ConvertError("structured numpy dtypes are not supported in converted checkpoints")
        return dt


def _np_reconstruct(cls, shape, typecode):
    if cls is not _NDArrayMarker:
        raise ConvertError("numpy _reconstruct called on something other than ndarray")
    return _ArrayStub()


def _np_scalar(dtype, raw=None):
    if not isinstance(dtype, _DTypeStub) or not isinstance(raw, (bytes, bytearray)):
        raise ConvertError("unsupported numpy scalar in the pickle")
    return np.frombuffer(bytes(raw), dtype=dtype.to_numpy())[0].item()


def _array_from_stub(a: _ArrayStub) -> np.ndarray | list:
    st = a.state
    if not (isinstance(st, tuple) and len(st) == 5):
        raise ConvertError("malformed numpy array in the pickle")
    _, shape, dtype, fortran, raw = st
    if not isinstance(dtype, _DTypeStub):
        raise ConvertError("malformed numpy array dtype in the pickle")
    if isinstance(raw, list):  # object array: keep the elements as a list
        return raw
    if isinstance(raw, str):
        raw = raw.encode("latin1")
    arr = np.frombuffer(bytes(raw), dtype=dtype.to_numpy())
    return arr.reshape(tuple(shape), order="F" if fortran else "C").copy()


def _safe_codecs_encode(obj, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8") or not isinstance(obj, str):
        raise ConvertError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, encoding, errors)


def _safe_getattr(obj, name, *default):
    return MethodRef(obj, str(name))


def _device_stub(*args):
    return str(args[0]) if args else "cpu"


# --------------------------------------------------------------------------------------
# Tensors from the archive's storages
# --------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, torch.Tensor):
        raise ConvertError("tensor without a storage in the pickle")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if size:
        last = int(storage_offset) + sum((s - 1) * st for s, st in zip(size, stride) if s > 0)
        if any(s == 0 for s in size):
            return storage.new_empty(size)
        if last >= storage.numel() or storage_offset < 0:
            raise ConvertError("tensor points outside its storage")
    return torch.as_strided(storage, size, stride, int(storage_offset))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
    return data


# --------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------

_TORCH_NN = {
    "torch.nn.modules.linear": {"Linear", "Identity", "Bilinear"},
    "torch.nn.modules.container": {"ModuleList", "Sequential", "ModuleDict", "ParameterList", "ParameterDict"},
    "torch.nn.modules.dropout": {"Dropout", "AlphaDropout"},
    "torch.nn.modules.activation": {"ReLU", "LeakyReLU", "GELU", "ELU", "SiLU", "Tanh", "Sigmoid", "Softplus",
                                    "PReLU", "Softmax"},
    "torch.nn.modules.normalization": {"LayerNorm"},
    "torch.nn.modules.batchnorm": {"BatchNorm1d"},
    "torch.nn.modules.loss": {"MSELoss", "L1Loss", "PoissonNLLLoss", "CosineEmbeddingLoss", "HuberLoss",
                              "SmoothL1Loss"},
}
# The original package's modules (classes and loss functions defined there become placeholders).
_ORIGINAL_MODULES = re.compile(r"deepspot(\.(spot|cell|deepspot2cell))?\.(model|loss)|deepspot\.(spot|cell)|deepspot2cell(\.(model|loss))?")
_ATTRIBUTE_DICTS = {
    "lightning.fabric.utilities.data", "lightning_fabric.utilities.data",
    "pytorch_lightning.utilities.parsing", "lightning.pytorch.utilities.parsing",
}
_SKLEARN_SCALERS = {"StandardScaler", "MinMaxScaler", "MaxAbsScaler", "RobustScaler"}
_TORCH_DTYPES = {n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickle ``data.pkl`` of a torch zip archive allowing only data (see module docstring)."""

    def __init__(self, file, storages: Callable, module_aliases: dict[str, str] | None = None,
                 extra_allowed: Iterable[str] = ()):
        super().__init__(file)
        self._storages = storages
        self._aliases = dict(module_aliases or {})
        self._extra = set(extra_allowed)
        self.globals_seen: list[str] = []

    def _canonical(self, module: str) -> str:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        for old, new in self._aliases.items():
            if module == old or module.startswith(old + "."):
                return new + module[len(old):]
        return module

    def find_class(self, module: str, name: str):
        module = self._canonical(module)
        full = f"{module}.{name}"
        self.globals_seen.append(full)
        fixed = {
            "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": _rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
            "collections.OrderedDict": OrderedDict,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.getattr": _safe_getattr,
            "_codecs.encode": _safe_codecs_encode,
            "torch.device": _device_stub,
            "numpy.ndarray": _NDArrayMarker,
            "numpy.dtype": _DTypeStub,
            "numpy.core.multiarray._reconstruct": _np_reconstruct,
            "numpy._core.multiarray._reconstruct": _np_reconstruct,
            "numpy.core.multiarray.scalar": _np_scalar,
            "numpy._core.multiarray.scalar": _np_scalar,
        }
        if full in fixed:
            return fixed[full]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return getattr(torch, name)
        allowed = (
            name in _TORCH_NN.get(module, ())
            or _ORIGINAL_MODULES.fullmatch(module) is not None
            or (module in _ATTRIBUTE_DICTS and name == "AttributeDict")
            or (module.startswith("sklearn.preprocessing") and name in _SKLEARN_SCALERS)
            or full in self._extra
        )
        if not allowed or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConvertError(
                f"refusing to unpickle '{full}': not a known DeepSpot/torch data class "
                f"(a pickle can run code through it; nothing was executed)")
        return _stub_class(full)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise ConvertError(f"unsupported persistent id in the pickle: {str(pid)[:80]}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise ConvertError("unsupported storage type in the pickle")
        return self._storages(key, storage_type.dtype)


def load_restricted(path: str | Path, module_aliases: dict[str, str] | None = None,
                    extra_allowed: Iterable[str] = ()) -> tuple[Any, list[str]]:
    """Read a ``torch.save`` zip archive without running pickled code.

    Returns (object tree with placeholders, list of globals referenced).
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path}: not a torch zip archive (legacy torch<1.6 or not a torch file); "
                           f"cannot convert it safely")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ConvertError(f"{path}: no single data.pkl in the archive")
        prefix = pkl[0][: -len("data.pkl")]
        if prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() not in (b"little",):
            raise ConvertError(f"{path}: big-endian archives are not supported")
        cache: dict[str, torch.Tensor] = {}

        def storages(key: str, dtype: torch.dtype) -> torch.Tensor:
            if key not in cache:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise ConvertError(f"{path}: storage {key} missing from the archive")
                raw = bytearray(z.read(entry))
                itemsize = torch.empty((), dtype=dtype).element_size()
                if len(raw) % itemsize:
                    raise ConvertError(f"{path}: storage {key} has a partial element")
                cache[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            t = cache[key]
            return t if t.dtype == dtype else t.view(dtype)

        up = RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), storages, module_aliases, extra_allowed)
        try:
            obj = up.load()
        except ConvertError as e:
            raise ConvertError(f"{path}: {e}") from None
        except Exception as e:  # malformed pickle
            raise ConvertError(f"{path}: cannot read the pickle ({type(e).__name__}: {str(e)[:200]})") from None
    return obj, up.globals_seen


# --------------------------------------------------------------------------------------
# From the object tree to weights + hyper-parameters
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Mapping onto our models
# --------------------------------------------------------------------------------------

KINDS = ("deepspot", "deepcell", "deepspot2cell")
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
    from deepspot.models.cells import CELL_CONTEXTS, DeepCell
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


# --------------------------------------------------------------------------------------
# Gene lists
# --------------------------------------------------------------------------------------

_GENE_COLUMNS = ("gene_name", "gene_names", "gene", "genes", "gene_ids", "symbol")
_TRUE, _FALSE = {"true", "1", "t", "yes", "1.0"}, {"false", "0", "f", "no", "0.0", ""}


def _gene_table(p: Path, rows: list[list[str]]) -> list[str]:
    """The original's gene table (e.g. info_highly_variable_genes.csv): gene_name where isPredicted, file order."""
    header = [h.strip() for h in rows[0]]
    gi, pi = header.index("gene_name"), header.index("isPredicted")
    genes = []
    for n, r in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in r):
            continue
        if len(r) <= max(gi, pi):
            raise ConvertError(f"{p}: line {n} has {len(r)} columns, the header {len(header)}")
        flag = r[pi].strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ConvertError(f"{p}: line {n}: isPredicted is {r[pi]!r}, not True/False")
        if flag in _TRUE:
            genes.append(r[gi].strip())
    return genes


def read_gene_list(genes) -> list[str]:
    """A gene list from a list, or a file, detected from its content: the original's gene table (a CSV with
    ``gene_name`` and ``isPredicted`` columns: the predicted genes in file order), a JSON list, a CSV/TSV (the
    gene column, else the first), or text with one gene per line."""
    if genes is None:
        return []
    if not isinstance(genes, (str, Path)):
        return [str(g) for g in genes]
    p = Path(genes)
    if not p.is_file():
        raise ConvertError(f"{p}: gene list file not found")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise ConvertError(f"{p}: not a text gene list") from None
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    if p.suffix == ".json" or first.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{p}: invalid JSON gene list ({e.msg})") from None
        if isinstance(data, dict):
            data = data.get("genes", data.get("gene_names"))
        if not isinstance(data, list):
            raise ConvertError(f"{p}: expected a JSON list of genes")
        return [str(g) for g in data]
    delim = "\t" if "\t" in first else "," if "," in first else None
    if delim is None:
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delim)]
    header = [h.strip() for h in rows[0]]
    if "gene_name" in header and "isPredicted" in header:
        return _gene_table(p, rows)
    lower = [h.lower() for h in header]
    col = next((lower.index(c) for c in _GENE_COLUMNS if c in lower), None)
    body = rows[1:] if col is not None else rows
    col = 0 if col is None else col
    return [r[col].strip() for r in body if len(r) > col and r[col].strip()]


# --------------------------------------------------------------------------------------
# Writing the checkpoint
# --------------------------------------------------------------------------------------


def _default_geometry(kind: str, context: str) -> dict:
    from deepspot.config import CellGeometry

    if kind == "deepspot":
        return SpotGeometry().to_dict()
    return CellGeometry(neighbors="knn" if context == "cell_neighbors" else "none").to_dict()


def _encoder_for_dim(dim: int, encoder: str | None, path: Path, feature_dim: int | None = None) -> str:
    """The encoder to record: ``encoder`` (checked against the weights), 'external' for ``feature_dim``, or
    the one registered encoder with this feature size."""
    from deepspot.config import EXTERNAL_ENCODER
    from deepspot.features.encoders import EncoderError, get_spec, list_encoders

    if encoder is not None and encoder.strip().lower() == EXTERNAL_ENCODER:
        encoder, feature_dim = None, dim if feature_dim is None else feature_dim
    if encoder is not None and feature_dim is not None:
        raise ConvertError(f"{path}: give --encoder or --feature-dim, not both")
    if feature_dim is not None:
        if int(feature_dim) != dim:
            raise ConvertError(f"{path}: the model takes {dim}-d features, not --feature-dim {feature_dim}")
        return EXTERNAL_ENCODER
    if encoder is not None:
        try:
            spec = get_spec(encoder)
        except EncoderError as e:
            raise ConvertError(str(e)) from None
        if spec.dim != dim:
            raise ConvertError(f"{path}: the model takes {dim}-d features but encoder '{spec.name}' gives {spec.dim}-d")
        return spec.name
    fits = [n for n in list_encoders() if get_spec(n).dim == dim]
    if len(fits) == 1:
        return fits[0]
    raise ConvertError(f"{path}: the model takes {dim}-d features; say which encoder it was trained with "
                       f"(--encoder {' | '.join(fits) if fits else 'NAME'}), or --feature-dim {dim} for features "
                       f"made outside deepspot")


def _jsonable(hp: dict) -> dict:
    out = {}
    for k, v in hp.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


_NOTES = {
    "deepspot": "original output Dropout(0.1) dropped (a no-op at inference)",
    "deepcell": "original output Dropout(0.1) dropped (a no-op at inference)",
    "deepspot2cell": "original output Dropout(0.1) dropped (a no-op at inference); context_padded (True = padding) "
                     "becomes neighbor_mask (True = real)",
}


def convert_checkpoint(src: str | Path, out_dir: str | Path, genes=None, encoder: str | None = None,
                       context: str | None = None, geometry: dict | None = None, kind: str | None = None,
                       feature_dim: int | None = None, module_aliases: dict[str, str] | None = None,
                       extra_allowed: Iterable[str] = ()) -> Path:
    """Convert a published DeepSpot / DeepCell / DeepSpot2Cell checkpoint into a checkpoint folder
    (model.safetensors + config.json).

    ``genes``: the model's gene list (list or file: text, JSON, CSV or the original's gene table), in
    output order; without it genes are named ``gene_0``… and a warning is logged. ``encoder``: the feature
    extractor the model was trained on (inferred from the feature dim when unique); ``feature_dim``
    instead records an external encoder (the model then predicts from given features only).
    ``context``: only where the file does not store it and the shapes leave it open. ``kind``:
    deepspot | deepcell | deepspot2cell, where a state dict does not say.
    """
    from deepspot.config import GridSpec
    from deepspot.models.checkpoint import save_checkpoint

    src = Path(src)
    orig = read_original(src, module_aliases, extra_allowed)
    kind, model, info = to_model(orig, kind, context)
    gene_list = read_gene_list(genes)
    placeholder_genes = not gene_list
    if placeholder_genes:
        log.warning("%s: no gene list given; genes are named gene_0..gene_%d (pass --genes FILE)",
                    src, info["n_genes"] - 1)
        gene_list = [f"gene_{i}" for i in range(info["n_genes"])]
    if len(gene_list) != info["n_genes"]:
        where = f"the gene list {genes}" if isinstance(genes, (str, Path)) else "the gene list given"
        raise ConvertError(f"{src}: the model predicts {info['n_genes']} genes but {where} has {len(gene_list)}")
    if len(set(gene_list)) != len(gene_list):
        raise ConvertError(f"{src}: the gene list has duplicates")
    enc = _encoder_for_dim(info["in_dim"], encoder, src, feature_dim)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    config = {
        "model": kind,
        "encoder": {"name": enc, "dim": info["in_dim"]},
        "genes": gene_list,
        "scaler": _scaler_config(orig.scaler),
        "converted_from": {
            "file": src.name, "sha256": digest, "class": orig.class_name,
            "hparams": _jsonable(orig.hparams), "genes_are_placeholders": placeholder_genes, "note": _NOTES[kind],
        },
    }
    if kind == "deepspot2cell":
        config["spot_grid"] = GridSpec().to_dict()
    if geometry is not None and kind != "deepspot" and "cell_diameter" not in geometry:
        raise ConvertError(f"{src}: a spot geometry (--geometry) is for DeepSpot models, this is a {kind}")
    config["geometry"] = geometry if geometry is not None else _default_geometry(kind, info["context"])
    return save_checkpoint(out_dir, model, config)


convert_deepspot = convert_checkpoint  # the name this function had when it converted DeepSpot files only
