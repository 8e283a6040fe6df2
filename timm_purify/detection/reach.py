"""Universal reach: how far one small perturbation, shared by every image, carries a model
towards each class.

Why a second signal beside BAN: a backdoor is a shortcut that one input pattern, the trigger,
opens from every class to the target. BAN looks for the shortcut in the weights (neuron
noise); on fully trained LayerNorm models (ConvNeXt) the noise either leaves clean and
backdoored models alike untouched or breaks all of them the same way, so BAN cannot tell
them apart (``benchmarks/DETECTION.md``). Reach looks for the shortcut in pixel space: for
every class ``t`` it fits one *universal* perturbation ``delta`` (norm at most ``rho``) that
lowers ``CE(f(x + delta), t)`` over images of the other classes, then measures on held-out
images of the other classes the share sent to ``t``. A clean model needs a large perturbation
to send shoes, bags and trousers alike to one class; a backdoored one has the trigger's
direction ready, so its target's reach stands out where the other classes stay near zero.

Choices, and why:

* The budget is an L2 ball (default, rho 1: the one ``benchmarks/calibrate_reach.py`` chose for
  both normalisation families; it finds the BadNets patch and the Blended trigger of a
  converged ConvNeXt, and the SIG sinusoid of the ResNets BAN misses) or an L1 ball, projected by soft thresholding (:func:`project_l1_ball`) so
  the perturbation can shrink to a few pixels of full contrast: it suits a patch (found on
  under-trained ResNets where L2 was not) and misses a global blend. ``rho`` is given for a
  3x32x32 image and scaled with the input size, like NPD's budget.
* Only images the unmodified model classifies correctly take part: a misclassified image
  says nothing about how far a class reaches.
* The perturbation is fitted by normalised-gradient descent on random batches and the pixels
  are clamped with a straight-through gradient (``clamp_pixels``): a plain clamp gives no
  gradient to pixels exactly at 0, and a black background is where a patch trigger sits.
* The score is the largest reach minus the median reach over the classes: a model that is
  easy to push anywhere (under-trained, or at too large a budget) lifts every class and scores
  low; a trapdoor lifts one.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._progress import progress
from ..defenses._common import (
    blend,
    clamp_pixels,
    fit_shared_pattern,
    grid_windows,
    paste,
    project_l2,
    scale_budget,
    window_mask,
)

__all__ = [
    "REACH_NORMS",
    "BlendSpreadResult",
    "ReachResult",
    "SpreadResult",
    "WindowSpreadResult",
    "blend_spread",
    "class_destinations",
    "confusion_matrix",
    "pattern_spread",
    "project_l1_ball",
    "reach_matrix",
    "spread_shares",
    "universal_away",
    "universal_reach",
    "universal_spread",
    "universal_towards",
    "window_spread",
]

REACH_NORMS = ("l1", "l2")


@dataclass
class ReachResult:
    """What :func:`universal_reach` measured.

    Attributes:
        reach: per class, the share of held-out images of the other classes that the class's
            universal perturbation sends to it (mean over source classes).
        score: ``max(reach) - median(reach)``; higher means one class is a trapdoor.
        suspected_target: the class with the largest reach.
        norm, rho: the budget's norm and its size at 3x32x32 (``rho_scaled``: at this input size).
        matrix: ``matrix[target][source]``, the share of held-out ``source`` images sent to ``target``.
        num_search, num_held_out: correctly classified images that fitted / measured the perturbations.
        seconds: wall time.
    """

    reach: list[float]
    score: float
    suspected_target: int
    norm: str
    rho: float
    rho_scaled: float
    steps: int
    matrix: list[list[float]]
    num_search: int
    num_held_out: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def project_l1_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection of one perturbation onto the L1 ball of ``radius`` (soft thresholding).

    Unlike rescaling (AWM's projection), it zeroes the small entries, so the perturbation can
    become a patch.
    """
    flat = delta.flatten()
    if float(flat.abs().sum()) <= radius:
        return delta
    mags = flat.abs().sort(descending=True).values
    excess = mags.cumsum(0) - radius
    ks = torch.arange(1, len(mags) + 1, dtype=mags.dtype, device=mags.device)
    k = int((mags - excess / ks > 0).nonzero().max())
    theta = excess[k] / (k + 1)
    return (flat.sign() * (flat.abs() - theta).clamp_min(0.0)).view_as(delta)


def universal_towards(
    f: nn.Module,
    x: torch.Tensor,
    target: int,
    *,
    rho: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    norm: str = "l2",
) -> torch.Tensor:
    """One perturbation of L2 (or L1) norm <= ``rho`` that pushes every image of ``x`` towards ``target``.

    ``f`` maps [0, 1] pixels to logits. Normalised-gradient descent on random batches of
    ``x`` (with replacement), projected onto the ball after each step.
    """
    goal = torch.full((len(x),), target, dtype=torch.long, device=x.device)
    return _fit_universal(
        f, x, goal, away=False, rho=rho, steps=steps, batch_size=batch_size, generator=generator, norm=norm
    )


def universal_away(
    f: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rho: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One perturbation of L2 norm <= ``rho`` that pushes every image of ``x`` away from its own label ``y``.

    Untargeted: it raises the cross-entropy of the true labels, wherever the images go.
    """
    return _fit_universal(
        f, x, y, away=True, rho=rho, steps=steps, batch_size=batch_size, generator=generator
    )


def _fit_universal(
    f: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    away: bool,
    rho: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    norm: str = "l2",
) -> torch.Tensor:
    """Normalised-gradient descent (``away``: ascent) of ``CE(f(x + delta), labels)`` on random
    batches of ``x`` (with replacement), projected onto the ball after each step."""
    if norm not in REACH_NORMS:
        raise ValueError(f"norm must be one of {REACH_NORMS}, got {norm!r}")
    delta = torch.zeros_like(x[:1], requires_grad=True)
    step = 0.25 * rho if norm == "l2" else rho / 8
    sign = 1.0 if away else -1.0
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator).to(x.device)
        loss = F.cross_entropy(f(clamp_pixels(x[idx] + delta)), labels[idx])
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += sign * step * grad / grad.norm().clamp_min(1e-12)
            delta.clamp_(-1.0, 1.0)
            delta.copy_(project_l2(delta, rho) if norm == "l2" else project_l1_ball(delta, rho))
    return delta.detach()


def reach_matrix(
    f: nn.Module,
    search: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    rho: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    norm: str = "l2",
    quiet: bool = True,
) -> torch.Tensor:
    """``[target, source]``: share of the held-out ``source`` images that ``target``'s perturbation
    (fitted on the search images of the other classes) sends to ``target``.

    A class with no search image of another class, or a source with no held-out image, keeps 0.
    """
    (xs, ys), (xh, yh) = search, held
    out = torch.zeros(num_classes, num_classes)
    for t in progress(range(num_classes), desc="scan: universal reach", disable=quiet):
        pool = xs[ys != t]
        if len(pool) == 0:
            continue
        delta = universal_towards(
            f, pool, t, rho=rho, steps=steps, batch_size=batch_size, generator=generator, norm=norm
        )
        others = yh != t
        with torch.no_grad():
            pred = f((xh[others] + delta).clamp(0.0, 1.0)).argmax(1).cpu()
        sources = yh[others].cpu()
        for s in range(num_classes):
            pick = sources == s
            if s != t and pick.any():
                out[t, s] = (pred[pick] == t).float().mean()
    return out


def _summarise(matrix: torch.Tensor) -> tuple[list[float], float, int]:
    n = matrix.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    reach = torch.stack([matrix[t][off[t]].mean() for t in range(n)])
    top = int(reach.argmax())
    return [float(r) for r in reach], float(reach[top] - reach.median()), top


def universal_reach(
    f: nn.Module,
    search: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    rho: float = 1.0,
    norm: str = "l2",
    steps: int = 40,
    batch_size: int = 64,
    generator: torch.Generator,
    quiet: bool = True,
) -> ReachResult:
    """Measure every class's reach and score the largest against the median.

    Args:
        f: the model as a function of [0, 1] pixels (``PixelModel``), in eval mode, frozen.
        search, held: ``(images in [0, 1], labels)`` of correctly classified clean images; the
            perturbations are fitted on ``search`` and measured on ``held``.
        rho: the budget at 3x32x32 (scaled here to the images' size).
        norm: ``"l2"`` or ``"l1"`` (admits a patch, misses a blend).
        steps, batch_size: of each perturbation's descent.
        generator: drives the batches (seeded by the caller).
        quiet: no progress bar (one tick per class).
    """
    if norm not in REACH_NORMS:
        raise ValueError(f"norm must be one of {REACH_NORMS}, got {norm!r}")
    start = time.perf_counter()
    scaled = scale_budget(rho, tuple(search[0].shape[1:]), norm=norm)
    matrix = reach_matrix(
        f,
        search,
        held,
        num_classes,
        rho=scaled,
        steps=steps,
        batch_size=batch_size,
        generator=generator,
        norm=norm,
        quiet=quiet,
    )
    reach, score, top = _summarise(matrix)
    return ReachResult(
        reach=reach,
        score=score,
        suspected_target=top,
        norm=norm,
        rho=float(rho),
        rho_scaled=float(scaled),
        steps=steps,
        matrix=[[float(v) for v in row] for row in matrix],
        num_search=len(search[1]),
        num_held_out=len(held[1]),
        seconds=time.perf_counter() - start,
    )


@dataclass
class SpreadResult:
    """What :func:`universal_spread` measured.

    Attributes:
        moved: per source class, the share of its held-out images the perturbation moves to
            another class.
        spread: per source class, the share moved to a class other than ``top_destination``.
        top_destination: the class that receives most moved images.
        score: the second-lowest ``spread``; high when every class is moved, each elsewhere.
        confusion: ``confusion[source][predicted]``, held-out images under the perturbation.
        rho, rho_scaled, steps: the L2 budget at 3x32x32 and at this input size, descent steps.
        restarts, restart_scores: how many perturbations were fitted, and each one's score (the
            fields above are the best one's).
        num_search, num_held_out: correctly classified images that fitted / measured it.
        seconds: wall time.
    """

    moved: list[float]
    spread: list[float]
    top_destination: int
    score: float
    confusion: list[list[int]]
    rho: float
    rho_scaled: float
    steps: int
    restarts: int
    restart_scores: list[float]
    num_search: int
    num_held_out: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``out[k, j]`` = number of images of class ``k`` predicted ``j``."""
    return torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(
        num_classes, num_classes
    )


def spread_shares(confusion: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(top destination, moved, spread)`` of ``confusion[source][predicted]`` under one
    perturbation: the class receiving most moved images, and per source class the share moved to
    another class and the share moved to a class other than the top destination (the all-to-all
    mark: an all-to-one trigger moves every class, but all to one)."""
    off = confusion.clone().fill_diagonal_(0)
    top = int(off.sum(0).argmax())
    counts = confusion.sum(1).clamp_min(1).float()
    return top, off.sum(1).float() / counts, (off.sum(1) - off[:, top]).float() / counts


def universal_spread(
    f: nn.Module,
    search: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    rho: float = 2.0,
    steps: int = 40,
    restarts: int = 1,
    batch_size: int = 64,
    generator: torch.Generator,
) -> SpreadResult:
    """The all-to-all reading: one untargeted universal perturbation, and where it sends each class.

    Why: an all-to-all backdoor (class ``y`` to ``y + 1``) has no single target, so the per-class
    reach sees only a ninth of the images follow any one class's perturbation, and BAN's noise
    misses the weaker implants. One perturbation fitted to push every image off its own label
    finds the trigger instead, since the trigger moves every class; a clean model leaves some
    classes (trousers, bags) unmoved at a budget that moves others. An all-to-one trigger moves
    every class too, but all to one class: so the score counts only images moved to a class
    other than the most common destination, and takes the second-lowest class (under an
    all-to-all permutation the class feeding the most common destination reads 0).

    With ``restarts`` > 1 it fits that many perturbations, each from zero on the generator's next
    batches, and keeps the one with the highest score: the ascent's steps are large and its first
    batches decide where it goes, so one fit can settle in a sink class of the model instead of
    the trigger (a fully trained all-to-all ConvNeXt read 0.000 on one set of 3,000 images and
    0.86-0.90 at each of the next five fits on the same images; benchmarks/DETECTION.md). The
    first fit draws exactly what a single one draws, so ``restarts=1`` is the reading as it was.

    Args:
        f: the model as a function of [0, 1] pixels (``PixelModel``), in eval mode, frozen.
        search, held: ``(images in [0, 1], labels)`` of correctly classified clean images.
        rho: the L2 budget at 3x32x32 (scaled here to the images' size).
        steps, batch_size: of the perturbation's ascent.
        restarts: perturbations fitted (>= 1); the best one's reading is returned.
        generator: drives the batches (seeded by the caller).
    """
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    start = time.perf_counter()
    (xs, ys), (xh, yh) = search, held
    scaled = scale_budget(rho, tuple(xs.shape[1:]), norm="l2")
    fits = []
    for _ in range(restarts):
        delta = universal_away(f, xs, ys, rho=scaled, steps=steps, batch_size=batch_size, generator=generator)
        with torch.no_grad():
            pred = f((xh + delta).clamp(0.0, 1.0)).argmax(1).cpu()
        confusion = confusion_matrix(yh.cpu(), pred, num_classes)
        top, moved, spread = spread_shares(confusion)
        ranked = spread[confusion.sum(1) > 0].sort().values
        fits.append((float(ranked[1]) if len(ranked) > 1 else 0.0, top, moved, spread, confusion))
    score, top, moved, spread, confusion = max(fits, key=lambda fit: fit[0])  # the first of equals
    return SpreadResult(
        moved=[float(v) for v in moved],
        spread=[float(v) for v in spread],
        top_destination=top,
        score=score,
        confusion=confusion.tolist(),
        rho=float(rho),
        rho_scaled=float(scaled),
        steps=steps,
        restarts=restarts,
        restart_scores=[fit[0] for fit in fits],
        num_search=len(ys),
        num_held_out=len(yh),
        seconds=time.perf_counter() - start,
    )


def pattern_spread(confusion: torch.Tensor) -> tuple[float, int, torch.Tensor, torch.Tensor]:
    """``(score, top destination, moved, spread)`` of one pattern shared by every image (a window's,
    or a blend's): :func:`spread_shares`, scored by the mean of ``spread`` over the classes
    present. The mean, not :func:`universal_spread`'s second-lowest class: the trigger's window
    moved 8-10 of 10 classes on 14 all-to-all BatchNorm models, so one or two unmoved classes
    should lower the score, not zero it."""
    top, moved, spread = spread_shares(confusion)
    return float(spread[confusion.sum(1) > 0].mean()), top, moved, spread


def class_destinations(confusion: torch.Tensor) -> list[int | None]:
    """Per source class of ``confusion[source][predicted]``, the class most of its moved images
    went to (``None``: none moved); under an all-to-all backdoor, its map (``y -> y + 1``, say)."""
    off = confusion.clone().fill_diagonal_(0)
    return [int(row.argmax()) if int(row.sum()) else None for row in off]


def _pattern_fields(
    f: nn.Module,
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pattern: torch.Tensor,
    held: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
) -> dict[str, Any]:
    """What one fitted shared pattern does to the held-out images, in the fields the pattern
    readings' results share: ``score``, ``top_destination``, ``moved`` and ``spread``
    (:func:`pattern_spread`), ``destinations`` (:func:`class_destinations`) and ``confusion``."""
    xh, yh = held
    with torch.no_grad():
        pred = f(apply(xh, pattern)).argmax(1).cpu()
    confusion = confusion_matrix(yh.cpu(), pred, num_classes)
    score, top, moved, spread = pattern_spread(confusion)
    return {
        "score": score,
        "moved": [float(v) for v in moved],
        "spread": [float(v) for v in spread],
        "top_destination": top,
        "destinations": class_destinations(confusion),
        "confusion": confusion.tolist(),
    }


@dataclass
class WindowSpreadResult:
    """What :func:`window_spread` measured.

    Attributes:
        score: the best window's mean over classes of ``spread``; high when one pattern in one
            place moves every class, each to its own destination.
        corner: ``[row, col]`` of the best window at this input size.
        second_score: the runner-up window's score (a trigger stands out; a fragile model does not).
        moved, spread, top_destination, confusion: the best window's, as :class:`SpreadResult` has them.
        destinations: per source class, where most of its moved images went (``None``: none moved);
            under an all-to-all backdoor, its mapping (``y -> y + 1``, say).
        window_scores: ``[row, col, score]`` of every window, in grid order.
        window, stride: the window side and grid step at 3x32x32; ``side``: the side at this size.
        steps, batch_size, lr: of each window's Adam search.
        num_search, num_held_out: correctly classified images that fitted / measured the patterns.
        seconds: wall time.
    """

    score: float
    corner: list[int]
    second_score: float
    moved: list[float]
    spread: list[float]
    top_destination: int
    destinations: list[int | None]
    confusion: list[list[int]]
    window_scores: list[list[float]]
    window: int
    stride: int
    side: int
    steps: int
    batch_size: int
    lr: float
    num_search: int
    num_held_out: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def window_spread(
    f: nn.Module,
    search: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    window: int = 8,
    stride: int | None = None,
    steps: int = 30,
    batch_size: int = 32,
    lr: float = 0.1,
    generator: torch.Generator,
) -> WindowSpreadResult:
    """The all-to-all reading for patch triggers: per window of a grid, one pasted pattern shared
    by every image, and where it sends each class.

    Why beside :func:`universal_spread`: on BatchNorm models an untargeted perturbation spread
    over the whole image finds a sink class of the clean model instead of an all-to-all patch
    (the calibration found no budget where it helped; ``benchmarks/DETECTION.md``). A patch
    trigger's mark is that one pattern at one place moves *every* class, each to its own
    destination. So each window's pixels are replaced by a pattern fitted (Adam on the negative
    cross-entropy of the true labels) to push images off their labels, and scored on held-out
    images by the mean over classes of the share moved to a class other than the most common
    destination (:func:`pattern_spread`): an all-to-one trigger moves every class but to one
    class and scores low; a clean model's best window moves a few fragile classes. The best
    window's score is the model's.

    Args:
        f: the model as a function of [0, 1] pixels (``PixelModel``), in eval mode, frozen.
        search, held: ``(images in [0, 1], labels)`` of correctly classified clean images.
        window, stride: the window side and grid step at 3x32x32, scaled to the images' size
            (``stride=None``: abutting windows, ``stride = window``).
        steps, batch_size, lr: of each window's Adam search, on random batches of ``search``.
        generator: drives the batches (seeded by the caller).
    """
    start = time.perf_counter()
    (xs, ys), yh = search, held[1]
    size = xs.shape[-1]
    side = max(1, min(size, round(window * size / 32)))
    step = max(1, round((stride or window) * size / 32))
    readings = []
    for r, c in grid_windows(size, side, step):
        apply = functools.partial(paste, mask=window_mask(size, (r, c), side, device=xs.device))
        pattern = fit_shared_pattern(
            f, search, apply, steps=steps, batch_size=batch_size, lr=lr, generator=generator
        )
        readings.append((_pattern_fields(f, apply, pattern, held, num_classes), r, c))
    best, r, c = max(readings, key=lambda w: w[0]["score"])
    return WindowSpreadResult(
        **best,
        corner=[r, c],
        second_score=sorted((w[0]["score"] for w in readings), reverse=True)[1] if len(readings) > 1 else 0.0,
        window_scores=[[r_, c_, w["score"]] for w, r_, c_ in readings],
        window=window,
        stride=stride or window,
        side=side,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        num_search=len(ys),
        num_held_out=len(yh),
        seconds=time.perf_counter() - start,
    )


@dataclass
class BlendSpreadResult:
    """What :func:`blend_spread` measured.

    Attributes:
        score: the mean over classes of ``spread``; high when one blended pattern moves every
            class, each to its own destination.
        moved, spread, top_destination, confusion, destinations: as :class:`WindowSpreadResult`
            has them, for the one pattern.
        alpha: the pattern's weight in the blend; ``steps, batch_size, lr``: of its Adam search.
        num_search, num_held_out: correctly classified images that fitted / measured the pattern.
        seconds: wall time.
    """

    score: float
    moved: list[float]
    spread: list[float]
    top_destination: int
    destinations: list[int | None]
    confusion: list[list[int]]
    alpha: float
    steps: int
    batch_size: int
    lr: float
    num_search: int
    num_held_out: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def blend_spread(
    f: nn.Module,
    search: tuple[torch.Tensor, torch.Tensor],
    held: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    alpha: float = 0.1,
    steps: int = 30,
    batch_size: int = 32,
    lr: float = 0.1,
    generator: torch.Generator,
) -> BlendSpreadResult:
    """The all-to-all reading for blended triggers: one whole-image pattern blended into every
    image, ``(1 - alpha) x + alpha p``, and where it sends each class.

    Why beside :func:`window_spread`: a blended trigger covers the whole image, so no window
    carries it (the window reading found one of seven blended all-to-all BatchNorm models), and
    an L2 perturbation over the whole image finds a clean BatchNorm model's sink class. The
    pattern is fitted as a window's is (:func:`fit_shared_pattern`) and scored the same way
    (:func:`pattern_spread`): an all-to-one blend sends every class to its target and scores
    low; a clean model's blend pushes most images into one or two sink classes
    (``benchmarks/DETECTION.md`` has the measurements behind ``alpha``).

    Args:
        f: the model as a function of [0, 1] pixels (``PixelModel``), in eval mode, frozen.
        search, held: ``(images in [0, 1], labels)`` of correctly classified clean images.
        alpha: the pattern's weight in the blend, in (0, 1).
        steps, batch_size, lr: of the Adam search, on random batches of ``search``.
        generator: drives the batches (seeded by the caller).
    """
    start = time.perf_counter()
    ys, yh = search[1], held[1]
    apply = functools.partial(blend, alpha=alpha)
    pattern = fit_shared_pattern(
        f, search, apply, steps=steps, batch_size=batch_size, lr=lr, generator=generator
    )
    return BlendSpreadResult(
        **_pattern_fields(f, apply, pattern, held, num_classes),
        alpha=alpha,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        num_search=len(ys),
        num_held_out=len(yh),
        seconds=time.perf_counter() - start,
    )
