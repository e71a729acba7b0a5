"""One run at a time per output folder."""
from __future__ import annotations

import contextlib
from pathlib import Path

from deepspot.inference.cohort.folder import LOCK_FILE


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
