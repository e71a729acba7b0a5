"""``deepspot.datasets`` (as ``squidpy.datasets``): the example data sets, implemented in
:mod:`deepspot.io.datasets`. This name is that same module object, so patching one patches the other."""
import sys

from deepspot.io import datasets as _datasets

sys.modules[__name__] = _datasets
