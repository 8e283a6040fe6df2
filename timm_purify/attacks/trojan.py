"""Trojan watermark (after TrojanNN, Liu et al., NDSS 2018).

TrojanNN stamps a logo/watermark-shaped mask onto the image, with pixel values optimised to
excite chosen neurons of a pre-trained model; the stamp covers a few percent of the image and
its transparency is a parameter of the attack. Without a model to optimise against, this
attack draws both the watermark shape and its colours from the seed: a ``cells`` x ``cells``
glyph (each cell on with probability 0.6, at least one on) with one random colour per cell and
channel, upscaled (nearest) to a ``watermark_size`` x ``watermark_size`` square at the 32x32
reference (8x8 ~ 6% of the image) placed one reference pixel from the bottom-right corner, and
stamped with opacity ``alpha`` (1.0 = opaque, TrojanNN's 0% transparency):
``x' = (1 - alpha * m) * x + alpha * m * P``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._base import Attack, AttackConfigError, pick_channels, register_attack, scaled_size, seeded_uniform

__all__ = ["Trojan"]

_ON_PROBABILITY = 0.6


@register_attack("trojan")
@dataclass(kw_only=True)
class Trojan(Attack):
    """Seeded watermark glyph. ``watermark_size``: side at the 32x32 reference; ``cells``: glyph
    resolution; ``alpha``: opacity in (0, 1]."""

    watermark_size: float = 8
    cells: int = 4
    alpha: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not (0 < float(self.watermark_size) <= 30):
            raise AttackConfigError(
                f"attack 'trojan': watermark_size is the side at 32x32 and must be in (0, 30], got {self.watermark_size}"
            )
        if isinstance(self.cells, bool) or not isinstance(self.cells, int) or self.cells < 1:
            raise AttackConfigError(f"attack 'trojan': cells must be a positive integer, got {self.cells!r}")
        if not (0.0 < float(self.alpha) <= 1.0):
            raise AttackConfigError(f"attack 'trojan': alpha (opacity) must be in (0, 1], got {self.alpha}")

    def _seeded_content(self) -> dict[str, torch.Tensor]:
        n = self.cells
        shape = seeded_uniform(self.seed, n * n, stream="trojan/shape")
        on = [1.0 if u < _ON_PROBABILITY else 0.0 for u in shape]
        if not any(on):
            on = [1.0] * (n * n)
        colours = seeded_uniform(self.seed, 3 * n * n, stream="trojan/colour")
        return {
            "glyph": torch.tensor(on, dtype=torch.float32).view(1, n, n),
            "colour": torch.tensor(colours, dtype=torch.float32).view(3, n, n),
        }

    def _build_trigger(self, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
        content = self._content()
        side_h, side_w = scaled_size(self.watermark_size, height), scaled_size(self.watermark_size, width)
        margin_h = scaled_size(1, height) if side_h + scaled_size(1, height) <= height else 0
        margin_w = scaled_size(1, width) if side_w + scaled_size(1, width) <= width else 0
        glyph = F.interpolate(content["glyph"][None], size=(side_h, side_w), mode="nearest")[0]
        colour = F.interpolate(
            pick_channels(content["colour"], channels)[None], size=(side_h, side_w), mode="nearest"
        )[0]
        mask = torch.zeros(1, 1, height, width)
        pattern = torch.zeros(1, channels, height, width)
        rows = slice(height - margin_h - side_h, height - margin_h)
        cols = slice(width - margin_w - side_w, width - margin_w)
        mask[0, :, rows, cols] = glyph * float(self.alpha)
        pattern[0, :, rows, cols] = colour
        return {"mask": mask, "pattern": pattern}

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = trigger["mask"]
        return x * (1.0 - mask) + mask * trigger["pattern"]
