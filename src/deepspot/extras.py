"""Optional dependencies: a feature that needs a missing extra says which one to install."""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(Exception):
    """An optional dependency is not installed; the message names the pip extra to install."""


def require(module: str, extra: str, what: str, hint: str = "") -> ModuleType:
    """Import ``module`` or raise MissingExtra: "<what> needs <module>: pip install 'deepspot[<extra>]'"."""
    import warnings

    try:
        with warnings.catch_warnings():  # a library's own deprecation notices at import are not the user's to act on
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs {module}: pip install 'deepspot[{extra}]'{hint}") from None
