"""Checks made before any compute: the output location, the slide (opened, mpp resolved, readable for a
thumbnail) and the previous result an output folder may hold. Each failure is one line naming the file
and the reason; each check costs milliseconds to a few seconds (a header, not the pixels)."""
from __future__ import annotations

import os
from pathlib import Path

from deepspot.config import resolve_mpp
# the request's checks and the output names live in config; their preflight import paths are kept
from deepspot.config.output_names import is_prediction_file, prediction_files
from deepspot.config.requests import check_gene_list, check_options
from deepspot.io.slides import open_slide

__all__ = ["check_gene_list", "check_options", "check_out_dir", "check_out_file", "check_previous", "check_slide", "is_prediction_file",
           "needs_um", "prediction_files", "prediction_folder"]


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(out: str | os.PathLike, option: str = "--out") -> Path:
    """``out`` must be a folder (existing or creatable) that this process may write into."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: {option} is an existing file, not a folder")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise NotADirectoryError(f"{out}: {option} cannot be created, {base} is a file")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: {option} is not writable ({base} is read-only for this user)")
    return out


def check_out_file(out: str | os.PathLike, option: str = "--out") -> Path:
    """``out`` is a file to write: not a folder, its folder creatable and writable."""
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out}: {option} is an existing folder, not a file")
    check_out_dir(out.parent, option)
    return out


def prediction_folder(out, command: str = "predict"):
    """The :class:`~deepspot.io.owner.OutputFolder` of a prediction run into ``out``."""
    from deepspot.io.owner import OutputFolder

    return OutputFolder(out, command, legacy=is_prediction_file)


def check_previous(out: str | os.PathLike, names, overwrite: bool = False) -> list[Path]:
    """Refuse an output folder that holds any of ``names`` (a previous result) unless ``overwrite``;
    returns the files that will be replaced."""
    out = Path(out)
    found = [out / n for n in names if (out / n).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{out}: holds a previous result ({', '.join(p.name for p in found)}); pass "
                              f"--overwrite to replace it or choose another --out")
    return found


def check_slide(path, mpp: float | None = None, needs_um: bool = True, thumbnail_size: int = 2000):
    """Open the slide, resolve its mpp and plan its thumbnail (nothing decoded beyond a header or a reduced
    preview): (level-0 (w, h), mpp used or None). Raises the SlideError / MppError a later step would."""
    with open_slide(path, mpp=mpp) as slide:
        mpp_used = resolve_mpp(slide, mpp, needs_um=needs_um)
        slide.thumbnail_plan(thumbnail_size)
        return tuple(slide.dimensions), mpp_used


def needs_um(config, geometry=None) -> bool:
    """Whether the geometry used (``geometry``: a preset name or SpotGeometry overriding the config's) is
    in µm or picked from the magnification (the slide then needs an mpp); plain pixels need none."""
    geo = config.geometry if geometry is None else geometry
    if isinstance(geo, str):
        from deepspot.config import geometry_preset

        geo = geometry_preset(geo)
    return (geo.grid.unit if hasattr(geo, "grid") else geo.unit) != "px"

