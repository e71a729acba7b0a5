"""Feature extraction: every unique crop encoded once, batched through a DataLoader.

Slide reading and cropping run in DataLoader workers (overlapped with encoding): each
worker item is a whole batch of spots, each spot's box read once from the pyramid level
nearest the target resolution and cut into its spot and n×n sub-spot crops in memory.
Features stream, in order, into a per-slide zarr store (reused on the next run) or into
arrays in memory for small images.

Modes
-----
``standard``  the spot crop and n×n sub-spot crops are encoded separately (the method as published).
``fast``      only the spot crop is encoded; sub-spot features are its patch tokens (ViT) or final
              feature map (CNN) mean-pooled over the same n×n regions (:func:`tiles.pool_regions`).
              A model must be trained and used in the same mode.
"""
from __future__ import annotations

import contextlib

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from deepspot.features.views import view_crops, view_tag
from deepspot.config import FEATURE_MODES, check_choice
from deepspot.config.runtime import settings
from deepspot.features.store import (FeatureWriter, Features, StoredFeatures, feature_key, match_centers,
                                     store_centers)
from deepspot.features.tiles import make_crops, pool_regions, read_size, spot_boxes

log = logging.getLogger(__name__)

# Standard mode: at most this many crops per encoder forward pass, by device type. On a CPU small batches
# keep a convnet's activations in cache: the batch-size sweep of benchmarks/fair_predict.py
# (docs/scaling.md) measured 9 fastest, 2.3x the crops/s of 64; on a GPU larger batches fill the device
# (activations, not weights, set the peak memory). Other device types take the "cuda" value.
FORWARD_BATCH = {"cpu": 9, "cuda": 64}


def forward_batch(device) -> int:
    """Crops per encoder forward pass on ``device`` (:data:`FORWARD_BATCH`)."""
    kind = torch.device(device).type
    return int(FORWARD_BATCH.get(kind, FORWARD_BATCH["cuda"]))


def check_mode(mode: str) -> str:
    check_choice("feature mode", mode, FEATURE_MODES)
    return mode


def default_num_workers() -> int:
    """Reader processes beside the encoder: about half the cores (1 on a 2-core machine), at most 4."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, n // 2))


class SpotCropDataset(Dataset):
    """Item = a list of spot indices -> {"crops": uint8 (B, C, out, out, 3), "error": None}, C = 1 + n_sub²
    (spot crop first) or 1 when ``n_sub == 0``. A read error comes back as {"error": message} so the
    main process can raise it as the :class:`SlideError` it is (worker exceptions lose their type).

    The slide is opened lazily in each worker (slides are not shared across processes).
    """

    def __init__(self, slide_path, mpp, centers: np.ndarray, tile_px: float, out_size: int, n_sub: int,
                 subspot_rule: str = "split"):
        slide_path, self._borrowed = _source(slide_path)  # an open Slide is read, never closed, here
        self.slide_path, self.mpp = str(slide_path), mpp
        self.boxes = spot_boxes(centers, tile_px)
        self.out_size, self.n_sub, self.subspot_rule = out_size, n_sub, subspot_rule
        # one read size per box: boxes of varying size (cells cropped by their polygon's box) each read at theirs
        self.read_px = np.broadcast_to(read_size(tile_px, out_size, n_sub, subspot_rule), (len(self.boxes),))
        self._slide = self._borrowed

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def slide(self):
        if self._slide is None:
            from deepspot.io.slides import open_slide

            self._slide = open_slide(self.slide_path, mpp=self.mpp)
        return self._slide

    def crops(self, i: int) -> torch.Tensor:
        """Spot ``i``: its box read once at ``read_px`` and cut into (C, out, out, 3) crops."""
        x0, y0, w, h = (int(v) for v in self.boxes[i])
        region = self.slide.read_scaled((x0, y0), (w, h), int(self.read_px[i]))
        return make_crops(region, self.out_size, self.n_sub, self.subspot_rule)

    def __getitem__(self, indices) -> dict:
        from deepspot.io.slides import SlideError

        try:
            return {"crops": torch.stack([self.crops(int(i)) for i in indices]), "error": None}
        except SlideError as e:
            return {"crops": None, "error": e.reason}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = state["_borrowed"] = None
        return state

    def close(self) -> None:
        """Close this process's slide handle (workers close theirs when they exit); a borrowed one (an
        open Slide given in place of a path) stays open for its owner."""
        if self._slide is not None and self._slide is not self._borrowed:
            self._slide.close()
        self._slide = self._borrowed


def _source(slide):
    """(path, open Slide or None) of what a caller gave: a path, or an open Slide (read through, the
    slide a prediction plan holds open, so that a prediction opens its slide once)."""
    if hasattr(slide, "read_scaled") and hasattr(slide, "path"):
        return slide.path, slide
    return slide, None


@dataclass
class ExtractStats:
    n_spots: int = 0
    n_crops: int = 0
    n_forward: int = 0  # images through the encoder
    seconds_total: float = 0.0
    seconds_encoder: float = 0.0  # inside the encoder (preprocess + forward)
    seconds_waiting: float = 0.0  # main process waiting for crops from the readers
    cached: bool = False
    store: str | None = None
    extra: dict = field(default_factory=dict)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=False)


@torch.no_grad()
def encode_batch(encoder, crops: torch.Tensor, n_sub: int, mode: str = "standard", device=None,
                 autocast_dtype=None) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 crops (B, C, out, out, 3) -> spot (B,d), sub-spot (B,n²,d) features (None when n_sub == 0).

    standard: C = 1 + n², all crops encoded; fast: C = 1, sub-spots pooled from the spot's tokens.
    """
    b, c = crops.shape[:2]
    if mode == "standard" or n_sub == 0:
        f = encoder.encode(crops.reshape(b * c, *crops.shape[2:]), device=device, autocast_dtype=autocast_dtype,
                           batch_size=forward_batch(device if device is not None else encoder.device))
        f = f.reshape(b, c, -1).numpy()
        return f[:, 0], (f[:, 1:] if n_sub else None)
    if device is not None and torch.device(device) != encoder.device:
        encoder.to(device)
    from deepspot.features.encoders import resolve_autocast

    x = encoder.preprocess(crops[:, 0])
    dtype = resolve_autocast(autocast_dtype, encoder.device)  # the rule Encoder.encode follows
    if dtype is not None:
        with torch.autocast(device_type=encoder.device.type, dtype=dtype):
            cls, tok = encoder.forward_tokens(x)
    else:
        cls, tok = encoder.forward_tokens(x)
    return cls.float().cpu().numpy(), pool_regions(tok.float(), n_sub).cpu().numpy()


def encode_spots(slide_path, centers: np.ndarray, tile_px, encoder, sink: Callable, n_sub: int = 3,
                 mode: str = "standard", mpp: float | None = None, batch_size: int = 16,
                 stats: ExtractStats | None = None, subspot_rule: str = "split", what: str = "spots",
                 view: int = 0, stain_sigma: float = 0.0, view_seed: int = 0, **run) -> ExtractStats:
    """Encode spots in order, calling ``sink(start, centers, spot (B,d), subspot (B,S,d)|None)`` per batch.

    centers: (N,2) level-0 (x, y) px; tile_px: spot side in level-0 px, or one side per crop (N,) (cells
    cropped by their polygon's box, each resized to the encoder input); subspot_rule: how sub-spots are
    cut (:func:`~deepspot.features.tiles.subspot_bounds`); ``what`` names the items in the progress rate
    ('spots', 'cells'). Reading runs in
    ``num_workers`` DataLoader processes (None: :func:`default_num_workers`; 0: in this process).
    ``view`` / ``stain_sigma`` / ``view_seed``: encode every crop as that dihedral view, with that HED
    stain jitter (:mod:`deepspot.features.views`; 0, 0: the crops as read). ``slide_path`` may be an open
    Slide (read through, not closed). ``num_workers``, ``device``, ``autocast_dtype`` and ``progress`` are
    :data:`deepspot.settings`; given as keywords (``run``) they hold for this call.
    """
    from deepspot.io.slides import SlideError

    run = settings.resolve(**run)
    num_workers, device, autocast_dtype, progress = run.num_workers, run.device, run.autocast_dtype, run.progress
    check_mode(mode)
    stats = stats if stats is not None else ExtractStats()
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    n, s = len(centers), n_sub * n_sub
    if n == 0:
        return stats
    n_crop = 1 + s if mode == "standard" else 1
    source, slide_path = slide_path, _source(slide_path)[0]
    ds = SpotCropDataset(source, mpp, centers, tile_px, encoder.input_size, n_sub if mode == "standard" else 0,
                         subspot_rule)
    workers = default_num_workers() if num_workers is None else int(num_workers)
    workers = min(workers, max(1, (n + batch_size - 1) // batch_size))
    if workers:  # a plain image is decoded here once; forked workers inherit the decode instead of redoing it
        ds.slide.read_region((0, 0), 0, (1, 1))
    dl = DataLoader(ds, batch_size=None, sampler=BatchSampler(SequentialSampler(range(n)), batch_size, False),
                    num_workers=workers, prefetch_factor=4 if workers else None)
    t_start, done = time.perf_counter(), 0
    with contextlib.closing(ds), _progress(progress) as bar:
        task = bar.add_task(f"encode {Path(slide_path).name}", total=n, rate="")
        it = iter(dl)
        while done < n:
            t0 = time.perf_counter()
            item = next(it)
            t1 = time.perf_counter()
            stats.seconds_waiting += t1 - t0
            if item["error"] is not None:
                raise SlideError(slide_path, item["error"])
            crops = item["crops"]
            if view or stain_sigma:
                crops = view_crops(crops, view, stain_sigma, view_seed, start=done)
            b = crops.shape[0]
            spot, sub = encode_batch(encoder, crops, n_sub, mode, device, autocast_dtype)
            stats.seconds_encoder += time.perf_counter() - t1
            sink(done, centers[done:done + b], spot, sub)
            done += b
            bar.update(task, advance=b, rate=f"{done / max(time.perf_counter() - t_start, 1e-9):.1f} {what}/s")
    stats.n_spots += n
    stats.n_crops += n * (1 + s)
    stats.n_forward += n * n_crop
    stats.seconds_total += time.perf_counter() - t_start
    return stats


def store_path_for(cache_dir, slide_path, encoder, tile_px: float, n_sub: int, mode: str = "standard",
                   subspot_rule: str = "split", view: int = 0, stain_sigma: float = 0.0, view_seed: int = 0) -> Path:
    """Where the feature store of (slide, encoder, crop geometry, mode, view) lives in ``cache_dir``."""
    key = feature_key(slide_path, encoder.name, tile_px, n_sub, mode, subspot_rule)
    suffix = ("" if mode == "standard" else f"-{mode}") + view_tag(view, stain_sigma, view_seed)
    return Path(cache_dir) / f"{Path(slide_path).stem}-{encoder.name}{suffix}-{key}.zarr"


def extract_to_store(slide_path, centers: np.ndarray, tile_px: float, encoder, store_path, n_sub: int = 3,
                     mode: str = "standard", mpp: float | None = None, batch_size: int = 16,
                     stats: ExtractStats | None = None, subspot_rule: str = "split",
                     what: str = "spots", view: int = 0, stain_sigma: float = 0.0,
                     view_seed: int = 0, **run) -> StoredFeatures:
    """Encode what ``store_path`` lacks and return the features of ``centers`` read lazily from it.

    Centres already in a finished store are reused; only new ones are encoded, appended behind the old
    rows (copied over chunk by chunk). Memory stays flat in the number of spots. ``run``: the settings of
    this call, as for :func:`encode_spots`.
    """
    settings.resolve(**run)  # an unknown keyword fails before the store is touched
    stats = stats if stats is not None else ExtractStats()
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    source, slide_path = slide_path, _source(slide_path)[0]
    store_path = Path(store_path)
    stats.store = str(store_path)
    s = n_sub * n_sub
    varying = np.ndim(tile_px) > 0  # one side per crop (cell boxes): the store holds exactly these crops, in order
    if varying and np.shape(tile_px) != (len(centers),):
        raise ValueError(f"{len(np.ravel(tile_px))} crop sides for {len(centers)} centres")
    attrs = {"encoder": encoder.name, "tile_px": "per crop" if varying else float(tile_px), "n_sub": n_sub,
             "mode": check_mode(mode), "slide": str(slide_path), "subspot_rule": subspot_rule}
    if view or stain_sigma:
        attrs.update(view=int(view), stain_sigma=float(stain_sigma), view_seed=int(view_seed))
    old = store_centers(store_path)
    if varying:  # crops of one centre may differ in side: reused only whole (same centres, in order), never merged
        same = len(old) == len(centers) and (match_centers(old, centers) == np.arange(len(centers))).all()
        if same and len(centers):
            log.info("reusing cached features %s", store_path)
            stats.cached = True
            return StoredFeatures(store_path, np.arange(len(centers)))
        writer = FeatureWriter(store_path, len(centers), encoder.dim, s, attrs)
        try:
            encode_spots(source, centers, tile_px, encoder, lambda start, c, f, sf: writer.write(start, c, f, sf),
                         n_sub=n_sub, mode=mode, mpp=mpp, batch_size=batch_size, stats=stats,
                         subspot_rule=subspot_rule, **run, what=what, view=view, stain_sigma=stain_sigma,
                         view_seed=view_seed)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return StoredFeatures(store_path, np.arange(len(centers)))
    rows = match_centers(old, centers)
    missing = np.flatnonzero(rows < 0)
    if len(missing) == 0 and (len(centers) or len(old)):
        log.info("reusing cached features %s", store_path)
        stats.cached = True
        return StoredFeatures(store_path, rows)
    new_centers = centers[missing]
    uniq_rows = match_centers(new_centers, new_centers)  # each new centre encoded once
    new_centers = new_centers[np.flatnonzero(uniq_rows == np.arange(len(new_centers)))]
    writer = FeatureWriter(store_path, len(old) + len(new_centers), encoder.dim, s, attrs)
    try:
        if len(old):
            prev = StoredFeatures(store_path)
            for a in range(0, len(old), 1024):
                b = min(a + 1024, len(old))
                writer.write(a, old[a:b], prev.spot_rows(np.arange(a, b)), prev.subspot_range(a, b))
        encode_spots(source, new_centers, tile_px, encoder,
                     lambda start, c, f, sf: writer.write(len(old) + start, c, f, sf), n_sub=n_sub, mode=mode,
                     mpp=mpp, batch_size=batch_size, stats=stats, subspot_rule=subspot_rule, **run,
                     what=what, view=view, stain_sigma=stain_sigma, view_seed=view_seed)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return StoredFeatures(store_path, match_centers(store_centers(store_path), centers))


def extract_features(slide_path, centers: np.ndarray, tile_px: float, encoder, n_sub: int = 3,
                     mpp: float | None = None, batch_size: int = 16, stats: ExtractStats | None = None,
                     mode: str = "standard", subspot_rule: str = "split", what: str = "spots", view: int = 0,
                     stain_sigma: float = 0.0, view_seed: int = 0, **run) -> Features:
    """Encode the spot crop and n×n sub-spot crops of every centre once; features in memory.

    centers: (N,2) level-0 (x, y) px; tile_px: spot side in level-0 px.
    Returns Features(spot (N,d), subspot (N,n²,d) or None when n_sub == 0), rows in ``centers`` order.
    With ``cache_dir``, one store per (slide, encoder, crop geometry, mode) holds features by centre:
    centres already in it are reused, only the new ones are encoded and added. For whole slides use
    :func:`extract_to_store`, which never holds all features in memory. ``view`` etc.: see
    :func:`encode_spots` (each view has its own store). ``run``: the settings of this call (``cache_dir``,
    ``num_workers`` (default here 0: read in this process), ``device``, ``autocast_dtype``, ``progress``).
    """
    stats = stats if stats is not None else ExtractStats()
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    cache_dir = run.pop("cache_dir") if "cache_dir" in run else settings.cache_dir
    if "num_workers" not in run and settings.num_workers is None:
        run["num_workers"] = 0
    settings.resolve(**run)  # an unknown keyword fails before any work
    common = dict(n_sub=n_sub, mode=mode, mpp=mpp, batch_size=batch_size, stats=stats, subspot_rule=subspot_rule,
                  what=what, view=view, stain_sigma=stain_sigma, view_seed=view_seed, **run)
    if cache_dir is not None:
        path = store_path_for(cache_dir, _source(slide_path)[0], encoder, tile_px, n_sub, mode, subspot_rule, view, stain_sigma,
                              view_seed)
        return extract_to_store(slide_path, centers, tile_px, encoder, path, **common).load()
    n, s = len(centers), n_sub * n_sub
    spot_out = np.zeros((n, encoder.dim), dtype=np.float32)
    sub_out = np.zeros((n, s, encoder.dim), dtype=np.float32) if s else None

    def sink(start, _c, spot, sub):
        spot_out[start:start + len(spot)] = spot
        if sub_out is not None:
            sub_out[start:start + len(spot)] = sub

    encode_spots(slide_path, centers, tile_px, encoder, sink, **common)
    return Features(spot=spot_out, subspot=sub_out)


__all__ = ["FEATURE_MODES", "FORWARD_BATCH", "ExtractStats", "SpotCropDataset", "default_num_workers", "encode_batch",
           "encode_spots", "extract_features", "extract_to_store", "forward_batch", "store_path_for"]
