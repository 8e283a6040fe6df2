"""``benchmarks/window_spread.py``: the script that measures the window shape of the spread reading
(``timm_purify.detection.reach.window_spread``, tested in ``test_reach.py``) alone, at any settings."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ws(benchmark_script):
    return benchmark_script("window_spread")


def test_the_grid_must_cover_the_image(ws):
    # a stride longer than the window would leave stripes no window sees
    with pytest.raises(SystemExit, match="so the windows cover the image"):
        ws.parse_args(["m", "--out", "o", "--window", "6", "--stride", "8"])
    args = ws.parse_args(["m", "--out", "o", "--steps", "30", "--batch-size", "32"])
    assert (args.window, args.stride, args.steps, args.batch_size) == (8, 8, 30, 32)
