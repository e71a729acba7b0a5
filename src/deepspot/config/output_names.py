"""The names of the files the package writes, in one place: ``predict`` (and each slide of
``predict-cohort``), ``score``, and the demos. Every writer, every previous-result check and every
clean-up of a killed run takes its names from here. No torch, no I/O."""
from __future__ import annotations

__all__ = ["DEMO_CHECKPOINT", "DEMO_FEATURES", "DEMO_FILES", "DEMO_LOGS", "DEMO_PER_GENE", "DEMO_PNG", "DEMO_PREDICTIONS",
           "DEMO_RELIABILITY", "DEMO_SCORES", "DEMO_SPOTS", "DEMO_TRAINING_CURVES", "FORMAT_EXTRAS",
           "PREDICTION_FORMATS", "SCORE_FEATURES", "SCORE_FILES", "SCORE_PER_GENE", "SCORE_SUMMARY", "all_prediction_files",
           "is_demo_file", "is_prediction_file", "is_score_file", "prediction_files", "score_plot"]

PREDICTION_FORMATS = ("h5ad", "spatialdata")
# the pip extra a format needs beyond the core install (the module it imports has the same name)
FORMAT_EXTRAS = {"spatialdata": "spatialdata"}
_PREDICTION_MAIN = {"h5ad": ".h5ad", "spatialdata": ".zarr"}
_SPOTS, _GENES = "_spots.csv", "_genes.png"


def prediction_files(name: str, fmt: str = "h5ad") -> tuple[str, str, str]:
    """The files a prediction of a slide called ``name`` writes: the predictions (``<name>.h5ad``, or
    ``<name>.zarr`` for ``fmt`` 'spatialdata'), the spot table ``<name>_spots.csv`` and the gene plot
    ``<name>_genes.png`` (only when genes are plotted)."""
    return f"{name}{_PREDICTION_MAIN.get(fmt, '.h5ad')}", f"{name}{_SPOTS}", f"{name}{_GENES}"


def all_prediction_files(name: str) -> tuple[str, ...]:
    """Every file a prediction of ``name`` may have written, in either format (clean-up of a killed run)."""
    return (f"{name}.h5ad", f"{name}.zarr", f"{name}{_SPOTS}", f"{name}{_GENES}")


def is_prediction_file(name: str) -> bool:
    """A name a prediction writes (a folder of such names, made before run records, is a previous result)."""
    return name.endswith((*_PREDICTION_MAIN.values(), _SPOTS, _GENES))


# ``deepspot score``
SCORE_PER_GENE, SCORE_SUMMARY, SCORE_FEATURES = "per_gene.csv", "summary.csv", "features"
SCORE_FILES = (SCORE_PER_GENE, SCORE_SUMMARY, SCORE_FEATURES)
_SCORE_PNG = "_score.png"


def score_plot(sample_id: str) -> str:
    """The per-sample figure of ``score``: ``<sample_id>_score.png``."""
    return f"{sample_id}{_SCORE_PNG}"


def is_score_file(name: str) -> bool:
    return name in SCORE_FILES or name.endswith(_SCORE_PNG)


# ``deepspot demo`` (both demos write the same names at the top of their folder)
DEMO_PREDICTIONS, DEMO_PNG, DEMO_SPOTS = "predictions.h5ad", "predicted_genes.png", "spots.csv"
DEMO_SCORES, DEMO_PER_GENE = "scores.csv", SCORE_PER_GENE
DEMO_CHECKPOINT, DEMO_FEATURES, DEMO_LOGS = "model", "features", "logs"
DEMO_RELIABILITY, DEMO_TRAINING_CURVES = "reliability.png", "training_curves.png"
DEMO_FILES = frozenset({DEMO_PREDICTIONS, DEMO_PNG, DEMO_SPOTS, DEMO_SCORES, DEMO_PER_GENE, DEMO_CHECKPOINT,
                        DEMO_FEATURES, DEMO_LOGS, score_plot("C5"), DEMO_RELIABILITY, DEMO_TRAINING_CURVES})


def is_demo_file(name: str) -> bool:
    return name in DEMO_FILES or name.endswith(_SCORE_PNG)
