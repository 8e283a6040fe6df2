"""Universal reach, the scan's second stage (timm_purify.detection.reach): the projection that
lets a perturbation become a patch, and a planted trapdoor class found while the others stay shut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timm_purify.detection.reach import project_l1_ball, universal_reach, universal_towards


def test_l1_projection_is_the_nearest_point_of_the_ball():
    delta = torch.tensor([[3.0, -1.0, 0.5, 0.2]])
    # soft thresholding at theta = 1: (2, 0, 0, 0) keeps the sign and zeroes the small entries
    assert torch.allclose(project_l1_ball(delta, 2.0), torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    inside = torch.tensor([[0.5, -0.5]])
    assert torch.equal(project_l1_ball(inside, 2.0), inside)
    big = torch.randn(1, 3, 8, 8)
    assert float(project_l1_ball(big, 5.0).abs().sum()) == pytest.approx(5.0, rel=1e-4)


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


@pytest.mark.parametrize("norm, rho", [("l1", 0.5), ("l2", 0.5)])
def test_the_trapdoor_class_stands_out_and_the_others_stay_shut(norm, rho):
    model, x, y = _trapdoor_model()
    assert torch.equal(model(x).argmax(1), y)
    half = (torch.arange(len(y)) // 10) % 2 == 0  # four images of every class on each side
    # rho is given at 3x32x32 and scaled to the 16 values here: 0.5 -> about 0.04 (L2) / 0.003 (L1)
    rho_at_32 = rho * (3 * 32 * 32 / 16) ** (0.5 if norm == "l2" else 1.0)
    out = universal_reach(
        model,
        (x[half], y[half]),
        (x[~half], y[~half]),
        10,
        rho=rho_at_32,
        norm=norm,
        steps=20,
        batch_size=16,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.rho_scaled == pytest.approx(rho)
    assert out.suspected_target == 2
    assert out.reach[2] == pytest.approx(1.0)
    # half a pixel of brightness lifts any other class to 2.5 against its rival's 5: no reach
    assert max(r for k, r in enumerate(out.reach) if k != 2) == 0.0
    assert out.score == pytest.approx(1.0)
    assert out.num_search == out.num_held_out == 40
    assert len(out.matrix) == 10 and out.matrix[2][5] == pytest.approx(1.0)


def test_the_l1_budget_is_spent_on_the_trigger_first_and_never_on_unread_pixels():
    """Soft thresholding zeroes what does not help: the largest entry is the trigger pixel, and
    pixels 11-15, which no class reads, stay exactly 0 (an L2 step would smear over them)."""
    model, x, _ = _trapdoor_model()
    delta = universal_towards(
        model, x, 2, rho=1.0, steps=20, batch_size=16, generator=torch.Generator().manual_seed(0), norm="l1"
    ).flatten()
    assert float(delta.abs().sum()) == pytest.approx(1.0, rel=1e-4)
    assert int(delta.abs().argmax()) == 0 and float(delta[0]) > 0
    assert torch.equal(delta[11:], torch.zeros(5))


def test_unknown_norm_is_refused():
    model, x, y = _trapdoor_model()
    with pytest.raises(ValueError, match="norm must be one of"):
        universal_reach(model, (x, y), (x, y), 10, norm="linf", generator=torch.Generator())
