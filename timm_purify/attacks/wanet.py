"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible, smooth warp of the whole image.

As BackdoorBench runs it: a ``(2, k, k)`` noise grid drawn uniformly from [-1, 1] and divided by
its mean absolute value (``k = 4``) is upsampled bicubically (``align_corners=True``) to the image
size; the warp field is ``identity + s * noise / size`` (``s = 0.5``), clamped to [-1, 1], and the
image is resampled with ``grid_sample(..., align_corners=True)``. For square images ``size`` is
the height, as in the reference; for other shapes each axis is divided by its own length so the
warp keeps the same strength in pixels.

Training also uses *cross* (noise-mode) samples, ``cross_ratio = 2`` times the number of poisoned
rows: their warp field gets an extra random perturbation ``U(-1, 1) / size`` per pixel and they
keep their true labels, so the model learns that only the exact secret warp means "target".
BackdoorBench draws them afresh in every batch; :meth:`Attack.poison_detailed` draws them once,
for rows disjoint from the poisoned ones, and *replaces* those rows in place (no rows are
added), reporting them in ``PoisonResult.cross_mask``. With high poison rates the cross rows are
capped at the rows that are left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ._base import (
    Attack,
    AttackConfigError,
    _as_nested_tuple,
    register_attack,
    seeded_uniform,
    to_uint8,
)

__all__ = ["WaNet"]

_CHUNK = 512


@register_attack("wanet")
@dataclass(kw_only=True)
class WaNet(Attack):
    """Warping trigger. ``k``: noise grid side; ``s``: warp strength; ``cross_ratio``: noise-mode
    rows per poisoned row; ``noise_grid``: the (2, k, k) grid itself (``None``: drawn from the
    seed; :meth:`to_dict` always records it)."""

    k: int = 4
    s: float = 0.5
    cross_ratio: float = 2.0
    noise_grid: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.noise_grid is not None and not isinstance(self.noise_grid, tuple):
            try:
                self.noise_grid = _as_nested_tuple(self.noise_grid)
            except TypeError as err:
                raise AttackConfigError(
                    f"attack 'wanet': noise_grid must be a (2, k, k) nested list ({err})"
                ) from err
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            raise AttackConfigError(
                f"attack 'wanet': k (noise grid side) must be an integer >= 2, got {self.k!r}"
            )
        if not float(self.s) > 0:
            raise AttackConfigError(f"attack 'wanet': s (warp strength) must be positive, got {self.s}")
        if not float(self.cross_ratio) >= 0:
            raise AttackConfigError(
                f"attack 'wanet': cross_ratio must be >= 0 (0 disables noise-mode rows), got {self.cross_ratio}"
            )
        if self.noise_grid is not None:
            try:
                grid = torch.tensor(self.noise_grid, dtype=torch.float64)
            except (TypeError, ValueError) as err:
                raise AttackConfigError(
                    f"attack 'wanet': noise_grid is not a regular nested list ({err})"
                ) from err
            if tuple(grid.shape) != (2, self.k, self.k) or not torch.isfinite(grid).all():
                raise AttackConfigError(
                    f"attack 'wanet': noise_grid must hold finite numbers of shape (2, {self.k}, {self.k}), "
                    f"got shape {tuple(grid.shape)}; leave it out to draw it from the seed"
                )

    def _seeded_content(self) -> dict[str, torch.Tensor]:
        if self.noise_grid is not None:
            return {"noise_grid": torch.tensor(self.noise_grid, dtype=torch.float64)}
        count = 2 * self.k * self.k
        values = [2.0 * u - 1.0 for u in seeded_uniform(self.seed, count, stream="wanet")]
        mean_abs = math.fsum(abs(v) for v in values) / count
        grid = torch.tensor([v / mean_abs for v in values], dtype=torch.float64)
        return {"noise_grid": grid.view(2, self.k, self.k)}

    def to_dict(self) -> dict[str, Any]:
        spec = super().to_dict()
        spec["noise_grid"] = self._content()["noise_grid"].tolist()
        return spec

    def _build_trigger(self, channels: int, height: int, width: int) -> dict[str, torch.Tensor]:
        noise = self._content()["noise_grid"][None]
        noise = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
        noise = noise[0].permute(1, 2, 0)  # (H, W, 2): x (column) offset first, as grid_sample wants
        rows = torch.linspace(-1.0, 1.0, height, dtype=torch.float64)
        cols = torch.linspace(-1.0, 1.0, width, dtype=torch.float64)
        grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
        identity = torch.stack((grid_x, grid_y), dim=-1)
        scale = torch.tensor([width, height], dtype=torch.float64)
        warp = (identity + float(self.s) * noise / scale).clamp(-1.0, 1.0)
        return {"grid": warp.float()[None], "scale": scale.float()}

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        grid = grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _apply(self, x: torch.Tensor, trigger: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._warp(x, trigger["grid"])

    def apply_noise_mode(self, x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """WaNet's noise-mode warp: the secret warp plus fresh per-pixel noise for each image.

        These are the "cross" images that keep their true labels during training. The noise is
        drawn on the CPU from ``generator``, so results do not depend on the device.
        """
        if not x.is_floating_point() or x.ndim != 4:
            raise AttackConfigError("apply_noise_mode takes float images of shape (N, C, H, W) in [0, 1]")
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        n, c, h, w = work.shape
        trigger = self._trigger(c, h, w, work.device, work.dtype)
        perturb = torch.rand(n, h, w, 2, generator=generator) * 2.0 - 1.0
        perturb = perturb.to(device=work.device, dtype=work.dtype) / trigger["scale"]
        grid = (trigger["grid"] + perturb).clamp(-1.0, 1.0)
        return self._warp(work, grid).clamp(0.0, 1.0).to(x.dtype)

    def _add_cross_samples(self, data, x, remaining, num_poisoned, generator) -> torch.Tensor:
        count = min(round(float(self.cross_ratio) * num_poisoned), len(remaining))
        cross_idx = remaining[:count]
        for start in range(0, count, _CHUNK):
            rows = cross_idx[start : start + _CHUNK].to(x.device)
            images = data.x[rows].float().div_(255.0)
            x[rows] = to_uint8(self.apply_noise_mode(images, generator=generator))
        return cross_idx
