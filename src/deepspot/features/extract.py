"""Feature extraction: every unique crop encoded once, batched through a DataLoader.

Slide reading and cropping run in DataLoader workers (overlapped with encoding);
features stream into a per-slide zarr store that is reused on the next run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from deepspot.features.store import (FeatureWriter, Features, feature_key, load_features, match_centers,
                                     store_centers)
from deepspot.features.tiles import make_crops, read_size, spot_boxes

log = logging.getLogger(__name__)


class SpotCropDataset(Dataset):
    """Item i -> uint8 (1 + n_sub², out, out, 3): spot crop then sub-spot crops.

    The slide is opened lazily in each worker (slides are not shared across processes).
    """

    def __init__(self, slide_path, mpp, centers: np.ndarray, tile_px: float, out_size: int, n_sub: int):
        self.slide_path, self.mpp = str(slide_path), mpp
        self.boxes = spot_boxes(centers, tile_px)
        self.out_size, self.n_sub = out_size, n_sub
        self.read_px = read_size(tile_px, out_size, n_sub)
        self._slide = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def slide(self):
        if self._slide is None:
            from deepspot.io.slides import open_slide

            self._slide = open_slide(self.slide_path, mpp=self.mpp)
        return self._slide

    def __getitem__(self, i: int) -> torch.Tensor:
        x0, y0, w, h = (int(v) for v in self.boxes[i])
        region = self.slide.read_scaled((x0, y0), (w, h), self.read_px)
        return make_crops(region, self.out_size, self.n_sub)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None
        return state


@dataclass
class ExtractStats:
    n_spots: int = 0
    n_crops: int = 0
    seconds_total: float = 0.0
    seconds_encoder: float = 0.0
    cached: bool = False
    store: str | None = None
    extra: dict = field(default_factory=dict)


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


def _encode(slide_path, centers, tile_px, encoder, n_sub, mpp, batch_size, num_workers, device, autocast_dtype,
            progress, stats, writer=None, offset: int = 0) -> Features:
    """Encode spot + sub-spot crops of ``centers`` (N,2); optionally stream into ``writer`` at ``offset``."""
    n, s = len(centers), n_sub * n_sub
    spot_out = np.zeros((n, encoder.dim), dtype=np.float32)
    sub_out = np.zeros((n, s, encoder.dim), dtype=np.float32) if s else None
    ds = SpotCropDataset(slide_path, mpp, centers, tile_px, encoder.input_size, n_sub)
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                    prefetch_factor=4 if num_workers else None)
    t_start, done = time.perf_counter(), 0
    with _progress(n, "encoding", progress) as bar:
        task = bar.add_task(f"encode {Path(slide_path).name}", total=n, rate="")
        for crops in dl:  # (B, 1+S, out, out, 3) uint8
            b = crops.shape[0]
            t0 = time.perf_counter()
            feats = encoder.encode(crops.reshape(b * (1 + s), *crops.shape[2:]), device=device,
                                   autocast_dtype=autocast_dtype)
            stats.seconds_encoder += time.perf_counter() - t0
            feats = feats.reshape(b, 1 + s, -1).numpy()
            spot_out[done:done + b] = feats[:, 0]
            if s:
                sub_out[done:done + b] = feats[:, 1:]
            if writer is not None:
                writer.write(offset + done, centers[done:done + b], feats[:, 0], feats[:, 1:] if s else None)
            done += b
            bar.update(task, advance=b, rate=f"{done / max(time.perf_counter() - t_start, 1e-9):.1f} spots/s")
    stats.n_crops += n * (1 + s)
    stats.seconds_total += time.perf_counter() - t_start
    return Features(spot=spot_out, subspot=sub_out)


def extract_features(slide_path, centers: np.ndarray, tile_px: float, encoder, n_sub: int = 3,
                     mpp: float | None = None, cache_dir: str | Path | None = None, batch_size: int = 16,
                     num_workers: int = 0, device: str | torch.device = "cpu", autocast_dtype=None,
                     progress: bool = True, stats: ExtractStats | None = None) -> Features:
    """Encode the spot crop and n×n sub-spot crops of every centre once.

    centers: (N,2) level-0 (x, y) px; tile_px: spot side in level-0 px.
    Returns Features(spot (N,d), subspot (N,n²,d) or None when n_sub == 0), rows in ``centers`` order.
    With ``cache_dir``, one store per (slide, encoder, crop geometry) holds features by centre:
    centres already in it are reused, only the new ones are encoded and added.
    """
    stats = stats if stats is not None else ExtractStats()
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    n, s = len(centers), n_sub * n_sub
    stats.n_spots += n
    common = dict(tile_px=tile_px, encoder=encoder, n_sub=n_sub, mpp=mpp, batch_size=batch_size,
                  num_workers=num_workers, device=device, autocast_dtype=autocast_dtype, progress=progress,
                  stats=stats)
    if cache_dir is None:
        return _encode(slide_path, centers, **common)
    key = feature_key(slide_path, encoder.name, tile_px, n_sub)
    store_path = Path(cache_dir) / f"{Path(slide_path).stem}-{encoder.name}-{key}.zarr"
    stats.store = str(store_path)
    attrs = {"encoder": encoder.name, "tile_px": float(tile_px), "n_sub": n_sub, "slide": str(slide_path)}
    old = store_centers(store_path)
    rows = match_centers(old, centers)
    missing = np.flatnonzero(rows < 0)
    if len(missing) == 0:
        log.info("reusing cached features %s", store_path)
        stats.cached = True
        return load_features(store_path, rows)
    new_centers = centers[missing]
    # drop duplicates among the new centres so each crop is encoded once
    uniq_rows = match_centers(new_centers, new_centers)
    first = np.flatnonzero(uniq_rows == np.arange(len(new_centers)))
    new_centers = new_centers[first]
    writer = FeatureWriter(store_path, len(old) + len(new_centers), encoder.dim, s, attrs)
    try:
        if len(old):  # carry the stored features over in chunks (bounded memory)
            for a in range(0, len(old), 4096):
                f = load_features(store_path, np.arange(a, min(a + 4096, len(old))))
                writer.write(a, old[a:a + 4096], f.spot, f.subspot)
        _encode(slide_path, new_centers, writer=writer, offset=len(old), **common)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return load_features(store_path, match_centers(store_centers(store_path), centers))
