"""The published TCGA predictions of the original DeepSpot (``ds.datasets.tcga``): 56 M predicted spots of
3,780 TCGA slides (SKCM, KIRC, LUSC, LUAD), a Hugging Face dataset (:data:`REPO_ID`).

Layout of the dataset: ``metadata_<date>.csv`` (columns ``dataset``, ``slide_type``, ``sample_id``,
``n_spots``, ``file_path``) and one gzipped h5ad per slide at ``file_path``
(``<dataset>/<slide_type>/<sample_id>.h5ad.gz``). Files come through ``huggingface_hub``
(``hf_hub_download``: the user's token from ``hf auth login`` / ``$HF_TOKEN`` and the user's Hugging Face
cache), or from ``local_dir``, a folder laid out the same way (a copy made with ``snapshot_download``).
Anything missing (offline and not cached, no access, unknown sample) is one line naming what and why.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import re
import shutil
import tempfile
from pathlib import Path

import anndata as ad
import pandas as pd

from deepspot.io.datasets import DataError

__all__ = ["REPO_ID", "DEFAULT_METADATA", "COLUMNS", "metadata_files", "metadata", "find", "download", "read"]

#: the dataset named in the original's README
REPO_ID = "nonchev/TCGA_digital_spatial_transcriptomics"
#: the metadata file that README names ("please check which is the latest one"); used when the file list
#: cannot be fetched (offline: taken from the Hugging Face cache if it is there)
DEFAULT_METADATA = "metadata_2025-01-11.csv"
COLUMNS = ("dataset", "slide_type", "sample_id", "n_spots", "file_path")
_META = re.compile(r"^metadata_.*\.csv$")


def _why(e: BaseException) -> str:
    """A short reason for a failed hub call, from huggingface_hub's error classes."""
    name = type(e).__name__
    if name == "GatedRepoError":
        return "the dataset is gated: accept its terms on the dataset page, then log in (hf auth login or $HF_TOKEN)"
    if name == "RepositoryNotFoundError":
        return "repository not found or no access with this token (hf auth login or $HF_TOKEN)"
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return "no such file in the dataset"
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "connect" in name.lower() \
            or "timeout" in name.lower() or isinstance(e, OSError):
        return "offline, and not in the Hugging Face cache"
    return name


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs a warning per retry; the one line we raise says it all."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _offline(e: BaseException | None) -> bool:
    return e is not None and _why(e).startswith("offline")


def _hub_file(repo_id: str, filename: str, token=None, cache_dir=None, local_only: bool = False) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        with _quiet_hub():
            return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", token=token,
                                        cache_dir=cache_dir, local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise DataError(f"{repo_id}/{filename}: cannot fetch it from Hugging Face ({_why(e)}); or pass a local "
                        f"copy of the dataset with --source DIR") from None


def _local_file(local_dir: str | Path, filename: str, source=None) -> Path:
    from deepspot.io.owner import UnsafeNameError, inside

    try:  # a name from the dataset's metadata: read only inside --source
        p = inside(local_dir, filename, "file_path", source or f"--source {local_dir}")
    except UnsafeNameError as e:
        raise DataError(str(e)) from None
    if not p.is_file():
        raise DataError(f"{p}: not found in the local copy of the TCGA dataset (--source {local_dir})")
    return p


def metadata_files(repo_id: str = REPO_ID, local_dir: str | Path | None = None, token=None) -> list[str]:
    """Names of the dataset's metadata CSVs (``metadata_*.csv``), oldest first; [] when the list cannot be
    fetched (offline, no access)."""
    return _metadata_files(repo_id, local_dir, token)[0]


def _metadata_files(repo_id, local_dir, token) -> tuple[list[str], BaseException | None]:
    if local_dir is not None:
        d = Path(local_dir)
        if not d.is_dir():
            raise DataError(f"{d}: --source is not a folder")
        return sorted(p.name for p in d.iterdir() if _META.match(p.name)), None
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return [], OSError("offline (HF_HUB_OFFLINE)")
    try:
        with _quiet_hub():
            names = HfApi().list_repo_files(repo_id, repo_type="dataset", token=token)
    except Exception as e:  # noqa: BLE001 - offline / no access: the caller falls back to the documented name
        return [], e
    return sorted(n for n in names if _META.match(n)), None


def metadata(repo_id: str = REPO_ID, filename: str | None = None, local_dir: str | Path | None = None,
             token=None, cache_dir=None) -> pd.DataFrame:
    """The slides of the dataset: one row per slide (``dataset``, ``slide_type``, ``sample_id``, ``n_spots``,
    ``file_path``). ``filename``: a metadata CSV; default the latest one listed (else
    :data:`DEFAULT_METADATA`)."""
    failed = None
    if filename is None:
        names, failed = _metadata_files(repo_id, local_dir, token)
        if local_dir is not None and not names:
            raise DataError(f"{local_dir}: no metadata_*.csv in the local copy of the TCGA dataset")
        filename = names[-1] if names else DEFAULT_METADATA
    # offline (the listing could not connect): only the Hugging Face cache, no second round of retries
    path = (_local_file(local_dir, filename) if local_dir is not None
            else _hub_file(repo_id, filename, token, cache_dir, local_only=_offline(failed)))
    try:
        df = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot read the metadata CSV ({type(e).__name__})") from None
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed")])
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: metadata lacks columns {missing} (expected {', '.join(COLUMNS)})")
    df.attrs["source"] = str(path)
    return df


def find(meta: pd.DataFrame, sample: str) -> pd.Series:
    """The metadata row of ``sample``: its full ``sample_id`` or a prefix shared by no other slide (e.g. the
    TCGA barcode ``TCGA-D9-A3Z3-06Z``)."""
    ids = meta["sample_id"].astype(str)
    hit = meta[ids == sample]
    if hit.empty:
        hit = meta[ids.str.startswith(sample)]
    if hit.empty:
        raise DataError(f"{sample}: no such sample in the TCGA metadata ({meta.attrs.get('source', '')}; "
                        f"{len(meta)} slides, e.g. {ids.iloc[0] if len(ids) else '-'})")
    if len(hit) > 1:
        more = ", ..." if len(hit) > 3 else ""
        raise DataError(f"{sample}: matches {len(hit)} samples ({', '.join(hit['sample_id'].astype(str)[:3])}"
                        f"{more}); give more of the id")
    return hit.iloc[0]


def download(sample: str, repo_id: str = REPO_ID, local_dir: str | Path | None = None, token=None,
             cache_dir=None, meta: pd.DataFrame | None = None) -> Path:
    """The gzipped h5ad of one slide: from ``local_dir``, else downloaded once into the Hugging Face cache."""
    meta = meta if meta is not None else metadata(repo_id, local_dir=local_dir, token=token, cache_dir=cache_dir)
    rel = str(find(meta, sample)["file_path"])
    if local_dir is not None:
        return _local_file(local_dir, rel, meta.attrs.get("source"))
    return _hub_file(repo_id, rel, token, cache_dir)


def read(sample_or_path: str | Path, out: str | Path | None = None, **kw) -> ad.AnnData:
    """One slide's predictions as AnnData (spots × genes): ``sample_or_path`` is a sample id (downloaded with
    :func:`download`, ``kw`` passed on) or a ``.h5ad.gz`` / ``.h5ad`` path. The gzip is expanded to a
    temporary file (h5py needs a seekable file) that is removed after reading, or to ``out`` (kept;
    written atomically) when given."""
    p = Path(sample_or_path)
    src = p if p.suffix in (".gz", ".h5ad") and p.is_file() else download(str(sample_or_path), **kw)
    if src.suffix != ".gz":
        return ad.read_h5ad(src)
    if out is not None:
        from deepspot.io.outputs import atomic_path

        with atomic_path(out) as tmp:
            _gunzip(src, tmp)
        return ad.read_h5ad(out)
    with tempfile.TemporaryDirectory(prefix="deepspot-tcga-") as d:
        tmp = Path(d) / src.name[:-3]
        _gunzip(src, tmp)
        return ad.read_h5ad(tmp)


def _gunzip(src: Path, dst: Path) -> None:
    try:
        with gzip.open(src, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, length=1 << 22)
    except (OSError, EOFError) as e:
        raise DataError(f"{src}: not a readable gzip file ({type(e).__name__}: {e})") from None
