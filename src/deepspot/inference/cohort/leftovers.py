"""What a killed run left behind: temp outputs and work folders, removed before the next run starts."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterable

from deepspot.config.output_names import all_prediction_files
from deepspot.inference.cohort.manifest import SlideJob


def remove_partials(out_dir: str | Path, jobs: Iterable[SlideJob]) -> list[Path]:
    """Delete what a killed run left behind for these slides: temp outputs (``.<name>.*.partial.*``,
    see io/outputs.atomic_path) and per-slide work folders (``.<id>.work-*``). Returns what was removed."""
    out_dir, removed = Path(out_dir), []
    for job in jobs:
        outs = [out_dir / n for n in all_prediction_files(job.id)]
        patterns = [f".{p.name}.*.partial{p.suffix}" for p in outs]
        for tmp in (t for pat in patterns + [f".{job.id}.work-*"] for t in out_dir.glob(pat)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            removed.append(tmp)
    return removed
