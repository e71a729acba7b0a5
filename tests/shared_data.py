"""The bundled example data, found the way the package finds it (deepspot.datasets.locate: --data-dir,
$DEEPSPOT_DATA_DIR, the checkout's shared/data, the user cache); never downloaded by the tests.

Tests that need a file carry ``@needs_data(name, ...)``: where the file is missing they are skipped,
except in CI (``CI`` set and not "0"/"false"), where they fail."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepspot import datasets


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _find(name: str) -> Path | None:
    if name in datasets.REGISTRY:
        return datasets.locate(name)
    return next((d / name for d in datasets.search_dirs() if (d / name).is_file()), None)  # not a registry file


def data_file(name: str) -> Path:
    """The local copy of example file ``name``, or the path it would have in the checkout (missing)."""
    found = _find(name)
    if found is not None:
        return found
    return (datasets.checkout_data_dir() or Path(__file__).resolve().parents[2] / "shared" / "data") / name


def missing(*names: str) -> list[str]:
    return [n for n in names if _find(n) is None]


def require_data(*names: str) -> None:
    """Skip (fail in CI) the running test or fixture when any of these example files is missing."""
    gone = missing(*names)
    if gone:
        msg = (f"example data not found: {', '.join(gone)} (looked in --data-dir/$DEEPSPOT_DATA_DIR, the checkout's "
               f"shared/data and the user cache)")
        if in_ci():
            pytest.fail(msg + "; in CI that is a failure, not a skip", pytrace=False)
        pytest.skip(msg)


def needs_data(*names: str):
    """Mark a test (or, as ``pytestmark``, a module) as needing these example files."""
    return pytest.mark.needs_data(*names)


HE = data_file("ncbi858/NCBI858.jpg")
NCBI858_H5AD = data_file("ncbi858/NCBI858.h5ad")
ZEN38 = data_file("ZEN38_visium_meta.json")
NCBI858 = tuple(f"ncbi858/NCBI858.{e}" for e in ("h5ad", "jpg", "json"))
HER2ST = tuple(n for n in datasets.REGISTRY if n.startswith("her2st/"))


def her2st_with_signal(sections=("C2", "C3", "C4", "C5"), n_sub: int = 9, dim: int = 24, seed: int = 0):
    """Bundled HER2ST sections (real counts, images unread) with features that carry expression signal:
    a fixed random projection of each spot's log expression of 200 variable genes plus noise (no
    encoding). Returns (samples, {sample_id: Features(spot (N,dim), subspot (N,n_sub,dim))})."""
    import numpy as np

    from deepspot.features.store import Features
    from deepspot.training.manifest import her2st_manifest, load_sample
    from deepspot.training.targets import log_normalize, rank_hvgs

    require_data(*HER2ST)
    samples = [load_sample(s, check_image=False) for s in her2st_manifest(sections=sections)]
    genes = rank_hvgs({s.sample_id: s.adata for s in samples}, 200, min_fraction=0.1)
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(len(genes), dim)).astype(np.float32) / np.sqrt(len(genes))
    feats = {}
    for s in samples:
        e = (log_normalize(s.adata, genes=genes) @ w).astype(np.float32)
        noise = rng.normal(size=(len(e), n_sub, dim)).astype(np.float32)
        feats[s.sample_id] = Features(spot=(e + 0.3 * rng.normal(size=e.shape)).astype(np.float32),
                                      subspot=(e[:, None] + 0.5 * noise).astype(np.float32))
    return samples, feats


def reference_dir(name: str) -> Path:
    """A folder of the shared reference material (``<checkout>/../shared/reference/<name>``, beside the example
    data; or under $DEEPSPOT_REFERENCE_DIR). Skips (fails in CI) the running test when it is missing."""
    roots = [Path(os.environ["DEEPSPOT_REFERENCE_DIR"])] if os.environ.get("DEEPSPOT_REFERENCE_DIR") else []
    roots += [d.parent / "reference" for d in datasets.search_dirs()]
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "reference")
    found = next((r / name for r in roots if (r / name).is_dir()), None)
    if found is None:
        msg = f"reference folder not found: {name} (looked in {', '.join(str(r) for r in roots)})"
        if in_ci():
            pytest.fail(msg + "; in CI that is a failure, not a skip", pytrace=False)
        pytest.skip(msg)
    return found


def stand_in_he(height: int = 600, width: int = 800, seed: int = 3):
    """An H&E-like uint8 RGB image for tests whose example image is missing: a pink, smoothly
    textured tissue ellipse with purple nuclei-like blobs (about 40 % of the area) on near-white
    glass. Unlike white noise it survives JPEG compression and has a tissue/background split, which
    is what the tests that fall back to it measure."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((yy - height / 2) / (0.42 * height)) ** 2 + ((xx - width / 2) / (0.36 * width)) ** 2 < 1
    texture = gaussian_filter(rng.normal(size=(height, width)), 6)
    texture /= np.abs(texture).max() + 1e-9
    nuclei = gaussian_filter((rng.random((height, width)) < 0.004).astype(float), 3)
    nuclei = np.clip(nuclei / (nuclei.max() + 1e-9) * 3, 0, 1)
    img = np.empty((height, width, 3), np.float32)
    img[:] = (240, 238, 242)  # glass
    pink = np.array([225, 150, 190], np.float32) + 25 * texture[..., None]
    purple = np.array([110, 60, 150], np.float32)
    tissue = pink * (1 - nuclei[..., None]) + purple * nuclei[..., None]
    img[inside] = tissue[inside]
    img += rng.normal(0, 2, img.shape)  # sensor noise, small enough for JPEG
    return np.clip(np.round(img), 0, 255).astype(np.uint8)
