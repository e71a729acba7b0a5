"""Cohort prediction: many slides, one task per slide, resumable, nothing lost.

A manifest (CSV: ``path``, optional ``id`` and ``mpp``) lists the slides. Every slide runs through
one function, :func:`predict_job`, which predicts it with
:func:`deepspot.inference.predict.predict_slide` (flat memory) into ``<id>.h5ad`` and
``<id>_spots.csv`` (+ ``<id>_genes.png`` when asked), written under temp names and renamed when
complete. A slide that raises is recorded as failed with its reason;
it never stops the others.

State lives in the output folder: ``_state.jsonl`` is append-only, one JSON record per finished
attempt (``done`` or ``failed`` + error), written by the driver only after the slide's outputs
were renamed into place. A rerun skips ``done`` slides whose outputs exist, retries ``failed``
ones only when asked, and removes temp files a killed run left behind. ``_summary.csv`` lists
the outcome of every slide after each run. A lock file keeps two runs out of the same folder.

``_run.json`` is the fingerprint of what produces a slide's output (sha256 of the model weights and
of its config, the encoder weights, the prediction options; each state record adds its slide's
mpp). A rerun whose fingerprint differs from the one of the slides already done is refused with
the fields that changed, unless ``new_run`` (write into a new sibling folder ``<out>-2``, ``-3``…)
or ``overwrite`` (remove the previous outputs and state, then run everything): one folder never
mixes two runs.

Backends: ``ray`` (one Ray task per slide, local Ray by default or an existing cluster via
``address``; a bounded number of tasks in flight; the model and encoder are loaded once per
worker process and reused for the slides it gets) and ``local`` (an in-process loop, same
per-slide function and state handling).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)

STATE_FILE = "_state.jsonl"
RUN_FILE = "_run.json"
SUMMARY_FILE = "_summary.csv"
LOCK_FILE = "_lock"
_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------------------
# Manifest and output folder: checked before any work starts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideJob:
    """One slide of a cohort: its id (names the outputs), file and optional µm/px override."""

    id: str
    path: Path
    mpp: float | None = None


def read_cohort(path: str | Path, default_mpp: float | None = None) -> list[SlideJob]:
    """Read and check a cohort manifest (CSV with a header).

    Columns: ``path`` (required; relative paths are taken from the manifest's folder), ``id``
    (optional, default: the file name without extension) and ``mpp`` (optional; empty = the
    slide's own, else ``default_mpp``). Every problem (missing file, duplicated or unsafe id,
    bad mpp) is reported in one ValueError naming the manifest, the rows and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    from deepspot.io.owner import check_manifest_size

    check_manifest_size(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in cols:
                raise ValueError(f"{path}: manifest needs a 'path' column (found: {', '.join(cols) or 'no header'})")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: manifest is not UTF-8 text (byte {e.start} of a line); save it as UTF-8 CSV") from None
    except csv.Error as e:
        raise ValueError(f"{path}: manifest is not a readable CSV ({e})") from None
    if not rows:
        raise ValueError(f"{path}: manifest lists no slides")
    jobs, problems, seen = [], [], {}
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        raw = r.get("path", "")
        if not raw:
            problems.append(f"line {line}: empty path")
            continue
        p = Path(raw).expanduser()
        p = p if p.is_absolute() else path.parent / p
        sid = r.get("id") or p.stem
        mpp = default_mpp
        if r.get("mpp"):
            try:
                mpp = float(r["mpp"])
            except ValueError:
                mpp = float("nan")
            if not (mpp > 0 and math.isfinite(mpp)):
                problems.append(f"line {line}: mpp must be a positive number, got {r['mpp']!r}")
        if not _ID_OK.match(sid):
            problems.append(f"line {line}: id {sid!r} is not a safe file name (letters, digits, . _ -)")
        elif sid in seen:
            problems.append(f"line {line}: id {sid!r} duplicates line {seen[sid]}")
        else:
            seen[sid] = line
        if not p.exists():
            problems.append(f"line {line}: slide file {raw} not found")
        elif p.is_dir():
            problems.append(f"line {line}: {raw} is a directory, not a slide file")
        jobs.append(SlideJob(sid, p, mpp))
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems[:3]) + more)
    return jobs


def check_output_dir(out: str | Path) -> Path:
    """Create ``out`` if needed and prove it is writable (a probe file); else a one-line error."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{out}: output folder is not writable ({e.strerror or type(e).__name__})") from None
    return out


def output_paths(out_dir: str | Path, slide_id: str, fmt: str = "h5ad") -> dict[str, Path]:
    """The files a finished slide has (the gene plot, ``<id>_genes.png``, is optional); ``fmt``
    'spatialdata' has ``<id>.zarr`` in place of ``<id>.h5ad``."""
    out_dir = Path(out_dir)
    if fmt == "spatialdata":
        return {"zarr": out_dir / f"{slide_id}.zarr", "csv": out_dir / f"{slide_id}_spots.csv"}
    return {"h5ad": out_dir / f"{slide_id}.h5ad", "csv": out_dir / f"{slide_id}_spots.csv"}


def remove_partials(out_dir: str | Path, jobs: Iterable[SlideJob]) -> list[Path]:
    """Delete what a killed run left behind for these slides: temp outputs (``.<name>.*.partial.*``,
    see io/outputs.atomic_path) and per-slide work folders (``.<id>.work-*``). Returns what was removed."""
    out_dir, removed = Path(out_dir), []
    for job in jobs:
        outs = [*output_paths(out_dir, job.id).values(), out_dir / f"{job.id}.zarr", out_dir / f"{job.id}_genes.png"]
        patterns = [f".{p.name}.*.partial{p.suffix}" for p in outs]
        for tmp in (t for pat in patterns + [f".{job.id}.work-*"] for t in out_dir.glob(pat)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def folder_lock(out_dir: Path):
    """Hold an exclusive lock on ``out_dir`` for one run (released by the OS if the run dies)."""
    import fcntl

    fh = open(out_dir / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{out_dir}: another predict-cohort run is writing to this folder") from None
        yield
    finally:
        fh.close()


# --------------------------------------------------------------------------------------
# Per-slide state
# --------------------------------------------------------------------------------------


@dataclass
class SlideResult:
    """The outcome of one attempt at one slide."""

    id: str
    status: str  # "done" | "failed"
    error: str = ""
    n_spots: int = 0
    seconds: float = 0.0
    path: str = ""
    outputs: list[str] = field(default_factory=list)
    mpp: float | None = None  # the slide's mpp override (part of its fingerprint; None: the file's)
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # who ran it

    @property
    def ok(self) -> bool:
        return self.status == "done"


class CohortState:
    """Append-only ``_state.jsonl``: the last record of an id is its state.

    Each record is one line written with a single ``write`` + fsync; a line cut short by a kill
    is ignored on reading (that slide simply runs again).
    """

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / STATE_FILE

    def load(self) -> dict[str, dict]:
        last: dict[str, dict] = {}
        if not self.path.exists():
            return last
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "id" in rec and rec.get("status") in ("done", "failed"):
                    last[rec["id"]] = rec
        return last

    def record(self, result: SlideResult) -> None:
        rec = {**asdict(result), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        line = json.dumps(rec) + "\n"
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:  # a previous run killed mid-line: start on a fresh line
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())


def plan(jobs: list[SlideJob], state: dict[str, dict], out_dir: Path, retry_failed: bool = False,
         fmt: str = "h5ad"):
    """Split jobs into (to run, already done, failed and not retried)."""
    todo, done, failed = [], [], []
    for job in jobs:
        rec = state.get(job.id)
        complete = all(p.exists() for p in output_paths(out_dir, job.id, fmt).values())
        if rec is not None and rec["status"] == "done" and complete:
            done.append(job)
        elif rec is not None and rec["status"] == "failed" and not retry_failed:
            failed.append(job)
        else:
            todo.append(job)
    return todo, done, failed


# --------------------------------------------------------------------------------------
# The per-slide work
# --------------------------------------------------------------------------------------


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


def _ray_predict(job: SlideJob, out_dir: str, opts: PredictOptions, threads: int) -> SlideResult:
    """Body of a Ray task: one slide with this worker process's cached predictor."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        predictor = SlidePredictor.cached(opts)
    except Exception as e:  # noqa: BLE001 - report, do not crash the worker
        return SlideResult(job.id, "failed", "loading the model: " + _one_line(e), path=str(job.path))
    return predict_job(job, out_dir, predictor)


# --------------------------------------------------------------------------------------
# Fingerprint: what produced the outputs of a folder
# --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def run_fingerprint(opts: PredictOptions) -> dict:
    """What decides a slide's output, besides its own file and mpp: the model weights and config (sha256),
    the encoder weights (sha256 of a file; a folder by its path) and the prediction options."""
    import hashlib

    from deepspot.models.checkpoint import WEIGHTS_FILE, read_config

    model = Path(opts.model)
    cfg = json.dumps(read_config(model).to_dict(), sort_keys=True)
    enc = opts.encoder_weights
    if enc is not None and Path(enc).is_file():
        enc = "sha256:" + _sha256(Path(enc))
    return {"model weights": "sha256:" + _sha256(model / WEIGHTS_FILE),
            "model config": "sha256:" + hashlib.sha256(cfg.encode()).hexdigest(),
            "encoder weights": enc, "tissue": opts.tissue, "plot_genes": opts.plot_genes, "autocast": opts.autocast}


def _short(v) -> str:
    s = str(v)
    return s[:7 + 12] if s.startswith("sha256:") else s


def fingerprint_changes(out_dir: Path, fp: dict, jobs: list[SlideJob], state: dict[str, dict]) -> list[str]:
    """How this run differs from the one that produced the slides already done in ``out_dir`` ([] if it
    does not, or if nothing is done there)."""
    done = {k: r for k, r in state.items() if r.get("status") == "done"}
    if not done:
        return []
    run_file = out_dir / RUN_FILE
    try:
        before = json.loads(run_file.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        before = None
    if not isinstance(before, dict):
        return [f"{len(done)} slides done by a run that left no readable {RUN_FILE}"]
    changes = [f"{k} {_short(before.get(k))} -> {_short(v)}" for k, v in fp.items() if before.get(k) != v]
    moved = [j.id for j in jobs if j.id in done and "mpp" in done[j.id] and done[j.id]["mpp"] != j.mpp]
    if moved:
        more = f" (+{len(moved) - 3} more)" if len(moved) > 3 else ""
        j0 = next(j for j in jobs if j.id == moved[0])
        changes.append(f"mpp of {', '.join(moved[:3])}{more} ({moved[0]}: {done[moved[0]]['mpp']} -> {j0.mpp})")
    return changes


def write_run_file(out_dir: Path, fp: dict) -> None:
    tmp = out_dir / f".{RUN_FILE}.partial"
    tmp.write_text(json.dumps({"fingerprint": fp, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
    os.replace(tmp, out_dir / RUN_FILE)


def new_run_dir(out_dir: Path, fp: dict) -> Path:
    """The first of ``<out>-2``, ``<out>-3``… that is new or holds a run with this same fingerprint."""
    for i in range(2, 10_000):
        cand = out_dir.with_name(f"{out_dir.name}-{i}")
        if not cand.exists():
            return cand
        try:
            if json.loads((cand / RUN_FILE).read_text()).get("fingerprint") == fp:
                return cand
        except (OSError, ValueError, AttributeError):
            continue
    raise ValueError(f"{out_dir}: no free folder name for a new run")


def cohort_folder(out_dir: Path):
    """The :class:`~deepspot.io.owner.OutputFolder` of a cohort run (a folder from before run records
    holds only the state files and prediction outputs)."""
    from deepspot.inference.preflight import is_prediction_file
    from deepspot.io.owner import OutputFolder

    own = {STATE_FILE, RUN_FILE, SUMMARY_FILE, LOCK_FILE}
    return OutputFolder(out_dir, "predict-cohort", legacy=lambda n: n in own or is_prediction_file(n))


def adopt_legacy(owner, state: dict[str, dict]) -> None:
    """A folder written before run records: its previous result is the state files and the outputs its
    state lists (names checked; anything else in the folder is not ours)."""
    from deepspot.io.owner import RECORD_FILE, UnsafeNameError, safe_name

    names = {STATE_FILE, RUN_FILE, SUMMARY_FILE}
    if (owner.out / RECORD_FILE).exists():  # the driver rewrites these on every slide: always this command's
        owner.previous |= {n for n in names if owner.exists(n)}
        return
    for rec in state.values():
        for n in rec.get("outputs") or []:
            try:
                names.add(safe_name(str(n)))
            except UnsafeNameError:
                continue
    owner.previous = {n for n in owner.previous if n in names}


def clear_previous(owner) -> int:
    """--overwrite: remove exactly the files the previous run recorded (outputs, state, run file)."""
    return len(owner.remove_previous())


# --------------------------------------------------------------------------------------
# Running a cohort
# --------------------------------------------------------------------------------------


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


def write_summary(out_dir: Path, jobs: list[SlideJob], state: dict[str, dict]) -> Path:
    """``_summary.csv``: id, path, status (done / failed / pending), spots, seconds, error."""
    import pandas as pd

    from deepspot.io.outputs import write_csv

    rows = []
    for job in jobs:
        rec = state.get(job.id, {})
        rows.append({"id": job.id, "path": str(job.path), "status": rec.get("status", "pending"),
                     "n_spots": rec.get("n_spots", 0), "seconds": round(float(rec.get("seconds", 0.0)), 3),
                     "error": rec.get("error", "")})
    return write_csv(pd.DataFrame(rows).set_index("id"), out_dir / SUMMARY_FILE)


def run_cohort(manifest: str | Path, model: str | Path, out_dir: str | Path, backend: str = "ray",
               address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0,
               max_in_flight: int | None = None, retry_failed: bool = False, mpp: float | None = None,
               tissue: str | None = None, batch_size: int = 16, num_workers: int = 0, plot_genes: int = 0,
               device: str = "auto",
               autocast: str | None = None, encoder_weights: str | Path | None = None,
               cache_dir: str | Path | None = None, progress: bool = True, echo=print, new_run: bool = False,
               overwrite: bool = False, fmt: str = "h5ad") -> CohortSummary:
    """Predict every slide of a manifest into ``out_dir`` (see the module doc); resumable.

    Checks the manifest, the output folder, the checkpoint and its encoder, and that the folder holds no
    other run's results (``new_run``: use a new sibling folder; ``overwrite``: replace them), before
    any slide runs.
    """
    from deepspot.features.encoders import get_spec
    from deepspot.models.checkpoint import CheckpointError, WEIGHTS_FILE, read_config

    if backend not in ("ray", "local"):
        raise ValueError(f"unknown backend {backend!r}; use 'ray' or 'local'")
    if backend == "ray":
        from deepspot.extras import require

        require("ray", "cohort", "predict-cohort --backend ray", " (or use --backend local)")
    if fmt not in ("h5ad", "spatialdata"):
        raise ValueError(f"unknown output format {fmt!r}; use h5ad or spatialdata")
    if fmt == "spatialdata":
        from deepspot.extras import require

        require("spatialdata", "spatialdata", "predict-cohort --format spatialdata")
    if not (math.isfinite(num_cpus) and math.isfinite(num_gpus)) or num_cpus < 0 or num_gpus < 0:
        raise ValueError("num_cpus and num_gpus must be ≥ 0")
    if backend == "ray" and num_cpus == 0 and num_gpus == 0:  # nothing would bound the slides run at once
        raise ValueError("--num-cpus 0 without --num-gpus would run every slide at once; give each slide task "
                         "at least one CPU or GPU share (e.g. --num-cpus 1)")
    if tissue not in (None, "otsu", "mean_rgb", "tile_mean_rgb", "none"):
        raise ValueError(f"unknown tissue filter {tissue!r}; use otsu, mean_rgb, tile_mean_rgb or none")
    jobs = read_cohort(manifest, default_mpp=mpp)
    cfg = read_config(model)  # every field checked
    if cfg.is_cell_model:
        raise CheckpointError(f"{model}: a {cfg.model} model predicts cells, not a spot grid; predict-cohort "
                              f"needs a spot model (deepspot)")
    if not (Path(model) / WEIGHTS_FILE).exists():
        raise CheckpointError(f"{model}: {WEIGHTS_FILE} missing")
    spec = get_spec(cfg.encoder.name)  # unknown encoder -> EncoderError now, not per slide
    cfg.check_encoder_dim(spec.dim, f"{Path(model) / 'config.json'}: encoder.dim")
    if new_run and overwrite:
        raise ValueError("give --new-run or --overwrite, not both")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"{out_dir}: --out is an existing file, not a folder")
    opts = PredictOptions(model=str(Path(model).resolve()),
                          encoder_weights=str(Path(encoder_weights).resolve()) if encoder_weights else None,
                          tissue=tissue, batch_size=batch_size, num_workers=num_workers, plot_genes=plot_genes,
                          device=device,
                          autocast=autocast, cache_dir=str(Path(cache_dir).resolve()) if cache_dir else None,
                          fmt=fmt)
    fp = run_fingerprint(opts)
    out = Path(out_dir)
    if new_run and fingerprint_changes(out, fp, jobs, CohortState(out).load()):
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
        if overwrite and prior:
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
        todo, done, failed = plan(jobs, prior, out, retry_failed=retry_failed, fmt=fmt)
        echo(f"{len(jobs)} slides: {len(done)} already done, {len(failed)} failed before"
             f"{' (not retried; --retry-failed to retry)' if failed else ''}, {len(todo)} to run"
             f" ({backend} backend)" + (f"; removed {len(removed)} leftovers of a killed run" if removed else ""))
        ran: list[SlideResult] = []
        with _progress(len(todo), progress and bool(todo)) as bar:
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
                    _run_ray(todo, out, opts, on_result, address, num_cpus, num_gpus, max_in_flight)
        final = state.load()
        write_summary(out, jobs, final)
        owner.record(*(n for n in (STATE_FILE, SUMMARY_FILE) if (out / n).exists()))
    skipped_failed = [{"id": j.id, "path": str(j.path), "error": prior[j.id].get("error", "")} for j in failed]
    return CohortSummary(out, ran, [j.id for j in done], skipped_failed, time.perf_counter() - t0, len(removed))
