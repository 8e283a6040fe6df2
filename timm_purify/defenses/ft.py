"""``ft``: plain fine-tuning of every weight on the clean set, the baseline every paper compares with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._augment import random_crop_flip
from .._progress import progress
from ..data import ImageData
from ._base import DefenseConfig, PurifyContext, positive, register_defense

__all__ = ["FTConfig", "run_ft"]


@dataclass
class FTConfig(DefenseConfig):
    """BackdoorBench's fine-tuning baseline: SGD with momentum, cosine decay, crop + flip."""

    epochs: int = positive(10)
    lr: float = positive(0.01)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True


@register_defense("ft", FTConfig, "fine-tune all weights on the clean set")
def run_ft(model: nn.Module, clean: ImageData, config: FTConfig, ctx: PurifyContext) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    steps_per_epoch = (len(clean) + config.batch_size - 1) // config.batch_size
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    for epoch in progress(range(config.epochs), desc="ft", disable=ctx.quiet):
        model.train()
        total, loss_sum = 0, torch.zeros((), device=ctx.device)  # read once per epoch
        for x, y in clean.batches(
            config.batch_size, shuffle=True, generator=ctx.generator, device=ctx.device
        ):
            if config.augment:
                x = random_crop_flip(x, pad=max(1, x.shape[-1] // 8), generator=ctx.generator)
            loss = F.cross_entropy(model(ctx.normalizer(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(y)
            total += len(y)
        model.eval()
        ctx.log({"epoch": epoch + 1, "loss": float(loss_sum) / total}, model)
    return model
