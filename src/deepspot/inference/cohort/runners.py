"""The two runners, both calling :func:`~deepspot.inference.cohort.work.predict_job` per slide: ``local`` (an in-process
loop) and ``ray`` (one task per slide, a bounded number in flight, the model loaded once per worker)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from deepspot.inference.cohort.manifest import SlideJob
from deepspot.inference.cohort.state import SlideResult
from deepspot.inference.cohort.work import PredictOptions, SlidePredictor, _one_line, predict_job


def _ray_predict(job: SlideJob, out_dir: str, opts: PredictOptions, threads: int) -> SlideResult:
    """Body of a Ray task: one slide with this worker process's cached predictor."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        predictor = SlidePredictor.cached(opts)
    except Exception as e:  # noqa: BLE001 - report, do not crash the worker
        return SlideResult(job.id, "failed", "loading the model: " + _one_line(e), path=str(job.path))
    return predict_job(job, out_dir, predictor)


def _run_local(todo: list[SlideJob], out_dir: Path, opts: PredictOptions, on_result: Callable[[SlideResult], None]):
    predictor = SlidePredictor.cached(opts)
    for job in todo:
        on_result(predict_job(job, out_dir, predictor))


def _run_ray(todo: list[SlideJob], out_dir: Path, opts: PredictOptions, on_result: Callable[[SlideResult], None],
             address: str | None, num_cpus: float, num_gpus: float, max_in_flight: int | None):
    import ray

    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
                  configure_logging=True)
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(**kw)
        started = True
    try:
        res = ray.cluster_resources()
        slots = int(res.get("CPU", 1) // max(num_cpus, 1e-9)) if num_cpus > 0 else len(todo)
        if num_gpus > 0:
            slots = min(slots, int(res.get("GPU", 0) // num_gpus))
            if slots < 1:
                raise ValueError(f"the Ray cluster has {res.get('GPU', 0):g} GPUs; "
                                 f"a slide task asks for {num_gpus:g}")
        if slots < 1:
            raise ValueError(f"the Ray cluster has {res.get('CPU', 0):g} CPUs; a slide task asks for {num_cpus:g}")
        limit = max_in_flight or 2 * slots  # a queue of one task per slot keeps every worker busy
        # max_calls=0: keep worker processes (and their loaded model) alive across tasks, GPU ones too
        task = ray.remote(max_calls=0)(_ray_predict).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
        threads = max(1, int(num_cpus))
        pending: dict = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < limit:
                job = queue.pop(0)
                pending[task.remote(job, str(out_dir), opts, threads)] = job
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the worker died (crash, OOM kill, node lost)
                    result = SlideResult(job.id, "failed", "worker lost: " + _one_line(e), path=str(job.path),
                                         worker="?")
                on_result(result)
    finally:
        if started:
            ray.shutdown()
