"""LF, the low-frequency attack (Zeng et al., "Rethinking the backdoor attacks' triggers: a
frequency perspective", ICCV 2021).

The reference computes a universal adversarial perturbation against a pre-trained model and
passes it through a Gaussian low-pass filter, so the trigger is smooth and shows no
high-frequency artefacts; BackdoorBench adds the stored pattern to the image and clips. Without a
model to attack, this version keeps the defining property, an additive, smooth, bounded,
image-wide pattern: seeded uniform noise on a ``cells`` x ``cells`` grid per channel (mean
removed), upsampled bicubically to the image size and scaled so its largest absolute value is
``eps`` (0.1 by default, a 0.2 peak-to-peak range like the reference's normalised trigger):
``x' = clip(x + P)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._base import Attack, AttackConfigError, pick_channels, register_attack, seeded_uniform

__all__ = ["LF"]


@register_attack("lf")
@dataclass(kw_only=True)
class LF(Attack):
    """Smooth additive pattern. ``eps``: its L-infinity amplitude; ``cells``: side of the
    low-resolution grid it is drawn on (smaller = smoother)."""

    eps: float = 0.1
    cells: int = 4

    def validate(self) -> None:
        super().validate()
        if not (0.0 < float(self.eps) <= 1.0):
            raise AttackConfigError(f"attack 'lf': eps (pattern amplitude) must be in (0, 1], got {self.eps}")
        if isinstance(self.cells, bool) or not isinstance(self.cells, int) or self.cells < 2:
            raise AttackConfigError(f"attack 'lf': cells must be an integer >= 2, got {self.cells!r}")

    def _seeded_content(self) -> dict[str, torch.Tensor]:
        n = self.cells
        values = [2.0 * u - 1.0 for u in seeded_uniform(self.seed, 3 * n * n, stream="lf")]
        mean = math.fsum(values) / len(values)
        return {"cells": torch.tensor([v - mean for v in values], dtype=torch.float64).view(3, n, n)}

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The additive pattern at one image shape, (C, H, W) in [-eps, eps]: useful for figures."""
        return self._trigger(channels, height, width, torch.device("cpu"), torch.float32)["pattern"][
            0
        ].clone()

    def _build_trigger(self, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
        cells = pick_channels(self._content()["cells"], channels)
        smooth = F.interpolate(cells[None], size=(height, width), mode="bicubic", align_corners=False)
        peak = smooth.abs().amax().clamp_min(1e-12)
        return {"pattern": (smooth / peak * float(self.eps)).float()}

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        return x + trigger["pattern"]
