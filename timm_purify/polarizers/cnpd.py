"""Class-conditional neural polarizers (CNPD): the NPD polarizer chosen or modulated by class.

CNPD (Zhu et al., arXiv 2502.18520; no public code) conditions the polarizer on the class the
*unpolarized* model predicts for the input. A triggered input is predicted as the attack's
target, so the purifier trained against targeted attacks on that class is the one applied.
:class:`~timm_purify.PolarizedModel` runs the base model once without the polarizer, hands
the predicted labels to :meth:`set_condition`, then runs the polarized forward pass: **every
prediction costs two forward passes of the base model.**

Three kinds, all identities right after construction in eval mode (like the NPD polarizer)
and all supporting the four layouts (NCHW, NHWC, NLC tokens, NC pooled vectors):

``cnpd-r`` (:class:`ReplicaPolarizer`)
    K replicas of the NPD polarizer (channel-mixing matrix + batch-norm scale and shift),
    one per class; sample i goes through replica ``y_hat_i``. Vectorised: the per-sample
    matrices are gathered from a (K, C, C) weight and applied in one batched matmul, unless
    computing all K projections is smaller in memory (``K * positions < C``, e.g. pooled or
    1x1 features), in which case every replica is applied and each sample's own output
    picked (:func:`class_matmul`). Both give the same result; neither loops over classes
    nor synchronises with the device. Parameters: K times NPD's.

    The batch-norm *statistics* are shared by the replicas (one running mean and variance
    over every sample and position, as in NPD); only the matrix and the affine scale and
    shift are per class. Fully separate replicas would normalise each class's features with
    that class's own mean: conditioned on the predicted class, that subtracts precisely the
    evidence the head needs for it. Tried on a BadNets ResNet-18 (polarizer at the last stage
    output), per-class statistics raised the warm-up loss from 0.7 to 4.7 and dropped clean
    accuracy from 73.6% to 55.7% before training could win it back; they would also rest on
    ~B/K samples per class and batch, and on none for rarely predicted classes.

``cnpd-e`` (:class:`EmbeddingPolarizer`)
    One shared NPD polarizer whose output is modulated by a class embedding: an
    ``nn.Embedding(K, 2C)`` gives a per-class scale ``s`` and shift ``b``, and the output is
    ``npd(x) * (1 + s) + b`` (FiLM). The table starts at zero, hence the identity. Batch
    norm statistics are shared by all classes (the embedding is the class-specific part).
    Parameters: NPD's + 2KC.

``cnpd-a`` (:class:`AttentionPolarizer`)
    One shared NPD polarizer followed by class-guided channel attention, a squeeze-and-
    excitation block whose hidden code is the class embedding plus the squeezed features:
    ``a = 2 * sigmoid(W_up(relu(e[y_hat] + W_down(mean(npd(x))))))`` and the output is
    ``npd(x) * a``. ``W_up`` starts at zero, so ``a == 1`` (identity). The mean runs over
    every spatial position or token the polarizer sees. Parameters: NPD's + K*d + 2*C*d + d
    + C with ``d = attention_dim`` (default 32, at most C): it scales to many classes.

Build one with ``wrap_model(model, polarizer="cnpd-r", num_classes=model.num_classes)``;
:meth:`Polarizer.options` returns what :func:`~timm_purify.load_polarizer` needs to rebuild it.

Random initial values (the a-CNPD embedding and squeeze layer) come from a private generator
seeded with ``init_seed`` (saved with the polarizer), so building one neither depends on nor
changes torch's global random state and a purification is reproducible from its seed alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import Polarizer, register_polarizer
from .npd import NeuralPolarizer, identity_init_, match_identity_

__all__ = [
    "ConditionalPolarizer",
    "ReplicaPolarizer",
    "EmbeddingPolarizer",
    "AttentionPolarizer",
    "class_matmul",
]


def _per_channel(v: torch.Tensor, layout: str, ndim: int) -> torch.Tensor:
    """Reshape per-sample channel vectors (N, C) to broadcast over a tensor of ``layout``."""
    if layout == "NCHW":
        return v.reshape(v.shape[0], v.shape[1], *([1] * (ndim - 2)))
    return v.reshape(v.shape[0], *([1] * (ndim - 2)), v.shape[1])


def _channel_mean(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Mean over every position (pixel or token) of each channel: (N, C)."""
    if layout == "NCHW":
        return x.mean(dim=(2, 3))
    if layout == "NC":
        return x
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(dim=1)


def class_matmul(
    z: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    channels_first: bool = False,
    strategy: str | None = None,
) -> torch.Tensor:
    """Apply matrix ``weight[labels[n]]`` (from a (K, C, C) stack) to the channels of sample n.

    ``z`` is (N, P, C), or (N, C, P) with ``channels_first``; the result has the same layout
    and is contiguous. ``"gather"`` materialises the N per-sample matrices (N x C x C values)
    and runs one batched matmul; ``"all"`` applies all K matrices (N x K x P x C values) and
    picks each sample's result. ``None`` takes the one with fewer values. Both are exact and
    free of host synchronisation.
    """
    k, c_out, _ = weight.shape
    n = z.shape[0]
    p = z.shape[2] if channels_first else z.shape[1]
    if strategy is None:
        strategy = "all" if k * p < c_out else "gather"
    if strategy == "gather":
        w = weight[labels]
        out = torch.bmm(w, z) if channels_first else torch.bmm(z, w.transpose(1, 2))
        return out.contiguous()
    if strategy == "all":
        every = torch.einsum("ncp,kdc->nkdp" if channels_first else "npc,kdc->nkpd", z, weight)
        return every[torch.arange(n, device=z.device), labels].contiguous()
    raise ValueError(f"strategy must be 'gather', 'all' or None, got {strategy!r}")


class ConditionalPolarizer(Polarizer):
    """Base of the CNPD kinds: holds the per-sample condition set by the wrapper.

    The labels are kept only for the duration of one forward pass (the wrapper sets them
    and clears them afterwards); they are never saved.
    """

    conditional = True

    def __init__(
        self,
        channels: int,
        layout: str,
        *,
        prefix_tokens: int = 0,
        include_prefix: bool = True,
        num_classes: int | None = None,
    ):
        super().__init__(channels, layout, prefix_tokens=prefix_tokens, include_prefix=include_prefix)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(
                f"a {type(self).__name__} needs num_classes (the model's head size, an int >= 1), got {num_classes!r}; "
                "pass it through wrap_model(..., num_classes=model.num_classes)"
            )
        self.num_classes = num_classes
        self._labels: torch.Tensor | None = None

    def options(self) -> dict:
        return {"num_classes": self.num_classes}

    def set_condition(self, labels: torch.Tensor | None) -> None:
        if labels is not None and (labels.dim() != 1 or labels.dtype != torch.long):
            raise ValueError(
                f"condition labels must be a 1-D int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        self._labels = labels

    def condition(self, batch: int) -> torch.Tensor:
        """The labels for a batch of ``batch`` samples, or a clear error when none were set."""
        if self._labels is None:
            raise RuntimeError(
                f"the {self.kind!r} polarizer is class-conditional and got no labels: run it inside a "
                "PolarizedModel (wrap_model / load_polarizer), which predicts them, or call set_condition(labels) first"
            )
        if self._labels.shape[0] != batch:
            raise RuntimeError(
                f"{self._labels.shape[0]} condition labels were set for a batch of {batch} samples"
            )
        return self._labels


@register_polarizer("cnpd-r")
class ReplicaPolarizer(ConditionalPolarizer):
    """r-CNPD: one NPD polarizer (matrix + batch-norm affine) per class, picked by the predicted class.

    The normalisation statistics are shared by the replicas (see the module docstring).
    """

    def __init__(self, channels: int, layout: str, **options: Any):
        super().__init__(channels, layout, **options)  # validated by ConditionalPolarizer
        k = self.num_classes
        # one identity NPD replica, copied K times, keeps the identity convention in one place
        proj = nn.Linear(channels, channels, bias=False)
        template = nn.BatchNorm1d(channels)
        identity_init_(proj, template)
        self.weight = nn.Parameter(proj.weight.detach().unsqueeze(0).repeat(k, 1, 1))
        self.norm_weight = nn.Parameter(template.weight.detach().unsqueeze(0).repeat(k, 1))
        self.norm_bias = nn.Parameter(template.bias.detach().unsqueeze(0).repeat(k, 1))
        self.norm = nn.BatchNorm1d(channels, eps=template.eps, momentum=template.momentum, affine=False)
        with torch.no_grad():
            self.norm.running_var.copy_(template.running_var)

    def match_statistics_(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        match_identity_(self.norm, mean, var)
        with torch.no_grad():
            self.norm_weight.copy_((var + self.norm.eps).sqrt().expand_as(self.norm_weight))
            self.norm_bias.copy_(mean.expand_as(self.norm_bias))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        labels = self.condition(x.shape[0])
        gamma, beta = self.norm_weight[labels], self.norm_bias[labels]  # (N, C)
        if self.layout == "NCHW":  # channels first, (N, C, H*W): the output keeps NCHW strides
            y = class_matmul(x.flatten(2), self.weight, labels, channels_first=True)
            out = torch.addcmul(beta.unsqueeze(2), self.norm(y), gamma.unsqueeze(2))
            return out.reshape(x.shape)
        z = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, positions, C)
        y = class_matmul(z, self.weight, labels)
        normed = self.norm(y.reshape(-1, y.shape[-1])).reshape(y.shape)
        return torch.addcmul(beta.unsqueeze(1), normed, gamma.unsqueeze(1)).reshape(x.shape)


@register_polarizer("cnpd-e")
class EmbeddingPolarizer(ConditionalPolarizer):
    """e-CNPD: a shared NPD polarizer with a per-class scale and shift from an embedding table."""

    def __init__(self, channels: int, layout: str, **options: Any):
        super().__init__(channels, layout, **options)  # validated by ConditionalPolarizer
        self.core = NeuralPolarizer(channels, layout)
        self.film = nn.Embedding(self.num_classes, 2 * channels)
        nn.init.zeros_(self.film.weight)

    def match_statistics_(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.core.match_statistics_(mean, var)  # the class-wise scale and shift start at zero

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        labels = self.condition(x.shape[0])
        h = self.core.transform(x)
        scale, shift = self.film(labels).chunk(2, dim=1)
        return torch.addcmul(
            _per_channel(shift, self.layout, h.dim()), h, 1.0 + _per_channel(scale, self.layout, h.dim())
        )


@register_polarizer("cnpd-a")
class AttentionPolarizer(ConditionalPolarizer):
    """a-CNPD: a shared NPD polarizer followed by class-guided channel attention."""

    def __init__(
        self, channels: int, layout: str, *, attention_dim: int = 32, init_seed: int = 0, **options: Any
    ):
        super().__init__(channels, layout, **options)  # validated by ConditionalPolarizer
        if isinstance(attention_dim, bool) or not isinstance(attention_dim, int) or attention_dim < 1:
            raise ValueError(f"attention_dim must be an int >= 1, got {attention_dim!r}")
        self.attention_dim = min(attention_dim, channels)
        self.init_seed = int(init_seed)
        d = self.attention_dim
        gen = torch.Generator().manual_seed(self.init_seed)
        self.core = NeuralPolarizer(channels, layout)
        self.embed = nn.Embedding(self.num_classes, d)
        self.down = nn.Linear(channels, d)
        self.up = nn.Linear(d, channels)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, generator=gen)
            bound = 1.0 / math.sqrt(channels)  # nn.Linear's default range, drawn from ``gen``
            self.down.weight.uniform_(-bound, bound, generator=gen)
            self.down.bias.uniform_(-bound, bound, generator=gen)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def options(self) -> dict:
        return {**super().options(), "attention_dim": self.attention_dim, "init_seed": self.init_seed}

    def match_statistics_(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.core.match_statistics_(mean, var)  # the attention starts at exactly 1

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        labels = self.condition(x.shape[0])
        h = self.core.transform(x)
        code = F.relu(self.embed(labels) + self.down(_channel_mean(h, self.layout)))
        attention = 2.0 * torch.sigmoid(self.up(code))
        return h * _per_channel(attention, self.layout, h.dim())
