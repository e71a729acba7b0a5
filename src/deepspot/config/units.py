"""The µm-per-pixel rule and µm -> px."""
from __future__ import annotations

import math

from deepspot.config.constants import UNITS, MppError
from deepspot.config.fields import check_choice


# --------------------------------------------------------------------------- units


def um_to_px(value: float, unit: str, mpp: float | None, what: str = "length") -> float:
    """A length in ``unit`` ('px' or 'um') as level-0 pixels; µm need ``mpp`` (µm per pixel)."""
    check_choice("unit", unit, UNITS)
    if unit == "px":
        return float(value)
    if mpp is None or not mpp > 0:
        raise MppError(f"this {what} is in µm: an mpp (µm per pixel) is needed; pass --mpp")
    return float(value) / float(mpp)


def resolve_mpp(slide, override: float | None = None, needs_um: bool = False) -> float | None:
    """The µm per level-0 pixel to use for ``slide`` (anything with ``.mpp`` and ``.path``).

    ``override`` (the user's ``--mpp``) wins over the file's; without either, a geometry in µm
    (``needs_um``) is refused with an error naming the file, and a pixel geometry gets None.
    """
    source = getattr(slide, "path", "slide")
    if override is not None:
        v = float(override)
        if not (v > 0 and math.isfinite(v)):
            raise MppError(f"{source}: mpp must be a positive number, got {override!r}")
        return v
    mpp = getattr(slide, "mpp", None)
    if mpp is not None:
        return float(mpp)
    if needs_um:
        raise MppError(f"{source}: resolution (µm per pixel) unknown: the file carries no mpp; "
                       f"pass --mpp (e.g. --mpp 0.5 for 20x)")
    return None
