"""SpatialData output (``--format spatialdata``, ``Model.predict_slide(..., as_spatialdata=True)``): the zarr
round-trips through ``spatialdata.read_zarr`` with the slide image (multiscale, level-0 pixels), the spots as
circles of their true radius and the prediction table linked to them; spatialdata-plot draws it; the write
is atomic; without the extra, one line names it.

Slide: a pyramidal TIFF grown from the bundled NCBI858 H&E at 0.5 µm/px; encoder: the one-block ViT of
test_predict_wsi (fixed random weights)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("spatialdata")

from deepspot.api import Model  # noqa: E402
from deepspot.config import ModelConfig  # noqa: E402
from deepspot.extras import MissingExtra  # noqa: E402
from deepspot.io import outputs  # noqa: E402
from deepspot.io.slides import open_slide  # noqa: E402
from deepspot.io.synthetic import write_pyramidal_tiff  # noqa: E402
from deepspot.models.checkpoint import save_checkpoint  # noqa: E402

from shared_data import HE, needs_data  # noqa: E402
from test_predict_wsi import GENES, _model_and_config, _tiny_vit, one_thread  # noqa: E402,F401  (_tiny_vit: the tiny encoder, autouse)

pytestmark = [pytest.mark.needs_extra("spatialdata"), needs_data("ncbi858/NCBI858.jpg")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    slide = write_pyramidal_tiff(d / "he.tif", HE, 1200, 1200, mpp=0.5)
    net, cfg = _model_and_config()
    model = Model(net, ModelConfig.coerce(cfg))
    sdata = model.predict_slide(slide, out=d / "out", as_spatialdata=True, progress=False, num_workers=0)
    return {"dir": d, "slide": slide, "model": model, "cfg": cfg, "net": net, "sdata": sdata}


def test_zarr_round_trips_with_image_circles_and_linked_table(setup):
    import spatialdata as sd

    out = setup["dir"] / "out"
    assert sorted(p.name for p in out.iterdir() if p.name != ".deepspot-run.json") == ["he.zarr", "he_genes.png", "he_spots.csv"]  # no partials
    back = sd.read_zarr(out / "he.zarr")
    # image: multiscale, level 0 = the slide's pixels (c, y, x)
    img = back.images["he"]
    scales = sorted(img.keys())
    assert len(scales) >= 2
    s0 = img["scale0"]["image"]
    assert s0.shape == (3, 1200, 1200) and img["scale1"]["image"].shape == (3, 600, 600)
    with open_slide(setup["slide"]) as s:
        ref = s.read_region((300, 500), 0, (64, 48))
    np.testing.assert_array_equal(np.moveaxis(s0[:, 500:548, 300:364].values, 0, -1), ref)
    # the prediction, the same as the in-memory AnnData path
    table = back.tables["table"]
    mem = setup["model"].predict_slide(setup["slide"], progress=False, num_workers=0)
    np.testing.assert_allclose(np.asarray(table.X), mem.X, rtol=1e-5, atol=1e-6)
    assert list(table.var_names) == GENES and list(table.obs_names) == list(mem.obs_names)
    # circles: true radius (55 µm spot at 0.5 µm/px = 110 px diameter), centred on the spots, linked by id
    circles = back.shapes["spots"]
    assert np.allclose(circles["radius"], 55.0 / 0.5 / 2)
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], mem.obsm["spatial"])
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "spots" and attrs["instance_key"] == "spot_id"
    assert (table.obs["region"] == "spots").all()
    np.testing.assert_array_equal(table.obs["spot_id"].to_numpy(), circles.index.to_numpy())
    assert table.uns["deepspot"]["spot_diameter_px"] == pytest.approx(110.0)
    # pixel and micron coordinate systems
    assert set(back.coordinate_systems) == {"global", "um"}


def test_in_memory_spatialdata_matches_the_written_one(setup):
    mem = setup["model"].predict_slide(setup["slide"], as_spatialdata=True, progress=False, num_workers=0)
    np.testing.assert_allclose(np.asarray(mem.tables["table"].X), np.asarray(setup["sdata"].tables["table"].X),
                               rtol=1e-5, atol=1e-6)
    assert mem.images["he"]["scale0"]["image"].shape == (3, 1200, 1200)


def test_spatialdata_plot_draws_a_gene_over_the_image(setup, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pytest.importorskip("spatialdata_plot")  # registers the .pl accessor (extra [spatialdata])

    fig, ax = plt.subplots(figsize=(4, 4))
    n_axes = len(fig.axes)
    try:
        (setup["sdata"].pl.render_images("he").pl.render_shapes("spots", color=GENES[0])
         .pl.show(coordinate_systems="global", ax=ax))
        png = tmp_path / "plot.png"
        fig.savefig(png, dpi=60)
        pix = plt.imread(png)
    finally:
        plt.close(fig)
    assert len(fig.axes) > n_axes  # the gene colour bar
    assert png.stat().st_size > 1000
    assert pix[..., :3].std() > 0.05  # an image with content, not a blank canvas


def test_cli_predict_format_spatialdata(setup, tmp_path):
    from deepspot.cli import main

    ckpt = save_checkpoint(tmp_path / "model", setup["net"], setup["cfg"])
    main(["predict", str(setup["slide"]), "--model", str(ckpt), "--out", str(tmp_path / "o"), "--format",
          "spatialdata", "--no-progress", "--num-workers", "0"])
    import spatialdata as sd

    back = sd.read_zarr(tmp_path / "o" / "he.zarr")
    assert back.tables["table"].shape == setup["sdata"].tables["table"].shape
    assert not (tmp_path / "o" / "he.h5ad").exists()


def test_a_failed_write_leaves_the_old_output_and_no_partials(setup, tmp_path, monkeypatch):
    import spatialdata as sd

    target = tmp_path / "x.zarr"
    outputs.write_spatialdata(setup["sdata"], target)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))

    def half_then_fail(self, path, *a, **k):
        Path(path).mkdir()
        (Path(path) / "zarr.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(sd.SpatialData, "write", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        outputs.write_spatialdata(setup["sdata"], target)
    assert [p.name for p in tmp_path.iterdir()] == ["x.zarr"]
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before


def test_without_the_extra_one_line_names_it(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # import spatialdata -> ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'deepspot\[spatialdata\]'"):
        setup["model"].predict_slide(setup["slide"], out=tmp_path / "o", as_spatialdata=True, progress=False)
    assert not (tmp_path / "o").exists()


def test_predict_cohort_format_spatialdata_writes_and_resumes(setup, tmp_path):
    import spatialdata as sd

    from deepspot.inference.cohort import run_cohort

    ckpt = save_checkpoint(tmp_path / "model", setup["net"], setup["cfg"])
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"path,id\n{setup['slide']},s1\n")
    out = tmp_path / "out"
    s = run_cohort(manifest, ckpt, out, backend="local", device="cpu", progress=False, echo=lambda *_: None,
                   fmt="spatialdata")
    assert s.n_done == 1 and not s.failures and s.ran[0].outputs == ["s1.zarr", "s1_spots.csv"]
    back = sd.read_zarr(out / "s1.zarr")
    np.testing.assert_allclose(np.asarray(back.tables["table"].X), np.asarray(setup["sdata"].tables["table"].X),
                               rtol=1e-5, atol=1e-6)
    again = run_cohort(manifest, ckpt, out, backend="local", device="cpu", progress=False, echo=lambda *_: None,
                       fmt="spatialdata")
    assert again.ran == [] and again.skipped_done == ["s1"]  # the zarr counts as the finished output
