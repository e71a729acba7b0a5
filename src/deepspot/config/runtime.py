"""Process-wide run settings (``ds.settings``, as scanpy's ``sc.settings``): how this process runs, not what
it computes. The deep functions of prediction read them instead of taking them as parameters; the CLI sets
them from its options; the public API maps its keyword arguments (``progress=False`` …) onto a temporary
:meth:`Settings.override`.

    import deepspot as ds
    ds.settings.progress = False             # no progress bars from now on
    with ds.settings.override(device="cuda", num_workers=0):
        model.predict_slide("HE.tif")

No torch import: every layer may read them.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from types import SimpleNamespace

__all__ = ["Settings", "settings"]

#: name -> (default, description)
_FIELDS = {
    "progress": (True, "show progress bars"),
    "cache_dir": (None, "folder of the per-slide feature stores (kept and reused); None: a work folder, removed"),
    "num_workers": (None, "slide-reading worker processes (None: each action's default: about half the cores "
                          "for a whole-slide prediction, 0 (in this process) for training and in-memory "
                          "prediction of an image)"),
    "device": ("cpu", "device of the encoder and the model (cpu, cuda, cuda:1, mps …)"),
    "autocast_dtype": (None, "mixed precision of the encoder (None: the device's default rule)"),
}


def _check(name: str, value):
    if name not in _FIELDS:
        raise AttributeError(f"deepspot.settings has no setting {name!r}; settings: {', '.join(_FIELDS)}")
    if name == "progress":
        return bool(value)
    if name == "cache_dir":
        return None if value is None else Path(value)
    if name == "num_workers":
        if value is None:
            return None
        if isinstance(value, bool) or not float(value).is_integer() or value < 0:
            raise ValueError(f"--num-workers must be 0 or more, got {value!r}")
        return int(value)
    if name == "device":
        return str(value) if value is not None else "cpu"
    return value


class Settings:
    """``progress``, ``cache_dir``, ``num_workers``, ``device``, ``autocast_dtype``: read as attributes, set as
    attributes (checked), or changed for a block with :meth:`override`. Per thread: an override in one thread
    is not seen by another; a setting assigned inside an override block lasts until the block ends."""

    def __init__(self):
        object.__setattr__(self, "_base", {k: v for k, (v, _) in _FIELDS.items()})
        object.__setattr__(self, "_local", threading.local())

    def _layers(self) -> list[dict]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in _FIELDS:
            raise AttributeError(f"deepspot.settings has no setting {name!r}; settings: {', '.join(_FIELDS)}")
        for layer in reversed(self._layers()):
            if name in layer:
                return layer[name]
        return self._base[name]

    def __setattr__(self, name: str, value) -> None:
        value = _check(name, value)
        layers = self._layers()
        (layers[-1] if layers else self._base)[name] = value

    @contextlib.contextmanager
    def override(self, **values):
        """Use these settings inside the ``with`` block (pass only what you change; an unknown name is a
        TypeError, as for a function's keyword)."""
        unknown = [k for k in values if k not in _FIELDS]
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (settings: {', '.join(_FIELDS)})")
        layer = {k: _check(k, v) for k, v in values.items()}
        stack = self._layers()
        stack.append(layer)
        try:
            yield self
        finally:
            stack.remove(layer)

    def unless_set(self, **values):
        """:meth:`override` with ``values`` only where the setting is None (an action's own default:
        ``settings.unless_set(num_workers=0)`` reads in this process unless the user chose otherwise)."""
        return self.override(**{k: v for k, v in values.items() if getattr(self, k) is None})

    def resolve(self, **values) -> SimpleNamespace:
        """The settings in force with ``values`` (a call's keyword arguments, checked) on top, as a namespace
        (``run = settings.resolve(**kw); run.progress``); nothing is changed."""
        unknown = [k for k in values if k not in _FIELDS]
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} (settings: {', '.join(_FIELDS)})")
        return SimpleNamespace(**{**self.as_dict(), **{k: _check(k, v) for k, v in values.items()}})

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in _FIELDS}

    def reset(self) -> None:
        """Back to the defaults (overrides in progress keep theirs)."""
        self._base.update({k: v for k, (v, _) in _FIELDS.items()})

    def __repr__(self) -> str:
        return "deepspot.settings(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_FIELDS))


settings = Settings()

