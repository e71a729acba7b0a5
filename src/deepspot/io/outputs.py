"""Outputs written atomically (temp name in the same folder, then rename): h5ad, CSV, PNG."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside ``path``; rename onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    return Path(path)


def write_h5ad_chunked(skeleton: ad.AnnData, X, path: str | Path, rows: int = 4096) -> Path:
    """Write ``skeleton`` (an AnnData without X) with ``X`` (N, G) taken from any sliceable array (zarr, h5py,
    numpy) ``rows`` at a time, through anndata's own writer (X as a dask array), so the full matrix is
    never in memory. Writes ``path`` as it is: callers that need it atomic pass a path of :func:`atomic_path`."""
    import dask
    import dask.array as da

    n, g = skeleton.shape
    if tuple(X.shape) != (n, g):
        raise ValueError(f"{path}: X has shape {tuple(X.shape)}, the AnnData is {n} x {g}")
    a = ad.AnnData(X=da.from_array(X, chunks=(max(1, min(rows, n)), max(g, 1))).astype(np.float32),
                   obs=skeleton.obs, var=skeleton.var, obsm=dict(skeleton.obsm), uns=dict(skeleton.uns))
    with dask.config.set(scheduler="synchronous"):
        a.write_h5ad(path, compression="gzip")
    return Path(path)


def write_csv(df, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=True)
    return Path(path)


def write_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    return Path(path)


def add_spatial_image(adata: ad.AnnData, library_id: str, thumbnail: np.ndarray, scale: float,
                      spot_diameter_px: float, **metadata) -> None:
    """scverse ``uns['spatial'][library_id]``: the thumbnail as 'hires' + its scalefactors, so
    ``squidpy.pl.spatial_scatter`` and ``scanpy.pl.spatial`` work unchanged."""
    adata.uns["spatial"] = {library_id: {
        "images": {"hires": np.asarray(thumbnail, dtype=np.uint8)},
        "scalefactors": {"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(spot_diameter_px)},
        "metadata": {k: str(v) for k, v in metadata.items()},
    }}
