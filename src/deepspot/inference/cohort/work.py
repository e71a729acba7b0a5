"""The per-slide work: what a worker needs (:class:`PredictOptions`), the model and encoder loaded once per
process (:class:`SlidePredictor`), and :func:`predict_job`, the one per-slide code path of both runners."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from deepspot.inference.cohort.manifest import SlideJob
from deepspot.inference.cohort.state import SlideResult

log = logging.getLogger("deepspot.inference.cohort")


@dataclass(frozen=True)
class PredictOptions:
    """Everything a worker needs to predict a slide (picklable; sent with each task)."""

    model: str
    encoder_weights: str | None = None
    tissue: str | None = None  # None: the model geometry's filter
    batch_size: int = 16
    num_workers: int = 0
    plot_genes: int = 0
    device: str = "auto"
    autocast: str | None = None
    cache_dir: str | None = None
    fmt: str = "h5ad"  # or "spatialdata" (<id>.zarr)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class SlidePredictor:
    """The model, its config and its encoder, loaded once per process and reused for every slide."""

    _cache: dict[tuple, "SlidePredictor"] = {}

    def __init__(self, opts: PredictOptions):
        from deepspot.features.encoders import load_encoder
        from deepspot.models.checkpoint import load_checkpoint, read_config

        self.opts = opts
        self.device = resolve_device(opts.device)
        cfg = read_config(opts.model)
        self.encoder = load_encoder(cfg.encoder.name, weights=opts.encoder_weights, device=self.device)
        self.model, self.config = load_checkpoint(opts.model, feature_dim=self.encoder.dim)

    @classmethod
    def cached(cls, opts: PredictOptions) -> "SlidePredictor":
        """This process's predictor for ``opts`` (built on first use; the checkpoint's mtime is
        part of the key, so a rewritten checkpoint is reloaded)."""
        from deepspot.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

        stamp = tuple(os.stat(Path(opts.model) / f).st_mtime_ns for f in (CONFIG_FILE, WEIGHTS_FILE)
                      if (Path(opts.model) / f).exists())
        key = (opts, stamp)
        if key not in cls._cache:
            cls._cache.clear()  # one model per worker process
            cls._cache[key] = cls(opts)
        return cls._cache[key]


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def predict_job(job: SlideJob, out_dir: str | Path, predictor: SlidePredictor) -> SlideResult:
    """Predict one slide into ``out_dir`` (streamed, flat memory; outputs renamed into place only when
    complete: see ``inference.predict.predict_slide``). Never raises for a bad slide: the error comes back
    in the result. The only per-slide code path of both backends."""
    from deepspot.inference import predict

    t0 = time.perf_counter()
    opts = predictor.opts
    try:
        res = predict.predict_slide(job.path, predictor.model, predictor.config, predictor.encoder, out_dir,
                                    n_plot=opts.plot_genes, mpp=job.mpp, tissue=opts.tissue,
                                    batch_size=opts.batch_size, num_workers=opts.num_workers,
                                    cache_dir=opts.cache_dir, device=predictor.device, autocast_dtype=opts.autocast,
                                    progress=False, library_id=job.id, name=job.id, fmt=opts.fmt,
                                    command="predict-cohort")
    except Exception as e:  # noqa: BLE001 - one bad slide must not stop the cohort
        log.debug("slide %s failed", job.id, exc_info=True)
        return SlideResult(job.id, "failed", _one_line(e), seconds=time.perf_counter() - t0, path=str(job.path),
                           mpp=job.mpp)
    made = [p.name for p in (res.h5ad, res.csv, res.png) if p is not None]
    return SlideResult(job.id, "done", n_spots=int(res.n_spots), seconds=time.perf_counter() - t0,
                       path=str(job.path), outputs=made, mpp=job.mpp)
