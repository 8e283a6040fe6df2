"""``nft``: Neural mask Fine-Tuning with MixUp (Karim et al., ECCV 2024).

One scalar mask per channel multiplies the weight (gamma) of every affine normalisation
layer (BatchNorm, LayerNorm, GroupNorm; the stem's excluded by default). Only the masks train,
on a MixUp cross-entropy that upper-bounds the loss on triggered inputs, so no trigger has to
be synthesised; a depth schedule ``mu(l) = alpha * exp(-beta * l)`` bounds each layer's masks
to ``[mu(l), 1]`` (shallow layers barely move, deep ones may switch channels off) and an L1
pull towards 1 keeps the purified model close to the original. Batches are drawn with
replacement, so one image per class still fills them.

Reference behaviour kept as the default (read from the authors' released script):

* ``l`` counts masked *layers* (one per norm layer, module order, starting at 1), not blocks.
  On a ResNet-18 that gives 19 layers and bounds from 0.49 down to ~6e-5: beyond the tenth
  layer a mask is effectively free in [0, 1]. ``depth="relative"`` stretches any model's
  layers over the same range of bounds (``reference_depth`` = 19, the reference ResNet-18),
  for deep models (a ResNet-50 has ~50 norm layers, a ViT-B 25) where the reference
  schedule frees all but the first few layers.
* The learning rate follows a cosine from ``lr`` to ``lr_min`` evaluated once per
  ``lr_period`` batches (the script steps ``CosineAnnealingLR(T_max=iterations/lr_period,
  eta_min=0.02)`` every 200 batches), so it is constant within each period and decays across
  periods; it does not restart.
* The regulariser is ``0.001 * sum|1 - m| / n_c`` (the script; the paper writes 5e-4).
* The model runs in train mode: BatchNorm running statistics follow the clean data while the
  masks train. Every other parameter is frozen. ``norm_stats="frozen"`` keeps every BatchNorm
  in eval mode instead (its running statistics, the trained model's, normalise each batch and
  do not move): with one image per class, train mode lets batches drawn from ten images set
  the statistics; on the full-suite resnet18 BadNets model frozen statistics left 87.7%
  instead of 99.96% at 85.3% instead of 83.3% accuracy (10 images), but 90.6% instead of
  57.4% with 3,000 (``benchmarks/PURIFICATION.md``), so the reference stays the default.

Not in the reference: ``mix`` can replace MixUp with CutMix (``"cutmix"``) or with a box cut
from a random place of the partner image and pasted at another (``"cutpaste"``; see
:func:`~timm_purify.defenses._common.cutmix`). MixUp fades whole images into each other, as a
blended trigger does, and never shows the masks a local patch; a pasted box is one. Which
trigger a model hides decides which wins: with one image per class on the full-suite
resnet18 models (frozen statistics, reg 0, alpha 0.2; ``benchmarks/PURIFICATION.md``,
"One-shot") cutpaste took BadNets to 8.2% where MixUp left 36.2% (other draws of the ten
images: 30.7% and 60.8%, MixUp 97.9% on one of them), but left Blended at 98.4% where the
reference settings reach 60.7%; with 3,000 images and the reference's other settings alike
(BadNets 39.6% instead of 57.4%, Blended 99.0% instead of 48.9%). So MixUp stays the default
and the option is for a defender who expects a patch trigger.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._augment import random_crop_flip
from .._progress import progress
from ..data import ImageData
from ._base import DefenseConfig, PurifyContext, PurifyOptionError, positive, register_defense
from ._common import attach_masks, cutmix, merge_masks, mixup, norm_layers

__all__ = ["NFTConfig", "run_nft", "depth_floors", "random_batches", "frozen"]

_DEPTH_MODES = ("layer", "relative")
_NORM_STATS = ("train", "frozen")
_MIXES = ("mixup", "cutmix", "cutpaste")


@dataclass
class NFTConfig(DefenseConfig):
    """Options of :func:`run_nft`; defaults are the reference script's.

    Attributes:
        iterations: mini-batches in all (drawn with replacement, so independent of the set size).
        lr, momentum: SGD on the masks (no weight decay).
        lr_min: the cosine's floor; ``lr_period``: batches between learning-rate updates.
        alpha, beta: the depth schedule ``mu(l) = alpha * exp(-beta * l)``.
        depth: ``"layer"`` (reference: ``l`` = 1, 2, ... per masked layer) or ``"relative"``
            (``l`` rescaled to ``1 .. reference_depth`` whatever the number of layers).
        reg: weight of ``sum|1 - m| / n_c`` (``n_c`` = clean images per class).
        mix: how each batch is mixed with a shuffled copy of itself: ``"mixup"`` (reference),
            ``"cutmix"`` (a box pasted from the same place of the partner image) or
            ``"cutpaste"`` (a box cut from a random place of the partner, pasted at another;
            see :func:`~timm_purify.defenses._common.cutmix`).
        mixup_alpha: the ``Beta(a, a)`` parameter of the mixing share (MixUp's and CutMix's).
        augment: random crop (padding = size / 8, i.e. 4 at 32 px) and horizontal flip.
        include_stem: also mask the first norm layer in module order.
        norm_stats: ``"train"`` (reference: BatchNorm normalises with each batch's moments and
            updates its running statistics) or ``"frozen"`` (BatchNorm in eval mode
            throughout).
        merge: fold the masks into the weights at the end (a plain timm model with its
            original keys); ``False`` returns the model with the masks still attached as
            torch parametrizations (``<layer>.parametrizations.weight[0].mask``), to inspect or
            keep training them; ``merge_masks(model)`` (``defenses._common``) folds them later.
    """

    iterations: int = positive(1000)
    lr: float = positive(0.05)
    momentum: float = 0.95
    lr_min: float = 0.02
    lr_period: int = positive(200)
    alpha: float = 0.8
    beta: float = 0.5
    depth: str = "layer"
    reference_depth: int = positive(19)
    reg: float = 0.001
    mix: str = "mixup"
    mixup_alpha: float = positive(1.0)
    augment: bool = True
    include_stem: bool = False
    norm_stats: str = "train"
    merge: bool = True

    def validate(self, *, num_clean: int, num_classes: int) -> None:
        super().validate(num_clean=num_clean, num_classes=num_classes)
        if self.depth not in _DEPTH_MODES:
            raise PurifyOptionError(f"depth must be one of {_DEPTH_MODES}, got {self.depth!r}")
        if self.mix not in _MIXES:
            raise PurifyOptionError(f"mix must be one of {_MIXES}, got {self.mix!r}")
        if self.norm_stats not in _NORM_STATS:
            raise PurifyOptionError(f"norm_stats must be one of {_NORM_STATS}, got {self.norm_stats!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise PurifyOptionError(
                f"alpha must lie in [0, 1] (it is the shallowest layer's mask floor), got {self.alpha}"
            )
        if self.beta < 0:
            raise PurifyOptionError(
                f"beta must be >= 0 (the floor must not grow with depth), got {self.beta}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise PurifyOptionError(f"momentum must lie in [0, 1), got {self.momentum}")
        if not 0.0 <= self.lr_min <= self.lr:
            raise PurifyOptionError(f"lr_min must lie in [0, lr={self.lr}], got {self.lr_min}")
        if self.reg < 0:
            raise PurifyOptionError(f"reg must be >= 0, got {self.reg}")


def depth_floors(
    num_layers: int, *, alpha: float, beta: float, depth: str = "layer", reference_depth: int = 19
) -> list[float]:
    """The lower bound ``mu(l)`` of each masked layer's masks, shallowest first.

    ``depth="layer"`` uses ``l = 1 .. num_layers`` (the reference); ``"relative"`` maps the
    first layer to ``l = 1`` and the last to ``l = reference_depth`` linearly, so a deep model
    sees the same range of bounds as the reference's 19-layer ResNet-18.
    """
    if depth not in _DEPTH_MODES:
        raise ValueError(f"depth must be one of {_DEPTH_MODES}, got {depth!r}")
    if depth == "layer" or num_layers <= 1:
        levels = [float(i + 1) for i in range(num_layers)]
    else:
        step = (reference_depth - 1) / (num_layers - 1)
        levels = [1.0 + i * step for i in range(num_layers)]
    return [alpha * math.exp(-beta * level) for level in levels]


def random_batches(
    data: ImageData, batch_size: int, *, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of ``batch_size`` images drawn uniformly *with replacement*.

    Iteration-based methods (NFT, AWM) take a fixed number of steps whatever the set size, so
    a set smaller than a batch (one image per class) still gives full batches.
    """
    n = len(data)
    while True:
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        x = data.x[idx].to(device=device, non_blocking=True).float().div_(255.0)
        yield x, data.y[idx].to(device=device, non_blocking=True)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter of ``model`` inside the block; restore each ``requires_grad`` after.

    Mask methods create their masks inside the block, so only the masks train; the user's
    flags come back afterwards so the purified model can be fine-tuned like the input.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _cosine_lr(period_index: int, num_periods: int, lr: float, lr_min: float) -> float:
    """Learning rate of the ``period_index``-th period (``CosineAnnealingLR`` closed form)."""
    return lr_min + (lr - lr_min) * (1.0 + math.cos(math.pi * period_index / num_periods)) / 2.0


def _mixer(mix: str) -> Callable[..., tuple]:
    """The mixing function a ``mix`` option names."""
    if mix == "mixup":
        return mixup
    return functools.partial(cutmix, anywhere=mix == "cutpaste")


@register_defense("nft", NFTConfig, "fine-tune per-channel masks on norm-layer weights with MixUp")
def run_nft(model: nn.Module, clean: ImageData, config: NFTConfig, ctx: PurifyContext) -> nn.Module:
    layers = norm_layers(model, skip_stem=not config.include_stem)
    if not layers:
        raise PurifyOptionError(
            "nft masks the weights of affine normalisation layers (BatchNorm, LayerNorm, GroupNorm) "
            "and this model has none"
            + ("" if config.include_stem else " besides its stem (pass include_stem=True to mask it)")
            + "; use a weight-mask method such as awm instead"
        )
    floors = depth_floors(
        len(layers),
        alpha=config.alpha,
        beta=config.beta,
        depth=config.depth,
        reference_depth=config.reference_depth,
    )
    n_per_class = len(clean) / ctx.num_classes
    num_periods = math.ceil(config.iterations / config.lr_period)
    pad = max(1, clean.image_size[-1] // 8)
    with frozen(model):
        masks = attach_masks(layers, per_channel=True)
        opt = torch.optim.SGD(masks, lr=config.lr, momentum=config.momentum, weight_decay=0.0)
        batches = random_batches(clean, config.batch_size, generator=ctx.generator, device=ctx.device)
        mixer = _mixer(config.mix)
        model.train()
        if config.norm_stats == "frozen":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        loss_sum, count = torch.zeros((), device=ctx.device), 0  # read once per period
        for step in progress(range(config.iterations), desc="nft", disable=ctx.quiet):
            period = step // config.lr_period
            if step % config.lr_period == 0:
                for group in opt.param_groups:
                    group["lr"] = _cosine_lr(period, num_periods, config.lr, config.lr_min)
            x, y = next(batches)
            if config.augment:
                x = random_crop_flip(x, pad=pad, generator=ctx.generator)
            x, y_a, y_b, lam = mixer(x, y, alpha=config.mixup_alpha, generator=ctx.generator)
            logits = model(ctx.normalizer(x))
            loss = lam * F.cross_entropy(logits, y_a) + (1.0 - lam) * F.cross_entropy(logits, y_b)
            if config.reg > 0:
                drift = torch.stack([(1.0 - m).abs().sum() for m in masks]).sum()
                loss = loss + config.reg * drift / n_per_class
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m, floor in zip(masks, floors, strict=True):
                    m.clamp_(floor, 1.0)
            loss_sum += loss.detach()
            count += 1
            if (step + 1) % config.lr_period == 0 or step + 1 == config.iterations:
                record = {
                    "epoch": period + 1,
                    "iteration": step + 1,
                    "loss": float(loss_sum) / count,
                    "lr": opt.param_groups[0]["lr"],
                    "mask_mean": float(torch.cat([m.detach().flatten() for m in masks]).mean()),
                }
                ctx.log(record, model)
                loss_sum, count = torch.zeros((), device=ctx.device), 0
        model.eval()
        if config.merge:
            merge_masks(model)
    return model
