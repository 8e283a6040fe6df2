"""Pieces several methods share, written once: pixel-space attacks, MixUp and CutMix, masks on
parameters, and discovery of normalisation layers.

Everything works on [0, 1] pixel tensors and on any timm model: layers are found by type,
never by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "PixelModel",
    "CleanForward",
    "targeted_pgd",
    "universal_perturbation",
    "window_mask",
    "paste",
    "blend",
    "grid_windows",
    "fit_shared_pattern",
    "clamp_pixels",
    "project_l2",
    "project_l1",
    "mixup",
    "cutmix",
    "norm_layers",
    "weight_layers",
    "ParamMask",
    "attach_masks",
    "merge_masks",
    "NormNoise",
    "scale_budget",
]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
Forward = Callable[[torch.Tensor], torch.Tensor]


class PixelModel(nn.Module):
    """``model(normalizer(x))``: the model as a function of [0, 1] pixels."""

    def __init__(self, model: nn.Module, normalizer: nn.Module):
        super().__init__()
        self.model = model
        self.normalizer = normalizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalizer(x))


def scale_budget(
    budget: float, image_size: tuple[int, ...], *, reference: tuple[int, ...] = (3, 32, 32), norm: str = "l2"
) -> float:
    """Rescale a perturbation budget defined at 32x32x3 to ``image_size`` (C, H, W).

    An L2 (or L1) norm over the whole tensor grows with the square root (or linearly) of the
    number of values, so the budget per value stays constant across resolutions.
    """
    n, n_ref = 1, 1
    for v in image_size:
        n *= int(v)
    for v in reference:
        n_ref *= int(v)
    if norm == "l2":
        return budget * (n / n_ref) ** 0.5
    if norm == "l1":
        return budget * n / n_ref
    return budget  # linf is per value already


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Project each sample of ``delta`` onto the L2 ball of ``radius``."""
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (radius / norms).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


def project_l1(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale ``delta`` (one universal perturbation) down to L1 norm ``radius`` if it exceeds it."""
    norm = float(delta.abs().sum())
    return delta * min(1.0, radius / max(norm, 1e-12))


@dataclass(frozen=True)
class CleanForward:
    """A forward pass a caller already ran on the clean batch, reused as PGD's first step.

    At ``delta = 0`` the attack's first forward pass computes exactly the clean logits; a
    training loop that needs those logits anyway (NPD's clean loss) runs its clean forward
    with ``inputs.requires_grad_()`` and hands it over, which saves one full forward pass per
    batch. The graph is kept (``retain_graph``) for the caller's own backward pass.

    Attributes:
        logits: ``f(inputs)``, graph alive, one row per image the attack works on.
        inputs: the leaf tensor the logits were computed from (``requires_grad``).
        rows: which rows of ``inputs`` the logits belong to (``None``: all of them).
    """

    logits: torch.Tensor
    inputs: torch.Tensor
    rows: torch.Tensor | None = None

    def select(self, keep: torch.Tensor) -> CleanForward:
        """The same forward pass restricted to the rows ``keep`` (a boolean mask)."""
        rows = keep.nonzero().flatten()
        return CleanForward(self.logits[rows], self.inputs, rows if self.rows is None else self.rows[rows])

    def input_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """``d loss / d inputs`` for the selected rows, keeping the graph."""
        (grad,) = torch.autograd.grad(loss, self.inputs, retain_graph=True)
        return grad if self.rows is None else grad[self.rows]


def targeted_pgd(
    f: Forward,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "l2",
    stop_fraction: float | None = None,
    clean: CleanForward | None = None,
) -> torch.Tensor:
    """Per-sample targeted attack in pixel space; returns the adversarial images.

    Sign-gradient descent on ``CE(f(x + delta), target)`` from ``delta = 0``, projected onto
    the L2 or Linf ball of ``eps`` and onto [0, 1] after each step (the NPD reference). With
    ``stop_fraction`` the loop ends once more than that share of the batch hits its target.
    Gradients flow only into ``delta``; ``f``'s parameters are left untouched. ``clean``
    (the caller's forward pass of ``f`` on ``x``) replaces the first step's forward pass.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    x = x.detach()
    delta = torch.zeros_like(x, requires_grad=True)
    for step in range(steps):
        reuse = step == 0 and clean is not None
        logits = clean.logits if reuse else f(x + delta)
        if stop_fraction is not None and float((logits.argmax(1) == target).float().mean()) > stop_fraction:
            break
        loss = F.cross_entropy(logits, target)
        grad = clean.input_grad(loss) if reuse else torch.autograd.grad(loss, delta)[0]
        with torch.no_grad():
            delta -= step_size * grad.sign()
            if norm == "l2":
                delta.copy_(project_l2(delta, eps))
            else:
                delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp_(0.0, 1.0) - x)
    return (x + delta).detach()


def clamp_pixels(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to [0, 1] in the forward pass, with the identity's gradient.

    A universal perturbation starts at zero, and a plain ``clamp`` passes no gradient to a
    pixel that sits exactly at 0 or 1. On images with a black background (Fashion-MNIST,
    MNIST, many medical scans) every background pixel is exactly 0, so a perturbation fitted
    through ``clamp`` could never touch the background, which is where a BadNets patch sits.
    The straight-through clamp shows the model a valid image and lets the gradient say which
    way each pixel should move (as the reference's unclamped ``f(x + delta)`` does); moves
    past the border are clamped away again in the next forward pass.
    """
    return x + (x.clamp(0.0, 1.0) - x).detach()


def universal_perturbation(
    f: Forward,
    batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    *,
    shape: tuple[int, ...],
    steps: int,
    lr: float,
    l1_budget: float,
    device: torch.device,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """One perturbation for every input that *maximises* ``CE(f(clamp(x + delta)), y)``.

    AWM's inner problem: ``steps`` SGD steps over the batches ``batches()`` yields (labels
    are the model's own predictions or the true ones, as the caller chooses), then one L1
    projection onto ``l1_budget``. The images are clamped with :func:`clamp_pixels`, so
    pixels at 0 or 1 (a black background) still receive gradient.
    """
    delta = (init.clone() if init is not None else torch.zeros(shape, device=device)).requires_grad_(True)
    opt = torch.optim.SGD([delta], lr=lr)
    done = 0
    while done < steps:
        for x, y in batches():
            loss = -F.cross_entropy(f(clamp_pixels(x + delta)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    with torch.no_grad():
        return project_l1(delta.detach(), l1_budget)


def window_mask(
    size: int, corner: tuple[int, int], side: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """``(1, 1, size, size)``: 1 on the ``side``-sided square whose top-left pixel is ``corner``
    (row, col), 0 elsewhere."""
    mask = torch.zeros(1, 1, size, size, device=device)
    r, c = corner
    mask[..., r : r + side, c : c + side] = 1.0
    return mask


def paste(x: torch.Tensor, pattern: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
    """``pattern`` pasted into ``x`` where ``mask`` is 1 (a patch trigger's shape)."""
    return x * (1 - mask) + pattern * mask


def blend(x: torch.Tensor, pattern: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """``(1 - alpha) x + alpha pattern`` (a blended trigger's shape)."""
    return x * (1 - alpha) + pattern * alpha


def grid_windows(size: int, side: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners ``(row, col)`` of a grid of ``side``-sided squares over a ``size``-sided
    image, the last row and column flush with the far edges, so with ``stride <= side`` every
    pixel lies in some window (a trigger no larger than ``side - stride + 1`` fits whole in one)."""
    starts = sorted({*range(0, size - side + 1, stride), size - side})
    return [(r, c) for r in starts for c in starts]


def fit_shared_pattern(
    f: Forward,
    search: tuple[torch.Tensor, torch.Tensor],
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One pattern (``(1, C, H, W)`` in [0, 1], from grey) that ``apply(images, pattern)`` puts
    into every image, fitted by Adam on the negative cross-entropy of the labels over random
    batches of ``search``, to push images off their labels; returned clamped to [0, 1].

    A trigger of known shape (a pasted patch, a blend), recovered without a norm budget: the
    shape is the constraint. The scan scores such patterns (``detection.reach``); AWM's shaped
    triggers train against them."""
    xs, ys = search
    pattern = torch.full((1, *xs.shape[1:]), 0.5, device=xs.device, requires_grad=True)
    opt = torch.optim.Adam([pattern], lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (batch_size,), generator=generator).to(xs.device)
        loss = -F.cross_entropy(f(apply(xs[idx], pattern.clamp(0, 1))), ys[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return pattern.detach().clamp(0, 1)


def mixup(
    x: torch.Tensor, y: torch.Tensor, *, alpha: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """MixUp with a random partner from the batch: returns (x_mix, y_a, y_b, lam)."""
    lam = _beta(alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    return lam * x + (1.0 - lam) * x[perm], y, y[perm], lam


def cutmix(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    anywhere: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al., ICCV 2019) with a random partner from the batch; same return as
    :func:`mixup`.

    One box per batch, of side ``sqrt(1 - lam)`` times the image's, is pasted from each image's
    partner and ``lam`` becomes the share of the image actually kept. CutMix proper centres the
    box uniformly, clips it at the border and cuts it from the same place in the partner;
    ``anywhere=True`` keeps the whole box inside the image and cuts it from an independent
    random place of the partner (CutPaste, Li et al., CVPR 2021, with CutMix's mixed labels),
    so image content can land where that class never has any, e.g. on an empty corner. Either
    way, where MixUp fades a whole second image in, this puts a sharp-edged local patch in,
    the kind of input a patch trigger is. Written here rather than taken from
    ``timm.data.Mixup`` because that draws from NumPy's global random state, and a purification
    run must follow its own seeded generator.
    """
    lam = _beta(alpha, generator)
    b, _, h, w = x.shape
    perm = torch.randperm(b, generator=generator).to(x.device)
    ratio = (1.0 - lam) ** 0.5
    if anywhere:
        cut_h, cut_w = max(1, int(h * ratio)), max(1, int(w * ratio))
        top, left, src_top, src_left = (
            int(torch.randint(0, n - cut + 1, (1,), generator=generator))
            for n, cut in ((h, cut_h), (w, cut_w), (h, cut_h), (w, cut_w))
        )
    else:
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        top, left = max(cy - cut_h // 2, 0), max(cx - cut_w // 2, 0)
        # clipped at the border, and cut from the same place
        cut_h, cut_w = min(cy + cut_h // 2, h) - top, min(cx + cut_w // 2, w) - left
        src_top, src_left = top, left
    mixed = x.clone()
    mixed[:, :, top : top + cut_h, left : left + cut_w] = x[
        perm, :, src_top : src_top + cut_h, src_left : src_left + cut_w
    ]
    return mixed, y, y[perm], 1.0 - cut_h * cut_w / (h * w)


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """Beta(alpha, alpha) from two gamma draws, seeded when ``generator`` is given (torch's
    ``Beta`` takes no generator)."""
    a = torch._standard_gamma(torch.tensor([alpha, alpha]), generator=generator)
    return float(a[0] / a.sum())


def norm_layers(model: nn.Module, *, skip_stem: bool = False) -> list[tuple[str, nn.Module]]:
    """Every normalisation layer with affine parameters (BatchNorm, LayerNorm, GroupNorm and
    timm's subclasses), in module order; ``skip_stem`` drops the first one."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _NORM_TYPES) and getattr(m, "weight", None) is not None
    ]
    return found[1:] if skip_stem else found


def weight_layers(
    model: nn.Module, *, include_head: bool = True, kinds=(nn.Conv2d, nn.Linear)
) -> list[tuple[str, nn.Module]]:
    """Every conv/linear layer, in module order, the classifier head optionally excluded."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_modules = set(head.modules()) if isinstance(head, nn.Module) else set()
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, kinds) and (include_head or m not in head_modules)
    ]


class ParamMask(nn.Module):
    """Parametrization ``w -> w * mask``; ``mask`` broadcasts over ``w`` (element-wise or per channel)."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | None = None, dtype=torch.float32):
        super().__init__()
        self.mask = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def attach_masks(
    modules: list[tuple[str, nn.Module]], *, param: str = "weight", per_channel: bool = False
) -> list[nn.Parameter]:
    """Put a multiplicative mask (initialised at 1) on ``param`` of each module; return the masks.

    ``per_channel`` gives one value per output channel, else one per element. The original
    tensor is kept by torch's parametrize machinery and :func:`merge_masks` folds the masks
    into it, so the model ends with its original keys.
    """
    masks = []
    for _, module in modules:
        w = getattr(module, param)
        shape = (w.shape[0],) + (1,) * (w.dim() - 1) if per_channel else tuple(w.shape)
        pm = ParamMask(shape, device=w.device, dtype=w.dtype)
        parametrize.register_parametrization(module, param, pm)
        masks.append(pm.mask)
    return masks


def merge_masks(model: nn.Module) -> None:
    """Fold every parametrization into its tensor (``w <- w * mask``) and drop it."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


class _NoiseParam(nn.Module):
    """Parametrization ``p -> p * (1 + delta)`` with ``delta`` switched on by its owner."""

    def __init__(self, shape: tuple[int, ...], owner: NormNoise, device, dtype):
        super().__init__()
        self.delta = torch.zeros(shape, device=device, dtype=dtype)
        self._owner = [owner]  # a list keeps the owner out of the module tree

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if not self._owner[0].active:
            return p
        return p * (1.0 + self.delta)


class NormNoise:
    """Multiplicative adversarial noise on the weight and bias of every affine norm layer (BAN).

    ``reset()`` draws ``delta ~ U(-eps, eps)``; ``ascend(loss_fn, steps)`` takes sign-gradient
    ascent steps of size ``eps / steps`` on ``loss_fn()`` and keeps ``delta`` in [-eps, eps];
    noise applies only inside ``with noise.on():``. ``remove()`` restores the layers.
    """

    def __init__(self, model: nn.Module, *, eps: float = 0.3):
        if eps <= 0:
            raise ValueError(f"noise eps must be > 0, got {eps}")
        self.model = model
        self.eps = eps
        self.active = False
        self._params: list[_NoiseParam] = []
        for _, module in norm_layers(model):
            for name in ("weight", "bias"):
                p = getattr(module, name, None)
                if p is None:
                    continue
                np_ = _NoiseParam(tuple(p.shape), self, p.device, p.dtype)
                parametrize.register_parametrization(module, name, np_, unsafe=True)
                self._params.append(np_)
        if not self._params:
            raise ValueError("the model has no affine normalisation layer to put noise on")

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        previous, self.active = self.active, True
        try:
            yield
        finally:
            self.active = previous

    def reset(self, generator: torch.Generator | None = None) -> None:
        for p in self._params:
            noise = torch.rand(p.delta.shape, generator=generator).to(p.delta.device, p.delta.dtype)
            p.delta = (noise * 2.0 - 1.0) * self.eps

    def ascend(self, loss_fn: Callable[[], torch.Tensor], steps: int) -> None:
        """Maximise ``loss_fn()`` (computed with the noise on) over the noise by sign ascent."""
        step = self.eps / max(steps, 1)
        for _ in range(steps):
            deltas = [p.delta.requires_grad_(True) for p in self._params]
            with self.on():
                loss = loss_fn()
            grads = torch.autograd.grad(loss, deltas, allow_unused=True)
            for p, g in zip(self._params, grads, strict=True):
                d = p.delta.detach()
                if g is not None:
                    d = (d + step * g.sign()).clamp_(-self.eps, self.eps)
                p.delta = d

    def remove(self) -> None:
        """Take the noise parametrizations off, leaving the original tensors."""
        for _, module in norm_layers(self.model):
            if parametrize.is_parametrized(module):
                for name in ("weight", "bias"):
                    if parametrize.is_parametrized(module, name) and any(
                        isinstance(p, _NoiseParam) for p in module.parametrizations[name]
                    ):
                        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self._params.clear()
