"""Example data sets (squidpy.datasets style): a registry of public files with their sha256.

A file is looked up, in order, in: the ``data_dir`` argument (``--data-dir``), ``$DEEPSPOT_DATA_DIR``,
the ``shared/data`` folder next to the project when run from a source checkout (found from this
file's location, never from the working directory), and the user cache (``pooch.os_cache("deepspot")``),
which is filled by download on first use; cached files are used only when their sha256 matches. Local names: ``ncbi858/NCBI858.{h5ad,jpg,json}``
and ``her2st/{S}_counts.tsv.gz``, ``her2st/{S}_spots.tsv``, ``her2st/{S}_HE.jpg`` for S in C2-C5.

``tcga`` (:mod:`deepspot.io.tcga`): the original's published TCGA predictions, a Hugging Face dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import anndata as ad

__all__ = ["DataError", "REGISTRY", "HER2ST_SECTIONS", "Source", "cache_dir", "checkout_data_dir", "fetch",
           "her2st", "her2st_adata", "locate", "ncbi858", "ncbi858_files", "search_dirs", "tcga"]

ENV_VAR = "DEEPSPOT_DATA_DIR"
_RAW = "https://github.com/{repo}/raw/{commit}/{path}"


class DataError(Exception):
    """Example data missing and not fetchable; the message says which file and what to do."""


class Source(NamedTuple):
    repo: str
    commit: str
    path: str
    sha256: str

    @property
    def url(self) -> str:
        return _RAW.format(repo=self.repo, commit=self.commit, path=self.path)


_DEEPSPOT = ("ratschlab/DeepSpot", "b1aeaed8")
_HER2ST = ("almaan/her2st", "85df7411")
_HER2ST_IMAGES = {"C2": "C/C2/5714_HE_BT_C2.jpg", "C3": "C/C3/5714_HE_BT_D1.jpg",
                  "C4": "C/C4/5714_HE_BT_D2.jpg", "C5": "C/C5/5714_HE_BT_E1.jpg"}
HER2ST_SECTIONS = tuple(_HER2ST_IMAGES)

#: local name -> public source and sha256 (checked against the bundled copies in the tests)
REGISTRY: dict[str, Source] = {
    "ncbi858/NCBI858.h5ad": Source(*_DEEPSPOT, "example_data/data/h5ad/NCBI858.h5ad",
                                   "4c1c428d0f14e5c6a47716652a91dadfa26c1c6c349093bbb4b45c1f10f445aa"),
    "ncbi858/NCBI858.jpg": Source(*_DEEPSPOT, "example_data/data/image/NCBI858.jpg",
                                  "7ad9ac065f89c57ec62d9010e8352e56f99cb4fc47359f46ab3db0ccc2b21123"),
    "ncbi858/NCBI858.json": Source(*_DEEPSPOT, "example_data/data/meta/NCBI858.json",
                                   "6b12f3e2cedda9ec1fb6c251ff08206ea428edde0b7397c500bef29dcaf6f1bd"),
}
_HER2ST_SHA = {
    "C2": ("c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
           "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
           "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e"),
    "C3": ("e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
           "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
           "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568"),
    "C4": ("33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
           "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
           "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2"),
    "C5": ("c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
           "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
           "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65"),
}
for _s, (_counts, _spots, _image) in _HER2ST_SHA.items():
    REGISTRY[f"her2st/{_s}_counts.tsv.gz"] = Source(*_HER2ST, f"data/ST-cnts/{_s}.tsv.gz", _counts)
    REGISTRY[f"her2st/{_s}_spots.tsv"] = Source(*_HER2ST, f"data/ST-spotfiles/{_s}_selection.tsv", _spots)
    REGISTRY[f"her2st/{_s}_HE.jpg"] = Source(*_HER2ST, f"data/ST-imgs/{_HER2ST_IMAGES[_s]}", _image)


def checkout_data_dir() -> Path | None:
    """``<repo>/../shared/data`` when this package runs from a source checkout (src layout), else None."""
    repo = Path(__file__).resolve().parents[3]  # <repo>/src/deepspot/io/datasets.py
    if Path(__file__).resolve().parents[2].name != "src" or not (repo / "pyproject.toml").is_file():
        return None
    cand = repo.parent / "shared" / "data"
    return cand if cand.is_dir() else None


def cache_dir() -> Path:
    """The per-user cache that downloads go to."""
    import pooch

    return Path(pooch.os_cache("deepspot"))


def search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The folders searched for a local copy, in order, before the cache."""
    dirs = []
    for d, what in ((data_dir, "--data-dir"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if d is not None:
            d = Path(d).expanduser()
            if not d.is_dir():
                raise DataError(f"{d}: {what} is not a folder")
            dirs.append(d)
    co = checkout_data_dir()
    if co is not None:
        dirs.append(co)
    return dirs


def _source(name: str) -> Source:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DataError(f"{name}: not an example file (known: {', '.join(sorted(REGISTRY))})") from None


def _cached(name: str) -> Path | None:
    import pooch

    p = cache_dir() / name
    return p if p.is_file() and pooch.file_hash(str(p)) == _source(name).sha256 else None


def locate(name: str, data_dir: str | Path | None = None) -> Path | None:
    """Local copy of example file ``name`` (e.g. 'ncbi858/NCBI858.jpg'), or None; never downloads.

    Copies in the search folders are taken as they are; a cached copy only if its sha256 matches."""
    _source(name)
    for d in search_dirs(data_dir):
        if (d / name).is_file():
            return d / name
    return _cached(name)


def _remove_new_dirs(created: list[Path]) -> None:
    for d in created:  # deepest first; only folders this call made, and only if still empty
        try:
            d.rmdir()
        except OSError:
            pass


def fetch(name: str, data_dir: str | Path | None = None) -> Path:
    """Path to example file ``name``: a local copy, else downloaded once into the cache (sha256 checked)."""
    src = _source(name)
    found = locate(name, data_dir)
    if found is not None:
        return found
    import pooch

    target = cache_dir() / name
    stale = target.is_file()
    created = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
    log = pooch.get_logger()
    level = log.level
    log.setLevel("WARNING")  # its "Downloading ..." line would precede our one-line error
    try:
        got = pooch.retrieve(src.url, known_hash=f"sha256:{src.sha256}", path=str(target.parent), fname=target.name,
                             downloader=pooch.HTTPDownloader(progressbar=False))
    except Exception as e:  # offline, proxy, 404, hash mismatch ...
        _remove_new_dirs(created)
        why = "wrong sha256" if isinstance(e, ValueError) and "hash" in str(e).lower() else type(e).__name__
        had = "; the cached copy has the wrong sha256" if stale else ""
        raise DataError(f"{name}: no local copy{had}, and the download from {src.url} failed ({why}); download it "
                        f"by hand and save it as {target} (or as DIR/{name} with --data-dir DIR or {ENV_VAR}=DIR)"
                        ) from None
    finally:
        log.setLevel(level)
    return Path(got)


def ncbi858_files(data_dir: str | Path | None = None) -> dict[str, Path]:
    """Paths of the NCBI858 files: keys 'h5ad', 'image', 'meta'."""
    return {k: fetch(f"ncbi858/NCBI858.{ext}", data_dir) for k, ext in (("h5ad", "h5ad"), ("image", "jpg"),
                                                                        ("meta", "json"))}


def ncbi858(data_dir: str | Path | None = None) -> tuple[ad.AnnData, Path, dict]:
    """The Xenium lung example: (cells AnnData with obsm['spatial'] (x, y) px, H&E image path, metadata).

    In the file, obs['x_pixel'] is the image row and obs['y_pixel'] the column.
    """
    f = ncbi858_files(data_dir)
    meta = json.loads(f["meta"].read_text())
    from deepspot.io.spatial import read_cells_h5ad

    cells = read_cells_h5ad(f["h5ad"], x_col="y_pixel", y_col="x_pixel")
    cells.uns["sample"] = meta.get("sample", "NCBI858")
    return cells, f["image"], meta


def her2st(sections=HER2ST_SECTIONS, data_dir: str | Path | None = None) -> dict[str, dict[str, Path]]:
    """Paths of HER2ST sections (patient C): {section: {'counts', 'spots', 'image'}}."""
    if isinstance(sections, str):
        sections = (sections,)
    bad = [s for s in sections if s not in _HER2ST_IMAGES]
    if bad:
        raise DataError(f"her2st: unknown section {bad[0]!r} (available: {', '.join(HER2ST_SECTIONS)})")
    return {s: {"counts": fetch(f"her2st/{s}_counts.tsv.gz", data_dir), "spots": fetch(f"her2st/{s}_spots.tsv", data_dir),
                "image": fetch(f"her2st/{s}_HE.jpg", data_dir)} for s in sections}


def her2st_adata(section: str, data_dir: str | Path | None = None) -> ad.AnnData:
    """One HER2ST section read as spots AnnData (in-tissue spots, positions in full-resolution px)."""
    f = her2st((section,), data_dir)[section]
    from deepspot.io.spatial import read_her2st

    return read_her2st(f["counts"], spots=f["spots"], image=f["image"], sample=section)


from deepspot.io import tcga  # noqa: E402  (ds.datasets.tcga: the published TCGA predictions, Hugging Face)
