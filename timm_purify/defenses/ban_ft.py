"""``ban-ft``: fine-tuning with adversarial neuron noise, BAN's removal step (Xu et al., 2024).

Why plain fine-tuning is not enough: clean images never activate the backdoor, so its
neurons receive no gradient. Multiplicative noise on the normalisation layers that
*maximises* the clean loss does activate it (the noisy model sends clean images to the
target); training the model to stay correct under that noise,
``CE(f(x), y) + noise_weight * CE(f_noisy(x), y)``, unlearns the shortcut.

Reference behaviour (``shared/notes/methods.md``, the authors' ``ban_finetune.py``): every
weight trains, SGD lr 0.005, momentum 0.9, weight decay 5e-4, constant lr, 25 epochs, 5% of
the training set; for every batch the noise is re-drawn from U(-eps, eps) and pushed by one
sign-ascent step of size eps on that batch (eps 0.3), the model is in train mode. The noise
lives in torch parametrizations (:class:`~timm_purify.defenses._common.NormNoise`) that are
removed at the end, so the result is a plain timm model with its original keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._augment import random_crop_flip
from .._progress import progress
from ..data import ImageData
from ._base import DefenseConfig, PurifyContext, PurifyOptionError, positive, register_defense
from ._common import NormNoise

__all__ = ["BANFTConfig", "run_ban_ft"]


@dataclass
class BANFTConfig(DefenseConfig):
    """Options of ``ban-ft`` (the paper's and the released code's values).

    Attributes:
        epochs: passes over the clean set.
        lr, momentum, weight_decay: SGD over every weight, constant learning rate.
        eps: bound of the multiplicative noise on norm weights and biases (``|delta| <= eps``).
        noise_steps: sign-ascent steps per batch (step size ``eps / noise_steps``).
        noise_weight: weight of the noisy-model loss (lambda_2 in the paper).
        augment: random crop (padding 1/8 of the side) and horizontal flip, as the
            reference's training transform.
    """

    epochs: int = positive(25)
    lr: float = positive(0.005)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = positive(0.3)
    noise_steps: int = positive(1)
    noise_weight: float = 0.5
    augment: bool = True

    def validate(self, *, num_clean: int, num_classes: int) -> None:
        super().validate(num_clean=num_clean, num_classes=num_classes)
        if self.eps >= 1:
            raise PurifyOptionError(
                f"eps={self.eps} lets the noise flip the sign of normalisation weights (w * (1 + delta), "
                "|delta| >= 1); use a value below 1 (0.3 for 32x32 images)"
            )
        if self.noise_weight < 0:
            raise PurifyOptionError(f"noise_weight must be >= 0, got {self.noise_weight}")
        if not 0 <= self.momentum < 1:
            raise PurifyOptionError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise PurifyOptionError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if isinstance(self.noise_steps, bool) or not isinstance(self.noise_steps, int):
            raise PurifyOptionError(f"noise_steps must be a positive integer, got {self.noise_steps!r}")


@register_defense("ban-ft", BANFTConfig, "fine-tune all weights against adversarial neuron noise (BAN)")
def run_ban_ft(model: nn.Module, clean: ImageData, config: BANFTConfig, ctx: PurifyContext) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    noise = NormNoise(model, eps=config.eps)
    # the originals behind the noise parametrizations are ordinary parameters of the model
    opt = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    try:
        for epoch in progress(range(config.epochs), desc="ban-ft", disable=ctx.quiet):
            model.train()
            total = 0
            # (total, clean, noisy) loss sums on the device, read once per epoch
            sums = torch.zeros(3, device=ctx.device)
            for x, y in clean.batches(
                config.batch_size, shuffle=True, generator=ctx.generator, device=ctx.device
            ):
                if config.augment:
                    x = random_crop_flip(x, pad=max(1, x.shape[-1] // 8), generator=ctx.generator)
                x = ctx.normalizer(x)
                noise.reset(ctx.generator)
                noise.ascend(lambda x=x, y=y: F.cross_entropy(model(x), y), config.noise_steps)
                with noise.on():
                    loss_noisy = F.cross_entropy(model(x), y)
                loss_clean = F.cross_entropy(model(x), y)
                loss = loss_clean + config.noise_weight * loss_noisy
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += len(y)
                sums += torch.stack([loss, loss_clean, loss_noisy]).detach() * len(y)
            model.eval()
            loss_sum, clean_sum, noisy_sum = sums.tolist()
            ctx.log(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum / total,
                    "loss_clean": clean_sum / total,
                    "loss_noisy": noisy_sum / total,
                },
                model,
            )
    finally:
        noise.remove()
    return model
