"""The contract every stage imports: the checkpoint config, the geometries, the target scaler, the
µm-per-pixel rule and µm -> px.

A checkpoint folder holds ``model.safetensors`` and ``config.json``; :class:`ModelConfig` is the typed
form of ``config.json``. :meth:`ModelConfig.from_dict` checks every field and raises one
:class:`CheckpointError` naming the file and the field (``config.json: geometry.grid.spot_diameter
missing``) before anything is computed; configs written before the schema version existed are
migrated on read (:func:`migrate`).

The package's modules hold one part each (``constants``, ``units``, ``fields``, ``geometry``, ``scaler``,
``checkpoint``); every name keeps its ``deepspot.config`` import path.

This package imports nothing else from deepspot (nor torch), so every layer may import it.
"""
from __future__ import annotations

from deepspot.config.constants import (CELL_MODELS, CheckpointError, EXTERNAL_ENCODER, FEATURE_MODES, GEOMETRY_PRESETS,
                                       GRID_LAYOUTS, GRID_ORIGINS, GRID_UNITS, MODEL_KINDS, MppError, NEIGHBOR_RULES, SCALERS,
                                       SCHEMA_VERSION, SPOT_MODELS, SUBSPOT_RULES, TARGETS, TISSUE_RULES, UNITS,
                                       gene_name_faults)
from deepspot.config.units import resolve_mpp, um_to_px
from deepspot.config.fields import _Fields, _names, _tuple, check_choice
from deepspot.config.geometry import (CELL_CROPS, CellGeometry, GridSpec, ORIGINAL_SPOT_PX, SpotGeometry,
                                      describe_geometries, geometry_preset, magnification_factor)
from deepspot.config.scaler import Scaler, invert_scaler
from deepspot.config.checkpoint import EncoderRef, MAX_GENES, MAX_MODEL_SIZE, ModelConfig, migrate, read_config_file
