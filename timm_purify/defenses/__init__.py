"""Purification methods behind one interface (see :mod:`timm_purify.defenses._base`).

Importing this package registers every method; each lives in its own module.
"""

from __future__ import annotations

import importlib

from ._base import (
    DEFENSES,
    DefenseConfig,
    PurifyContext,
    PurifyOptionError,
    PurifyResult,
    purify,
    register_defense,
)

__all__ = [
    "DEFENSES",
    "DefenseConfig",
    "PurifyContext",
    "PurifyOptionError",
    "PurifyResult",
    "purify",
    "register_defense",
]

# one module per method; a module listed here but not yet written is skipped
_METHOD_MODULES = ("ft", "npd", "cnpd", "nft", "awm", "ban_ft")
for _name in _METHOD_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _err:
        if _err.name != f"{__name__}.{_name}":
            raise
