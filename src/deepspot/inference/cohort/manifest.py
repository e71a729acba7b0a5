"""The cohort manifest: one :class:`SlideJob` per row, every problem reported before any work starts."""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
