"""``awm``: Adversarial Weight Masking (Chai & Chen, NeurIPS 2022).

A soft mask in [0, 1], one value per weight element, multiplies the weights of the model's
conv (and, by default, linear) layers. Each outer iteration first recovers the worst-case
*universal* perturbation ``Delta`` (one image-shaped tensor, L1-bounded) that pushes the
current model off its own predictions, a proxy for the unknown trigger, then trains the masks
to classify both clean and ``Delta``-shifted images correctly with a small L1 pull towards
sparsity. Weights the recovered trigger relies on get masked down. Designed for the one-shot
case: one image per class plus fixed augmented copies.

Reference behaviour (the authors' released ``main.py``) kept as the default:

* 20 outer iterations; phase 1: ``Delta`` from 0, 15 SGD steps (lr 10) maximising
  ``CE(f(x + Delta), f's own prediction)`` on fresh batches, then one L1 projection onto
  ``tau`` (1000 at 32x32x3); phase 2: 15 Adam steps (lr 1e-2, state kept across iterations) on
  ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(clamp(x + Delta)), y) + gamma * ||m||_1``,
  masks clamped to [0, 1] after every step; alpha 0.9, gamma 1e-8.
* The Adam learning rate decays by 0.9 after every outer iteration (``ExponentialLR`` in the
  script, absent from the paper).
* The model stays in eval mode throughout; batches are drawn with replacement.
* Few-shot (one image per class): alpha 0.99, tau 100, and 9 augmented copies of every image
  (random resized crop + horizontal flip, drawn once). Here "few-shot" is switched on
  automatically when the clean set holds at most one image per class on average
  (``few_shot=None``); ``few_shot=True/False`` forces it, and explicit ``alpha``,
  ``trigger_norm`` or ``augment_copies`` override its values.

Shaped triggers (``trigger="window"`` or ``"blend"``; not in the paper): the L1-bounded
``Delta`` is a proxy that the all-to-all patch backdoor often escapes (22% left on one build of
the fully trained all-to-all resnet18, 1.3% on another; ``benchmarks/PURIFICATION.md``). A
shaped trigger recovers a pattern of the shape the scan's spread readings found
(``detection.reach``): a pattern pasted into one square window (``window`` pixels at 32x32, the
window chosen once, before the first outer iteration, as the one of a grid at ``window_stride``
whose fitted pattern moves the most images off the model's own predictions), or a whole-image
pattern blended in at ``blend_alpha``. Each outer iteration refits the pattern from grey
(``inner_steps`` Adam steps, lr 0.1, batches of 32, on a pool of at most 1,024 clean images
drawn once) against the current masks; phase 2 is the reference's with the pattern in place of
``Delta`` and a clean-loss weight of its own per shape unless ``alpha`` is given: 0.5 for the
window (the two losses equal; the reference's 0.9 left twice as much on the all-to-all model it
was tried on), 0.7 for the blend (at 0.5 the fully trained blended all-to-all resnet18 lost 2.3
and 2.6 points of accuracy on two draws of the clean images, at 0.7 1.5 on both, the ASR 0.91%
and 0.54% at 0.5, 0.76% and 0.34% at 0.7; on five 2,000-image blended all-to-all models the
accuracy after was higher on four, the mean ASR 1.0% against 1.5%).

Which layers: the reference masks every conv (stem, blocks, 1x1 shortcuts) and nothing else.
On its CIFAR ResNets the only linear layer is the classifier head, so masking conv *and*
linear layers with the head excluded (the defaults ``mask_linear=True, mask_head=False``) is
the reference there, and it is what makes transformers (whose weights are nearly all linear)
maskable at all. ``mask_linear=False`` gives the conv-only variant; ``mask_head=True`` masks
the classifier too. Norm layers are never masked.
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
from torch.nn.utils import parametrize

from .._progress import progress
from ..data import ImageData
from ._base import DefenseConfig, PurifyContext, PurifyOptionError, positive, register_defense
from ._common import (
    PixelModel,
    attach_masks,
    blend,
    fit_shared_pattern,
    grid_windows,
    merge_masks,
    paste,
    scale_budget,
    universal_perturbation,
    weight_layers,
    window_mask,
)
from .nft import frozen

__all__ = ["TRIGGERS", "AWMConfig", "run_awm", "random_resized_crop", "with_augmented_copies"]

_FEW_SHOT = {"alpha": 0.99, "trigger_norm": 100.0, "augment_copies": 9}
_MANY_SHOT = {"alpha": 0.9, "trigger_norm": 1000.0, "augment_copies": 0}

# How the inner problem models the trigger: the reference's L1-bounded additive perturbation,
# a pattern pasted into one window, or a whole-image pattern blended in.
TRIGGERS = ("l1", "window", "blend")
_SHAPED_ALPHA = {"window": 0.5, "blend": 0.7}  # clean-loss weight per shaped trigger (module docstring)
_POOL = 1024  # clean images a shaped trigger's pattern is fitted on, drawn once
_PATTERN = {"batch_size": 32, "lr": 0.1}  # Adam on the pattern, as the scan's readings fit theirs
_SEARCH_STEPS = 30  # Adam steps per window while choosing the window (the scan's)


@dataclass
class AWMConfig(DefenseConfig):
    """Options of :func:`run_awm`; defaults are the reference script's.

    Attributes:
        outer_steps: outer iterations (trigger recovery + mask update).
        inner_steps: SGD steps on ``Delta`` and Adam steps on the masks per outer iteration.
        trigger_lr: SGD learning rate of ``Delta``.
        trigger_norm: L1 bound ``tau`` of ``Delta`` defined at 32x32x3 and rescaled to the
            image size; ``None``: 1000, or 100 in few-shot mode.
        lr: Adam learning rate of the masks; ``lr_decay``: its factor per outer iteration.
        alpha: weight of the clean loss (``1 - alpha`` on the perturbed one); ``None``: 0.9,
            or 0.99 in few-shot mode, and with a shaped trigger 0.5 (window) or 0.7 (blend).
        gamma: weight of ``||m||_1``.
        few_shot: ``None`` = automatic (at most one clean image per class on average).
        augment_copies: augmented copies added per clean image before training; ``None``:
            9 in few-shot mode, else 0.
        trigger: how phase 1 models the trigger (:data:`TRIGGERS`): ``"l1"``, the reference's
            L1-bounded ``Delta``; ``"window"``, a pattern pasted into one square window;
            ``"blend"``, a whole-image pattern blended in (module docstring). ``trigger_norm`` and
            ``trigger_lr`` apply to ``"l1"`` only.
        window, window_stride: the window's side and the step of the grid it is chosen from, in
            pixels at 32x32, scaled to the image size (``trigger="window"``).
        blend_alpha: the pattern's weight in the blend (``trigger="blend"``).
        mask_linear: mask linear layers as well as convs; ``mask_head``: mask the classifier.
        merge: fold the masks into the weights at the end; ``False`` returns the model with
            the masks attached as torch parametrizations
            (``<layer>.parametrizations.weight[0].mask``); ``merge_masks(model)``
            (``defenses._common``) folds them later.
    """

    outer_steps: int = positive(20)
    inner_steps: int = positive(15)
    trigger_lr: float = positive(10.0)
    trigger_norm: float | None = None
    lr: float = positive(1e-2)
    lr_decay: float = 0.9
    alpha: float | None = None
    gamma: float = 1e-8
    few_shot: bool | None = None
    augment_copies: int | None = None
    trigger: str = "l1"
    window: int = positive(8)
    window_stride: int = positive(4)
    blend_alpha: float = 0.1
    mask_linear: bool = True
    mask_head: bool = False
    merge: bool = True

    def validate(self, *, num_clean: int, num_classes: int) -> None:
        super().validate(num_clean=num_clean, num_classes=num_classes)
        if self.trigger_norm is not None and not self.trigger_norm > 0:
            raise PurifyOptionError(
                f"trigger_norm must be > 0 (or None for the default), got {self.trigger_norm}"
            )
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise PurifyOptionError(f"alpha must lie in [0, 1] (or None for the default), got {self.alpha}")
        if not 0.0 < self.lr_decay <= 1.0:
            raise PurifyOptionError(f"lr_decay must lie in (0, 1], got {self.lr_decay}")
        if self.gamma < 0:
            raise PurifyOptionError(f"gamma must be >= 0, got {self.gamma}")
        if self.augment_copies is not None and self.augment_copies < 0:
            raise PurifyOptionError(f"augment_copies must be >= 0 (or None), got {self.augment_copies}")
        if self.trigger not in TRIGGERS:
            raise PurifyOptionError(f"trigger must be one of {', '.join(TRIGGERS)}, got {self.trigger!r}")
        if not 0.0 < self.blend_alpha < 1.0:
            raise PurifyOptionError(f"blend_alpha must lie in (0, 1), got {self.blend_alpha}")

    def resolved(self, *, num_clean: int, num_classes: int) -> dict:
        """The values of the mode-dependent options for a clean set of ``num_clean`` images
        (``alpha`` also depends on ``trigger``)."""
        few = self.few_shot if self.few_shot is not None else num_clean <= num_classes
        base = _FEW_SHOT if few else _MANY_SHOT
        alpha = base["alpha"] if self.trigger == "l1" else _SHAPED_ALPHA[self.trigger]
        return {
            "few_shot": few,
            "alpha": alpha if self.alpha is None else self.alpha,
            "trigger_norm": base["trigger_norm"] if self.trigger_norm is None else self.trigger_norm,
            "augment_copies": base["augment_copies"] if self.augment_copies is None else self.augment_copies,
        }


def random_resized_crop(
    x: torch.Tensor,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` (+ horizontal flip) per sample, in one ``grid_sample``.

    Each sample gets a crop covering ``scale`` of its area with aspect ratio in ``ratio``
    (log-uniform), resized back to full size bilinearly. Crops that would leave the image are
    shrunk to fit, instead of torchvision's retry loop; the distribution differs only for
    extreme draws.
    """
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    cw = (area * r).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    ch = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - cw)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - ch)
    sx = cw
    if flip:
        sx = torch.where(torch.rand(b, generator=generator) < 0.5, -cw, cw)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def with_augmented_copies(data: ImageData, copies: int, *, generator: torch.Generator) -> ImageData:
    """``data`` followed by ``copies`` fixed augmented views of each image (AWM's one-shot set)."""
    if copies <= 0:
        return data
    x = data.floats().repeat(copies, 1, 1, 1)
    views = random_resized_crop(x, generator=generator)
    views = views.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return data.replace(
        x=torch.cat([data.x, views]),
        y=torch.cat([data.y, data.y.repeat(copies)]),
        source=f"{data.source} + {copies} augmented copies per image",
    )


def _mask_layers(model: nn.Module, config: AWMConfig) -> list[tuple[str, nn.Module]]:
    kinds: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear) if config.mask_linear else (nn.Conv2d,)
    layers = weight_layers(model, include_head=config.mask_head, kinds=kinds)
    if not layers:
        what = "conv or linear" if config.mask_linear else "conv"
        raise PurifyOptionError(
            f"awm masks {what} weights and this model has none outside its head; "
            + ("pass mask_head=True" if not config.mask_head else "use nft instead")
        )
    return layers


class _Sampler:
    """Batches drawn with replacement from ``data``; indices are kept so per-image values
    computed once (the model's own predictions) can be looked up instead of recomputed."""

    def __init__(self, data: ImageData, batch_size: int, *, generator: torch.Generator, device: torch.device):
        self.data, self.batch_size, self.generator, self.device = data, batch_size, generator, device

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.data), (self.batch_size,), generator=self.generator)
        x = self.data.x[idx].to(device=self.device, non_blocking=True).float().div_(255.0)
        return x, self.data.y[idx].to(device=self.device, non_blocking=True), idx.to(self.device)

    @torch.no_grad()
    def predictions(self, f: nn.Module) -> torch.Tensor:
        """``f``'s predicted label for every image of the set, in order."""
        out = [f(x).argmax(1) for x, _ in self.data.batches(max(self.batch_size, 256), device=self.device)]
        return torch.cat(out)


_Stamp = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def _constant(masks: list[nn.Parameter]) -> Iterator[None]:
    """The masks as constants while a trigger is recovered: out of autograd (no weight gradients
    are computed, only the input's or the pattern's) and the masked weights built once."""
    for m in masks:
        m.requires_grad_(False)
    try:
        with parametrize.cached():
            yield
    finally:
        for m in masks:
            m.requires_grad_(True)


def _l1_trigger(f: nn.Module, sampler: _Sampler, config: AWMConfig, tau: float) -> tuple[_Stamp, dict]:
    """Phase 1 (the reference): the universal perturbation that most moves ``f`` off its own
    predictions. Those are fixed while the masks are, so they are computed once per image rather
    than once per drawn batch."""
    own = sampler.predictions(f)

    def labelled():
        while True:
            x, _, idx = sampler.draw()
            yield x, own[idx]

    delta = universal_perturbation(
        f,
        labelled,
        shape=sampler.data.image_size,
        steps=config.inner_steps,
        lr=config.trigger_lr,
        l1_budget=tau,
        device=sampler.device,
    )
    return (lambda x: (x + delta).clamp_(0.0, 1.0)), {"trigger_l1": float(delta.abs().sum()), "tau": tau}


@torch.no_grad()
def _predict(f: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([f(b).argmax(1) for b in x.split(256)])


def _fit_shaped(
    f: nn.Module,
    pool: torch.Tensor,
    own: torch.Tensor,
    apply: Callable,
    *,
    steps: int,
    generator: torch.Generator,
) -> tuple[_Stamp, float]:
    """A shaped trigger's pattern fitted to move ``pool`` off ``own``, ``f``'s predictions for
    it (computed by the caller, once for as long as the masks stay as they are), and the share
    of ``pool`` it moves."""
    pattern = fit_shared_pattern(f, (pool, own), apply, steps=steps, generator=generator, **_PATTERN)
    moved = float((_predict(f, apply(pool, pattern)) != own).float().mean())
    return (lambda x: apply(x, pattern)), moved


def _choose_window(
    f: nn.Module, pool: torch.Tensor, config: AWMConfig, generator: torch.Generator
) -> tuple[Callable, list[int]]:
    """The window of the grid whose fitted pattern moves the most of ``pool`` (ties: the first),
    as a paste function, with its ``[row, col, side]`` at this image size."""
    size = pool.shape[-1]
    side, stride = (max(1, min(size, round(v * size / 32))) for v in (config.window, config.window_stride))
    own = _predict(f, pool)  # the masks are constant through the whole grid
    best: tuple[float, Callable, list[int]] | None = None
    for corner in grid_windows(size, side, stride):
        apply = functools.partial(paste, mask=window_mask(size, corner, side, device=pool.device))
        _, moved = _fit_shaped(f, pool, own, apply, steps=_SEARCH_STEPS, generator=generator)
        if best is None or moved > best[0]:
            best = (moved, apply, [*corner, side])
    assert best is not None  # the grid always holds a window
    return best[1], best[2]


@register_defense("awm", AWMConfig, "adversarially recover a universal trigger, mask the weights it uses")
def run_awm(model: nn.Module, clean: ImageData, config: AWMConfig, ctx: PurifyContext) -> nn.Module:
    _, height, width = clean.image_size
    if config.trigger == "window" and height != width:
        raise PurifyOptionError(
            f"trigger='window' needs square images, got {height}x{width}; use trigger='l1' or 'blend'"
        )
    mode = config.resolved(num_clean=len(clean), num_classes=ctx.num_classes)
    layers = _mask_layers(model, config)
    data = with_augmented_copies(clean, mode["augment_copies"], generator=ctx.generator)
    tau = scale_budget(mode["trigger_norm"], data.image_size, norm="l1")
    alpha = mode["alpha"]
    f = PixelModel(model, ctx.normalizer)
    model.eval()
    with frozen(model):
        masks = attach_masks(layers)
        opt = torch.optim.Adam(masks, lr=config.lr)
        sampler = _Sampler(data, config.batch_size, generator=ctx.generator, device=ctx.device)
        shape: dict = {}
        if config.trigger != "l1":
            pick = torch.randperm(len(data), generator=ctx.generator)[:_POOL]
            pool = data.x[pick].to(ctx.device).float().div_(255.0)
            apply: Callable = functools.partial(blend, alpha=config.blend_alpha)
            if config.trigger == "window":
                with _constant(masks):
                    apply, window = _choose_window(f, pool, config, ctx.generator)
                shape = {"window": window}
        for outer in progress(range(config.outer_steps), desc="awm", disable=ctx.quiet):
            with _constant(masks):
                if config.trigger == "l1":
                    stamp, found = _l1_trigger(f, sampler, config, tau)
                else:
                    own = _predict(f, pool)  # the masks moved since the last refit
                    stamp, moved = _fit_shaped(
                        f, pool, own, apply, steps=config.inner_steps, generator=ctx.generator
                    )
                    found = {"trigger_moved": moved, **shape}
            loss_sum = torch.zeros((), device=ctx.device)  # read once per outer iteration
            for _ in range(config.inner_steps):
                x, y, _ = sampler.draw()
                # clean and triggered images in one pass: eval mode makes it the same as two
                logits_clean, logits_adv = f(torch.cat([x, stamp(x)])).chunk(2)
                l1 = torch.stack([m.sum() for m in masks]).sum()  # masks stay in [0, 1]
                loss = (
                    alpha * F.cross_entropy(logits_clean, y)
                    + (1.0 - alpha) * F.cross_entropy(logits_adv, y)
                    + config.gamma * l1
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in masks:
                        m.clamp_(0.0, 1.0)
                loss_sum += loss.detach()
            record = {
                "epoch": outer + 1,
                "loss": float(loss_sum) / config.inner_steps,
                "lr": opt.param_groups[0]["lr"],
                "trigger": config.trigger,
                **found,
                "mask_mean": float(torch.cat([m.detach().flatten() for m in masks]).mean()),
                "few_shot": mode["few_shot"],
                "alpha": alpha,
            }
            for group in opt.param_groups:
                group["lr"] *= config.lr_decay
            ctx.log(record, model)
        if config.merge:
            merge_masks(model)
    return model
