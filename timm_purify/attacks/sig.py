"""SIG (Barni et al., 2019): a clean-label attack with a horizontal sinusoidal signal.

``x' = clip(x + delta * sin(2 * pi * j * f / W))`` for every row and channel, column ``j`` of
``W``, with BackdoorBench's ``delta = 40/255`` and ``f = 6``. The frequency counts periods over
the image width, so the stripes keep the same look at every resolution. Training poisons only
target-class images and keeps their labels: the model learns to associate the signal with the
target class; at test time the signal is added to images of other classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Attack, AttackConfigError, register_attack

__all__ = ["SIG"]


@register_attack("sig")
@dataclass(kw_only=True)
class SIG(Attack):
    """Additive sinusoid; ``delta`` is its amplitude in [0, 1] pixel units, ``frequency`` the
    number of periods across the image width."""

    clean_label: ClassVar[bool] = True

    delta: float = 40 / 255
    frequency: float = 6

    def validate(self) -> None:
        super().validate()
        if not (0.0 < float(self.delta) <= 1.0):
            raise AttackConfigError(
                f"attack 'sig': delta must be in (0, 1] (40/255 by default), got {self.delta}"
            )
        if not float(self.frequency) > 0:
            raise AttackConfigError(f"attack 'sig': frequency must be positive, got {self.frequency}")

    def _build_trigger(self, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
        columns = torch.arange(width, dtype=torch.float64)
        wave = float(self.delta) * torch.sin(2 * math.pi * columns * float(self.frequency) / width)
        return {"signal": wave.float().view(1, 1, 1, width)}

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        return x + trigger["signal"]
