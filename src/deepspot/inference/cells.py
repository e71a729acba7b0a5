"""Cell-level prediction: a table of cell centroids + an H&E image + a cell model -> cells AnnData.

Each cell is one tile of side ``cell_diameter`` centred on its centroid, encoded once;
its context is the tiles of its neighbouring cells, found by the rule stored in the
checkpoint (k nearest or within a radius, KD-tree) — the same rule as in training.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from deepspot.features.extract import ExtractStats, extract_features
from deepspot.geometry.neighbors import knn_neighbors, radius_neighbors
from deepspot.inference.predict import invert_scaler
from deepspot.io.outputs import add_spatial_image
from deepspot.io.spatial import SpatialDataError, check_inside, read_cells_h5ad
from deepspot.models.cells import CellBags, cell_predictor, predict_batches
from deepspot.models.checkpoint import CheckpointError

log = logging.getLogger(__name__)

CELL_MODELS = ("deepcell", "deepspot2cell")
NEIGHBOR_RULES = ("knn", "radius", "none")


@dataclass(frozen=True)
class CellGeometry:
    """How a cell's tile and context are cut; stored in every cell checkpoint.

    ``cell_diameter`` (tile side) and ``radius`` are in ``unit`` ('px' = level-0 pixels, or 'um',
    converted with the slide's mpp). ``neighbors``: 'knn' (the ``k`` nearest cells; published
    k = 45), 'radius' (all cells within ``radius``, at most ``max_neighbors`` nearest) or 'none'
    (the cell's own tile only).
    """

    cell_diameter: float = 20.0
    unit: str = "px"
    neighbors: str = "knn"
    k: int = 45
    radius: float = 50.0
    max_neighbors: int | None = None

    def __post_init__(self):
        if self.unit not in ("um", "px"):
            raise ValueError(f"cell geometry unit must be 'um' or 'px', got {self.unit!r}")
        if self.neighbors not in NEIGHBOR_RULES:
            raise ValueError(f"neighbour rule must be one of {', '.join(NEIGHBOR_RULES)}, got {self.neighbors!r}")
        if self.cell_diameter <= 0:
            raise ValueError(f"cell diameter must be positive, got {self.cell_diameter}")
        if self.neighbors == "knn" and self.k < 1:
            raise ValueError(f"k nearest neighbours needs k >= 1, got {self.k}")
        if self.neighbors == "radius" and self.radius <= 0:
            raise ValueError(f"neighbour radius must be positive, got {self.radius}")

    @property
    def context(self) -> str:
        """The model context this rule implies."""
        return "cell" if self.neighbors == "none" else "cell_neighbors"

    def _px(self, value: float, mpp: float | None) -> float:
        if self.unit == "px":
            return float(value)
        if mpp is None or mpp <= 0:
            raise ValueError("this cell geometry is in µm: an mpp (µm per pixel) is needed; pass --mpp")
        return float(value) / mpp

    def tile_px(self, mpp: float | None = None) -> float:
        return self._px(self.cell_diameter, mpp)

    def find_neighbors(self, xy_px: np.ndarray, mpp: float | None = None):
        """Padded neighbour index (N,K) + mask (N,K) of cells at level-0 (x, y) px positions."""
        xy_px = np.asarray(xy_px, dtype=np.float64)
        if self.neighbors == "knn":
            return knn_neighbors(xy_px, self.k)
        if self.neighbors == "radius":
            return radius_neighbors(xy_px, self._px(self.radius, mpp), max_k=self.max_neighbors)
        return np.zeros((len(xy_px), 0), np.int64), np.zeros((len(xy_px), 0), bool)

    def describe(self) -> str:
        rule = {"knn": f"{self.k} nearest cells", "none": "no neighbours",
                "radius": f"cells within {self.radius:g} {self.unit}"}[self.neighbors]
        return f"cell tile {self.cell_diameter:g} {self.unit}, context: {rule}"

    def to_dict(self) -> dict:
        return {"kind": "cell", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CellGeometry":
        return cls(**{k: v for k, v in d.items() if k != "kind"})


def cell_bags(features: np.ndarray, xy_px: np.ndarray, geometry: CellGeometry, mpp: float | None = None) -> CellBags:
    """Bags over cells: each cell's own tile features + its neighbours' (looked up by index)."""
    idx, mask = geometry.find_neighbors(xy_px, mpp)
    if geometry.neighbors != "none" and len(xy_px) and mask.shape[1] == 0:
        log.warning("only %d cell(s): no neighbour context", len(xy_px))
    return CellBags.from_numpy(features, idx, mask)


def read_cell_table(path: str | Path, x_col: str = "x", y_col: str = "y", id_col: str | None = None):
    """Cell centroids from CSV/TSV/parquet (columns ``x_col``, ``y_col``: level-0 px, x horizontal)
    or an h5ad (obs columns or obsm['spatial']). Returns (ids pd.Index of str, xy (N,2) float64)."""
    path = Path(path)
    if not path.exists():
        raise SpatialDataError(f"{path}: cell table not found")
    name = path.name.lower()
    if name.endswith(".h5ad"):
        a = read_cells_h5ad(path, *((x_col, y_col) if x_col in _obs_columns(path) else (None, None)))
        return pd.Index(a.obs_names.astype(str)), np.asarray(a.obsm["spatial"], dtype=np.float64)
    try:
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        else:
            sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")) else ","
            df = pd.read_csv(path, sep=sep)
    except ImportError as e:
        raise SpatialDataError(f"{path}: reading parquet needs pyarrow ({e}); install it or pass a CSV") from None
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read cell table ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    missing = [c for c in (x_col, y_col) if c not in df.columns]
    if missing:
        raise SpatialDataError(f"{path}: cell table needs centroid columns {missing} (level-0 px, x horizontal); "
                               f"found {list(map(str, df.columns))[:10]}; choose them with --x-col/--y-col")
    if len(df) == 0:
        raise SpatialDataError(f"{path}: cell table has no rows")
    try:
        xy = df[[x_col, y_col]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise SpatialDataError(f"{path}: columns {x_col!r}/{y_col!r} are not numeric") from None
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise SpatialDataError(f"{path}: {int(bad.sum())} cells have missing or non-finite centroids "
                               f"(first at row {int(np.flatnonzero(bad)[0])})")
    if id_col is not None and id_col not in df.columns:
        raise SpatialDataError(f"{path}: id column {id_col!r} not in the table")
    id_col = id_col or ("cell_id" if "cell_id" in df.columns else None)
    ids = pd.Index(df[id_col].astype(str) if id_col else df.index.astype(str))
    if not ids.is_unique:
        raise SpatialDataError(f"{path}: duplicated cell ids, e.g. {ids[ids.duplicated()][:3].tolist()}")
    return ids, xy


def _obs_columns(path: Path) -> list[str]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return list(f["obs"].keys()) if "obs" in f else []
    except OSError:
        return []


def inside_image(xy: np.ndarray, width: int, height: int, source: str, drop_outside: bool = False) -> np.ndarray:
    """Boolean keep-mask of cells inside the image. Outside cells raise SpatialDataError, or with
    ``drop_outside`` are dropped with a warning."""
    xy = np.asarray(xy)
    keep = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < width) & (xy[:, 1] < height)
    if not drop_outside:
        check_inside(xy, width, height, source, what="cells")
    elif not keep.all():
        log.warning("%s: dropping %d of %d cells outside the %dx%d image", source, int((~keep).sum()), len(xy),
                    width, height)
        if not keep.any():
            raise SpatialDataError(f"{source}: all {len(xy)} cells lie outside the {width}x{height} image")
    return keep


def check_cell_model(config: dict, source: str | Path) -> None:
    if config.get("model") not in CELL_MODELS:
        raise CheckpointError(f"{source}: a '{config.get('model')}' checkpoint is not a cell model "
                              f"({' or '.join(CELL_MODELS)}); use `deepspot predict` for spot models")


def predict_cells(slide_path, xy: np.ndarray, model, config: dict, encoder, cell_ids=None, mpp: float | None = None,
                  batch_size: int = 16, num_workers: int = 0, cache_dir=None, device="cpu", autocast_dtype=None,
                  progress: bool = True, library_id: str | None = None, thumbnail_size: int = 2000,
                  drop_outside: bool = False, predict_batch: int = 512,
                  stats: ExtractStats | None = None) -> ad.AnnData:
    """Predict every cell of a centroid table (N,2 level-0 px) on a slide with a DeepCell or
    DeepSpot2Cell checkpoint.

    Returns AnnData (cells × genes, log1p-normalised expression) with obsm['spatial'] (x, y) px,
    uns['spatial'][library_id] (thumbnail + scalefactors, spot_diameter_fullres = cell tile px) and
    uns['deepspot'] (provenance, neighbour rule).
    """
    from deepspot.io.slides import open_slide, require_mpp

    check_cell_model(config, "checkpoint")
    geom = CellGeometry.from_dict(config["geometry"])
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    ids = pd.Index(np.asarray(cell_ids).astype(str)) if cell_ids is not None else pd.Index(
        [f"cell_{i}" for i in range(len(xy))])
    if len(ids) != len(xy):
        raise ValueError(f"{len(ids)} cell ids for {len(xy)} centroids")
    if len(xy) == 0:
        raise SpatialDataError(f"{slide_path}: no cells to predict")
    with open_slide(slide_path, mpp=mpp) as slide:
        mpp_used = require_mpp(slide, mpp) if geom.unit == "um" else slide.mpp
        w, h = slide.dimensions
        thumb = slide.get_thumbnail(thumbnail_size)
    keep = inside_image(xy, w, h, str(slide_path), drop_outside=drop_outside)
    xy, ids = xy[keep], ids[keep]
    tile = geom.tile_px(mpp_used)
    feats = extract_features(slide_path, xy, tile, encoder, n_sub=0, mpp=mpp, cache_dir=cache_dir,
                             batch_size=batch_size, num_workers=num_workers, device=device,
                             autocast_dtype=autocast_dtype, progress=progress, stats=stats)
    bags = cell_bags(feats.spot, xy, geom, mpp_used)
    X = invert_scaler(predict_batches(cell_predictor(model), bags, batch_size=predict_batch, device=device),
                      config.get("scaler"))
    genes = list(config["genes"])
    adata = ad.AnnData(X=X.astype(np.float32), obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    lib = library_id or Path(slide_path).stem
    add_spatial_image(adata, lib, thumb, thumb.shape[1] / w, tile, source_image_path=str(slide_path))
    adata.uns["deepspot"] = {
        "model": config["model"], "encoder": config["encoder"]["name"], "cell_tile_px": float(tile),
        "neighbors": geom.describe(), "mpp": float(mpp_used) if mpp_used else -1.0,
        "n_dropped_outside": int((~keep).sum()),
        "values": "log1p(normalize_total 1e4) expression per cell",
    }
    return adata
