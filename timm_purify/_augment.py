"""Batch augmentations on [0, 1] image tensors, vectorised over the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip"]


def random_crop_flip(
    x: torch.Tensor, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` and random horizontal flip, per sample.

    One gather does all crops, so the cost does not grow with a Python loop over samples.
    ``generator`` lives on the CPU; offsets are moved to ``x``'s device.
    """
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        off_y = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        off_x = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        rows = off_y[:, None] + torch.arange(h, device=x.device)[None, :]
        cols = off_x[:, None] + torch.arange(w, device=x.device)[None, :]
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        do_flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(do_flip[:, None, None, None], x.flip(3), x)
    return x.contiguous()
