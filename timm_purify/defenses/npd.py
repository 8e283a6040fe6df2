"""``npd``, ``npd-tp``, ``npd-tu``: Neural Polarizer Defense (Zhu et al., NeurIPS 2023).

A small identity-initialised polarizer (channel mixing + batch norm) is inserted into the
frozen backdoored model (:func:`~timm_purify.wrap_model`, ``layer="auto"`` by default) and
trained alone, as the reference code runs it:

0. ``norm_init="features"`` (default; not in the reference): one pass over the clean set
   sets the polarizer's batch norm to the features' per-channel moments at the insertion
   spot, so the polarizer is the identity in train mode as well as in eval mode. The
   reference's unit statistics (``norm_init="unit"``) make the warm-up train through
   standardised features and leave a damaged model for the main loop to repair
   (``benchmarks/PURIFICATION.md``: 1.5-2 points of clean accuracy on a full-suite resnet18);
1. warm-up: ``warmup_epochs`` of cross-entropy on the clean set, SGD without momentum at
   ``warmup_lr``, polarizer batch norm in train mode (its running statistics settle on the
   features at the insertion spot);
2. main loop: ``epochs`` of SGD with momentum and weight decay, polarizer batch norm in eval
   mode (its affine parameters still train). Per batch:

   * one forward pass of the current polarized model on the clean images gives the clean
     loss, the model's own prediction and the estimated target ``y'`` (the highest logit
     once the true class is masked out);
   * a targeted L2 PGD towards ``y'`` (``pgd_steps`` sign steps of ``pgd_step_size``, radius
     ``rho`` defined at 32x32x3 and rescaled to the image size, early stop once more than
     ``stop_fraction`` of the batch reaches its target) approximates the trigger;
   * one update on ``w_clean * CE(f(x), y) + w_adv * CE(f(x_adv), own prediction)
     + w_other * mean(-log(1.0001 - max_{k != y} p_adv[k]))
     + w_target * mean(-log(1.0001 - p_adv[y']))``.

   The clean forward pass is shared by the target estimate, the loss and the PGD's first
   step (at ``delta = 0`` the attack's forward pass is this one): nothing changes the
   polarizer in between and its batch norm is in eval mode, so all three would compute the
   same logits.

``npd-tp`` and ``npd-tu`` are the paper's variants for a *known* target class ``target``:
per-sample targeted PGD towards it (TP) or one universal targeted perturbation shared by all
images, updated on every batch and kept inside the L2 ball (TU). Their loss weights default
to the paper's (1, 0.1, 0.1): ``w_target`` is the paper's lambda_2 (its L_asr) and both halves
of the boosted cross-entropy L_bce (``w_adv``, ``w_other``) take lambda_3. Images of the
target class itself say nothing about a trigger towards it: TP does not attack them (their
"adversarial" copy is the clean image), TU leaves them out of the universal perturbation's
objective (it is still added to them), and both leave them out of the ``w_target`` term.

The result is the :class:`~timm_purify.PolarizedModel` (base model untouched).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import LayerNotFoundError
from .._progress import progress
from .._wrap import PolarizedModel, wrap_model
from ..data import ImageData
from ._base import DefenseConfig, PurifyContext, PurifyOptionError, positive, register_defense
from ._common import CleanForward, PixelModel, clamp_pixels, project_l2, scale_budget, targeted_pgd

__all__ = [
    "NPDConfig",
    "NPDTargetConfig",
    "NORM_INITS",
    "Attack",
    "TargetRule",
    "polarizer_loss",
    "runner_up",
    "match_feature_statistics",
    "pgd_attack",
    "known_target_pgd",
    "universal_target_attack",
    "train_polarizer",
    "wrap_for_defense",
    "run_npd",
    "run_npd_tp",
    "run_npd_tu",
]

# (forward over pixels, clean images, true labels, per-sample targets, the loop's clean
# forward pass on those images) -> adversarial images
Attack = Callable[
    [Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, CleanForward],
    torch.Tensor,
]
# (clean logits, true labels) -> per-sample target classes
TargetRule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NORM_INITS = ("features", "unit")


@dataclass
class NPDConfig(DefenseConfig):
    """Options of NPD; defaults are the reference code's (CIFAR-10, PreAct-ResNet18).

    Attributes:
        layer: insertion spot: ``"auto"``, a module name (``"name:output"`` for a stage
            output), a regex selecting one spot, or a depth fraction in [0, 1].
        epochs: main-loop epochs (adversarial unlearning).
        warmup_epochs: clean cross-entropy epochs before it (0 skips the warm-up).
        lr, momentum, weight_decay: SGD of the main loop (constant learning rate).
        warmup_lr: SGD of the warm-up (no momentum, no weight decay).
        rho: L2 radius of the targeted perturbation for a 3x32x32 image in [0, 1]; it is
            rescaled so that ``rho / sqrt(C*H*W)`` stays constant at other sizes.
        pgd_steps, pgd_step_size: sign-gradient steps of the targeted PGD and their size.
        stop_fraction: the PGD stops once more than this share of the batch hits its target
            (1.0 never stops early).
        w_clean, w_adv, w_other, w_target: loss weights (reference: 1, 0.4, 0.4, 0.4).
        include_prefix: for token layouts, whether class/register tokens go through the
            polarizer (see :func:`~timm_purify.wrap_model`).
        norm_init: ``"features"`` (default) first sets the polarizer's batch norm to the
            clean features' per-channel moments, so the polarizer is the identity in the
            warm-up's train mode too; ``"unit"`` keeps the reference's unit statistics, under
            which the warm-up trains a polarizer that standardises every channel and the main
            loop spends its first epochs undoing it (full-suite resnet18 BadNets, clean loss
            only: clean cross-entropy 0.19 -> 0.45, accuracy -2 points; see
            ``benchmarks/PURIFICATION.md``).
    """

    layer: str | float = "auto"
    epochs: int = positive(50)
    warmup_epochs: int = 5
    lr: float = positive(0.01)
    warmup_lr: float = positive(1e-4)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = positive(3.0)
    pgd_steps: int = positive(2)
    pgd_step_size: float = positive(0.1)
    stop_fraction: float = 0.6
    w_clean: float = 1.0
    w_adv: float = 0.4
    w_other: float = 0.4
    w_target: float = 0.4
    include_prefix: bool = True
    norm_init: str = "features"

    def validate(self, *, num_clean: int, num_classes: int) -> None:
        super().validate(num_clean=num_clean, num_classes=num_classes)
        if self.norm_init not in NORM_INITS:
            raise PurifyOptionError(f"norm_init must be one of {NORM_INITS}, got {self.norm_init!r}")
        for name in ("epochs", "warmup_epochs", "pgd_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PurifyOptionError(f"{name} must be an integer, got {value!r}")
        if self.warmup_epochs < 0:
            raise PurifyOptionError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0.0 <= self.momentum < 1.0:
            raise PurifyOptionError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise PurifyOptionError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.stop_fraction <= 1.0:
            raise PurifyOptionError(
                f"stop_fraction must lie in [0, 1] (1 disables early stopping), got {self.stop_fraction}"
            )
        weights = (self.w_clean, self.w_adv, self.w_other, self.w_target)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise PurifyOptionError(f"loss weights must be >= 0 and not all zero, got {weights}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, (str, int, float)):
            raise PurifyOptionError(
                f"layer must be 'auto', a module name, a regex or a depth in [0, 1], got {self.layer!r}"
            )
        if isinstance(self.layer, (int, float)) and not 0.0 <= float(self.layer) <= 1.0:
            raise PurifyOptionError(f"a depth fraction for layer must lie in [0, 1], got {self.layer}")
        if num_classes < 2:
            raise PurifyOptionError(f"NPD needs a model with at least 2 classes, got {num_classes}")


@dataclass
class NPDTargetConfig(NPDConfig):
    """NPD-TP / NPD-TU: NPD when the attack's target class is known (``target``).

    Loss weights default to the paper's (1, 0.1, 0.1) for these variants.
    """

    target: int | None = None
    w_adv: float = 0.1
    w_other: float = 0.1
    w_target: float = 0.1

    def validate(self, *, num_clean: int, num_classes: int) -> None:
        super().validate(num_clean=num_clean, num_classes=num_classes)
        if self.target is None:
            raise PurifyOptionError(
                "npd-tp and npd-tu need the attack's target class: pass target=<class index> "
                "(or use method='npd', which estimates it)"
            )
        if (
            isinstance(self.target, bool)
            or not isinstance(self.target, int)
            or not 0 <= self.target < num_classes
        ):
            raise PurifyOptionError(
                f"target must be a class index in [0, {num_classes - 1}], got {self.target!r}"
            )


def wrap_for_defense(
    model: nn.Module, config: NPDConfig, *, polarizer: str = "npd", **options
) -> PolarizedModel:
    """:func:`wrap_model` with the config's spot, turning a bad ``layer`` into an option error."""
    try:
        return wrap_model(
            model, layer=config.layer, polarizer=polarizer, include_prefix=config.include_prefix, **options
        )
    except LayerNotFoundError as err:
        raise PurifyOptionError(f"layer={config.layer!r}: {err}") from err


def runner_up(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """NPD's target estimate: the highest-scoring class other than the true one."""
    return logits.detach().scatter(1, y.unsqueeze(1), float("-inf")).argmax(dim=1)


def polarizer_loss(
    clean_logits: torch.Tensor,
    adv_logits: torch.Tensor,
    y: torch.Tensor,
    own: torch.Tensor,
    target: torch.Tensor,
    config: NPDConfig,
    *,
    target_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference NPD objective (see the module docstring).

    ``target_weight`` (0/1 per sample) leaves samples out of the target term (TP/TU: the
    images of the target class).
    """
    loss = config.w_clean * F.cross_entropy(clean_logits, y)
    loss = loss + config.w_adv * F.cross_entropy(adv_logits, own)
    p_adv = adv_logits.softmax(dim=1)
    top_other = p_adv.scatter(1, y.unsqueeze(1), 0.0).amax(dim=1)
    loss = loss + config.w_other * (-torch.log(1.0001 - top_other)).mean()
    toward_target = -torch.log(1.0001 - p_adv.gather(1, target.unsqueeze(1)).squeeze(1))
    if target_weight is None:
        term = toward_target.mean()
    else:
        term = (toward_target * target_weight).sum() / target_weight.sum().clamp_min(1.0)
    return loss + config.w_target * term


def match_feature_statistics(f: PixelModel, clean: ImageData, *, batch_size: int, device) -> None:
    """Set the polarizer's normalisation to the clean features' moments at its spot (one pass).

    ``f`` is the wrapped model over pixels. The moments are accumulated in float64 over every
    clean image; the freshly built polarizer is the identity, so what it receives is the
    frozen model's own features (see
    :meth:`~timm_purify.polarizers.Polarizer.match_statistics_`).
    """
    polarizer = f.model.polarizer
    total = torch.zeros(polarizer.channels, dtype=torch.float64, device=device)
    squares = torch.zeros_like(total)
    count = 0

    def record(module, args):
        nonlocal count
        rows = module.channel_rows(args[0]).detach().double()
        total.add_(rows.sum(0))
        squares.add_(rows.square().sum(0))
        count += rows.shape[0]

    handle = polarizer.register_forward_pre_hook(record)
    try:
        f.eval()
        with torch.no_grad():
            for x, _ in clean.batches(batch_size, device=device):
                f(x)
    finally:
        handle.remove()
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0.0)
    dtype = next(polarizer.parameters()).dtype
    polarizer.match_statistics_(mean.to(dtype), var.to(dtype))


def train_polarizer(
    wrapped: PolarizedModel,
    clean: ImageData,
    config: NPDConfig,
    ctx: PurifyContext,
    *,
    choose_target: TargetRule,
    attack: Attack,
    exclude_class: int | None = None,
    desc: str = "npd",
) -> PolarizedModel:
    """NPD's warm-up and adversarial unlearning loop, shared by every polarizer method.

    Args:
        choose_target: per-sample attack targets from the clean logits of the current model.
        attack: builds the adversarial images towards those targets.
        exclude_class: a known target class whose images leave the target term out.

    Per-epoch records go to ``ctx.log``. Losses and hit counts are accumulated on the device
    and read once per epoch, so the loop adds no host synchronisation of its own (the PGD's
    early-stop test reads one value per step).
    """
    f = PixelModel(wrapped, ctx.normalizer)
    if config.norm_init == "features":
        match_feature_statistics(f, clean, batch_size=config.batch_size, device=ctx.device)
    params = [p for p in wrapped.polarizer.parameters() if p.requires_grad]
    warm = torch.optim.SGD(params, lr=config.warmup_lr)
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    total = config.warmup_epochs + config.epochs
    for epoch in progress(range(total), desc=desc, disable=ctx.quiet):
        batches = clean.batches(config.batch_size, shuffle=True, generator=ctx.generator, device=ctx.device)
        loss_sum = torch.zeros((), device=ctx.device)
        if epoch < config.warmup_epochs:
            wrapped.train()  # polarizer batch norm in train mode; the base stays in eval mode
            seen = 0
            for x, y in batches:
                if len(y) < 2:  # batch statistics of a single sample are undefined
                    continue
                loss = F.cross_entropy(f(x), y)
                warm.zero_grad(set_to_none=True)
                loss.backward()
                warm.step()
                loss_sum += loss.detach() * len(y)
                seen += len(y)
            wrapped.eval()
            ctx.log({"epoch": epoch + 1, "phase": "warmup", "loss": float(loss_sum) / max(seen, 1)}, wrapped)
            continue
        wrapped.eval()  # main loop: polarizer batch norm uses its running statistics
        hits = torch.zeros((), device=ctx.device)
        attacked = torch.zeros((), device=ctx.device)
        for x, y in batches:
            # graph kept for the update below and, reaching x, for the attack's first step
            clean_logits = f(x.requires_grad_(True))
            with torch.no_grad():
                own = clean_logits.argmax(dim=1)
                target = choose_target(clean_logits, y)
            x_adv = attack(f, x.detach(), y, target, CleanForward(clean_logits, x))
            adv_logits = f(x_adv)
            weight = None if exclude_class is None else (y != exclude_class).to(adv_logits.dtype)
            loss = polarizer_loss(clean_logits, adv_logits, y, own, target, config, target_weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward(inputs=params)  # not on into the frozen layers below the polarizer
            opt.step()
            loss_sum += loss.detach() * len(y)
            hit = (adv_logits.detach().argmax(dim=1) == target).to(adv_logits.dtype)
            hits += hit.sum() if weight is None else (hit * weight).sum()
            attacked += len(y) if weight is None else weight.sum()
        record = {
            "epoch": epoch + 1,
            "phase": "main",
            "loss": float(loss_sum) / len(clean),
            # share of the attacked images that the polarized model still sends to their target
            "adv_hit_rate": float(hits) / max(float(attacked), 1.0),
        }
        ctx.log(record, wrapped)
    wrapped.eval()
    return wrapped


def pgd_attack(config: NPDConfig, eps: float) -> Attack:
    """Per-sample targeted L2 PGD with the config's steps and early stop (NPD, CNPD)."""

    def attack(f, x, y, target, clean=None):
        return targeted_pgd(
            f, x, target, eps=eps, steps=config.pgd_steps, step_size=config.pgd_step_size,
            norm="l2", stop_fraction=config.stop_fraction, clean=clean,
        )  # fmt: skip

    return attack


def known_target_pgd(config: NPDTargetConfig, eps: float) -> Attack:
    """NPD-TP: per-sample PGD towards the known target, on the images of other classes only."""
    pgd = pgd_attack(config, eps)

    def attack(f, x, y, target, clean=None):
        keep = y != config.target
        x_adv = x.clone()
        if bool(keep.any()):
            x_adv[keep] = pgd(
                f, x[keep], y[keep], target[keep], None if clean is None else clean.select(keep)
            )
        return x_adv

    return attack


def universal_target_attack(config: NPDTargetConfig, eps: float, image_size: tuple[int, int, int]) -> Attack:
    """NPD-TU: one perturbation for all images, pushed towards the known target on every batch.

    The perturbation persists across batches and epochs. Each call takes up to
    ``pgd_steps`` sign steps of ``pgd_step_size`` on the mean cross-entropy towards the target
    over the batch's images of other classes, projects it onto the L2 ball of ``eps`` after
    each step, and stops early like the per-sample PGD. Images are clamped to [0, 1] with
    :func:`~timm_purify.defenses._common.clamp_pixels`, whose gradient reaches pixels at 0 or
    1: with a plain clamp a black background would never move.
    """
    state: dict[str, torch.Tensor] = {}

    def attack(f, x, y, target, clean=None):  # starts from the kept delta: no clean step to reuse
        delta = state.get("delta")
        if delta is None:
            delta = torch.zeros((1, *image_size), device=x.device, dtype=x.dtype)
        weight = (y != config.target).to(x.dtype)
        n = weight.sum().clamp_min(1.0)
        x = x.detach()
        for _ in range(config.pgd_steps):
            delta = delta.detach().requires_grad_(True)
            logits = f(clamp_pixels(x + delta))
            hit = ((logits.argmax(dim=1) == target).to(x.dtype) * weight).sum() / n
            if float(hit) > config.stop_fraction:
                break
            loss = (F.cross_entropy(logits, target, reduction="none") * weight).sum() / n
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = project_l2(delta - config.pgd_step_size * grad.sign(), eps)
        state["delta"] = delta.detach()
        return (x + state["delta"]).clamp(0.0, 1.0)

    return attack


def _budget(config: NPDConfig, clean: ImageData) -> float:
    return scale_budget(config.rho, clean.image_size, norm="l2")


def _fixed_target(target: int) -> TargetRule:
    def choose(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, target)

    return choose


@register_defense(
    "npd", NPDConfig, "train a neural polarizer against estimated targeted attacks (frozen model)"
)
def run_npd(model: nn.Module, clean: ImageData, config: NPDConfig, ctx: PurifyContext) -> nn.Module:
    wrapped = wrap_for_defense(model, config)
    attack = pgd_attack(config, _budget(config, clean))
    return train_polarizer(wrapped, clean, config, ctx, choose_target=runner_up, attack=attack, desc="npd")


@register_defense(
    "npd-tp", NPDTargetConfig, "neural polarizer against per-sample attacks towards a known target"
)
def run_npd_tp(model: nn.Module, clean: ImageData, config: NPDTargetConfig, ctx: PurifyContext) -> nn.Module:
    wrapped = wrap_for_defense(model, config)
    attack = known_target_pgd(config, _budget(config, clean))
    return train_polarizer(
        wrapped, clean, config, ctx, choose_target=_fixed_target(config.target), attack=attack,
        exclude_class=config.target, desc="npd-tp",
    )  # fmt: skip


@register_defense(
    "npd-tu", NPDTargetConfig, "neural polarizer against a universal perturbation towards a known target"
)
def run_npd_tu(model: nn.Module, clean: ImageData, config: NPDTargetConfig, ctx: PurifyContext) -> nn.Module:
    wrapped = wrap_for_defense(model, config)
    attack = universal_target_attack(config, _budget(config, clean), clean.image_size)
    return train_polarizer(
        wrapped, clean, config, ctx, choose_target=_fixed_target(config.target), attack=attack,
        exclude_class=config.target, desc="npd-tu",
    )  # fmt: skip
