"""BppAttack (Wang et al., CVPR 2022): colour-depth reduction with dithering as the trigger.

Every channel is quantised to ``squeeze_num`` levels (8 by default, BackdoorBench and the
authors' code), ``round(x * (L - 1)) / (L - 1)``, and with ``dithering`` (default on) the
quantisation error is spread Floyd-Steinberg style to the unvisited neighbours (7/16 right,
3/16 below-left, 5/16 below, 1/16 below-right), which hides the banding from the eye.

Error diffusion is sequential in raster order, but pixel (r, c) only depends on pixels with a
smaller ``c + 2 r``; all pixels on one such anti-diagonal are processed together, so an image of
H x W takes ``W + 2 (H - 1)`` vectorised steps (for all images and channels at once) instead of
``H * W``. The result is exactly the raster-order algorithm.

Not reproduced: the paper's contrastive adversarial training (negative samples made with an
adversarial attack on the model being trained) needs the training loop, not the data set; this
class poisons data as a plain dirty-label attack with the BPP trigger.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._base import Attack, AttackConfigError, register_attack

__all__ = ["BPP", "floyd_steinberg"]


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Quantise (N, C, H, W) images in [0, 1] to ``levels`` levels with Floyd-Steinberg dithering.

    As in the reference, diffused values are not clipped while the error travels, so an output
    level can fall just outside [0, 1]; callers clamp.
    """
    n, c, h, w = x.shape
    step = float(levels - 1)
    # Pixel (r, col) lives at (r, col + 1) of the buffer: a spare column on each side and a
    # spare row below take the error pushed past the image border.
    buffer = torch.zeros(n, c, h + 1, w + 2, dtype=x.dtype, device=x.device)
    buffer[:, :, :h, 1 : w + 1] = x
    out = torch.empty_like(x)
    for t in range(w + 2 * (h - 1)):
        first, last = max(0, (t - w + 2) // 2), min(h - 1, t // 2)
        rows = torch.arange(first, last + 1, device=x.device)
        cols = t - 2 * rows
        value = buffer[:, :, rows, cols + 1]
        level = torch.round(value * step) / step
        out[:, :, rows, cols] = level
        error = value - level
        # Rows of one anti-diagonal are distinct, so each of these writes has unique indices.
        buffer[:, :, rows, cols + 2] += error * (7 / 16)
        buffer[:, :, rows + 1, cols] += error * (3 / 16)
        buffer[:, :, rows + 1, cols + 1] += error * (5 / 16)
        buffer[:, :, rows + 1, cols + 2] += error * (1 / 16)
    return out


@register_attack("bpp")
@dataclass(kw_only=True)
class BPP(Attack):
    """Colour-depth squeezing. ``squeeze_num``: levels per channel (>= 2); ``dithering``:
    Floyd-Steinberg error diffusion on (True) or plain rounding (False)."""

    squeeze_num: int = 8
    dithering: bool = True

    def validate(self) -> None:
        super().validate()
        if (
            isinstance(self.squeeze_num, bool)
            or not isinstance(self.squeeze_num, int)
            or self.squeeze_num < 2
        ):
            raise AttackConfigError(
                f"attack 'bpp': squeeze_num (levels per channel) must be an integer >= 2, got {self.squeeze_num!r}"
            )
        if not isinstance(self.dithering, bool):
            raise AttackConfigError(f"attack 'bpp': dithering must be true or false, got {self.dithering!r}")

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dithering:
            return floyd_steinberg(x, self.squeeze_num)
        step = float(self.squeeze_num - 1)
        return torch.round(x * step) / step
