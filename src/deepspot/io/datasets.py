"""Moved to :mod:`deepspot.datasets`; this name is kept so that existing imports still work."""
from deepspot.datasets import *  # noqa: F401,F403
