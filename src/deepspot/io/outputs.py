"""Outputs written atomically (temp name in the same folder, then rename): h5ad, CSV, PNG, SpatialData zarr."""
from __future__ import annotations

import contextlib
from pathlib import Path

import anndata as ad
import numpy as np

from deepspot.io.atomic import atomic_dir, atomic_path, current_umask  # noqa: F401  (their import path)


def check_space(folder: str | Path, nbytes: float, what: str) -> None:
    """Refuse, before any compute, to write about ``nbytes`` into ``folder`` when the disk's free space or
    this process's file-size limit is smaller: HDF5 crashes the interpreter on a write that fails half-way."""
    import resource
    import shutil

    need = int(nbytes * 1.1) + (1 << 20)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(28, f"{what}: needs about {need / 1e9:.2f} GB, {folder} has {free / 1e9:.2f} GB free; "
                          f"free space or choose another --out")
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and nbytes > soft:
        raise OSError(27, f"{what}: needs about {nbytes / 1e9:.2f} GB, over this process's file-size limit "
                          f"({soft / 1e9:.3f} GB, ulimit -f)")


@contextlib.contextmanager
def h5_writing(path: str | Path, target: str | Path | None = None):
    """Around an h5ad writer: a full disk (or a file-size limit) becomes one line naming ``target``."""
    import errno

    try:
        yield
    except BaseException as e:
        full = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
        if isinstance(e, OSError) and (e.errno in full or any(f"errno = {n}," in str(e) for n in full)):
            raise OSError(errno.ENOSPC, f"{target or path}: cannot write it, the disk is full (or over a size "
                                        f"limit); nothing was kept") from None
        raise


def write_h5ad(adata: ad.AnnData, path: str | Path) -> Path:
    with atomic_path(path) as tmp, h5_writing(tmp, path):
        adata.write_h5ad(tmp, compression="gzip")
    return Path(path)


def write_h5ad_chunked(skeleton: ad.AnnData, X, path: str | Path, rows: int = 4096, target=None,
                       layers: dict | None = None) -> Path:
    """Write ``skeleton`` (an AnnData without X) with ``X`` (N, G) taken from any sliceable array (zarr, h5py,
    numpy) ``rows`` at a time, through anndata's own writer (X as a dask array), so the full matrix is
    never in memory. Writes ``path`` as it is: callers that need it atomic pass a path of :func:`atomic_path`
    (``target``: the final name, for the error message)."""
    import dask
    import dask.array as da

    n, g = skeleton.shape
    if tuple(X.shape) != (n, g):
        raise ValueError(f"{path}: X has shape {tuple(X.shape)}, the AnnData is {n} x {g}")
    chunks = (max(1, min(rows, n)), max(g, 1))
    a = ad.AnnData(X=da.from_array(X, chunks=chunks).astype(np.float32),
                   obs=skeleton.obs, var=skeleton.var, obsm=dict(skeleton.obsm), uns=dict(skeleton.uns),
                   layers={k: da.from_array(v, chunks=chunks).astype(np.float32) for k, v in (layers or {}).items()})
    with dask.config.set(scheduler="synchronous"), h5_writing(path, target):
        a.write_h5ad(path, compression="gzip")
    return Path(path)


def write_csv(df, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=True)
    return Path(path)


def write_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Render in memory first (seconds), then write the bytes atomically (milliseconds): a process killed
    while rendering leaves no empty ``.partial.png`` behind."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
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


# --------------------------------------------------------------------------- SpatialData


class SlideArray:
    """Level 0 of a slide as a lazy (3, H, W) uint8 array (c, y, x) for ``dask.array.from_array``: each
    block is one ``read_region``; the slide is opened on first read and reopened after pickling."""

    def __init__(self, slide_path: str | Path, mpp: float | None = None):
        from deepspot.io.slides import open_slide

        self.path, self.mpp = Path(slide_path), mpp
        with open_slide(self.path, mpp=mpp) as s:
            w, h = s.dimensions
        self.shape, self.dtype, self.ndim = (3, int(h), int(w)), np.dtype(np.uint8), 3
        self._slide = None

    def __getstate__(self):
        return {**self.__dict__, "_slide": None}

    def __getitem__(self, key):
        from deepspot.io.slides import open_slide

        c, ys, xs = (tuple(key) + (slice(None),) * 3)[:3]
        y0, y1, _ = ys.indices(self.shape[1])
        x0, x1, _ = xs.indices(self.shape[2])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((3, max(y1 - y0, 0), max(x1 - x0, 0)), np.uint8)[c]
        if self._slide is None:
            self._slide = open_slide(self.path, mpp=self.mpp)
        block = self._slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0))  # (h, w, 3)
        return np.ascontiguousarray(np.moveaxis(block, -1, 0))[c]


def spatialdata_from_predictions(adata: ad.AnnData, slide_path: str | Path, X=None, mpp: float | None = None,
                                 image_key: str = "he", shapes_key: str = "spots", table_key: str = "table",
                                 chunk: int = 2048, smallest: int = 1024, layers: dict | None = None):
    """A SpatialData of a prediction: ``images[image_key]``, the slide (level 0 read lazily, a x2 pyramid
    down to ``smallest`` px), ``shapes[shapes_key]``, the spots as circles of their true radius, and
    ``tables[table_key]``, the predictions (spots × genes) linked to the circles (``region`` =
    ``shapes_key``, ``instance_key`` = 'spot_id', the circle's index). Coordinates: 'global' is the
    slide's level-0 pixels (identity for all three); with an mpp (``mpp`` or the prediction's), 'um' is
    microns.

    adata: the prediction AnnData (obsm['spatial'] (x, y) level-0 px, uns['deepspot']['spot_diameter_px']
    or uns['spatial'] scalefactors); X: its (N, G) values when adata has none (zarr / h5py / numpy, read
    lazily through dask); layers: extra (N, G) arrays for the table's layers (default: adata's, e.g. the
    interval bounds 'lower' / 'upper'). Needs the extra ``[spatialdata]`` (callers check it with
    ``deepspot.extras``)."""
    import warnings

    import dask.array as da
    import pandas as pd

    with warnings.catch_warnings():  # ome-zarr warns at import about its own default argument, not our call
        warnings.filterwarnings("ignore", message=".*deprecated class Scaler.*", category=DeprecationWarning)
        import spatialdata as sd
        from spatialdata.models import Image2DModel, ShapesModel, TableModel
        from spatialdata.transformations import Identity, Scale

    info = dict(adata.uns.get("deepspot", {}))
    diam = info.get("spot_diameter_px")
    if diam is None:
        lib = next(iter(adata.uns.get("spatial", {}).values()), {})
        diam = lib.get("scalefactors", {}).get("spot_diameter_fullres")
    if diam is None:
        raise ValueError(f"{slide_path}: the prediction does not record its spot diameter in pixels")
    mpp = mpp if mpp is not None else (info.get("mpp") if (info.get("mpp") or -1) > 0 else None)

    def transforms():
        t = {"global": Identity()}
        if mpp:
            t["um"] = Scale([float(mpp), float(mpp)], axes=("y", "x"))
        return t

    arr = SlideArray(slide_path, mpp=mpp)
    h, w = arr.shape[1:]
    n_scales = max(0, int(np.ceil(np.log2(max(h, w) / smallest)))) if max(h, w) > smallest else 0
    image = Image2DModel.parse(da.from_array(arr, chunks=(3, chunk, chunk)), dims=("c", "y", "x"),
                               c_coords=["r", "g", "b"], scale_factors=[2] * n_scales or None,
                               transformations=transforms())
    n = adata.n_obs
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64).reshape(n, 2)
    circles = ShapesModel.parse(xy, geometry=0, radius=np.full(n, float(diam) / 2.0), index=pd.RangeIndex(n),
                                transformations=transforms())
    values = X if X is not None else adata.X
    if values is None:
        raise ValueError(f"{slide_path}: the prediction has no values (X)")
    if tuple(values.shape) != (n, adata.n_vars):
        raise ValueError(f"{slide_path}: X has shape {tuple(values.shape)}, the prediction is {n} x {adata.n_vars}")
    obs = adata.obs.copy()
    obs["region"] = pd.Categorical([shapes_key] * n)
    obs["spot_id"] = np.arange(n)
    rows = max(1, min(n, 4096))
    table = ad.AnnData(X=da.from_array(values, chunks=(rows, max(adata.n_vars, 1))).astype(np.float32) if n
                       else np.zeros((0, adata.n_vars), np.float32),
                       obs=obs, var=adata.var.copy(), obsm={"spatial": xy},
                       uns={k: v for k, v in adata.uns.items() if k != "spatial"},
                       layers={k: da.from_array(v, chunks=(rows, max(adata.n_vars, 1))).astype(np.float32) if n
                               else np.zeros((0, adata.n_vars), np.float32)
                               for k, v in (dict(adata.layers) if layers is None else layers).items()})
    table = TableModel.parse(table, region=shapes_key, region_key="region", instance_key="spot_id")
    return sd.SpatialData(images={image_key: image}, shapes={shapes_key: circles}, tables={table_key: table})


def write_spatialdata(sdata, path: str | Path, atomic: bool = True) -> Path:
    """Write a SpatialData zarr (``atomic``: into a temp folder beside ``path``, renamed when complete)."""
    import warnings

    import dask

    path = Path(path)
    if not atomic:
        with warnings.catch_warnings(), dask.config.set(scheduler="synchronous"):
            warnings.filterwarnings("ignore", message=".*autosharding.*")  # zarr's notice, not ours to act on
            warnings.filterwarnings("ignore", message=".*deprecated class Scaler.*", category=DeprecationWarning)
            sdata.write(path)
        return path
    with atomic_dir(path) as tmp:
        write_spatialdata(sdata, tmp, atomic=False)
    return path
