"""timm-purify: detect and remove neural backdoors in any timm image classifier."""

from ._layers import LayerNotFoundError, LayerSpot, NotAClassifierError, find_layers, resolve_spot
from ._version import __version__
from ._wrap import PolarizedModel, load_polarizer, save_polarizer, wrap_model

__all__ = [
    "__version__",
    "LayerSpot",
    "LayerNotFoundError",
    "NotAClassifierError",
    "PolarizedModel",
    "find_layers",
    "resolve_spot",
    "wrap_model",
    "save_polarizer",
    "load_polarizer",
]
