"""Blended (Chen et al., 2017): mix a fixed full-image pattern into every triggered image.

``x' = (1 - alpha) * x + alpha * K`` with BackdoorBench's ``alpha = 0.2``. The references blend a
fixed image; like several of them this project uses a licence-free noise image: Gaussian
noise (mean 0.5, standard deviation 0.25, clipped to [0, 1]) drawn from the seed at a
``pattern_size`` x ``pattern_size`` reference resolution and resized to each image, so the same
pattern (not a new one per resolution) is blended at every size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Attack, AttackConfigError, pick_channels, register_attack, resize_pattern, seeded_gaussian

__all__ = ["Blended"]

_MEAN, _STD = 0.5, 0.25


@register_attack("blended")
@dataclass(kw_only=True)
class Blended(Attack):
    """Alpha-blend of a seeded noise image; ``alpha`` in (0, 1], ``pattern_size`` its native side."""

    alpha: float = 0.2
    pattern_size: int = 32

    def validate(self) -> None:
        super().validate()
        if not (0.0 < float(self.alpha) <= 1.0):
            raise AttackConfigError(f"attack 'blended': alpha must be in (0, 1], got {self.alpha}")
        if (
            isinstance(self.pattern_size, bool)
            or not isinstance(self.pattern_size, int)
            or self.pattern_size < 1
        ):
            raise AttackConfigError(
                f"attack 'blended': pattern_size must be a positive integer, got {self.pattern_size!r}"
            )

    def _seeded_content(self) -> dict[str, torch.Tensor]:
        side = int(self.pattern_size)
        z = seeded_gaussian(self.seed, 3 * side * side, stream="blended")
        values = [min(1.0, max(0.0, _MEAN + _STD * v)) for v in z]
        return {"pattern": torch.tensor(values, dtype=torch.float32).view(3, side, side)}

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The blend image K at one image shape, (C, H, W) in [0, 1]: useful for figures."""
        return self._trigger(channels, height, width, torch.device("cpu"), torch.float32)["pattern"].clone()

    def _build_trigger(self, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
        source = pick_channels(self._content()["pattern"], channels)
        return {"pattern": resize_pattern(source, height, width).clamp_(0.0, 1.0)}

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        alpha = float(self.alpha)
        return (1.0 - alpha) * x + alpha * trigger["pattern"]
