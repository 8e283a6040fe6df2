"""The contract every polarizer follows, and the registry of polarizer kinds."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["POLARIZERS", "Polarizer", "build_polarizer", "register_polarizer"]

POLARIZERS: dict[str, type[Polarizer]] = {}


class Polarizer(nn.Module):
    """Base class: maps a feature tensor of a given layout to one of the same shape.

    Subclasses take ``(channels, layout, *, prefix_tokens, include_prefix, **options)`` and
    must be the identity (in eval mode) right after construction, so wrapping a model does
    not change its predictions before training.

    ``conditional`` polarizers (CNPD) also need the class predicted by the unpolarized model;
    the wrapper sets it through :meth:`set_condition` before the polarized forward pass.
    """

    kind: str = ""
    conditional: bool = False

    def __init__(self, channels: int, layout: str, *, prefix_tokens: int = 0, include_prefix: bool = True):
        super().__init__()
        from .._layers import LAYOUTS

        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        if channels <= 0:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = int(channels)
        self.layout = layout
        self.prefix_tokens = int(prefix_tokens) if layout == "NLC" else 0
        self.include_prefix = bool(include_prefix)

    def options(self) -> dict:
        """Constructor keyword arguments beyond the common ones, saved with the weights."""
        return {}

    def set_condition(self, labels: torch.Tensor | None) -> None:  # noqa: B027 - optional hook
        """Receive the predicted class of each sample (conditional polarizers only)."""

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the polarizer to a tensor of ``self.layout`` with every token/position included."""
        raise NotImplementedError

    def channel_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(samples, channels)`` view of ``x`` (as :meth:`forward` receives it) that the
        polarizer's normalisation computes its statistics over: every position or token it
        transforms is one sample."""
        if self.layout == "NLC" and self.prefix_tokens and not self.include_prefix:
            x = x[:, self.prefix_tokens :]
        if self.layout == "NCHW":
            return x.transpose(0, 1).reshape(self.channels, -1).T
        return x.reshape(-1, self.channels)

    def match_statistics_(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Make the freshly built polarizer the identity in train mode too, for features with
        these per-channel moments (as :meth:`channel_rows` samples them).

        The constructor's identity holds in eval mode only (unit running statistics): in train
        mode a batch norm standardises its input, so NPD's warm-up would train, and leave
        behind, a polarizer that rescales every channel. Setting the running statistics to the
        features' moments and the affine scale and shift to their square root and mean makes
        ``norm(x) == x`` in eval mode exactly and, up to batch noise, in train mode.
        """
        raise NotImplementedError(f"the {self.kind!r} polarizer cannot match feature statistics")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "NLC" and self.prefix_tokens and not self.include_prefix:
            prefix, tokens = x[:, : self.prefix_tokens], x[:, self.prefix_tokens :]
            return torch.cat([prefix, self.transform(tokens)], dim=1)
        return self.transform(x)


def register_polarizer(name: str) -> Callable[[type[Polarizer]], type[Polarizer]]:
    """Class decorator adding a polarizer kind to :data:`POLARIZERS`."""

    def decorate(cls: type[Polarizer]) -> type[Polarizer]:
        if name in POLARIZERS and POLARIZERS[name] is not cls:
            raise ValueError(f"a polarizer named {name!r} is already registered")
        cls.kind = name
        POLARIZERS[name] = cls
        return cls

    return decorate


def build_polarizer(kind: str, channels: int, layout: str, **kwargs) -> Polarizer:
    if kind not in POLARIZERS:
        raise ValueError(f"unknown polarizer {kind!r}; available: {', '.join(sorted(POLARIZERS))}")
    return POLARIZERS[kind](channels, layout, **kwargs)
