"""The one safe-name rule (deepspot.io.owner): a name from data either stays inside its folder or is refused."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from deepspot.io.owner import OutputFolder, UnsafeNameError, inside, safe_name

HOSTILE = ["..", ".", "../x", "../../victim/secret", "/etc/passwd", "a/b", "a\\b", "a\x00b", "-rf", " x", "x\n",
           "", "   ", "~", "x" * 300]
PIECES = st.sampled_from(["..", ".", "/", "\\", "\x00", "-", "~", "a", "b.h5ad", " ", "\n", "é", "%2e%2e"])
NAMES = st.one_of(st.text(max_size=40), st.lists(PIECES, max_size=8).map("".join))


@pytest.mark.parametrize("name", HOSTILE[:-4] + [HOSTILE[-1]])
def test_hostile_names_are_refused_with_the_field(name):
    with pytest.raises(UnsafeNameError, match="sample_id"):
        safe_name(name, "sample_id", "m.csv")


@pytest.mark.parametrize("name", ["TCGA-D9-A3Z3-06Z-00-DX1.C4820632", "s1", "a.b_c-d", "é", "x~", "..x", "a b"])
def test_ordinary_names_pass_unchanged(name):
    assert safe_name(name) == name


@settings(max_examples=400, deadline=None)
@given(NAMES)
def test_a_name_is_refused_or_stays_a_direct_child(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "root"
    root.mkdir(exist_ok=True)
    try:
        s = safe_name(name)
    except UnsafeNameError:
        return
    assert s == name
    p = (root / s).resolve()
    assert p.parent == root.resolve() and p.name == s
    assert OutputFolder(root, "x").path(s) == root / s


@settings(max_examples=400, deadline=None)
@given(st.lists(NAMES, min_size=1, max_size=3).map("/".join))
def test_a_relative_path_is_refused_or_stays_inside(tmp_path_factory, rel):
    root = tmp_path_factory.getbasetemp() / "src"
    root.mkdir(exist_ok=True)
    try:
        p = inside(root, rel, "file_path")
    except UnsafeNameError:
        return
    r = p.resolve()
    assert r == root.resolve() or root.resolve() in r.parents


def test_inside_refuses_a_link_out(tmp_path):
    (tmp_path / "src").mkdir()
    os.symlink(tmp_path, tmp_path / "src" / "up")
    with pytest.raises(UnsafeNameError, match="outside"):
        inside(tmp_path / "src", "up/secret", "file_path")
    assert inside(tmp_path / "src", "a/b.gz") == tmp_path / "src" / "a" / "b.gz"
    assert isinstance(inside(tmp_path / "src", Path("x")), Path)
