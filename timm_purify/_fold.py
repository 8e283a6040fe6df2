"""Fold a trained polarizer into the layer it feeds, when that is exact.

A non-conditional polarizer in eval mode is, at every position (pixel or token), an affine
map of the channel vector: ``x -> A x + b``. For NPD's ``BatchNorm(P x)``,
``A = diag(gamma / sqrt(var + eps)) P`` and ``b = beta - gamma * mean / sqrt(var + eps)``.
When the polarizer sits on the *input* of a layer that is itself linear in the channels of
every position, the two compose into one layer of the same shape:

* ``nn.Linear`` (tokens, channels-last maps or pooled vectors): ``W' = W A``,
  ``bias' = bias + W b``;
* ``nn.Conv2d`` with ``groups == 1``: ``W'[:, :, i, j] = W[:, :, i, j] A`` for every kernel
  tap, ``bias' = bias + sum_ij W[:, :, i, j] b``. With zero padding this is exact only when
  ``b`` is zero, because the padded border never saw the offset ``b``; reflect / replicate /
  circular padding copies transformed values, so it stays exact.

The folded model has exactly the keys of the base model, so vanilla timm loads it. Anything
that would change the keys (a target without a bias while ``b != 0``), that depends on the
prediction (conditional CNPD polarizers), or that feeds more than one layer (a stage output)
is reported as not foldable, with the reason, and is saved as base model + polarizer files.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._wrap import PolarizedModel
from .polarizers import NeuralPolarizer, Polarizer

__all__ = ["FoldError", "can_fold", "fold_polarizer", "polarizer_affine"]

# |W b| below this (per output unit) counts as "no offset": dropping it moves no logit visibly
_ZERO_OFFSET = 1e-6
# relative tolerance of the check that a polarizer really is a per-position affine map
_AFFINE_RTOL = 1e-6


class FoldError(ValueError):
    """The polarizer cannot be folded exactly into the layer it feeds (the message says why)."""


def _linear_forwards() -> tuple:
    forwards = [nn.Linear.forward]
    try:  # timm's Linear only adds a TorchScript cast around F.linear
        from timm.layers import Linear as TimmLinear

        forwards.append(TimmLinear.forward)
    except ImportError:  # pragma: no cover - older timm
        pass
    return tuple(forwards)


def _layout_batch(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Rows of channel vectors ``(N, C)`` -> a tensor of ``layout`` with one position each."""
    if layout == "NCHW":
        return x[:, :, None, None]
    if layout == "NHWC":
        return x[:, None, None, :]
    if layout == "NLC":
        return x[:, None, :]
    return x


@torch.no_grad()
def polarizer_affine(
    polarizer: Polarizer, *, shape: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(A, b)`` (float64, CPU) with ``polarizer(x) == A x + b`` at every position, eval mode.

    NPD's map is read from its weights; any other kind is probed with unit vectors. Either
    way the result is then checked on random tensors of the spot's ``shape`` (batch
    excluded), so a polarizer that mixes positions or is not affine is rejected rather than
    folded wrongly.

    Raises:
        FoldError: the polarizer is conditional, skips prefix tokens, or is not affine.
    """
    if polarizer.conditional:
        raise FoldError(
            f"the {polarizer.kind!r} polarizer is conditional: it depends on the class the model "
            "predicts first, so it cannot become fixed weights (it needs two forward passes)"
        )
    if polarizer.layout == "NLC" and polarizer.prefix_tokens and not polarizer.include_prefix:
        raise FoldError(
            "the polarizer skips the class/register tokens, while the layer it feeds sees every token"
        )
    probe = copy.deepcopy(polarizer).to(device="cpu", dtype=torch.float64).eval()
    channels = polarizer.channels
    if isinstance(probe, NeuralPolarizer):
        norm = probe.norm
        if norm.running_mean is None or norm.running_var is None:
            raise FoldError(
                "the polarizer's batch norm keeps no running statistics, so its eval-mode output "
                "depends on the batch"
            )
        proj = probe.proj.weight.reshape(channels, channels)
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        A = scale[:, None] * proj
        b = -scale * norm.running_mean
        if norm.bias is not None:
            b = b + norm.bias
    else:
        rows = torch.cat(
            [torch.zeros(1, channels, dtype=torch.float64), torch.eye(channels, dtype=torch.float64)]
        )
        out = probe.channel_rows(probe(_layout_batch(rows, probe.layout)))
        b = out[0]
        A = (out[1:] - b).T
    # check on tensors of the real shape: catches maps that mix positions or are not affine
    generator = torch.Generator().manual_seed(0)
    full = (3, *shape) if shape else (3, *_layout_batch(torch.zeros(1, channels), probe.layout).shape[1:])
    x = torch.randn(full, generator=generator, dtype=torch.float64) * 3.0
    got = probe.channel_rows(probe(x))  # prefix-skipping polarizers were rejected above
    want = probe.channel_rows(x) @ A.T + b
    err = float((got - want).abs().max())
    if err > _AFFINE_RTOL * (1.0 + float(want.abs().max())):
        raise FoldError(
            f"the {polarizer.kind!r} polarizer is not a per-position affine map of the channels "
            f"(deviation {err:.2e}), so no single layer can absorb it"
        )
    return A, b


def _has_padding(conv: nn.Conv2d) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(k > 1 for k in conv.kernel_size)
    return any(p > 0 for p in conv.padding)


def _target_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot absorb an affine map of its input channels, or None."""
    if parametrize.is_parametrized(module):
        return f"{type(module).__name__} carries parametrizations (unmerged masks) that recompute its weight at run time"
    if isinstance(module, nn.Linear):
        if type(module).forward not in _linear_forwards():
            return f"{type(module).__name__} overrides Linear.forward (its weight may be transformed at run time)"
        return None
    if isinstance(module, nn.Conv2d):
        if (
            type(module).forward is not nn.Conv2d.forward
            or type(module)._conv_forward is not nn.Conv2d._conv_forward
        ):
            return (
                f"{type(module).__name__} overrides Conv2d.forward (run-time padding or weight "
                "standardisation), so rescaled input channels do not map to rescaled weights"
            )
        return None
    return f"the polarizer feeds a {type(module).__name__}, not a Linear or Conv2d"


def _plan(wrapped: PolarizedModel) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Check everything a fold needs; return the target module and ``(A, b)``."""
    if not isinstance(wrapped, PolarizedModel):
        raise FoldError(f"expected a PolarizedModel (the result of wrap_model), got {type(wrapped).__name__}")
    if not wrapped.enabled:
        raise FoldError("the polarizer is switched off (inside polarizer_disabled()); nothing to fold")
    spot = wrapped.spot
    if spot.where != "input":
        raise FoldError(
            f"the polarizer sits on the output of {spot.name}, which feeds the rest of the network "
            "(skip connections included); only a polarizer on the input of one Linear/Conv2d folds"
        )
    target = dict(wrapped.base.named_modules()).get(spot.name)
    if target is None:
        raise FoldError(f"the base model has no module {spot.name!r}")
    problem = _target_problem(target)
    if problem:
        raise FoldError(problem)
    if isinstance(target, nn.Conv2d) and spot.layout != "NCHW":
        raise FoldError(f"a Conv2d at a {spot.layout} spot: the channel axis is ambiguous")
    if isinstance(target, nn.Linear) and spot.layout == "NCHW":
        raise FoldError("a Linear fed an NCHW tensor mixes the width axis, not the channels")
    A, b = polarizer_affine(wrapped.polarizer, shape=spot.shape)
    weight = target.weight.detach().to("cpu", torch.float64)
    if isinstance(target, nn.Conv2d):
        groups = target.groups
        if groups != 1:
            per = A.shape[0] // groups
            block = torch.block_diag(*[torch.ones(per, per, dtype=torch.bool)] * groups)
            leak = float(A.masked_fill(block, 0.0).abs().max())
            if leak > 1e-9 * (1.0 + float(A.abs().max())):
                raise FoldError(
                    f"the conv is grouped (groups={groups}, depthwise when groups equal the channels) "
                    "and the polarizer mixes channels across groups"
                )
        offset = float(_grouped_offset(weight, b, groups).abs().max())
    else:
        offset = float((weight @ b).abs().max())
    reasons = []
    if offset > _ZERO_OFFSET:
        if isinstance(target, nn.Conv2d) and _has_padding(target) and target.padding_mode == "zeros":
            reasons.append(
                f"the {tuple(target.kernel_size)} conv zero-pads its input, and the padded border never "
                "sees the polarizer's offset b, so the folded conv would differ there"
            )
        if target.bias is None:
            reasons.append(
                f"{spot.name} has no bias while the polarizer's offset b is not zero (|W b| up to "
                f"{offset:.2e}): folding would add a bias key that vanilla timm refuses"
            )
    if reasons:
        raise FoldError("; ".join(reasons))
    return target, A, b


def _grouped_offset(weight: torch.Tensor, b: torch.Tensor, groups: int) -> torch.Tensor:
    """``sum_taps W b`` for a grouped conv, output unit by output unit."""
    out_per = weight.shape[0] // groups
    taps = weight.sum(dim=(2, 3))  # (out, in/groups)
    b_groups = b.reshape(groups, -1)
    return torch.cat([taps[g * out_per : (g + 1) * out_per] @ b_groups[g] for g in range(groups)])


def can_fold(wrapped: PolarizedModel) -> tuple[bool, str]:
    """Whether :func:`fold_polarizer` would give an exact plain model, and why (not).

    Cheap: it reads weights and runs the polarizer on a few small tensors, never the model.
    """
    try:
        target, _, _ = _plan(wrapped)
    except FoldError as err:
        return False, str(err)
    kind = type(target).__name__
    if isinstance(target, nn.Conv2d):
        kind = f"{tuple(target.kernel_size)} {kind}"
    return True, f"the polarizer is an affine channel map on the input of {wrapped.spot.name} ({kind})"


@torch.no_grad()
def fold_polarizer(wrapped: PolarizedModel) -> nn.Module:
    """A deep copy of the base model with the polarizer folded into the layer it feeds.

    The returned model has exactly the base model's ``state_dict`` keys and shapes, no hooks,
    and is in eval mode (the fold uses the polarizer's eval-mode statistics). ``wrapped`` is
    not modified.

    Raises:
        FoldError: the fold would not be exact; the message says why (see :func:`can_fold`).
    """
    target, A, b = _plan(wrapped)
    name = wrapped.spot.name
    clone = copy.deepcopy(wrapped)
    base = clone.unwrap()
    layer = dict(base.named_modules())[name]
    weight = target.weight.detach().to("cpu", torch.float64)
    if isinstance(layer, nn.Linear):
        new_weight = weight @ A
        shift = weight @ b
    else:
        groups = layer.groups
        per = A.shape[0] // groups
        out_per = weight.shape[0] // groups
        parts = []
        for g in range(groups):
            a_g = A[g * per : (g + 1) * per, g * per : (g + 1) * per]
            parts.append(torch.einsum("oikl,ij->ojkl", weight[g * out_per : (g + 1) * out_per], a_g))
        new_weight = torch.cat(parts)
        shift = _grouped_offset(weight, b, groups)
    layer.weight.copy_(new_weight.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((layer.bias.detach().to("cpu", torch.float64) + shift).to(layer.bias.dtype))
    return base.eval()
