"""``benchmarks/window_spread.py``: the windowed shared-pattern reading measured for all-to-all patch triggers."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def ws(benchmark_script):
    return benchmark_script("window_spread")


class _Toy(nn.Module):
    """Class ``k`` is a bright left half of row ``k``; with ``trigger``, a bright bottom-right 8x8
    square sends every class to ``k + 1`` (an all-to-all patch backdoor)."""

    def __init__(self, trigger: bool):
        super().__init__()
        self.trigger = trigger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clean = 10 * x[:, 0, :10, :16].mean(-1)
        if not self.trigger:
            return clean
        t = x[:, :, 24:, 24:].mean((1, 2, 3))[:, None]
        return clean + 3 * t * clean.roll(1, dims=1)


def _images(n_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(10).repeat_interleave(n_per_class)
    x = torch.zeros(len(y), 3, 32, 32)
    x[torch.arange(len(y)), :, y, :16] = 1.0
    return x, y


def test_every_pixel_lies_in_a_window(ws):
    corners = ws.windows(32, 8, 8)
    assert corners[0] == (0, 0) and corners[-1] == (24, 24) and len(corners) == 16
    covered = torch.zeros(32, 32, dtype=torch.bool)
    for r, c in ws.windows(32, 6, 4):  # a side the stride does not divide: the last one sits flush
        covered[r : r + 6, c : c + 6] = True
    assert covered.all()
    # a stride longer than the window would leave stripes no window sees
    with pytest.raises(SystemExit, match="so the windows cover the image"):
        ws.parse_args(["m", "--out", "o", "--window", "6", "--stride", "8"])


def test_the_spread_score_counts_classes_moved_apart_not_to_one_sink(ws):
    shift = torch.eye(10, dtype=torch.long).roll(1, dims=1) * 5  # every class to the next
    score, _, where = ws.spread_of(shift)
    assert score == pytest.approx(0.9) and where == [(k + 1) % 10 for k in range(10)]
    sink = torch.zeros(10, 10, dtype=torch.long)
    sink[:, 3] = 5  # every class to class 3
    assert ws.spread_of(sink)[:2] == (pytest.approx(0.0), 3)


def test_the_trigger_window_recovers_an_all_to_all_patch_and_a_clean_model_reads_low(ws):
    args = argparse.Namespace(window=8, stride=8, steps=40, lr=0.1, batch_size=20)
    search, held = _images(4), _images(3)
    backdoored = ws.window_spread(_Toy(True), search, held, 10, args, torch.Generator().manual_seed(0))
    assert backdoored["best"]["window"] == [24, 24, 8]
    assert backdoored["score"] > 0.8
    assert backdoored["best"]["destinations"] == [(k + 1) % 10 for k in range(10)]
    clean = ws.window_spread(_Toy(False), search, held, 10, args, torch.Generator().manual_seed(0))
    assert clean["score"] < backdoored["score"] - 0.3
