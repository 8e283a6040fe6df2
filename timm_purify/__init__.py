"""timm-purify: detect and remove neural backdoors in any timm image classifier.

The public API, by idea: locating layers (:func:`find_layers`), inserting a polarizer
(:func:`wrap_model`), loading any model (:func:`load_model`), detecting (:func:`scan`),
purifying (:func:`purify`), measuring (:func:`evaluate`), and publishing
(:func:`save_pretrained`, :func:`push_to_hub`, :func:`from_pretrained`).
"""

from ._fold import can_fold, fold_polarizer
from ._hub import load_model, push_to_hub
from ._layers import LayerNotFoundError, LayerSpot, NotAClassifierError, find_layers, resolve_spot
from ._save import from_pretrained, save_pretrained
from ._version import __version__
from ._wrap import PolarizedModel, load_polarizer, save_polarizer, wrap_model
from .data import ImageData, clean_subset, load_data
from .defenses import PurifyResult, purify
from .detection import ScanReport, scan
from .metrics import EvalResult, der, evaluate

__all__ = [
    "__version__",
    "LayerSpot",
    "LayerNotFoundError",
    "NotAClassifierError",
    "PolarizedModel",
    "ImageData",
    "EvalResult",
    "PurifyResult",
    "ScanReport",
    "find_layers",
    "resolve_spot",
    "wrap_model",
    "save_polarizer",
    "load_polarizer",
    "can_fold",
    "fold_polarizer",
    "load_model",
    "load_data",
    "clean_subset",
    "scan",
    "purify",
    "evaluate",
    "der",
    "save_pretrained",
    "from_pretrained",
    "push_to_hub",
]
