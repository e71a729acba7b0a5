"""Field checks shared by the config dataclasses (one error naming the file and the field)."""
from __future__ import annotations

import math
from typing import Any

from deepspot.config.constants import CheckpointError


# --------------------------------------------------------------------------- field checks


def check_choice(what: str, value: Any, options, optional: bool = False) -> None:
    """The one refusal of a value outside its vocabulary (``optional``: None is accepted too)."""
    if value not in options and not (optional and value is None):
        raise ValueError(f"{what} must be one of {', '.join(options)}, got {value!r}")


class _Fields:
    """Reads typed fields of one mapping; every failure is a CheckpointError naming ``source: prefix.key``."""

    def __init__(self, d: Any, source: str, prefix: str = ""):
        self.source, self.prefix = source, prefix
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: {prefix.rstrip('.') or 'config'} must be a JSON object, "
                                  f"got {type(d).__name__}")
        self.d = d

    def fail(self, key: str, why: str):
        raise CheckpointError(f"{self.source}: {self.prefix}{key} {why}")

    def get(self, key: str, default: Any = ..., types=None, name: str = ""):
        if key not in self.d or self.d[key] is None:
            if default is ...:
                self.fail(key, "missing")
            return default
        v = self.d[key]
        if types is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in _tuple(types)):
            self.fail(key, f"must be {name or _names(types)}, got {v!r}"[:200])
        return v

    def number(self, key: str, default: Any = ..., positive: bool = False) -> float:
        v = self.get(key, default, (int, float), "a number")
        if v is None:
            return v
        if not math.isfinite(float(v)) or positive and not v > 0:
            self.fail(key, f"must be a {'positive ' if positive else ''}finite number, got {v!r}")
        return float(v)

    def integer(self, key: str, default: Any = ..., minimum: int | None = None) -> int:
        v = self.get(key, default, int, "an integer")
        if v is not None and minimum is not None and v < minimum:
            self.fail(key, f"must be >= {minimum}, got {v}")
        return v

    def choice(self, key: str, options, default: Any = ...) -> str:
        v = self.get(key, default, str, "a string")
        if v not in options:
            self.fail(key, f"must be one of {', '.join(options)}, got {v!r}")
        return v

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.get(key, types=dict, name="an object"), self.source, f"{self.prefix}{key}.")


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _names(types) -> str:
    return " or ".join({int: "an integer", float: "a number", str: "a string", dict: "an object",
                        list: "a list", bool: "true/false"}.get(t, t.__name__) for t in _tuple(types))
