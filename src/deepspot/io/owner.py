"""One owner for every output folder, one rule for every name that comes from data.

:func:`safe_name` checks a name read from data (sample, patient, slide, gene ids; dataset metadata)
before it becomes a file name; :func:`inside` joins it to a folder and proves the result stays there
(also used on reading, e.g. ``--source``).

:class:`OutputFolder` is how a command claims ``--out``: it creates it, or accepts an existing folder
only when it is empty or holds a previous result of the same command (listed in the run record
``.deepspot-run.json`` it keeps there). It removes only files it wrote in this run or that the record
lists (``--overwrite``); an interrupted run removes what it wrote itself and the folder only if it
made it and it is empty again.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from deepspot.io.atomic import atomic_dir, atomic_path, current_umask

__all__ = ["RECORD_FILE", "OutputFolder", "UnsafeNameError", "check_manifest_size", "inside", "is_leftover",
           "safe_name"]

RECORD_FILE = ".deepspot-run.json"
_LEFTOVER = re.compile(r"^\..+(\.partial(\.[A-Za-z0-9]+)?|\.work-[A-Za-z0-9_]+|\.old|\.probe-\d+)$")
_MAX_NAME = 200


class UnsafeNameError(ValueError):
    """A name from data that cannot be a file name inside its folder."""


def safe_name(name, field: str = "id", source=None) -> str:
    """``name`` as a file name that stays inside its folder, else a one-line :class:`UnsafeNameError`
    naming ``source`` and ``field``: no ``.``/``..``, path separators, NUL or control characters, absolute
    paths, leading ``-`` or whitespace, at most 200 characters."""
    s = str(name)
    why = None
    if not s or not s.strip():
        why = "is empty"
    elif s in (".", ".."):
        why = "is a folder reference"
    elif "/" in s or "\\" in s or os.sep in s or (os.altsep and os.altsep in s):
        why = "holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in s):
        why = "holds a control character (NUL, newline…)"
    elif s.startswith("-"):
        why = "starts with '-'"
    elif s != s.strip():
        why = "starts or ends with whitespace"
    elif len(s.encode("utf-8", "surrogatepass")) > _MAX_NAME:
        why = f"is longer than {_MAX_NAME} bytes"
    if why:
        where = f"{source}: " if source is not None else ""
        raise UnsafeNameError(f"{where}{field} {s[:60]!r} {why}; it cannot name a file")
    return s


def inside(root, rel, field: str = "path", source=None) -> Path:
    """``root / rel`` after checking it resolves inside ``root`` (``rel`` may hold subfolders, never ``..``
    or an absolute path); else :class:`UnsafeNameError`."""
    root = Path(root)
    rel_s = str(rel)
    where = f"{source}: " if source is not None else ""
    if not rel_s or "\x00" in rel_s or os.path.isabs(rel_s) or rel_s.startswith("~"):
        raise UnsafeNameError(f"{where}{field} {rel_s[:60]!r} is not a relative path inside {root}")
    parts = Path(rel_s).parts
    if any(p == ".." for p in parts):
        raise UnsafeNameError(f"{where}{field} {rel_s[:60]!r} leaves {root} ('..')")
    p = root / rel_s
    base = root.resolve()
    if base != p.resolve() and base not in p.resolve().parents:
        raise UnsafeNameError(f"{where}{field} {rel_s[:60]!r} resolves outside {root} (a link?)")
    return p


MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists slides / samples, one line each: 64 MB is ~500k lines


def check_manifest_size(path, what: str = "manifest") -> None:
    """Refuse a manifest too large to be one (before it is parsed into memory)."""
    size = os.path.getsize(path)
    if size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path}: {what} is {size / 1e6:.0f} MB; a manifest lists one slide or sample a line "
                         f"and is at most {MAX_MANIFEST_BYTES >> 20} MB")


def is_leftover(name: str) -> bool:
    """A temp name deepspot's writers use (``.<name>.<random>.partial<ext>``, ``.<name>.work-<random>``)."""
    return bool(_LEFTOVER.match(name))


@contextlib.contextmanager
def _dir_lock(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(p: Path) -> bool:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
        return True
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
        return True
    return False


class OutputFolder:
    """The output folder of one run of ``command`` (see the module doc).

    ``legacy``: names a folder written before run records may hold (adopted as the previous result).
    ``shared``: a folder of other files is accepted (``tcga download`` into ``.``); none of them is ever
    replaced or removed (:meth:`check_target`).
    """

    def __init__(self, out, command: str, option: str = "--out", legacy=None, shared: bool = False):
        self.out, self.command, self.option, self.shared = Path(out), command, option, shared
        self.legacy = legacy or (lambda name: False)
        self.created: list[Path] = []
        self.written: list[str] = []
        self.previous: set[str] = set()
        self.opened = False

    # ------------------------------------------------------------------ claim
    def read_record(self) -> dict | None:
        try:
            rec = json.loads((self.out / RECORD_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            raise ValueError(f"{self.out / RECORD_FILE}: unreadable run record; move it away or choose another "
                             f"{self.option}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("files", []), list):
            raise ValueError(f"{self.out / RECORD_FILE}: not a deepspot run record")
        return rec

    def entries(self) -> list[str]:
        return sorted(n for n in os.listdir(self.out) if n != RECORD_FILE and not is_leftover(n))

    def check(self) -> "OutputFolder":
        """Refuse ``out`` unless it is new, empty, or a previous result of this command; nothing written."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"{out}: {self.option} is an existing file, not a folder")
        if not out.exists():
            return self
        rec = self.read_record()
        names = self.entries()
        if rec is not None:
            if rec.get("command") != self.command and (names or rec.get("files")):
                raise FileExistsError(f"{out}: {self.option} holds a deepspot {rec.get('command')} result; "
                                      f"choose another folder for {self.command}")
            stamps = rec.get("stamps") if isinstance(rec.get("stamps"), dict) else {}
            self.previous = {str(n) for n in rec.get("files", []) if isinstance(n, str)}
            # a recorded name whose file changed since (replaced by the user) is no longer ours
            self.previous = {n for n in self.previous if self._safe(n) and self._same(n, stamps.get(n))}
            return self
        foreign = [n for n in names if not self.legacy(n)]
        if foreign and self.shared:
            self.previous = set(names) - set(foreign)
            return self
        if foreign:
            more = f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
            raise FileExistsError(f"{out}: {self.option} holds files deepspot did not write "
                                  f"({', '.join(foreign[:3])}{more}); give an empty or new folder")
        self.previous = set(names)
        return self

    def open(self) -> "OutputFolder":
        """:meth:`check`, then create the folder (recording which parents this run made)."""
        self.check()
        missing, p = [], self.out.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self.created = missing  # innermost first
        self.opened = True
        return self

    def _stamp(self, name: str):
        try:
            st = os.lstat(self.out / name)
        except OSError:
            return None
        return [st.st_ino] if os.path.isdir(self.out / name) else [st.st_ino, st.st_size, st.st_mtime_ns]

    def _same(self, name: str, stamp) -> bool:
        return stamp is None or not self.exists(name) or self._stamp(name) == list(stamp)

    @staticmethod
    def _safe(name: str) -> bool:
        try:
            safe_name(name)
            return True
        except UnsafeNameError:
            return False

    def check_target(self, name: str, overwrite: bool = True) -> Path:
        """``out/name`` for writing: a safe name, and not a file this command did not write."""
        p = self.path(name, "output name")
        if self.exists(name) and (name not in self.previous or not overwrite):
            why = "a previous result (pass --overwrite)" if name in self.previous else "not written by deepspot"
            raise FileExistsError(f"{p}: already exists, {why}; choose another {self.option}")
        return p

    # ------------------------------------------------------------------ names and writes
    def path(self, name, field: str = "name", source=None) -> Path:
        return self.out / safe_name(name, field, source)

    def exists(self, name: str) -> bool:
        return (self.out / name).exists() or (self.out / name).is_symlink()

    def record(self, *names: str) -> None:
        """Note ``names`` (written in this run) and save the run record (merged under a folder lock, so
        concurrent runs of one command keep each other's names)."""
        for n in names:
            safe_name(n, "output name")
            if n not in self.written:
                self.written.append(n)
        with _dir_lock(self.out):
            try:
                rec = self.read_record() or {}
            except ValueError:
                rec = {}
            files = [f for f in rec.get("files", []) if isinstance(f, str)]
            files += [n for n in sorted(self.previous | set(self.written)) if n not in files]
            files = [f for f in files if self.exists(f)]
            old = rec.get("stamps") if isinstance(rec.get("stamps"), dict) else {}
            stamps = {f: (self._stamp(f) if f in self.written or f not in old else old[f]) for f in files}
            with atomic_path(self.out / RECORD_FILE) as tmp:
                tmp.write_text(json.dumps({"command": self.command, "files": files, "stamps": stamps}, indent=1),
                               encoding="utf-8")

    @contextlib.contextmanager
    def atomic(self, name: str, folder: bool = False):
        """Yield a temp path beside ``out/name``; on success it replaces ``name`` (recorded as written)."""
        target = self.path(name, "output name")
        with (atomic_dir(target) if folder else atomic_path(target)) as tmp:
            yield tmp
        self.record(name)

    def remove_previous(self, names=None) -> list[str]:
        """``--overwrite``: remove the files the previous run recorded (those of ``names`` only, if given);
        nothing else."""
        doomed = sorted(self.previous if names is None else self.previous & set(names))
        removed = [n for n in doomed if _remove(self.out / n)]
        self.previous -= set(doomed)
        if removed and (self.out / RECORD_FILE).exists():
            self.record()
        return removed

    def abort(self) -> None:
        """An interrupted run: remove what it wrote, and the folders it made if they are empty again."""
        for n in self.written:
            _remove(self.out / n)
        self.written = []
        if (self.out / RECORD_FILE).exists():
            with contextlib.suppress(OSError, ValueError):
                self.record()
        for d in self.created:
            try:
                if set(os.listdir(d)) <= {RECORD_FILE}:
                    with contextlib.suppress(FileNotFoundError):
                        (d / RECORD_FILE).unlink()
                    d.rmdir()
            except OSError:
                break


class _DirLock:
    """An exclusive flock on a folder's own descriptor (no file inside it that a writer could clear)."""

    def __init__(self, folder: Path):
        self.fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
            self.closed = True


def hold(work: Path) -> _DirLock:
    """Lock temp folder ``work`` for as long as the returned handle is open (the OS releases it when the
    process dies): a later run sees the folder is alive."""
    return _DirLock(Path(work))


def is_alive(work: Path) -> bool:
    """Whether a live process holds ``work``'s lock (see :func:`hold`)."""
    try:
        _DirLock(Path(work)).close()
        return False
    except FileNotFoundError:
        return False
    except OSError:
        return True


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove the temp folders matching ``pattern`` in ``folder`` that no live run holds."""
    removed = []
    for w in Path(folder).glob(pattern):
        if w.is_dir() and not w.is_symlink() and not is_alive(w):
            shutil.rmtree(w, ignore_errors=True)
            removed.append(w)
    return removed


def new_temp_dir(folder: Path, prefix: str) -> Path:
    """A work folder ``<folder>/<prefix><random>`` with normal permissions."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp
