"""Backdoor attacks used to plant known backdoors (for testing defences and building the zoo).

Each attack lives in its own file and registers itself under a name with
:func:`register_attack`; :func:`build_attack` builds one by that name, :func:`from_json` /
:func:`from_dict` rebuild one from its saved spec. Every attack follows :class:`Attack`:
``apply(x)`` stamps the trigger on float images in [0, 1] at any size, ``poison(data)`` returns
a poisoned copy of a uint8 training set and the mask of poisoned rows, ``target_labels(y)`` and
``asr_mask(y)`` give what the metrics need.

Registered: ``badnets``, ``blended``, ``sig`` (clean-label), ``wanet``, ``trojan``, ``lf``,
``bpp``. Not provided: Input-aware (needs a trigger-generator network trained jointly with the
victim model, i.e. a training loop rather than a data transform).
"""

from __future__ import annotations

from ._base import (
    ATTACKS,
    MODES,
    Attack,
    AttackConfigError,
    AttackInputError,
    PoisonResult,
    UnknownAttackError,
    build_attack,
    from_dict,
    from_json,
    register_attack,
)
from .badnets import BadNets
from .blended import Blended
from .bpp import BPP
from .lf import LF
from .sig import SIG
from .trojan import Trojan
from .wanet import WaNet

__all__ = [
    "ATTACKS",
    "MODES",
    "Attack",
    "AttackConfigError",
    "AttackInputError",
    "PoisonResult",
    "UnknownAttackError",
    "build_attack",
    "from_dict",
    "from_json",
    "register_attack",
    "BadNets",
    "Blended",
    "BPP",
    "LF",
    "SIG",
    "Trojan",
    "WaNet",
]
