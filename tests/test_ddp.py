"""Training at scale: features read lazily from per-sample zarr stores, and Lightning DDP on 2 CPU processes.

Three samples with random features in real feature stores (features/store.FeatureWriter, small chunks
so batches cross chunks) and targets that are a linear function of the features. The DDP run is a
script launched with ``strategy="ddp"`` (Lightning starts rank 1 as a second process, gloo backend),
as on a cluster. Without dropout, DDP over 2 ranks with batch b must give the weights of one process
with batch 2b (same permutation, gradients averaged): that is checked, along with both ranks having
run their half of every epoch and ending with the same weights, and the validation loss falling.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from deepspot.features.store import FeatureWriter
from deepspot.geometry.grid import GridSpec, make_grid
from deepspot.datasets import DataError
from deepspot.models.bags import Bags
from deepspot.models.deepsets import DeepSpot
from deepspot.training.fit import fit
from deepspot.training.lazy_bags import StoreBags, StoreSample
from shared_data import NCBI858, needs_data

D, S, G = 24, 4, 5
EPOCHS = 5


def _sample(root: Path, name: str, seed: int, width: int, w_true: np.ndarray, chunk: int | None):
    grid = make_grid(width, 900, GridSpec(55.0, 100.0, unit="px"))
    n = len(grid)
    rng = np.random.default_rng(seed)
    spot = rng.normal(size=(n, D)).astype(np.float32)
    sub = rng.normal(size=(n, S, D)).astype(np.float32)
    centers = grid[["x", "y"]].to_numpy()
    order = rng.permutation(n)  # the store holds the spots in another order than the sample lists them
    path = root / f"{name}.zarr"
    if chunk is None:  # the project's writer
        w = FeatureWriter(path, n, D, S, {"encoder": "random"})
        w.write(0, centers[order], spot[order], sub[order])
        w.close()
    else:  # the same store format with small chunks, so that batches cross chunks
        g = zarr.open_group(str(path), mode="w")
        for key, a in (("centers", centers[order]), ("spot", spot[order]), ("subspot", sub[order])):
            g.create_array(key, shape=a.shape, dtype=a.dtype, chunks=(chunk,) + a.shape[1:])[:] = a
        g.attrs["complete"] = True
    y = (spot + 0.25 * sub.sum(1)) @ w_true + 0.05 * rng.normal(size=(n, G))
    return StoreSample(name, path, centers, grid["array_row"].to_numpy(),
                       grid["array_col"].to_numpy()), spot, sub, y.astype(np.float32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    w_true = np.random.default_rng(0).normal(size=(D, G)).astype(np.float32) / np.sqrt(D)
    parts = [_sample(root, f"s{i}", i + 1, wd, w_true, ch) for i, (wd, ch) in enumerate(((1300, 16), (1100, 8),
                                                                                         (900, None)))]
    samples = [p[0] for p in parts]
    y = np.concatenate([p[3] for p in parts])
    # the same spots as one in-memory Bags (neighbour indices shifted by each sample's offset)
    from deepspot.geometry.neighbors import array_neighbors

    idx, mask, off = [], [], 0
    for s in samples:
        i, m = array_neighbors(s.array_row, s.array_col, 1)
        idx.append(i + off)
        mask.append(m)
        off += len(s.centers)
    k = max(i.shape[1] for i in idx)
    pad = lambda a, v: np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=v)  # noqa: E731
    bags = Bags.from_numpy(np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                           np.concatenate([pad(i, 0) for i in idx]), np.concatenate([pad(m, False) for m in mask]))
    return root, samples, y, bags


def test_store_bags_read_lazily_what_bags_hold(cohort):
    root, samples, y, bags = cohort
    sb = StoreBags(samples, neighbor_radius=1, cache_mb=0.01)  # ~1 chunk of 16 spots × 5 × 24 floats
    assert len(sb) == len(bags) == len(y) and sb.dim == D and sb.use_subspots
    ix = np.random.default_rng(3).choice(len(sb), size=40, replace=False)
    a, b = sb.batch(torch.as_tensor(ix)), bags.batch(torch.as_tensor(ix))
    assert a.keys() == b.keys()
    for key in ("spot", "subspots", "subspot_mask", "neighbor_mask"):
        assert torch.equal(a[key], b[key]), key
    m = b["neighbor_mask"]
    assert m.any() and torch.equal(a["neighbors"][m], b["neighbors"][m])
    assert not a["neighbors"][~m].any()  # padding is zeros, and masked out by the model anyway
    assert sb._cached <= max(sb.cache_bytes, max(c.nbytes for c in sb._cache.values()))
    assert sb.chunks_read > len(sb._cache)  # bounded: chunks were evicted
    model = DeepSpot(D, G, hidden=16, n_ensemble=2, dropout=0.0)
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(**a).numpy(), model(**b).numpy(), rtol=1e-5, atol=1e-6)
    # pickles without its handles/cache (DataLoader workers, DDP spawn) and reads the same after
    import pickle

    sb2 = pickle.loads(pickle.dumps(sb))
    assert sb2.chunks_read == 0 and torch.equal(sb2.batch(ix[:5])["subspots"], b["subspots"][:5])
    # the epoch order fit uses: a seeded permutation that keeps batches within few chunks, so that an
    # epoch decodes far fewer chunks than a uniform shuffle through the same small cache
    train = np.arange(0, len(sb), 2)
    order = sb.epoch_order(train, seed=1)
    assert sorted(order.tolist()) == train.tolist() and np.array_equal(order, sb.epoch_order(train, seed=1))
    assert not np.array_equal(order, sb.epoch_order(train, seed=2))
    reads = {}
    for name, window in (("local", 2), ("uniform", None)):
        s = StoreBags(samples, cache_mb=0.05, shuffle_window=window)
        o = s.epoch_order(train, seed=1)
        for start in range(0, len(o), 16):
            s.batch(o[start:start + 16])
        reads[name] = s.chunks_read
    assert reads["local"] < reads["uniform"] / 2, reads
    # spots without features / a missing store are refused with the sample's name
    bad = StoreSample("ghost", samples[0].store, samples[0].centers + 3.0, samples[0].array_row,
                      samples[0].array_col)
    with pytest.raises(DataError, match="ghost: .* spots have no features"):
        StoreBags([samples[1], bad])
    with pytest.raises(DataError, match="nowhere: no complete feature store"):
        StoreBags([StoreSample("nowhere", root / "x.zarr", samples[0].centers, samples[0].array_row,
                               samples[0].array_col)])


SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys
    import numpy as np, torch
    from deepspot.models.deepsets import DeepSpot
    from deepspot.training.fit import fit
    from deepspot.training.lazy_bags import StoreBags, StoreSample

    class CountingBags(StoreBags):
        """Records the spots of every batch this process gathers."""
        def batch(self, ix):
            self.seen.append(np.asarray(ix).tolist())
            return super().batch(ix)

    def main():
        cfg = json.load(open(sys.argv[1]))
        samples = [StoreSample(s["name"], s["store"], np.array(s["centers"]), np.array(s["row"]), np.array(s["col"]))
                   for s in cfg["samples"]]
        bags = CountingBags(samples, cache_mb=1)
        bags.seen = []
        y = np.load(cfg["targets"])
        train, val = np.array(cfg["train"]), np.array(cfg["val"])
        torch.manual_seed(0)
        model = DeepSpot(cfg["dim"], y.shape[1], hidden=16, n_ensemble=2, dropout=0.0)
        def mse(m):
            with torch.no_grad():
                return float(((m.eval()(**bags.batch(val)).numpy() - y[val]) ** 2).mean())

        before = mse(model)
        bags.seen = []
        model.train()
        out = fit(model, bags, y, train, val, lr=cfg["lr"], batch_size=cfg["batch"], max_epochs=cfg["epochs"],
                  patience=100, seed=7, progress=False, accelerator="cpu", devices=2, strategy="ddp")
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        state = {k: v.detach().numpy().tolist() for k, v in model.state_dict().items()}
        digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
        seen_train = [b for b in bags.seen if set(b) <= set(train.tolist())]
        weights = {k: v.numpy() for k, v in model.state_dict().items()}
        np.savez(os.path.join(cfg["out"], f"weights{rank}.npz"), **weights)
        json.dump({"rank": rank, "world": world, "pid": os.getpid(), "before": before, "after": mse(model),
                   "fit": {k: float(v) if isinstance(v, (int, float)) else v for k, v in out.items()},
                   "digest": digest, "train_batches": seen_train},
                  open(os.path.join(cfg["out"], f"rank{rank}.json"), "w"))

    if __name__ == "__main__":
        main()
''')


def test_ddp_two_cpu_processes_match_one_process(cohort, tmp_path):
    root, samples, y, _ = cohort
    n = len(y)
    perm = np.random.default_rng(0).permutation(n)
    train, val = np.sort(perm[:256]), np.sort(perm[256:])  # 256 = 8 global batches of 2 × 16: no wrap-around
    np.save(tmp_path / "y.npy", y)
    cfg = {"samples": [{"name": s.name, "store": str(s.store), "centers": s.centers.tolist(),
                        "row": s.array_row.tolist(), "col": s.array_col.tolist()} for s in samples],
           "targets": str(tmp_path / "y.npy"), "train": train.tolist(), "val": val.tolist(), "dim": D,
           "batch": 16, "epochs": EPOCHS, "lr": 2e-2, "out": str(tmp_path)}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "train_ddp.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, str(tmp_path / "train_ddp.py"), str(tmp_path / "cfg.json")],
                         capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2) and r0["pid"] != r1["pid"]
    # each rank trained on its own half of every epoch: 8 batches of 16 per rank per epoch, disjoint per epoch
    for r in (r0, r1):
        assert len(r["train_batches"]) == 8 * EPOCHS and all(len(b) == 16 for b in r["train_batches"])
    for e in range(EPOCHS):
        a = {i for b in r0["train_batches"][8 * e:8 * e + 8] for i in b}
        b = {i for b in r1["train_batches"][8 * e:8 * e + 8] for i in b}
        assert not a & b and a | b == set(train.tolist())
    # same best epoch and weights on both ranks (KeepBest agrees across ranks), and it learned
    # (the per-epoch history that training_curves.png draws is kept by rank 0 only)
    no_hist = lambda f: {k: v for k, v in f.items() if k != "history"}  # noqa: E731
    assert r0["digest"] == r1["digest"] and no_hist(r0["fit"]) == no_hist(r1["fit"])
    assert len(r0["fit"]["history"]) == r0["fit"]["epochs"] and r1["fit"]["history"] == []
    assert r0["after"] < 0.7 * r0["before"]
    # one process with the global batch (2 × 16) reaches the same weights
    sb = StoreBags(samples, cache_mb=1)
    torch.manual_seed(0)
    single = DeepSpot(D, G, hidden=16, n_ensemble=2, dropout=0.0)
    out = fit(single, sb, y, train, val, lr=2e-2, batch_size=32, max_epochs=EPOCHS, patience=100, seed=7,
              progress=False)
    assert out["best_epoch"] == r0["fit"]["best_epoch"]
    ddp = np.load(tmp_path / "weights0.npz")
    for k, v in single.state_dict().items():
        np.testing.assert_allclose(ddp[k], v.numpy(), rtol=1e-4, atol=1e-5, err_msg=k)


@needs_data(*NCBI858)
def test_build_stores_extracts_once_per_sample_and_reads_back(tmp_path):
    """Real crops of the bundled H&E through a tiny in-test encoder: the stores build_stores writes hold
    what in-memory extraction gives, row for row, for two samples."""
    from types import SimpleNamespace

    from deepspot.features import encoders as E
    from deepspot.features.extract import extract_features
    from deepspot.geometry.grid import pool_cells
    from deepspot.config import SpotGeometry
    from deepspot.datasets import ncbi858
    from deepspot.training.lazy_bags import build_stores

    spec = E.EncoderSpec("tiny-stores-test", 4, 8, (0.5,) * 3, (0.25,) * 3, source="test", needs_download=False,
                         builder=lambda p: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                               torch.nn.Linear(3, 4)))
    E.register_encoder(spec)
    try:
        torch.manual_seed(0)
        enc = E.load_encoder("tiny-stores-test")
        cells, image, _ = ncbi858()
        geometry = SpotGeometry(GridSpec(120.0, 120.0, unit="px"), n_sub=2)
        samples = []
        for k, off in enumerate((0.0, 40.0)):
            grid = GridSpec(120.0, 120.0, unit="px", offset_x=off, offset_y=off)
            spots, _ = pool_cells(cells, 1431, 1249, grid)
            samples.append(SimpleNamespace(sample_id=f"lung{k}", image=image, mpp=None, adata=spots))
        stores = build_stores(samples, enc, geometry, tmp_path / "cache", progress=False)
        assert [s.name for s in stores] == ["lung0", "lung1"] and all(s.store.exists() for s in stores)
        sb = StoreBags(stores, shuffle_window=None)
        got = sb.batch(np.arange(len(sb)))
        want = [extract_features(image, s.adata.obsm["spatial"], 120.0, enc, n_sub=2, progress=False) for s in samples]
        assert torch.equal(got["spot"], torch.from_numpy(np.concatenate([w.spot for w in want])))
        assert torch.equal(got["subspots"], torch.from_numpy(np.concatenate([w.subspot for w in want])))
        assert len(sb) == sum(s.adata.n_obs for s in samples) > 10
        no_rows = SimpleNamespace(sample_id="flat", image=image, mpp=None, adata=cells)
        with pytest.raises(DataError, match="flat: obs needs array_row/array_col"):
            build_stores([no_rows], enc, geometry, tmp_path / "cache", progress=False)
    finally:
        E._REGISTRY.pop("tiny-stores-test")
