"""BadNets (Gu et al., 2017): a small solid patch in a fixed corner.

BackdoorBench's CIFAR-10 trigger is a 3x3 white square in the bottom-right corner (rows and
columns 29-31 of 32). At other sizes the side scales with the image,
``max(1, round(3 * H / 32))`` rows by ``max(1, round(3 * W / 32))`` columns, and the patch
stays flush with the bottom-right corner, so the trigger covers the same share of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Attack, AttackConfigError, register_attack, scaled_size

__all__ = ["BadNets"]


@register_attack("badnets")
@dataclass(kw_only=True)
class BadNets(Attack):
    """Solid square patch; ``patch_size`` is its side at the 32x32 reference, ``patch_value`` its
    pixel value in [0, 1] (1.0 = white) on every channel."""

    patch_size: float = 3
    patch_value: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not (0 < float(self.patch_size) <= 32):
            raise AttackConfigError(
                f"attack 'badnets': patch_size is the patch side at 32x32 and must be in (0, 32], got {self.patch_size}"
            )
        if not (0.0 <= float(self.patch_value) <= 1.0):
            raise AttackConfigError(
                f"attack 'badnets': patch_value is a pixel value in [0, 1], got {self.patch_value}"
            )

    def _build_trigger(self, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
        mask = torch.zeros(1, 1, height, width)
        mask[
            ...,
            height - scaled_size(self.patch_size, height) :,
            width - scaled_size(self.patch_size, width) :,
        ] = 1.0
        return {"mask": mask}

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = trigger["mask"]
        return x * (1.0 - mask) + mask * float(self.patch_value)
