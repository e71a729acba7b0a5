"""Which predictions to trust: per-gene reliability and per-spot, per-gene conformal intervals.

Both are measured once, at the end of training, on the validation spots the recipe already holds out
inside the training samples (never on test samples), and stored in the checkpoint
(``config.json`` key ``reliability``):

- **reliability**, per gene: the Pearson r of prediction vs truth across the validation spots
  (``val_pearson``), the shuffled-prediction noise band (the 95th percentile of |r| with the spots of
  the prediction permuted: what a prediction without spot-to-spot signal scores by chance on these
  spots) and the verdict ``reliable`` = val_pearson above the band. The validation spots also chose the
  early-stopping epoch, so val_pearson is mildly optimistic; it ranks genes, it is not a test score.
- **intervals**, split conformal prediction (Vovk et al.; Lei et al. 2018) per gene in the space of the
  predictions (log1p counts per 10k, the scaler inverted). Nonconformity score
  ``|y - ŷ| / (s + eps)`` with ``s`` the spread (sd) of the model's rho ensemble heads at that spot and
  gene and ``eps`` the gene's median spread on the validation spots; the per-gene quantile is the
  ``ceil((n + 1) level)``-th smallest score of the n validation spots, so on spots exchangeable with
  them the interval ``ŷ ± q (s + eps)`` holds the truth with probability ≥ ``level``. When the head
  spread does not track the error (median over genes of the Spearman correlation between spread and
  |error| on the validation spots below :data:`MIN_INFORMATIVE`) the spread is dropped and the interval
  is a per-gene constant width ``ŷ ± q`` (mode ``constant``); the stored ``spread_informative`` says
  which and why.

A checkpoint without the key (converted published models, models trained before) has no validation:
its genes show NaN val_pearson and no verdict, and its predictions carry no interval.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import numpy as np

from deepspot.config import CheckpointError

NOISE_QUANTILE = 0.95  # the noise band: this quantile of |r| under shuffled predictions
N_SHUFFLES = 200
MIN_INFORMATIVE = 0.1  # median Spearman(spread, |error|) below which the head spread is not used
DEFAULT_LEVEL = 0.9
LEVELS = (0.5, 0.8, 0.9, 0.95)  # nominal levels calibrated at training (--interval picks one)
NO_VALIDATION = ("this model carries no validation (a converted published model, or trained before "
                 "deepspot stored one): val_pearson is NaN, no gene is marked reliable and there are no intervals")


def shuffled_band(pred: np.ndarray, truth: np.ndarray, n: int = N_SHUFFLES, seed: int = 0,
                  q: float = NOISE_QUANTILE) -> np.ndarray:
    """Per gene, the ``q`` quantile of |Pearson r| of ``pred`` with its rows (spots) permuted against
    ``truth``, over ``n`` permutations: (N,G),(N,G) -> (G,); NaN where a side is constant."""
    from deepspot.metrics import pearson_per_gene

    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    if len(pred) < 3 or n <= 0:
        return np.full(pred.shape[1], np.nan)
    rng = np.random.default_rng(seed)
    r = np.stack([pearson_per_gene(pred[rng.permutation(len(pred))], truth) for _ in range(n)])
    with np.errstate(all="ignore"):
        out = np.quantile(np.abs(r), q, axis=0)
    out[np.isnan(r).all(axis=0)] = np.nan
    return out


def coverage_per_gene(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per gene, the share of spots whose truth lies in [lower, upper]: (N,G) x3 -> (G,)."""
    truth = np.asarray(truth, np.float64)
    return ((truth >= np.asarray(lower) - 1e-6) & (truth <= np.asarray(upper) + 1e-6)).mean(axis=0)


def conformal_rank(n: int, level: float) -> int:
    """The rank k = ceil((n + 1) level) of split conformal prediction (1-based); k > n means no finite
    quantile exists (too few calibration spots for this level)."""
    return int(math.ceil((n + 1) * level - 1e-9))


def conformal_quantile(scores: np.ndarray, level: float) -> np.ndarray:
    """Per column, the k-th smallest of the n scores, k = ceil((n + 1) level): (n,G) -> (G,); +inf
    where k > n."""
    scores = np.asarray(scores, np.float64)
    n = scores.shape[0]
    k = conformal_rank(n, level)
    if k > n or n == 0:
        return np.full(scores.shape[1], np.inf)
    return np.sort(scores, axis=0)[k - 1]


def _spearman_cols(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from deepspot.metrics import spearman_per_gene

    return spearman_per_gene(a, b)


@dataclass
class Intervals:
    """A per-gene conformal calibration at a few nominal levels: ``lower, upper = ŷ ∓ q (s + eps)`` (mode
    'head_spread') or ``ŷ ∓ q`` (mode 'constant'). levels (L,); q (L,G); eps (G,)."""

    levels: tuple
    mode: str
    q: np.ndarray
    eps: np.ndarray
    spread_informative: float
    n: int

    @classmethod
    def calibrate(cls, pred: np.ndarray, truth: np.ndarray, spread: np.ndarray | None, levels=LEVELS,
                  mode: str = "auto", min_informative: float = MIN_INFORMATIVE) -> "Intervals":
        """Calibrate on (n,G) predictions and truths of calibration spots and the per-spot spread (n,G)
        (None: constant width). ``levels``: a nominal level or several. ``mode``: 'auto' (head spread
        when informative), 'head_spread' or 'constant'."""
        levels = tuple(sorted({float(v) for v in np.atleast_1d(levels)}))
        bad = [v for v in levels if not 0 < v < 1]
        if bad or not levels:
            raise ValueError(f"interval levels must be in (0, 1), got {bad or levels}")
        pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
        resid = np.abs(truth - pred)
        g = pred.shape[1]
        informative = float("nan")
        if spread is not None:
            spread = np.asarray(spread, np.float64)
            if len(pred) > 2:
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    informative = float(np.nanmedian(_spearman_cols(spread, resid)))
        if mode == "auto":
            mode = "head_spread" if spread is not None and np.isfinite(informative) and \
                informative >= min_informative else "constant"
        if mode == "head_spread":
            if spread is None:
                raise ValueError("head_spread intervals need the spread of the heads")
            eps = np.median(spread, axis=0) if len(spread) else np.zeros(g)
            eps = np.where(eps > 1e-8, eps, 1e-8)
            scores = resid / (spread + eps)
        elif mode == "constant":
            eps = np.zeros(g)
            scores = resid
        else:
            raise ValueError(f"unknown interval mode {mode!r}; choose auto, head_spread or constant")
        q = np.stack([conformal_quantile(scores, v) for v in levels])
        return cls(levels, mode, q, eps, informative, int(len(pred)))

    def q_at(self, level: float) -> np.ndarray:
        """The per-gene factor (G,) of nominal ``level`` (one of :attr:`levels`)."""
        for i, v in enumerate(self.levels):
            if abs(v - float(level)) < 1e-9:
                return self.q[i]
        raise ValueError(f"the model's intervals are calibrated at {', '.join(f'{v:g}' for v in self.levels)}, "
                         f"not {level:g}")

    def half_width(self, spread: np.ndarray | None, level: float = DEFAULT_LEVEL, n: int | None = None) -> np.ndarray:
        """(N,G) half widths at ``level``; ``spread`` (N,G) is needed in mode 'head_spread'."""
        q = self.q_at(level)
        if self.mode == "head_spread":
            if spread is None:
                raise ValueError("this calibration needs the spread of the heads")
            return (q * (np.asarray(spread, np.float64) + self.eps)).astype(np.float32)
        rows = len(spread) if spread is not None else int(n or 0)
        return np.broadcast_to(q.astype(np.float32), (rows, len(q))).copy()

    def bounds(self, pred: np.ndarray, spread: np.ndarray | None = None,
               level: float = DEFAULT_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper), (N,G) float32, in the units of ``pred``; the lower bound is clipped at 0
        (log1p expression is never negative) unless the prediction itself is below 0."""
        pred = np.asarray(pred, np.float32)
        h = self.half_width(spread, level, len(pred))
        return np.maximum(pred - h, np.minimum(pred, 0.0)).astype(np.float32), (pred + h).astype(np.float32)

    def to_dict(self) -> dict:
        return {"levels": list(self.levels), "mode": self.mode,
                "q": [[None if not np.isfinite(v) else float(v) for v in row] for row in self.q],
                "eps": [float(v) for v in self.eps], "spread_informative": _num(self.spread_informative),
                "n": self.n, "score": "|y - pred| / (head sd + eps)" if self.mode == "head_spread" else "|y - pred|"}

    @classmethod
    def from_dict(cls, d: dict, n_genes: int, source: str = "config.json") -> "Intervals":
        try:
            levels = tuple(float(v) for v in d["levels"])
            q = np.array([[np.inf if v is None else float(v) for v in row] for row in d["q"]], dtype=np.float64)
            eps = np.asarray(d.get("eps", [0.0] * n_genes), dtype=np.float64)
            mode = str(d["mode"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: reliability.interval is malformed ({e})") from None
        if q.shape != (len(levels), n_genes) or len(eps) != n_genes:
            raise CheckpointError(f"{source}: reliability.interval has {q.shape} factors for {len(levels)} levels "
                                  f"x {n_genes} genes")
        if mode not in ("head_spread", "constant") or not all(0 < v < 1 for v in levels):
            raise CheckpointError(f"{source}: reliability.interval mode {mode!r} / levels {levels} not understood")
        si = d.get("spread_informative")
        return cls(levels, mode, q, eps, float("nan") if si is None else float(si), int(d.get("n", 0)))


def _num(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


@dataclass
class Reliability:
    """Per-gene reliability measured on validation spots, with the conformal calibration of intervals."""

    val_pearson: np.ndarray
    noise_band: np.ndarray
    n_val: int
    interval: Intervals | None = None
    source: str = ""

    @property
    def reliable(self) -> np.ndarray:
        """val_pearson above the noise band (False where either is NaN)."""
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(self.val_pearson, nan=-np.inf) > np.nan_to_num(self.noise_band, nan=np.inf)

    @classmethod
    def measure(cls, pred: np.ndarray, truth: np.ndarray, spread: np.ndarray | None = None,
                levels=LEVELS, n_shuffles: int = N_SHUFFLES, seed: int = 0,
                source: str = "", interval_mode: str = "auto") -> "Reliability":
        """Reliability of (n,G) predictions vs truths of validation spots (both in expression units);
        ``levels`` None: no interval."""
        from deepspot.metrics import pearson_per_gene

        pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
        iv = None if levels is None else Intervals.calibrate(pred, truth, spread, levels, mode=interval_mode)
        return cls(pearson_per_gene(pred, truth), shuffled_band(pred, truth, n_shuffles, seed), int(len(pred)), iv,
                   source)

    def to_dict(self) -> dict:
        return {"val_pearson": [_num(v) for v in self.val_pearson], "noise_band": [_num(v) for v in self.noise_band],
                "reliable": [bool(v) for v in self.reliable], "n_val": self.n_val, "source": self.source,
                "noise_band_rule": f"{NOISE_QUANTILE:.0%} quantile of |r| over shuffled predictions",
                "interval": None if self.interval is None else self.interval.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, n_genes: int, source: str = "config.json") -> "Reliability":
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: reliability must be an object")
        try:
            vp = np.array([np.nan if v is None else float(v) for v in d["val_pearson"]])
            nb = np.array([np.nan if v is None else float(v) for v in d["noise_band"]])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: reliability is malformed ({e})") from None
        if len(vp) != n_genes or len(nb) != n_genes:
            raise CheckpointError(f"{source}: reliability has {len(vp)} val_pearson / {len(nb)} noise_band values "
                                  f"for {n_genes} genes")
        iv = d.get("interval")
        return cls(vp, nb, int(d.get("n_val", 0)), None if not iv else Intervals.from_dict(iv, n_genes, source),
                   str(d.get("source", "")))

    @classmethod
    def of(cls, config) -> "Reliability | None":
        """The reliability stored in a :class:`~deepspot.config.ModelConfig` (None when it has none)."""
        d = config.extra.get("reliability")
        return None if not d else cls.from_dict(d, len(config.genes))


def gene_table(config) -> "pd.DataFrame":  # noqa: F821
    """One row per gene of the model, in output order: val_pearson, noise_band, reliable (NaN / <NA> when the
    model has no validation), interval_q (the per-gene conformal factor) and rank (1 = most reliable)."""
    import pandas as pd

    rel = Reliability.of(config)
    g = len(config.genes)
    if rel is None:
        df = pd.DataFrame({"val_pearson": np.full(g, np.nan), "noise_band": np.full(g, np.nan),
                           "reliable": pd.array([pd.NA] * g, dtype="boolean")},
                          index=pd.Index(config.genes, name="gene"))
    else:
        df = pd.DataFrame({"val_pearson": rel.val_pearson, "noise_band": rel.noise_band,
                           "reliable": pd.array(rel.reliable, dtype="boolean")},
                          index=pd.Index(config.genes, name="gene"))
        if rel.interval is not None:
            if DEFAULT_LEVEL in rel.interval.levels:
                df["interval_q"] = rel.interval.q_at(DEFAULT_LEVEL)
    order = np.argsort(-np.nan_to_num(df["val_pearson"].to_numpy(float), nan=-np.inf), kind="stable")
    rank = np.empty(g, dtype=np.int64)
    rank[order] = np.arange(1, g + 1)
    df["rank"] = rank
    return df


def reliable_first(config, genes=None) -> list[str]:
    """``genes`` (default: all of the model's) ordered reliable first, then by val_pearson (highest first);
    the model's order when it has no validation."""
    genes = list(config.genes if genes is None else genes)
    t = gene_table(config)
    if t["val_pearson"].isna().all():
        return genes
    key = {g: (-int(bool(t.at[g, "reliable"])), -np.nan_to_num(t.at[g, "val_pearson"], nan=-np.inf)) for g in genes}
    return sorted(genes, key=lambda g: key[g])


def annotate_var(adata, config) -> None:
    """Add ``var['val_pearson']``, ``var['noise_band']`` and ``var['reliable']`` (NaN / False with a note in
    ``uns['deepspot']['reliability']`` when the model has no validation), for the genes of ``adata``."""
    t = gene_table(config).reindex(adata.var_names)
    adata.var["val_pearson"] = t["val_pearson"].to_numpy(np.float64)
    rel = Reliability.of(config)
    adata.var["reliable"] = t["reliable"].fillna(False).to_numpy(bool)
    adata.var["noise_band"] = t["noise_band"].to_numpy(np.float64)
    info = adata.uns.setdefault("deepspot", {})
    if rel is None:
        info["reliability"] = NO_VALIDATION
    else:
        iv = rel.interval
        info["reliability"] = (f"val_pearson: Pearson on {rel.n_val} validation spots held out in training "
                               f"({rel.source or 'validation block'}); reliable: above the shuffled-prediction "
                               "noise band"
                               + ("" if iv is None else f"; intervals: split-conformal, calibrated at "
                                  f"{', '.join(f'{v:g}' for v in iv.levels)} ({iv.mode.replace('_', ' ')})"))


# --------------------------------------------------------------------------- the spread of the heads


@contextlib.contextmanager
def head_spread(model):
    """While active, every forward of ``model`` (a DeepSpot in eval mode) appends to the yielded list the
    (B,G) sd across its rho ensemble heads (in the model's output units, before any scaler inversion).
    Yields None for models without rho ensemble heads."""
    import torch

    rho = getattr(model, "rho", None)
    lin = getattr(rho, "linear", None)
    if rho is None or not hasattr(lin, "heads_last"):
        yield None
        return
    out: list = []

    def hook(mod, inputs, output):
        with torch.no_grad():
            x = torch.relu(mod.dropout(inputs[0]))
            heads = mod.linear.heads_last(x.float())  # (..., E, G)
            out.append(heads.std(dim=-2, unbiased=False).reshape(-1, heads.shape[-1]).cpu().numpy())

    handle = rho.register_forward_hook(hook)
    try:
        yield out
    finally:
        handle.remove()


def predict_rows(model, bags, rows: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray | None]:
    """(predictions, head spread) (n,G) of spots ``rows`` of ``bags`` in the model's output units (spread
    None for a model without ensemble heads)."""
    import torch

    model.eval()
    rows = np.asarray(rows, dtype=np.int64)
    preds = []
    with head_spread(model) as spreads, torch.no_grad():
        for a in range(0, len(rows), batch_size):
            ix = torch.as_tensor(rows[a:a + batch_size])
            preds.append(model(**bags.batch(ix)).float().cpu().numpy())
    g = int(getattr(model, "n_genes", 0))
    pred = np.concatenate(preds) if preds else np.zeros((0, g), np.float32)
    spread = None if spreads is None else (np.concatenate(spreads) if spreads else np.zeros((0, g), np.float32))
    return pred, spread


def spread_to_expression(spread: np.ndarray | None, scaler) -> np.ndarray | None:
    """Head spread from scaled units into expression units (× the scaler's per-gene scale)."""
    if spread is None or scaler is None:
        return spread
    from deepspot.config import Scaler

    s = scaler if isinstance(scaler, Scaler) else Scaler.from_dict(scaler)
    return (np.asarray(spread, np.float32) * s.b).astype(np.float32)


def measure_model(model, scaler, bags, targets: np.ndarray, val_idx: np.ndarray, levels=LEVELS,
                  source: str = "", seed: int = 0) -> Reliability:
    """The reliability of a trained model on its validation spots ``val_idx`` of ``bags``; ``targets``
    (N,G) in expression units (not scaled)."""
    from deepspot.config import invert_scaler

    val_idx = np.unique(np.asarray(val_idx, dtype=np.int64))
    pred, spread = predict_rows(model, bags, val_idx)
    pred = invert_scaler(pred, scaler)
    return Reliability.measure(pred, np.asarray(targets, np.float32)[val_idx], spread_to_expression(spread, scaler),
                               levels=levels, seed=seed, source=source)


__all__ = ["DEFAULT_LEVEL", "Intervals", "NO_VALIDATION", "Reliability", "annotate_var", "conformal_quantile",
           "gene_table", "head_spread", "intervals_for", "measure_model", "predict_rows", "reliable_first",
           "shuffled_band", "spread_to_expression", "trusted_genes", "coverage_per_gene"]


def intervals_for(config, level: float | None) -> tuple["Intervals | None", str | None]:
    """(the calibration to draw ``level`` intervals with, or None; a note saying why not, or None).
    ``level`` None or 0: no intervals asked."""
    if not level:
        return None, None
    rel = Reliability.of(config)
    if rel is None or rel.interval is None:
        return None, "no intervals: " + (NO_VALIDATION if rel is None else "the model's validation has no calibration")
    rel.interval.q_at(level)  # a level the model was not calibrated at: one error before any compute
    return rel.interval, None


def trusted_genes(config, genes=None) -> list[str]:
    """The reliable ones of ``genes`` (default: the model's), highest val_pearson first ([] without
    validation)."""
    t = gene_table(config)
    genes = list(config.genes if genes is None else genes)
    ok = [g for g in genes if t["reliable"].fillna(False).at[g]]
    return sorted(ok, key=lambda g: -float(t.at[g, "val_pearson"]))
