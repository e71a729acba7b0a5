"""The fingerprint of what produced a folder's outputs (``_run.json``): a rerun that would mix two runs
is refused, or goes to a new sibling folder."""
from __future__ import annotations

import json
import time
from pathlib import Path

from deepspot.inference.cohort.folder import RUN_FILE
from deepspot.inference.cohort.manifest import SlideJob
from deepspot.inference.cohort.work import PredictOptions
from deepspot.io.atomic import atomic_path


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
    """Write ``_run.json`` atomically: a killed run leaves the previous one whole, or none."""
    with atomic_path(out_dir / RUN_FILE) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fp, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))


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
