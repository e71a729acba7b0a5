"""The one way deepspot writes a file or folder atomically: into a temp name beside it (``.<name>.<random>
.partial<ext>``, which io/owner.py and the cohort's leftover sweep recognise), renamed onto it only when
complete. Standard library only, so that light modules (the output-folder owner, slide conversion) can
use it without loading anndata through io/outputs.py, which re-exports these names."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temp path beside ``path``; rename onto ``path`` only if the block succeeds (with the usual
    file mode), remove it if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def replace_dir(tmp: str | Path, path: str | Path) -> Path:
    """Rename the finished folder ``tmp`` onto folder ``path``: an existing ``path`` is moved aside first
    (to a ``.old`` temp folder, then deleted; one that disappears meanwhile is no error). Raises OSError
    when ``tmp`` cannot take its place (another writer's folder appeared there in between)."""
    tmp, path = Path(tmp), Path(path)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except OSError:
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # nothing took its place: the previous folder goes back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a (not yet existing) temp path beside folder ``path`` (``.<name>.<random>.partial<suffix>``);
    on success it replaces ``path`` (:func:`replace_dir`), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial" + path.suffix, dir=path.parent))
    tmp.rmdir()  # writers (zarr, spatialdata) want to create the folder themselves
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
