"""Purification methods behind one interface (see :mod:`timm_purify.defenses._base`).

Importing this package registers every method; each lives in its own module, and adding one
means adding its module to the imports below.
"""

from __future__ import annotations

from . import awm, ban_ft, cnpd, ft, nft, npd  # noqa: F401 - each module registers its method
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
