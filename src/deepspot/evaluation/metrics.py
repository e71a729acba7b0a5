"""Per-gene metrics (the old import path: they live in :mod:`deepspot.metrics`, below every stage that
scores, so that training and inference can measure reliability with the same functions)."""
from deepspot.metrics import mse_per_gene, pearson_per_gene, spearman_per_gene, summarize

__all__ = ["pearson_per_gene", "spearman_per_gene", "mse_per_gene", "summarize"]
