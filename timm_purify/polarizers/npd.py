"""The NPD neural polarizer: a channel-mixing linear map followed by batch normalisation.

For NCHW features it is the paper's 1x1 convolution (no bias) + ``BatchNorm2d``; for
channels-last features (NHWC, tokens, pooled vectors) the same map is a ``Linear`` (no bias)
+ ``BatchNorm1d`` over the channel dimension, every spatial position or token being one
sample of the normalisation statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import Polarizer, register_polarizer

__all__ = ["NeuralPolarizer", "identity_init_", "match_identity_"]


def identity_init_(proj: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Make ``norm(proj(x)) == x`` in eval mode.

    The running variance is set to ``1 - eps`` so that ``sqrt(var + eps)`` is exactly 1: with
    the usual ``var = 1`` the map would scale by ``1/sqrt(1 + 1e-5)``, a visible change in the
    logits of deep models.
    """
    with torch.no_grad():
        weight = proj.weight
        weight.zero_()
        eye = torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
        weight.copy_(eye.view(weight.shape))
        norm.reset_parameters()
        norm.running_var.fill_(1.0 - norm.eps)


def match_identity_(norm: nn.modules.batchnorm._NormBase, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Running statistics ``(mean, var)`` and, when ``norm`` is affine, scale ``sqrt(var + eps)``
    and shift ``mean``: the identity in both modes for inputs of those moments (see
    :meth:`~timm_purify.polarizers.Polarizer.match_statistics_`)."""
    with torch.no_grad():
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
        if norm.affine:
            norm.weight.copy_((var + norm.eps).sqrt())
            norm.bias.copy_(mean)


@register_polarizer("npd")
class NeuralPolarizer(Polarizer):
    """Identity-initialised ``proj`` (1x1 conv or linear, no bias) followed by ``norm``."""

    def __init__(self, channels: int, layout: str, *, prefix_tokens: int = 0, include_prefix: bool = True):
        super().__init__(channels, layout, prefix_tokens=prefix_tokens, include_prefix=include_prefix)
        if layout == "NCHW":
            self.proj = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
            self.norm = nn.BatchNorm2d(channels)
        else:
            self.proj = nn.Linear(channels, channels, bias=False)
            self.norm = nn.BatchNorm1d(channels)
        identity_init_(self.proj, self.norm)

    def match_statistics_(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        match_identity_(self.norm, mean, var)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NCHW":
            return self.norm(self.proj(x))
        shape = x.shape
        flat = self.proj(x.reshape(-1, shape[-1]))
        return self.norm(flat).reshape(shape)
