"""Device placement through accelerate, without creating an ``Accelerator`` behind the user's back."""

from __future__ import annotations

import torch

__all__ = ["get_device"]


def get_device(accelerator=None, device: str | torch.device | None = None) -> torch.device:
    """The device to run on: an explicit ``device``, else the caller's ``Accelerator``, else
    accelerate's process-wide ``PartialState`` (CUDA when available, otherwise CPU)."""
    if device is not None:
        return torch.device(device)
    if accelerator is not None:
        return accelerator.device
    from accelerate import PartialState

    return PartialState().device
