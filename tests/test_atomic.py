"""io/atomic.py: the one temp-then-rename writer of files and folders, and no other rename in the package."""
import os
import re
from pathlib import Path

import pytest

import deepspot
from deepspot.io.atomic import atomic_dir, atomic_path, current_umask, replace_dir
from deepspot.io.owner import is_leftover

SRC = Path(deepspot.__file__).resolve().parent


def test_atomic_path_renames_only_a_finished_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and is_leftover(tmp.name) and not target.exists()
        tmp.write_text("one")
    assert target.read_text() == "one" and os.stat(target).st_mode & 0o777 == 0o666 & ~current_umask()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_dir_and_replace_dir(tmp_path, monkeypatch):
    target = tmp_path / "store.zarr"
    for text in ("old", "new"):
        with atomic_dir(target) as tmp:
            assert is_leftover(tmp.name) and not tmp.exists()
            tmp.mkdir()
            (tmp / "x").write_text(text)
        assert (target / "x").read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["store.zarr"]  # the old one moved aside, then deleted
    # another writer's folder took the place in between: an OSError, and that folder is kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x").write_text("mine")
    theirs = tmp_path / "theirs.zarr"
    theirs.mkdir()
    (theirs / "y").write_text("theirs")
    real = os.replace

    def racing(a, b):
        if Path(a) == mine:
            theirs.rename(target)  # appears just before our rename
        return real(a, b)

    monkeypatch.setattr(os, "replace", racing)
    with pytest.raises(OSError):
        replace_dir(mine, target)
    monkeypatch.setattr(os, "replace", real)
    assert (target / "y").read_text() == "theirs" and mine.is_dir()
    # a failure with nothing in its place puts the previous folder back
    with pytest.raises(OSError):
        replace_dir(tmp_path / "missing", target)
    assert (target / "y").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "store.zarr"]


def test_every_rename_into_place_goes_through_io_atomic():
    found = []
    for p in SRC.rglob("*.py"):
        rel = p.relative_to(SRC).as_posix()
        text = p.read_text(encoding="utf-8")
        if rel != "io/atomic.py" and re.search(r"\bos\.(replace|rename)\(|\.rename\(|NamedTemporaryFile", text):
            found.append(rel)
    assert not found, sorted(found)
