"""``benchmarks/calibrate_reach.py``: the rule that fits the reach stage's threshold and decides
for which normalisation family it runs (the shipped ``reach`` section of calibration.json)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cal(benchmark_script):
    return benchmark_script("calibrate_reach")


def _row(attack, score, *, ban="clean", ban_target=None, reach_target=0, target=None, rho=1.0):
    return {
        "arch": "convnext_atto",
        "attack": attack,
        "mode": None if attack is None else "all-to-one",
        "target": target,
        "ban_verdict": ban,
        "ban_target": ban_target,
        "reach_norm": "l2",
        "reach_rho": rho,
        "reach_score": score,
        "reach_target": reach_target,
    }


def test_every_candidate_cut_sits_above_every_clean_model(cal):
    cuts = cal.threshold_candidates([0.05, 0.1], [0.08, 0.5, 0.9, 0.5])
    assert [c["threshold"] for c in cuts] == pytest.approx([0.3, 0.5])
    assert [c["margin"] for c in cuts] == pytest.approx([0.2, 0.4])
    # no backdoor above the clean models: the stage could only add false alarms
    assert cal.threshold_candidates([0.05, 0.6], [0.2, 0.5]) == []


def test_among_equally_good_cuts_the_widest_margin_wins(cal):
    """A backdoor BAN missed scores just above the clean models but with the wrong target:
    catching it gains nothing (a wrong target is an error too), so the cut keeps its distance."""
    rows = [
        _row(None, 0.10),
        _row("sig", 0.13, reach_target=6, target=5),
        _row("badnets", 0.88, reach_target=0, target=0),
    ]
    best = cal.fit_family(rows, [("l2", 1.0)])["chosen"]
    assert best["fit"]["threshold"] == pytest.approx((0.10 + 0.88) / 2)
    assert (best["errors"], best["errors_ban_alone"]) == (1, 2)


def test_reach_is_enabled_only_where_it_beats_ban_alone(cal):
    rows = [
        _row(None, 0.02),
        _row(None, 0.05),
        # BAN finds this one, with the wrong target; reach names the right one
        _row("badnets", 0.9, ban="backdoored", ban_target=4, reach_target=3, target=3),
        # BAN misses these; reach finds the first, not the second
        _row("blended", 0.8, reach_target=0, target=0),
        _row("sig", 0.03, reach_target=5, target=1),
    ]
    fit = cal.fit_family(rows, [("l2", 1.0)])
    assert fit["enabled"]
    best = fit["chosen"]
    # BAN alone: wrong target + two misses = 3; with reach: one miss, and reach's target where both fire
    assert (best["errors_ban_alone"], best["errors"], best["target_when_both"]) == (3, 1, "reach")
    assert best["fit"]["threshold"] == pytest.approx((0.05 + 0.8) / 2)
    rel = best["reliability"]
    assert (rel["detected"], rel["false_positives"], rel["targets_correct"]) == (2, 0, 2)

    # where reach adds nothing BAN does not already find, it stays off
    only_ban = [
        rows[0],
        rows[1],
        _row("badnets", 0.9, ban="backdoored", ban_target=3, reach_target=3, target=3),
    ]
    assert not cal.fit_family(only_ban, [("l2", 1.0)])["enabled"]
    # and a family whose backdoors all score inside the clean range gets no stage at all
    assert not cal.fit_family([rows[0], _row(None, 0.95), rows[3]], [("l2", 1.0)])["enabled"]


def test_budgets_parse_and_reject_nonsense(cal):
    assert cal.parse_budgets("l1:6,l2:1") == [("l1", 6.0), ("l2", 1.0)]
    with pytest.raises(SystemExit, match="NORM:RHO"):
        cal.parse_budgets("linf:3")
