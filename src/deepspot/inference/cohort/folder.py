"""The output folder of a cohort run: the names of its own files, the outputs a finished slide has, and
what the folder owner (:mod:`deepspot.io.owner`) counts as this command's."""
from __future__ import annotations

import os
from pathlib import Path

from deepspot.config.output_names import is_prediction_file, prediction_files

STATE_FILE = "_state.jsonl"
RUN_FILE = "_run.json"
SUMMARY_FILE = "_summary.csv"
LOCK_FILE = "_lock"


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
    main, csv, _ = prediction_files(slide_id, fmt)
    return {"zarr" if fmt == "spatialdata" else "h5ad": out_dir / main, "csv": out_dir / csv}


def cohort_folder(out_dir: Path):
    """The :class:`~deepspot.io.owner.OutputFolder` of a cohort run (a folder from before run records
    holds only the state files and prediction outputs)."""
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
