"""The former home of checkpoint conversion, kept so that ``deepspot.convert`` imports keep working: the code
lives in :mod:`deepspot.models.convert` (unpickler, original layouts, gene tables, writing)."""
from deepspot.models.convert import *  # noqa: F401,F403
from deepspot.models.convert import __all__  # noqa: F401
