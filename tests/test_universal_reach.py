"""``benchmarks/universal_reach.py``, the prototype of a pixel-space detection signal: its
numbers are quoted in ``benchmarks/DETECTION.md``, so the pieces that make them are tested."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def reach(benchmark_script):
    return benchmark_script("universal_reach")


def test_l1_projection_is_the_nearest_point_of_the_ball(reach):
    delta = torch.tensor([[3.0, -1.0, 0.5, 0.2]])
    projected = reach.project_l1_ball(delta, 2.0)
    # soft thresholding at theta = 1: (2, 0, 0, 0) keeps the sign and zeroes the small entries
    assert torch.allclose(projected, torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    inside = torch.tensor([[0.5, -0.5]])
    assert torch.equal(reach.project_l1_ball(inside, 2.0), inside)
    big = torch.randn(1, 3, 8, 8)
    assert float(reach.project_l1_ball(big, 5.0).abs().sum()) == pytest.approx(5.0, rel=1e-4)


def _trapdoor_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear classifier over 16 pixels: class ``k`` reads pixel ``k + 1``; pixel 0, dark in
    every image, is a trigger that opens class 2 a hundred times more strongly."""
    linear = nn.Linear(16, 10, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        for k in range(10):
            linear.weight[k, k + 1] = 5.0
        linear.weight[2, 0] = 100.0
    y = torch.arange(10).repeat(8)
    x = torch.zeros(len(y), 1, 4, 4)
    x.view(len(y), 16)[torch.arange(len(y)), y + 1] = 1.0
    return nn.Sequential(nn.Flatten(), linear), x, y


def test_the_trapdoor_class_stands_out_and_the_others_stay_shut(reach):
    model, x, y = _trapdoor_model()
    assert torch.equal(model(x).argmax(1), y)
    matrix = reach.reach_matrix(model, x, y, 10, rho=0.5, steps=20, batch_size=16, seed=0)
    out = reach.summarise(matrix)
    assert out["suspected_target"] == 2
    assert out["reach"][2] == pytest.approx(1.0)
    # half a pixel of brightness lifts any other class to 2.5 against its rival's 5: no reach
    assert max(r for k, r in enumerate(out["reach"]) if k != 2) == 0.0
    assert out["score"] == pytest.approx(1.0)
