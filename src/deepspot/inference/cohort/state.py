"""Per-slide state: the append-only ``_state.jsonl``, what is left to run, and ``_summary.csv``."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deepspot.inference.cohort.folder import STATE_FILE, SUMMARY_FILE, output_paths
from deepspot.inference.cohort.manifest import SlideJob


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
