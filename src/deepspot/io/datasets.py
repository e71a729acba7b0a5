"""Bundled example data: found in a data directory, or fetched from its public source on first use.

The data directory is, in order: the ``data_dir`` argument, ``$DEEPSPOT_DATA_DIR``,
``../shared/data`` or ``./shared/data`` relative to the working directory (where present),
else a per-user cache that :func:`fetch` fills with pooch (network needed once).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np

# Public sources of the example files (fetched only when no local copy exists).
_SOURCES = {
    "ncbi858/NCBI858.h5ad": "https://github.com/ratschlab/DeepSpot/raw/main/example_data/NCBI858/NCBI858.h5ad",
    "ncbi858/NCBI858.jpg": "https://github.com/ratschlab/DeepSpot/raw/main/example_data/NCBI858/NCBI858.jpg",
    "ncbi858/NCBI858.json": "https://github.com/ratschlab/DeepSpot/raw/main/example_data/NCBI858/NCBI858.json",
}


class DataError(Exception):
    """Example data missing and not fetchable; the message says which file and what to do."""


def data_dir(data_dir: str | Path | None = None) -> Path:
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("DEEPSPOT_DATA_DIR")
    if env:
        return Path(env)
    for cand in (Path("../shared/data"), Path("shared/data")):
        if cand.is_dir():
            return cand
    import pooch

    return Path(pooch.os_cache("deepspot"))


def fetch(relpath: str, data_dir_: str | Path | None = None) -> Path:
    """Path to example file ``relpath`` (e.g. 'ncbi858/NCBI858.jpg'), downloading it once if needed."""
    root = data_dir(data_dir_)
    path = root / relpath
    if path.exists():
        return path
    url = _SOURCES.get(relpath)
    if url is None:
        raise DataError(f"{path}: example file not found (set DEEPSPOT_DATA_DIR or --data-dir)")
    try:
        import pooch

        got = pooch.retrieve(url, known_hash=None, path=str(path.parent), fname=path.name, progressbar=False)
    except Exception as e:  # offline, proxy, 404 ...
        raise DataError(f"{path}: not found locally and could not be downloaded from {url} "
                        f"({type(e).__name__}); set DEEPSPOT_DATA_DIR to a folder holding {relpath}") from None
    return Path(got)


def ncbi858(data_dir_: str | Path | None = None) -> tuple[ad.AnnData, Path, dict]:
    """The Xenium lung example: (cells AnnData with obsm['spatial'] (x, y) px, H&E image path, metadata).

    In the file, obs['x_pixel'] is the image row and obs['y_pixel'] the column.
    """
    h5 = fetch("ncbi858/NCBI858.h5ad", data_dir_)
    img = fetch("ncbi858/NCBI858.jpg", data_dir_)
    meta = json.loads(fetch("ncbi858/NCBI858.json", data_dir_).read_text())
    from deepspot.io.spatial import read_cells_h5ad

    cells = read_cells_h5ad(h5, x_col="y_pixel", y_col="x_pixel")
    cells.uns["sample"] = meta.get("sample", "NCBI858")
    return cells, img, meta
