"""Universal reach, the scan's second stage (timm_purify.detection.reach): the projection that
lets a perturbation become a patch, and a planted trapdoor class found while the others stay shut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from timm_purify.defenses._common import grid_windows
from timm_purify.detection.reach import (
    blend_spread,
    confusion_matrix,
    project_l1_ball,
    spread_shares,
    universal_reach,
    universal_spread,
    universal_towards,
    window_spread,
)


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


# ------------------------------------------------------------------ window spread


class _PatchShift(nn.Module):
    """Class ``k`` is a bright left half of row ``k``; with ``trigger``, a bright bottom-right 8x8
    square sends every class to ``k + 1`` (an all-to-all patch backdoor)."""

    def __init__(self, trigger: bool):
        super().__init__()
        self.trigger = trigger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clean = 10 * x[:, 0, :10, :16].mean(-1)
        if not self.trigger:
            return clean
        return clean + self.strength(x) * clean.roll(1, dims=1)

    def strength(self, x: torch.Tensor) -> torch.Tensor:
        """How strongly each image carries the trigger (here: the bottom-right square's brightness)."""
        return 3 * x[:, :, 24:, 24:].mean((1, 2, 3))[:, None]


def _rows(n_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(10).repeat_interleave(n_per_class)
    x = torch.zeros(len(y), 3, 32, 32)
    x[torch.arange(len(y)), :, y, :16] = 1.0
    return x, y


def test_every_pixel_lies_in_a_window():
    corners = grid_windows(32, 8, 8)
    assert corners[0] == (0, 0) and corners[-1] == (24, 24) and len(corners) == 16
    covered = torch.zeros(32, 32, dtype=torch.bool)
    for r, c in grid_windows(32, 6, 4):  # a side the stride does not divide: the last one sits flush
        covered[r : r + 6, c : c + 6] = True
    assert covered.all()


def test_spread_shares_count_classes_moved_apart_not_to_one_sink():
    y = torch.arange(10).repeat_interleave(5)
    shift = confusion_matrix(y, (y + 1) % 10, 10)  # every class to the next
    top, moved, spread = spread_shares(shift)
    assert moved.tolist() == [1.0] * 10 and float(spread.mean()) == pytest.approx(0.9)
    sink = confusion_matrix(y, torch.full_like(y, 3), 10)  # every class to class 3
    top, moved, spread = spread_shares(sink)
    assert top == 3 and float(spread.sum()) == 0.0


class _BlendShift(_PatchShift):
    """The window reading's toy all-to-all model with a blend for the trigger: a blue cast over
    the whole image (blue above red) sends every class ``k`` to ``k + 1``."""

    def strength(self, x: torch.Tensor) -> torch.Tensor:
        return 200 * (x[:, 2] - x[:, 0]).mean((1, 2))[:, None]


def test_a_blended_all_to_all_trigger_reads_high_and_a_clean_model_low():
    """The blend reading fits one pattern blended into every image: a blended all-to-all trigger
    moves every class to the next; where the model has none, a tenth of a pattern cannot outshine
    a class's own row, so nothing moves."""
    search, held = _rows(4), _rows(3)
    options = dict(alpha=0.1, steps=40, batch_size=20, lr=0.1)
    backdoored = blend_spread(
        _BlendShift(True), search, held, 10, **options, generator=torch.Generator().manual_seed(0)
    )
    assert backdoored.score > 0.8 and min(backdoored.moved) > 0.9
    assert backdoored.destinations == [(k + 1) % 10 for k in range(10)]
    assert (backdoored.alpha, backdoored.num_search, backdoored.num_held_out) == (0.1, 40, 30)
    assert sum(map(sum, backdoored.confusion)) == 30
    clean = blend_spread(
        _BlendShift(False), search, held, 10, **options, generator=torch.Generator().manual_seed(0)
    )
    assert clean.score < 0.1 and max(clean.moved) < 0.1
    # the patch model's trigger is a bright square: a blend cannot light it, so it reads low too
    patch = blend_spread(
        _PatchShift(True), search, held, 10, **options, generator=torch.Generator().manual_seed(0)
    )
    assert patch.score < backdoored.score - 0.5


def test_the_trigger_window_recovers_an_all_to_all_patch_and_a_clean_model_reads_low():
    search, held = _rows(4), _rows(3)
    options = dict(window=8, steps=40, batch_size=20)
    backdoored = window_spread(
        _PatchShift(True), search, held, 10, **options, generator=torch.Generator().manual_seed(0)
    )
    assert backdoored.corner == [24, 24] and backdoored.side == 8 and backdoored.stride == 8
    assert backdoored.score > 0.8 and backdoored.second_score < backdoored.score
    assert backdoored.destinations == [(k + 1) % 10 for k in range(10)]
    assert (
        len(backdoored.window_scores) == 16
        and max(w[2] for w in backdoored.window_scores) == backdoored.score
    )
    assert (backdoored.num_search, backdoored.num_held_out) == (40, 30)
    clean = window_spread(
        _PatchShift(False), search, held, 10, **options, generator=torch.Generator().manual_seed(0)
    )
    assert clean.score < backdoored.score - 0.3
    # the window and grid scale with the image: at 64x64 an 8-pixel window is 16 pixels
    big = [(torch.nn.functional.interpolate(x, scale_factor=2.0), y) for x, y in (search, held)]
    scaled = window_spread(
        nn.Sequential(nn.AvgPool2d(2), _PatchShift(True)),
        *big,
        10,
        **options,
        generator=torch.Generator().manual_seed(0),
    )
    assert scaled.side == 16 and scaled.corner == [48, 48] and scaled.score > 0.8


@pytest.mark.parametrize("trigger", [True, False])
def test_the_l2_spread_reading_keeps_its_best_restart_and_its_first_fit_is_the_single_one(trigger):
    """``restarts`` fits that many perturbations on the generator's next batches and keeps the
    highest score; the first draws exactly what a single fit draws, so ``restarts=1`` is the
    reading as it was calibrated before restarts, and a restarted score is never below it."""
    search, held = _rows(4), _rows(3)
    model = _PatchShift(trigger)

    def read(restarts: int):
        return universal_spread(
            model, search, held, 10, rho=8.0, steps=5, batch_size=8, restarts=restarts,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip

    single, restarted = read(1), read(4)
    assert single.restart_scores == [single.score] and single.restarts == 1
    assert restarted.restarts == 4 and len(restarted.restart_scores) == 4
    assert restarted.restart_scores[0] == single.score
    assert restarted.score == max(restarted.restart_scores) >= single.score
    with pytest.raises(ValueError, match="restarts must be an int >= 1"):
        read(0)
