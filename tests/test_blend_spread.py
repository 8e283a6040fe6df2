"""``benchmarks/blend_spread.py``: the blend reading measured at several blend weights, outside
the scan (the reading itself is tested in ``test_reach.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def bs(benchmark_script):
    return benchmark_script("blend_spread")


def test_alphas_are_blend_weights(bs):
    assert bs.parse_args(["m", "--out", "o", "--alphas", "0.05,0.1"]).alpha_list == [0.05, 0.1]
    for bad in ("0", "1", "0.1,x", ""):
        with pytest.raises(SystemExit, match="--alphas"):
            bs.parse_args(["m", "--out", "o", "--alphas", bad])
