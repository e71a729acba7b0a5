"""convert-slide (io/pyramid through the CLI): a pyramid with the mpp and the same pixels, nothing left
behind when the source is broken."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from PIL import Image

from deepspot.io.slides import open_slide

from fixtures_hard_inputs import _cli, _fresh_cache, _tiny_vit, _one_line, _tissue  # noqa: F401 (_fresh_cache: autouse)


def test_convert_slide_writes_a_pyramid_with_the_mpp_and_same_pixels(tmp_path, capsys):
    img = _tissue(1100, 1300)
    src = tmp_path / "a.png"
    Image.fromarray(img).save(src)
    out = tmp_path / "a.tif"
    code, o, err = _cli(capsys, "convert-slide", src, out, "--mpp", "0.25", "--tile", "256", "--compression", "zlib",
                        "--no-progress")
    assert code == 0, err
    assert "4 levels" in o
    with open_slide(out) as s:
        assert s.level_dimensions == [(1300, 1100), (650, 550), (325, 275), (162, 137)]
        assert s.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (1300, 1100)), img)
        half = s.read_region((0, 0), 1, (650, 550)).astype(int)
    ref = img.astype(int).reshape(550, 2, 650, 2, 3).mean(axis=(1, 3))
    assert np.abs(half - ref).max() <= 1
    code, _, err = _cli(capsys, "convert-slide", src, out, "--mpp", "0.25")
    assert code == 1
    _one_line(err, "a.tif", "already exists", "--overwrite")
    code, _, err = _cli(capsys, "convert-slide", src, tmp_path / "b.tif")
    assert code == 1
    _one_line(err, "a.png", "--mpp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.tif"]


def test_convert_slide_of_a_truncated_png_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "a.png"
    Image.fromarray(_tissue(800, 600)).save(src, compress_level=0)
    data = src.read_bytes()
    cut = tmp_path / "cut.png"  # IDAT shortened but the chunk structure intact: fails mid-stream
    i = data.index(b"IDAT") - 4
    n = int.from_bytes(data[i:i + 4], "big")
    body = data[i + 8:i + 8 + n][: n // 2]
    cut.write_bytes(data[:i] + len(body).to_bytes(4, "big") + b"IDAT" + body
                    + zlib.crc32(b"IDAT" + body).to_bytes(4, "big") + data[i + 12 + n:])
    code, _, err = _cli(capsys, "convert-slide", cut, tmp_path / "o.tif", "--mpp", "0.5", "--no-progress")
    assert code == 1
    _one_line(err, "cut.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "cut.png"]

