"""``benchmarks/blend_spread.py``: a candidate all-to-all reading for blended triggers (one
whole-image pattern blended into every image), measured beside the scan, not part of it."""

from __future__ import annotations

import pytest
import torch
from test_reach import _PatchShift, _rows  # the window reading's toy model and images


@pytest.fixture(scope="module")
def bs(benchmark_script):
    return benchmark_script("blend_spread")


class _BlendShift(_PatchShift):
    """The window reading's toy all-to-all model with a blend for the trigger: a blue cast over
    the whole image (blue above red) sends every class ``k`` to ``k + 1``."""

    def strength(self, x: torch.Tensor) -> torch.Tensor:
        return 200 * (x[:, 2] - x[:, 0]).mean((1, 2))[:, None]


def test_a_blended_all_to_all_trigger_reads_high_and_a_clean_model_low(bs):
    search, held = _rows(4), _rows(3)
    options = dict(alpha=0.1, steps=40, batch_size=20, lr=0.1)
    backdoored = bs.blend_reading(
        _BlendShift(True), search, held, 10, **options, generator=torch.Generator().manual_seed(0)
    )
    assert backdoored["score"] > 0.8 and backdoored["moved"] > 0.9
    assert backdoored["destinations"] == [(k + 1) % 10 for k in range(10)]
    clean = bs.blend_reading(
        _BlendShift(False), search, held, 10, **options, generator=torch.Generator().manual_seed(0)
    )
    # a tenth of a pattern cannot outshine a class's own row: nothing moves
    assert clean["score"] < 0.1 and clean["moved"] < 0.1


def test_alphas_are_blend_weights(bs):
    assert bs.parse_args(["m", "--out", "o", "--alphas", "0.05,0.1"]).alpha_list == [0.05, 0.1]
    for bad in ("0", "1", "0.1,x", ""):
        with pytest.raises(SystemExit, match="--alphas"):
            bs.parse_args(["m", "--out", "o", "--alphas", bad])
