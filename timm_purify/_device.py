"""Device placement through accelerate, without creating an ``Accelerator`` behind the user's back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["get_device", "module_device", "placed_on"]


def get_device(accelerator=None, device: str | torch.device | None = None) -> torch.device:
    """The device to run on: an explicit ``device``, else the caller's ``Accelerator``, else
    accelerate's process-wide ``PartialState`` (CUDA when available, otherwise CPU)."""
    if device is not None:
        return torch.device(device)
    if accelerator is not None:
        return accelerator.device
    from accelerate import PartialState

    return PartialState().device


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first parameter or buffer (CPU when it has none)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def placed_on(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Run ``module`` on ``device`` for the ``with`` block, then put it back where it was.

    Functions that only read a caller's model (evaluation) must not leave it moved: on a GPU
    machine accelerate's default is CUDA, and a CPU model silently moved there breaks the
    caller's next ``model(x)`` with CPU inputs.
    """
    home = module_device(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
