"""Property-based tests (hypothesis): whatever the input, the readers and the config loader give a result
or one clear error of deepspot's own class (one line naming the file), never another exception, and
writers leave no partial file.

Inputs: random bytes under image/slide names, valid files cut at a random byte, random image sizes and
modes, random edits of a valid checkpoint config. Examples are few and small (the whole module runs in
well under half a minute); ``deadline=None`` because the machine may be busy.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepspot.config import CheckpointError, GridSpec, ModelConfig, SpotGeometry
from deepspot.io import slides as slides_mod
from deepspot.io.pyramid import convert_slide
from deepspot.io.slides import SlideError, open_slide

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True)


def _one_line(e: BaseException, name: str) -> None:
    msg = str(e)
    assert "\n" not in msg, msg
    assert name in msg, msg


def _use(slide) -> None:
    """What predict does with a slide: geometry, a region, a scaled read, a thumbnail."""
    w, h = slide.dimensions
    assert w >= 1 and h >= 1
    r = slide.read_region((0, 0), 0, (min(w, 8), min(h, 8)))
    assert r.dtype == np.uint8 and r.shape == (min(h, 8), min(w, 8), 3)
    assert slide.read_scaled((0, 0), (w, h), 4).shape == (4, 4, 3)
    t = slide.get_thumbnail(16)
    assert t.ndim == 3 and t.shape[2] == 3 and max(t.shape[:2]) <= 16


def _open_and_use(path: Path) -> None:
    """Either the slide opens and every read works, or one SlideError naming the file."""
    slides_mod.clear_decode_cache()
    try:
        with open_slide(path) as s:
            _use(s)
    except SlideError as e:
        _one_line(e, path.name)


def _valid_bytes() -> dict[str, bytes]:
    import tifffile

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 56, 3), np.uint8)
    out = {}
    for fmt, ext in (("PNG", ".png"), ("JPEG", ".jpg")):
        b = io.BytesIO()
        Image.fromarray(img).save(b, format=fmt)
        out[ext] = b.getvalue()
    b = io.BytesIO()
    tifffile.imwrite(b, img, tile=(16, 16), photometric="rgb", compression="zlib", metadata=None)
    out[".tif"] = b.getvalue()
    return out


VALID = _valid_bytes()
EXTS = [".png", ".jpg", ".tif", ".svs", ".bmp", ".ome.tif"]


@settings(max_examples=25, **SETTINGS)
@given(data=st.binary(min_size=0, max_size=600), ext=st.sampled_from(EXTS),
       head=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"BM"]))
def test_random_bytes_never_crash_a_reader(tmp_path, data, ext, head):
    p = tmp_path / f"x{ext}"
    p.write_bytes(head + data)
    _open_and_use(p)


@settings(max_examples=30, **SETTINGS)
@given(ext=st.sampled_from(sorted(VALID)), frac=st.floats(0.0, 1.0), flip=st.integers(0, 10_000))
def test_truncated_or_damaged_files_give_a_result_or_one_slide_error(tmp_path, ext, frac, flip):
    raw = bytearray(VALID[ext])
    if flip % 2:  # damage one byte instead of cutting
        raw[flip % len(raw)] ^= 0xFF
    else:
        raw = raw[: int(len(raw) * frac)]
    p = tmp_path / f"cut{ext}"
    p.write_bytes(bytes(raw))
    _open_and_use(p)


@settings(max_examples=30, **SETTINGS)
@given(w=st.integers(1, 70), h=st.integers(1, 70), mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "I;16"]),
       fmt=st.sampled_from(["PNG", "TIFF", "JPEG", "BMP"]), seed=st.integers(0, 2**16))
def test_any_image_size_and_mode_reads_as_its_rgb(tmp_path, w, h, mode, fmt, seed):
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (h, w, 4), np.uint8)
    im = Image.fromarray(rgba, "RGBA")
    im = im.convert(mode) if mode not in ("I;16",) else Image.fromarray(
        rng.integers(0, 65536, (h, w), np.uint16))
    if fmt == "JPEG" and mode not in ("L", "RGB"):
        im = im.convert("RGB")
    if fmt == "BMP" and mode in ("LA", "RGBA", "I;16"):
        im = im.convert("RGB")
    p = tmp_path / f"img.{fmt.lower()}"
    im.save(p, format=fmt)
    slides_mod.clear_decode_cache()
    with open_slide(p) as s:
        assert s.dimensions == (w, h)
        full = s.read_region((0, 0), 0, (w, h))
        _use(s)
    if fmt in ("PNG", "TIFF", "BMP"):  # lossless: the pixels as PIL makes them RGB (alpha on white)
        ref = Image.open(p)
        if ref.mode in ("RGBA", "LA", "PA") or (ref.mode == "P" and "transparency" in ref.info):
            want = slides_mod._as_rgb(np.asarray(ref.convert("RGBA")))
        elif ref.mode.startswith("I;16") or ref.mode == "I":
            want = slides_mod._as_rgb(np.asarray(ref).astype(np.uint16))
        else:
            want = np.asarray(ref.convert("RGB"))
        np.testing.assert_array_equal(full, want)


@settings(max_examples=15, **SETTINGS)
@given(ext=st.sampled_from(sorted(VALID)), frac=st.floats(0.0, 1.0))
def test_convert_slide_leaves_a_complete_file_or_nothing(tmp_path, ext, frac):
    d = Path(tempfile.mkdtemp(dir=tmp_path))
    raw = VALID[ext][: max(1, int(len(VALID[ext]) * frac))]
    src = d / f"src{ext}"
    src.write_bytes(raw)
    out = d / "out" / "o.tif"
    slides_mod.clear_decode_cache()
    try:
        convert_slide(src, out, mpp=0.5, tile=16, compression="zlib")
    except SlideError as e:
        _one_line(e, src.name)
        assert not (d / "out").exists() or list((d / "out").iterdir()) == []
        return
    with open_slide(out) as s:  # a complete pyramid
        assert s.dimensions == (56, 40) and s.mpp == pytest.approx(0.5)
        _use(s)
    assert [p.name for p in (d / "out").iterdir()] == ["o.tif"]
    shutil.rmtree(d)


# --------------------------------------------------------------------------- config


def _valid_config() -> dict:
    geom = SpotGeometry(GridSpec(55.0, 100.0, unit="um"), n_sub=3, neighbor_radius=1)
    return {"schema_version": 2, "model": "deepspot",
            "model_args": {"in_dim": 8, "n_genes": 3, "hidden": 4, "n_ensemble": 1, "context": "spot"},
            "encoder": {"name": "efficientnet-lite0", "dim": 8}, "genes": ["A", "B", "C"],
            "geometry": geom.to_dict(), "scaler": {"kind": "standard", "a": [0, 0, 0], "b": [1, 1, 1]},
            "mpp": None, "training": {}, "scores": {}}


def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


PATHS = list(_paths(_valid_config()))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=120, **SETTINGS)
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(st.just("<delete>"), JSON_VALUES)),
                      min_size=1, max_size=3))
def test_random_config_edits_load_or_fail_with_one_checkpoint_error(edits):
    cfg = _valid_config()
    for path, value in edits:
        node = cfg
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if value == "<delete>":
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    try:
        c = ModelConfig.from_dict(cfg, source="edited/config.json")
    except CheckpointError as e:
        _one_line(e, "edited/config.json")
        return
    # loaded: the invariants every later step relies on hold
    assert c.model_args["n_genes"] == len(c.genes) and c.model_args["in_dim"] == c.encoder.dim
    assert len(set(c.genes)) == len(c.genes) and all(g.strip() for g in c.genes)
    assert ModelConfig.from_dict(c.to_dict(), "again").to_dict() == c.to_dict()
    if c.scaler is not None:
        assert c.scaler.a.shape == (len(c.genes),) and np.all(c.scaler.b != 0)
    assert c.mpp is None or (c.mpp > 0 and math.isfinite(c.mpp))


@settings(max_examples=25, **SETTINGS)
@given(cut=st.floats(0.0, 1.0), junk=st.binary(max_size=20))
def test_config_file_cut_or_garbled_is_one_checkpoint_error(tmp_path, cut, junk):
    from deepspot.models.checkpoint import read_config

    d = Path(tempfile.mkdtemp(dir=tmp_path)) / "ck"
    d.mkdir()
    text = json.dumps(_valid_config()).encode()
    (d / "config.json").write_bytes(text[: int(len(text) * cut)] + junk)
    try:
        read_config(d)
    except CheckpointError as e:
        _one_line(e, "config.json")
    except UnicodeDecodeError:  # pragma: no cover - reported below if it happens
        pytest.fail("undecodable bytes escaped as UnicodeDecodeError")
