"""deepspot.datasets: registry hashes match the bundled copies; lookup order; hash-checked cache;
offline failure is one line naming file + URL and leaves no folder behind."""
import hashlib
import shutil
from pathlib import Path

import pooch
import pytest
import requests

from deepspot import datasets
from deepspot.datasets import DataError, REGISTRY
from shared_data import HER2ST, NCBI858, needs_data

NAME = "ncbi858/NCBI858.json"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env var, no checkout folder, the user cache under tmp_path/cache (not yet created)."""
    bundled = {n: datasets.locate(n) for n in REGISTRY}
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "checkout_data_dir", lambda: None)
    monkeypatch.chdir(tmp_path)
    return bundled


def _offline(monkeypatch):
    calls = []

    def fail(self, url, output_file, pooch_):
        calls.append(url)
        raise requests.exceptions.ConnectionError(f"no network for {url}")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", fail)
    return calls


@needs_data(*NCBI858, *HER2ST)
def test_registry_hashes_match_the_bundled_copies():
    assert len(REGISTRY) == 3 + 4 * 3
    for name, src in REGISTRY.items():
        assert _sha(datasets.locate(name)) == src.sha256, name
        assert src.url.endswith(f"/{src.commit}/{src.path}") and src.repo in src.url


def test_registry_paths_are_the_published_ones():
    assert REGISTRY["ncbi858/NCBI858.h5ad"].path == "example_data/data/h5ad/NCBI858.h5ad"
    assert REGISTRY["her2st/C3_HE.jpg"].path == "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg"
    assert REGISTRY["her2st/C5_spots.tsv"].path == "data/ST-spotfiles/C5_selection.tsv"
    assert REGISTRY["her2st/C2_counts.tsv.gz"].path == "data/ST-cnts/C2.tsv.gz"
    assert {s.commit for s in REGISTRY.values()} == {"b1aeaed8", "85df7411"}


def test_checkout_folder_comes_from_the_package_location_not_the_working_directory(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    want = repo.parent / "shared" / "data"
    (tmp_path / "shared" / "data").mkdir(parents=True)  # decoys at ./shared/data and ../shared/data
    (tmp_path / "sub" / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub")
    got = datasets.checkout_data_dir()
    assert got == (want if want.is_dir() else None)


@needs_data(NAME)
def test_lookup_order_explicit_then_env_then_cache(isolated, tmp_path, monkeypatch):
    calls = _offline(monkeypatch)
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    for d in (explicit, env):
        (d / "ncbi858").mkdir(parents=True)
        shutil.copy(isolated[NAME], d / NAME)
    cache = datasets.cache_dir()
    assert cache == tmp_path / "cache" / "deepspot"
    (cache / "ncbi858").mkdir(parents=True)
    shutil.copy(isolated[NAME], cache / NAME)
    monkeypatch.setenv(datasets.ENV_VAR, str(env))
    assert datasets.fetch(NAME, explicit) == explicit / NAME
    assert datasets.fetch(NAME) == env / NAME
    (env / NAME).unlink()
    assert datasets.fetch(NAME, explicit) == explicit / NAME
    assert datasets.fetch(NAME) == cache / NAME  # env folder lacks it: the cache (hash ok) is next
    monkeypatch.delenv(datasets.ENV_VAR)
    assert datasets.fetch(NAME) == cache / NAME
    assert calls == []  # nothing was downloaded


@needs_data(NAME)
def test_checkout_folder_comes_before_the_cache(isolated, tmp_path, monkeypatch):
    shared = tmp_path / "shared" / "data"
    (shared / "ncbi858").mkdir(parents=True)
    shutil.copy(isolated[NAME], shared / NAME)
    monkeypatch.setattr(datasets, "checkout_data_dir", lambda: shared)
    assert datasets.fetch(NAME) == shared / NAME
    assert datasets.search_dirs(tmp_path) == [tmp_path, shared]


def test_data_dir_that_is_not_a_folder_is_one_clear_error(isolated, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"nowhere: --data-dir is not a folder$"):
        datasets.fetch(NAME, tmp_path / "nowhere")
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"gone: \$DEEPSPOT_DATA_DIR is not a folder$"):
        datasets.fetch(NAME)
    with pytest.raises(DataError, match="not an example file"):
        datasets.fetch("ncbi858/other.txt")
    with pytest.raises(DataError, match="unknown section 'C9'"):
        datasets.her2st(("C2", "C9"))


@needs_data(NAME)
def test_download_goes_to_the_cache_and_is_hash_checked(isolated, tmp_path, monkeypatch):
    payload = {"bytes": isolated[NAME].read_bytes()}
    urls = []

    def fake_download(self, url, output_file, pooch_):
        urls.append(url)
        Path(output_file).write_bytes(payload["bytes"])

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", fake_download)
    got = datasets.fetch(NAME)
    assert got == tmp_path / "cache" / "deepspot" / NAME and _sha(got) == REGISTRY[NAME].sha256
    assert urls == [REGISTRY[NAME].url]
    assert datasets.fetch(NAME) == got and len(urls) == 1  # second call: from the cache

    got.write_bytes(b"tampered")  # a cached copy with the wrong hash is not used
    assert datasets.locate(NAME) is None
    payload["bytes"] = b"not the published file"
    with pytest.raises(DataError, match=r"cached copy has the wrong sha256, and the download .* failed \(wrong sha256\)"):
        datasets.fetch(NAME)
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(DataError, match=r"failed \(wrong sha256\)"):
        datasets.fetch(NAME)
    assert not (tmp_path / "cache").exists()  # neither the bad file nor its folders are left


def test_offline_failure_names_file_url_and_where_to_put_it_and_leaves_no_folder(isolated, tmp_path, monkeypatch):
    calls = _offline(monkeypatch)
    name = "her2st/C4_HE.jpg"
    with pytest.raises(DataError) as e:
        datasets.her2st(("C4",))
    msg = str(e.value)
    target = tmp_path / "cache" / "deepspot" / name
    assert "\n" not in msg and msg.startswith("her2st/C4_counts.tsv.gz: no local copy")
    assert REGISTRY["her2st/C4_counts.tsv.gz"].url in msg and f"save it as {target.parent}/C4_counts.tsv.gz" in msg
    assert "--data-dir DIR" in msg and "DEEPSPOT_DATA_DIR=DIR" in msg
    assert calls == [REGISTRY["her2st/C4_counts.tsv.gz"].url]
    assert not (tmp_path / "cache").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_data(*NCBI858, "her2st/C2_counts.tsv.gz", "her2st/C2_spots.tsv", "her2st/C2_HE.jpg")
def test_ncbi858_and_her2st_return_what_they_say():
    cells, image, meta = datasets.ncbi858()
    assert cells.n_obs == 200 and cells.obsm["spatial"].shape == (200, 2) and image.name == "NCBI858.jpg"
    f = datasets.her2st("C2")
    assert set(f) == {"C2"} and {k: p.name for k, p in f["C2"].items()} == {
        "counts": "C2_counts.tsv.gz", "spots": "C2_spots.tsv", "image": "C2_HE.jpg"}


def test_missing_data_skips_locally_and_fails_in_ci(monkeypatch):
    import conftest

    class Item:
        def iter_markers(self, name):
            return [pytest.mark.needs_data("ncbi858/NCBI858.jpg").mark] if name == "needs_data" else []

    monkeypatch.setattr(datasets, "locate", lambda name, data_dir=None: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="NCBI858.jpg"):
        conftest.pytest_runtest_setup(Item())
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="NCBI858.jpg.*in CI that is a failure"):
        conftest.pytest_runtest_setup(Item())
