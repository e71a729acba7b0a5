"""``run_cohort``: check everything, then predict the slides still to do and record each outcome."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from deepspot.inference.cohort.fingerprint import fingerprint_changes, new_run_dir, run_fingerprint, write_run_file
from deepspot.inference.cohort.folder import RUN_FILE, STATE_FILE, SUMMARY_FILE, adopt_legacy, check_output_dir, clear_previous, cohort_folder
from deepspot.inference.cohort.leftovers import remove_partials
from deepspot.inference.cohort.lock import folder_lock
from deepspot.inference.cohort.manifest import read_cohort
from deepspot.inference.cohort.runners import _run_local, _run_ray
from deepspot.inference.cohort.state import CohortState, SlideResult, plan, write_summary
from deepspot.inference.cohort.work import PredictOptions
from deepspot.inference.predict_plan import require_format


@dataclass
class CohortSummary:
    """What a run did: results of the slides it ran, plus slides skipped as done or failed."""

    out_dir: Path
    ran: list[SlideResult]
    skipped_done: list[str]
    skipped_failed: list[dict]
    seconds: float
    removed_partials: int = 0

    @property
    def failures(self) -> list[dict]:
        """Every slide whose current state is failed: (id, path, error)."""
        now = [{"id": r.id, "path": r.path, "error": r.error} for r in self.ran if not r.ok]
        return now + list(self.skipped_failed)

    @property
    def n_done(self) -> int:
        return len(self.skipped_done) + sum(r.ok for r in self.ran)


def _progress(total: int, enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("slides"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[failed]}"),
                    disable=not enabled, transient=False)



def run_cohort(manifest, model: str | Path | None = None, out_dir: str | Path | None = None, echo=print,
               **options) -> CohortSummary:
    """Predict every slide of a manifest into ``out_dir`` (see the module doc); resumable.

    ``manifest`` is a :class:`~deepspot.config.requests.CohortRequest`, or a manifest path with ``model``,
    ``out_dir`` and ``options`` (the request's other fields: ``backend`` ('ray'), ``address``, ``num_cpus``,
    ``num_gpus``, ``max_in_flight``, ``retry_failed``, ``mpp``, ``tissue``, ``batch_size``, ``num_workers``,
    ``plot_genes``, ``device`` ('auto'), ``autocast``, ``encoder_weights``, ``cache_dir``, ``new_run``,
    ``overwrite``, ``fmt``); ``progress`` (the bar over slides) overrides :data:`deepspot.settings`.

    Checks the manifest, the output folder, the checkpoint and its encoder, and that the folder holds no
    other run's results (``new_run``: use a new sibling folder; ``overwrite``: replace them), before
    any slide runs.
    """
    from deepspot.config.requests import CohortRequest
    from deepspot.config.runtime import settings

    progress = options.pop("progress", None)
    request = manifest if isinstance(manifest, CohortRequest) else CohortRequest(manifest, model, out_dir, **options)
    with settings.override(**({} if progress is None else {"progress": progress})):
        return _run_cohort(request, echo)


def _run_cohort(request, echo) -> CohortSummary:
    from deepspot.config.runtime import settings
    from deepspot.features.encoders import get_spec
    from deepspot.models.checkpoint import CheckpointError, WEIGHTS_FILE, read_config

    r = request
    manifest, model, out_dir, backend, fmt, mpp = r.manifest, r.model, r.out, r.backend, r.fmt, r.mpp
    if backend == "ray":
        from deepspot.extras import require

        require("ray", "cohort", "predict-cohort --backend ray", " (or use --backend local)")
    require_format(fmt, f"predict-cohort --format {fmt}")
    jobs = read_cohort(manifest, default_mpp=mpp)
    cfg = read_config(model)  # every field checked
    if cfg.is_cell_model:
        raise CheckpointError(f"{model}: a {cfg.model} model predicts cells, not a spot grid; predict-cohort "
                              f"needs a spot model (deepspot)")
    if not (Path(model) / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{model}: {WEIGHTS_FILE} missing")
    spec = get_spec(cfg.encoder.name)  # unknown encoder -> EncoderError now, not per slide
    cfg.check_encoder_dim(spec.dim, f"{Path(model) / 'config.json'}: encoder.dim")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"{out_dir}: --out is an existing file, not a folder")
    opts = PredictOptions(model=str(Path(model).resolve()),
                          encoder_weights=str(Path(r.encoder_weights).resolve()) if r.encoder_weights else None,
                          tissue=r.tissue, batch_size=r.batch_size, num_workers=r.num_workers,
                          plot_genes=r.plot_genes, device=r.device, autocast=r.autocast,
                          cache_dir=str(Path(r.cache_dir).resolve()) if r.cache_dir else None, fmt=fmt)
    fp = run_fingerprint(opts)
    out = Path(out_dir)
    if r.new_run and fingerprint_changes(out, fp, jobs, CohortState(out).load()):
        out = new_run_dir(out, fp)
        echo(f"{out_dir} holds another run; writing this one into {out}")
    owner = cohort_folder(out).check()
    out = check_output_dir(out)
    owner.open()
    t0 = time.perf_counter()
    with folder_lock(out):
        state = CohortState(out)
        prior = state.load()
        adopt_legacy(owner, prior)
        changes = fingerprint_changes(out, fp, jobs, prior)
        if r.overwrite and prior:
            n = clear_previous(owner)
            echo(f"--overwrite: removed {n} files of the previous run"
                 + (f" ({'; '.join(changes)})" if changes else ""))
            prior = {}
        elif changes:
            raise ValueError(f"{out}: holds results of another run ({'; '.join(changes)}); pass --new-run "
                             f"(a new folder) or --overwrite (replace them)")
        write_run_file(out, fp)
        owner.record(RUN_FILE)
        removed = remove_partials(out, jobs)
        todo, done, failed = plan(jobs, prior, out, retry_failed=r.retry_failed, fmt=fmt)
        echo(f"{len(jobs)} slides: {len(done)} already done, {len(failed)} failed before"
             f"{' (not retried; --retry-failed to retry)' if failed else ''}, {len(todo)} to run"
             f" ({backend} backend)" + (f"; removed {len(removed)} leftovers of a killed run" if removed else ""))
        ran: list[SlideResult] = []
        with _progress(len(todo), settings.progress and bool(todo)) as bar:
            tid = bar.add_task("predict", total=len(todo), rate="", failed="")

            def on_result(result: SlideResult) -> None:
                state.record(result)
                ran.append(result)
                n_fail = sum(not r.ok for r in ran)
                per_h = 3600.0 * len(ran) / max(time.perf_counter() - t0, 1e-9)
                bar.update(tid, advance=1, rate=f"{per_h:.1f} slides/h",
                           failed=f"[red]{n_fail} failed" if n_fail else "")

            if todo:
                if backend == "local":
                    _run_local(todo, out, opts, on_result)
                else:
                    _run_ray(todo, out, opts, on_result, r.address, r.num_cpus, r.num_gpus, r.max_in_flight)
        final = state.load()
        write_summary(out, jobs, final)
        owner.record(*(n for n in (STATE_FILE, SUMMARY_FILE) if (out / n).exists()))
    skipped_failed = [{"id": j.id, "path": str(j.path), "error": prior[j.id].get("error", "")} for j in failed]
    return CohortSummary(out, ran, [j.id for j in done], skipped_failed, time.perf_counter() - t0, len(removed))
