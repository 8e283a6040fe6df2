"""``benchmarks/calibrate_spread.py``: the rule that fits the spread reading's threshold and decides
for which normalisation family it runs (the shipped ``spread`` section of calibration.json)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cal(benchmark_script):
    return benchmark_script("calibrate_spread")


def _row(attack, score, *, mode=None, verdict="clean", pattern=None, found=None, target=None, rho=2.0):
    return {
        "arch": "convnext_atto",
        "attack": attack,
        "mode": mode if attack is not None else None,
        "target": target,
        "verdict": verdict,
        "pattern": pattern,
        "suspected_target": found,
        "spread_rho": rho,
        "spread_score": score,
    }


def test_spread_adds_the_all_to_all_backdoor_the_earlier_stages_missed(cal):
    rows = [
        _row(None, 0.0),
        _row(None, 0.04),
        _row("badnets", 0.83, mode="all-to-all"),  # missed before, found by spread
        # found before (by BAN or reach): spread's score does not matter
        _row(
            "badnets", 0.0, mode="all-to-one", verdict="backdoored", pattern="all-to-one", found=0, target=0
        ),
        _row("sig", 0.0, mode="all-to-one", target=0),  # missed by every stage
    ]
    fit = cal.fit_family(rows, [2.0])
    best = fit["chosen"]
    assert fit["enabled"] and best["fit"]["threshold"] == pytest.approx((0.04 + 0.83) / 2)
    assert (best["errors"], best["errors_before"]) == (1, 2)
    after = best["reliability"]
    assert (after["detected"], after["false_positives"], after["targets_correct"]) == (2, 0, 1)


def test_a_flagged_all_to_one_backdoor_gains_no_target(cal):
    """An all-to-one backdoor that only the spread reading flags is detected but its target stays
    unknown (an all-to-all verdict): one error either way, so the reading is not enabled for it."""
    rows = [_row(None, 0.1), _row("sig", 0.9, mode="all-to-one", target=0)]
    fit = cal.fit_family(rows, [2.0])
    assert fit["chosen"]["errors"] == fit["chosen"]["errors_before"] == 1
    assert not fit["enabled"]


def test_no_candidate_where_no_missed_backdoor_clears_the_clean_models(cal):
    rows = [_row(None, 0.5), _row("badnets", 0.2, mode="all-to-all")]
    assert cal.fit_family(rows, [2.0]) == {
        "enabled": False,
        "reason": "at no budget did a backdoor the earlier stages missed score above every clean model",
        "trials": [],
    }
