"""Example data sets (``deepspot.datasets``, as ``squidpy.datasets``): see :mod:`deepspot.io.datasets`."""
from deepspot.io.datasets import *  # noqa: F401,F403
from deepspot.io.datasets import __all__  # noqa: F401
