"""Convert published DeepSpot, DeepCell and DeepSpot2Cell checkpoints (pickled whole Lightning modules,
Lightning ``.ckpt`` files or state dicts) into our format.

The published models were saved with ``torch.save(model)``: a zip archive whose
``data.pkl`` is a pickle of the original package's objects. Unpickling such a
file normally imports those classes and can run arbitrary code. This package
never does that. Its rooms, in the order a conversion runs:

* :mod:`.unpickle`: the restricted unpickler (reads the archive, rebuilds tensors itself, turns known
  classes into inert placeholders and refuses every other global before anything is called);
* :mod:`.original`: the placeholder tree -> weights, hyper-parameters, scaler (:func:`read_original`);
* :mod:`.layouts`: the original's head layouts -> :class:`deepspot.models.deepsets.DeepSpot`,
  :class:`deepspot.models.deepcell.DeepCell` or :class:`deepspot.models.spot2cell.DeepSpot2Cell` (:func:`to_model`);
* :mod:`.genes`: the gene list (the original's gene table, JSON, CSV/TSV or text);
* :mod:`.published`: :func:`convert_checkpoint`, which writes them with
  :func:`deepspot.models.checkpoint.save_checkpoint` (``model.safetensors`` + ``config.json``).
"""
from deepspot.models.convert.unpickle import ConvertError, MethodRef, RestrictedUnpickler, Stub, load_restricted
from deepspot.models.convert.original import OriginalCheckpoint, read_original
from deepspot.models.convert.layouts import KINDS, detect_kind, to_deepspot, to_model
from deepspot.models.convert.genes import read_gene_list
from deepspot.models.convert.published import convert_checkpoint, convert_deepspot

__all__ = ["ConvertError", "KINDS", "MethodRef", "OriginalCheckpoint", "RestrictedUnpickler", "Stub",
           "convert_checkpoint", "convert_deepspot", "detect_kind", "load_restricted", "read_gene_list",
           "read_original", "to_deepspot", "to_model"]
