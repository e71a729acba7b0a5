"""deepspot: predict spatial gene expression from H&E histology.

Stages (one sub-package each): ``io`` (slides, spatial data, outputs), ``geometry``
(grids, neighbours, tissue), ``features`` (crops, encoders, extraction, stores),
``models`` (deep-sets models, losses, checkpoints), ``training``, ``inference``,
``evaluation``; ``plotting`` and ``cli`` on top.
"""
__version__ = "0.1.0"
