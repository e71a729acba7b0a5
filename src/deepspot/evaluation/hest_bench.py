"""Run one HEST-Bench task folder as published: ridge (their protocol) and DeepSpot on each fold.

A task folder (HEST-Bench, Jaume et al. 2024, e.g. ``bench_data/IDC``) holds:

- ``splits/train_<i>.csv`` and ``splits/test_<i>.csv``: columns ``sample_id``, ``patches_path``,
  ``expr_path`` (paths relative to the task folder), one pair per fold;
- ``patches/<sample>.h5``: ``img`` (N, 224, 224, 3) uint8 patches (112 µm at 0.5 µm/px, centred on
  the spots), ``barcode`` (N, 1) the spot of each patch, ``coords`` (N, 2) their level-0 top-left corners;
- ``adata/<sample>.h5ad``: the spots' raw counts (obs names = barcodes);
- ``var_50genes.json``: ``{"genes": [...]}``, the genes scored.

Per fold, as HEST-Bench does: patches embedded by the encoder; targets log1p of the counts of the
listed genes at the patches' barcodes; ridge = StandardScaler + PCA(256) fitted on the training
patches, then ``Ridge(alpha = 100 / (256 · n_genes), solver='lsqr', fit_intercept=False)``; the
score is the mean over genes of the Pearson r across the test spots, and the task's score the mean
over folds. DeepSpot is trained on the same features and targets (the default recipe; context
``spot_neighbors``: neighbours are the adjacent patches of each sample's lattice, from ``coords``;
early stopping on the top 20 % of the lattice rows of every training sample) and scored the same way.

:data:`LEADERBOARD` holds the published ridge figures (HEST README, results of 08.30.24) for the
encoders registered here under another name (:data:`LEADERBOARD_NAMES`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

TASKS = ("IDC", "PRAD", "PAAD", "SKCM", "COAD", "READ", "ccRCC", "LUAD", "LYMPH_IDC")
#: HEST-Bench ridge + PCA-256 Pearson per task (HEST README, "HEST-Benchmark results (08.30.24)")
LEADERBOARD = {
    "Resnet50": (0.4741, 0.3075, 0.3889, 0.4822, 0.2528, 0.0812, 0.2231, 0.4917, 0.2322),
    "Phikon": (0.5327, 0.342, 0.4432, 0.5355, 0.2585, 0.1517, 0.2423, 0.5468, 0.2373),
    "UNI": (0.5702, 0.314, 0.4764, 0.6254, 0.263, 0.1762, 0.2427, 0.5511, 0.2565),
    "Hoptimus0": (0.5982, 0.385, 0.4932, 0.6432, 0.2991, 0.2292, 0.2654, 0.5582, 0.2595),
}
LEADERBOARD_NAMES = {"resnet50": "Resnet50", "phikon": "Phikon", "uni": "UNI", "hoptimus0": "Hoptimus0"}
#: where our registered encoder is not exactly the network the leaderboard ran
LEADERBOARD_NOTES = {"resnet50": "HEST-Bench's ResNet50 stops after the third block (1024-d features, ImageNet "
                                 "tv_in1k); ours is the whole network (2048-d): not the same features"}


class BenchError(ValueError):
    """A task folder that is not laid out as HEST-Bench publishes it; the message names what is missing."""


def leaderboard_figure(task: str, encoder: str) -> float | None:
    """The published ridge Pearson of ``encoder`` (our registry name) on ``task``, None when not listed."""
    name = LEADERBOARD_NAMES.get(encoder.strip().lower())
    key = {t.lower(): i for i, t in enumerate(TASKS)}.get(task.strip().lower().replace(" ", "_"))
    if name is None or key is None:
        return None
    return LEADERBOARD[name][key]


@dataclass
class BenchSample:
    sample_id: str
    features: np.ndarray  # (N, d)
    targets: np.ndarray  # (N, G) log1p counts
    array_row: np.ndarray
    array_col: np.ndarray


@dataclass
class BenchResult:
    task: str
    encoder: str
    genes: list[str]
    folds: pd.DataFrame  # fold, n_train, n_test, ridge, deepspot
    per_gene: pd.DataFrame = field(default_factory=pd.DataFrame)  # fold, gene, ridge, deepspot

    @property
    def summary(self) -> dict:
        f = self.folds
        out = {"task": self.task, "encoder": self.encoder, "folds": len(f),
               "ridge": float(f["ridge"].mean()), "ridge_std": float(f["ridge"].std(ddof=0))}
        if "deepspot" in f:
            out.update(deepspot=float(f["deepspot"].mean()), deepspot_std=float(f["deepspot"].std(ddof=0)))
        out["leaderboard"] = leaderboard_figure(self.task, self.encoder)
        out["leaderboard_note"] = LEADERBOARD_NOTES.get(self.encoder.strip().lower())
        return out


def read_splits(root: Path) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """The (train, test) tables of every fold, in fold order."""
    d = root / "splits"
    if not d.is_dir():
        raise BenchError(f"{root}: no splits/ folder (a HEST-Bench task folder has splits/, patches/, adata/ "
                         f"and var_50genes.json)")
    folds, i = [], 0
    while (d / f"train_{i}.csv").exists() or (d / f"test_{i}.csv").exists():
        pair = []
        for kind in ("train", "test"):
            p = d / f"{kind}_{i}.csv"
            if not p.exists():
                raise BenchError(f"{root}: fold {i} has no splits/{p.name}")
            t = pd.read_csv(p)
            missing = [c for c in ("sample_id", "patches_path", "expr_path") if c not in t.columns]
            if missing:
                raise BenchError(f"{p}: lacks columns {missing}")
            pair.append(t)
        folds.append(tuple(pair))
        i += 1
    if not folds:
        raise BenchError(f"{d}: no train_0.csv / test_0.csv")
    return folds


def read_genes(root: Path, gene_list: str = "var_50genes.json") -> list[str]:
    p = root / gene_list
    if not p.exists():
        raise BenchError(f"{root}: no {gene_list} (the genes scored)")
    genes = json.loads(p.read_text()).get("genes")
    if not genes:
        raise BenchError(f"{p}: no 'genes' list")
    return [str(g) for g in genes]


def read_patches(path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(img (N, H, W, 3) uint8, barcodes, coords (N, 2)) of a HEST patch file."""
    import h5py

    if not path.exists():
        raise BenchError(f"{path}: patch file not found")
    with h5py.File(path, "r") as f:
        for k in ("img", "barcode", "coords"):
            if k not in f:
                raise BenchError(f"{path}: no '{k}' dataset (HEST patch files hold img, barcode, coords)")
        img = np.asarray(f["img"][:])
        bc = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(f["barcode"][:]).reshape(-1)]
        coords = np.asarray(f["coords"][:], dtype=np.float64)
    return img, bc, coords


def load_sample(root: Path, row, genes: list[str], encoder, batch_size: int = 64) -> BenchSample:
    """Embed one sample's patches and read its targets (log1p counts of ``genes`` at the patches' barcodes)."""
    import anndata as ad
    import scipy.sparse as sp

    from deepspot.features.external import lattice_coordinates

    img, bc, coords = read_patches(root / row["patches_path"])
    a = ad.read_h5ad(root / row["expr_path"])
    missing = [g for g in genes if g not in a.var_names]
    if missing:
        raise BenchError(f"{row['expr_path']}: {len(missing)} listed genes missing (e.g. {missing[:3]})")
    absent = [b for b in bc if b not in a.obs_names]
    if absent:
        raise BenchError(f"{row['expr_path']}: {len(absent)} patch barcodes have no expression (e.g. {absent[:2]})")
    x = a[bc, genes].X
    x = np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float64)
    feats = encoder.encode(img, batch_size=batch_size).numpy().astype(np.float32)
    r, c, _ = lattice_coordinates(coords + img.shape[1] / 2.0)
    return BenchSample(str(row["sample_id"]), feats, np.log1p(x).astype(np.float32), r, c)


def hest_ridge(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, latent_dim: int = 256,
               seed: int = 0) -> np.ndarray:
    """HEST-Bench's probe: StandardScaler + PCA(latent_dim) fitted on train, Ridge(alpha=100/(k·G), lsqr,
    no intercept)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    k = int(min(latent_dim, x_train.shape[0], x_train.shape[1]))
    sc = StandardScaler().fit(x_train)
    pca = PCA(n_components=k, random_state=seed).fit(sc.transform(x_train))
    zt, zs = pca.transform(sc.transform(x_train)), pca.transform(sc.transform(x_test))
    alpha = 100.0 / (zt.shape[1] * y_train.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=seed, fit_intercept=False, max_iter=1000)
    return np.asarray(reg.fit(zt, y_train).predict(zs), dtype=np.float32)


def _bags(samples: list[BenchSample], radius: int = 1):
    from deepspot.geometry.neighbors import array_neighbors
    from deepspot.models.bags import Bags

    idxs, masks, off = [], [], 0
    for s in samples:
        ix, m = array_neighbors(s.array_row, s.array_col, radius)
        idxs.append(ix + off)
        masks.append(m)
        off += len(s.features)
    k = max(ix.shape[1] for ix in idxs)
    pad = lambda a, v: np.pad(a, ((0, 0), (0, k - a.shape[1])), constant_values=v)  # noqa: E731
    return Bags.from_numpy(np.concatenate([s.features for s in samples]), None,
                           np.concatenate([pad(i, 0) for i in idxs]), np.concatenate([pad(m, False) for m in masks]))


def deepspot_fold(train: list[BenchSample], test: list[BenchSample], genes: list[str], context: str = "spot_neighbors",
                  seed: int = 2024, max_epochs: int | None = None, progress: bool = False) -> np.ndarray:
    """Train the default-recipe DeepSpot on ``train`` and predict ``test`` (rows in sample order)."""
    from deepspot.config import invert_scaler
    from deepspot.models.bags import predict_bags
    from deepspot.training.recipe import SpotRecipe, block_validation, fit_spot_model

    recipe = SpotRecipe(context=context, seed=seed).replace(max_epochs=max_epochs)
    bags = _bags(train)
    y = np.concatenate([s.targets for s in train])
    rows, off = [], 0
    for s in train:
        rows.append(np.arange(off, off + len(s.features)))
        off += len(s.features)
    tr, va = block_validation(rows, [s.array_row for s in train], recipe.val_fraction)
    model, scaler, _ = fit_spot_model(recipe, bags, y, tr, va, progress=progress)
    return invert_scaler(predict_bags(model, _bags(test)), scaler)


def _pearson(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    from deepspot.evaluation.metrics import pearson_per_gene

    return pearson_per_gene(pred, truth)


def run_task(root: str | Path, encoder, gene_list: str = "var_50genes.json", deepspot: bool = True,
             context: str = "spot_neighbors", max_epochs: int | None = None, seed: int = 2024,
             progress: bool = False, echo=None) -> BenchResult:
    """Every fold of task folder ``root`` -> :class:`BenchResult` (per-fold ridge / DeepSpot Pearson)."""
    root = Path(root)
    if not root.is_dir():
        raise BenchError(f"{root}: task folder not found")
    folds = read_splits(root)
    genes = read_genes(root, gene_list)
    loaded: dict[str, BenchSample] = {}

    def get(row) -> BenchSample:
        sid = str(row["sample_id"])
        if sid not in loaded:
            loaded[sid] = load_sample(root, row, genes, encoder)
        return loaded[sid]

    rows, per_gene = [], []
    for i, (tr_df, te_df) in enumerate(folds):
        train = [get(r) for _, r in tr_df.iterrows()]
        test = [get(r) for _, r in te_df.iterrows()]
        x_tr = np.concatenate([s.features for s in train])
        y_tr = np.concatenate([s.targets for s in train])
        x_te = np.concatenate([s.features for s in test])
        y_te = np.concatenate([s.targets for s in test])
        r_ridge = _pearson(hest_ridge(x_tr, y_tr, x_te, seed=0), y_te)
        row = {"fold": i, "train": ",".join(s.sample_id for s in train), "test": ",".join(s.sample_id for s in test),
               "n_train": len(y_tr), "n_test": len(y_te), "ridge": float(np.nanmean(r_ridge))}
        r_ds = None
        if deepspot:
            r_ds = _pearson(deepspot_fold(train, test, genes, context, seed, max_epochs, progress), y_te)
            row["deepspot"] = float(np.nanmean(r_ds))
        rows.append(row)
        for j, g in enumerate(genes):
            per_gene.append({"fold": i, "gene": g, "ridge": float(r_ridge[j]),
                             **({} if r_ds is None else {"deepspot": float(r_ds[j])})})
        if echo:
            echo(f"fold {i}: train {row['train']} ({row['n_train']} spots), test {row['test']} ({row['n_test']}): "
                 f"ridge {row['ridge']:.4f}" + (f", deepspot {row['deepspot']:.4f}" if deepspot else ""))
    return BenchResult(root.name, encoder.name, genes, pd.DataFrame(rows), pd.DataFrame(per_gene))


__all__ = ["BenchError", "BenchResult", "LEADERBOARD", "LEADERBOARD_NAMES", "TASKS", "deepspot_fold", "hest_ridge",
           "leaderboard_figure", "read_genes", "read_patches", "read_splits", "run_task"]
