"""Checks made before any compute: the output location, the slide (opened, mpp resolved, readable for a
thumbnail) and the previous result an output folder may hold. Each failure is one line naming the file
and the reason; each check costs milliseconds to a few seconds (a header, not the pixels)."""
from __future__ import annotations

import os
from pathlib import Path

from deepspot.config import gene_name_faults, resolve_mpp
from deepspot.io.slides import open_slide

__all__ = ["check_gene_list", "check_options", "check_out_dir", "check_out_file", "check_predict", "check_previous", "check_slide", "is_prediction_file",
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


def prediction_files(name: str, fmt: str = "h5ad") -> tuple[str, str, str]:
    """The files ``predict`` writes for a slide called ``name`` (``fmt`` 'spatialdata': ``<name>.zarr``)."""
    return f"{name}.zarr" if fmt == "spatialdata" else f"{name}.h5ad", f"{name}_spots.csv", f"{name}_genes.png"


def is_prediction_file(name: str) -> bool:
    """A name ``predict`` writes (a folder of such names, made before run records, is a previous result)."""
    return name.endswith((".h5ad", "_spots.csv", "_genes.png", ".zarr"))


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


def check_gene_list(genes, option: str = "--genes") -> None:
    """A gene list the user gave: no empty and no repeated names."""
    if not genes:
        return
    blank, dups = gene_name_faults(genes)
    if blank:
        raise ValueError(f"{option}: empty gene name at position {blank[0]}")
    if dups:
        raise ValueError(f"{option}: repeated gene names ({', '.join(dups[:3])}{' …' if len(dups) > 3 else ''})")


def check_options(spacing=None, min_tissue=None, batch_size=None, spot_px=None, spacing_px=None,
                  num_workers=None) -> None:
    """Numeric prediction options, each a one-line error naming the option: sizes positive and finite,
    a fraction in [0, 1], counts at least 1."""
    import math

    def number(v, option, lo=0.0, hi=math.inf, closed=False):
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        ok = math.isfinite(x) and (lo <= x <= hi if closed else lo < x <= hi)
        if not ok:
            rng = f"between {lo:g} and {hi:g}" if closed else f"a positive number{f' up to {hi:g}' if hi < math.inf else ''}"
            raise ValueError(f"{option} must be {rng}, got {v!r}")

    for v, option in ((spacing, "--spacing"), (spot_px, "--spot-px"), (spacing_px, "--spacing-px")):
        if v is not None:
            number(v, option, hi=1e6)
    if min_tissue is not None:
        number(min_tissue, "--min-tissue", 0.0, 1.0, closed=True)
    if batch_size is not None and (not float(batch_size).is_integer() or batch_size < 1):
        raise ValueError(f"--batch-size must be a whole number of at least 1, got {batch_size!r}")
    if num_workers is not None and num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {num_workers!r}")


def needs_um(config, geometry=None) -> bool:
    """Whether the geometry used (``geometry``: a preset name or SpotGeometry overriding the config's) is
    in µm or picked from the magnification (the slide then needs an mpp); plain pixels need none."""
    geo = config.geometry if geometry is None else geometry
    if isinstance(geo, str):
        from deepspot.config import geometry_preset

        geo = geometry_preset(geo)
    return (geo.grid.unit if hasattr(geo, "grid") else geo.unit) != "px"


def check_predict(slide, model_dir, out, mpp: float | None = None, overwrite: bool = False, genes=None,
                  geometry: str | None = None, fmt: str = "h5ad"):
    """Everything ``deepspot predict`` can check in its first second, in order: the output folder, the
    checkpoint's config (every field), the requested genes, the slide and its mpp, a previous result
    in the folder. Imports neither torch nor the encoder. Returns the checked config."""
    from deepspot.config import read_config_file

    check_out_dir(out)
    owner = prediction_folder(out).check()
    for name in prediction_files(Path(slide).stem, fmt):
        owner.check_target(name, overwrite=True)  # a file of that name deepspot did not write: never replaced
    check_gene_list(genes)
    cfg = read_config_file(model_dir)
    cfg.check_genes(genes, str(model_dir))
    check_slide(slide, mpp, needs_um=needs_um(cfg, geometry))
    check_previous(out, prediction_files(Path(slide).stem, fmt), overwrite)
    return cfg
