"""Device placement: reading a caller's model never leaves it moved.

On a GPU machine accelerate's default device is CUDA; evaluation used to move the caller's
CPU model there for good, so their next ``model(x)`` with CPU inputs failed. CI has no GPU,
so the contract is checked with a module that records where it is sent.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timm_purify._device import module_device, placed_on


class _Recorder(nn.Linear):
    """A layer that records ``.to(device)`` calls instead of moving (no second device on CI)."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.sent: list[torch.device] = []

    def to(self, device):  # type: ignore[override]
        self.sent.append(torch.device(device))
        return self


def test_placed_on_goes_back_home_even_after_an_error():
    layer = _Recorder()
    with placed_on(layer, torch.device("cuda")):
        pass
    assert layer.sent == [torch.device("cuda"), torch.device("cpu")]
    layer.sent.clear()
    with pytest.raises(RuntimeError), placed_on(layer, torch.device("cuda")):
        raise RuntimeError("evaluation failed")
    assert layer.sent == [torch.device("cuda"), torch.device("cpu")]


def test_module_device_reads_parameters_then_buffers():
    assert module_device(nn.Linear(2, 2).to("meta")) == torch.device("meta")
    buffers_only = nn.BatchNorm1d(2, affine=False).to("meta")
    assert module_device(buffers_only) == torch.device("meta")
    assert module_device(nn.ReLU()) == torch.device("cpu")
