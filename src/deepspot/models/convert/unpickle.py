"""A restricted unpickler for ``torch.save`` zip archives: it reads the archive itself and unpickles
``data.pkl`` so that no pickled code ever runs. It

* rebuilds tensors from the archive's raw storages with our own code,
* turns a fixed list of known classes (the original DeepSpot/DeepCell modules,
  ``torch.nn`` layers, Lightning's ``AttributeDict``, numpy arrays, scikit-learn
  scalers) into inert placeholder objects (:class:`Stub`) that only hold their pickled state,
* refuses every other global (``os.system``, ``builtins.eval``, ...) with a
  :class:`ConvertError` naming it, before anything is called.
"""
from __future__ import annotations

import codecs
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch


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
