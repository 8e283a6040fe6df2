"""``benchmarks/calibrate_reach.py``: the rule that fits the reach stage's threshold and decides
for which normalisation family it runs (the shipped ``reach`` section of calibration.json)."""

from __future__ import annotations

import json

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


def _scored(attack, a2o, reach, *, a2a=0.0, target=None, ban_target=None):
    """A stored scan with BAN's statistics (BAN names ``ban_target``, else the true target, else 0)."""
    named = ban_target if ban_target is not None else target if target is not None else 0
    stats = {"all_to_one": a2o, "target": named, "target_masked": named, "all_to_all": a2a}
    return {**_row(attack, reach, reach_target=target, target=target), "ban_statistics": stats}


def test_refit_lifts_bans_cut_where_reach_covers_what_it_gave_up(cal):
    """BAN's cuts, fitted for BAN alone, flag a clean model to catch a blended backdoor that
    reach finds anyway: refitted with reach, the all-to-one cut rises above the clean model, and
    an all-to-all cut that only ever flags clean models stops deciding."""
    rows = [
        _scored(None, 0.20, 0.10),
        _scored(None, 0.45, 0.20),
        _scored(None, 0.10, 0.05, a2a=0.25),  # clean, but above the shipped all-to-all cut
        _scored("badnets", 0.60, 0.05, target=3),  # only BAN sees it
        _scored("blended", 0.40, 0.90, target=1),  # both do
    ]
    shipped = cal.BanCuts(all_to_one=0.30, all_to_all=0.15, target_source="noisy", eps=0.75)
    fit = cal.refit_family({0.75: rows}, [("l2", 1.0)], shipped)
    best = fit["chosen"]
    assert best["all_to_one_threshold"] == pytest.approx((0.45 + 0.60) / 2)
    assert best["all_to_all_threshold"] is None
    # reach's cut: midway between the highest clean score and the blended backdoor's
    assert fit["enabled"] and best["fit"]["threshold"] == pytest.approx((0.20 + 0.90) / 2)
    rel = best["reliability"]
    assert (best["errors"], rel["false_positives"], rel["detected"], rel["targets_correct"]) == (0, 0, 2, 2)
    # BAN alone at these cuts misses the blended backdoor; the best BAN cuts without reach also
    # cost an error (a miss rather than a false alarm); the shipped cuts, two false alarms
    assert (best["errors_ban_alone"], best["errors_best_ban_alone"]) == (1, 1)
    assert fit["without_reach"]["errors"] == 1 and fit["without_reach"]["reliability"]["false_positives"] == 0
    assert fit["before_refit"]["errors"] == 2 and fit["before_refit"]["reach"] is None


def test_refit_without_a_use_for_reach_keeps_ban_alone(cal):
    """No backdoor reaches above the clean models: the refit moves BAN's cut and leaves reach off."""
    rows = [_scored(None, 0.10, 0.50), _scored(None, 0.20, 0.60), _scored("badnets", 0.60, 0.30, target=3)]
    fit = cal.refit_family({0.75: rows}, [("l2", 1.0)], cal.BanCuts(0.15, 0.1, "noisy", 0.75))
    best = fit["chosen"]
    assert not fit["enabled"] and best["fit"] is None
    assert best["all_to_one_threshold"] == pytest.approx(0.40) and best["errors"] == 0
    assert fit["before_refit"]["errors"] == 1  # the shipped cut flags the clean model at 0.20


def test_an_all_to_all_cut_never_buys_detections_with_a_clean_model(cal):
    """Two all-to-all backdoors read above a clean model's all-to-all score, one below: the cut
    that catches both (and flags the clean model, one error fewer) is not tried; the one above
    every clean model is."""
    a2a = [
        {**_scored(None, 0.10, 0.10, a2a=0.05)},
        {**_scored(None, 0.12, 0.10, a2a=0.09)},
        {**_scored("badnets", 0.05, 0.10, a2a=0.08), "mode": "all-to-all"},
        {**_scored("badnets", 0.05, 0.10, a2a=0.085), "mode": "all-to-all"},
        {**_scored("badnets", 0.05, 0.10, a2a=0.20), "mode": "all-to-all"},
        _scored("badnets", 0.60, 0.05, target=3),
    ]
    best = cal.refit_family({0.3: a2a}, [("l2", 1.0)], cal.BanCuts(0.3, None, "noisy", 0.3))["chosen"]
    assert best["all_to_all_threshold"] == pytest.approx((0.09 + 0.20) / 2)
    assert best["reliability"]["false_positives"] == 0 and best["errors"] == 2


def test_refit_keeps_the_noise_budget_whose_cuts_make_the_fewest_errors(cal):
    """At eps 0.75 a clean model scores above a BadNets backdoor (no cut separates them, and
    reach does not see the patch); at 0.5 the same models separate: the refit ships 0.5, and
    says what calibrate_scan.py's budget and cuts did on the same models."""
    at_075 = [
        _scored(None, 0.48, 0.10),
        _scored(None, 0.20, 0.12),
        _scored("badnets", 0.42, 0.05, target=3),
        _scored("blended", 0.30, 0.90, target=1),
    ]
    at_05 = [
        {**r, "ban_statistics": {**r["ban_statistics"], "all_to_one": a2o}}
        for r, a2o in zip(at_075, [0.25, 0.10, 0.41, 0.20], strict=True)
    ]
    shipped = cal.BanCuts(0.37, None, "noisy", 0.75)
    fit = cal.refit_family({0.75: at_075, 0.5: at_05}, [("l2", 1.0)], shipped)
    best = fit["chosen"]
    assert best["eps"] == 0.5 and best["errors"] == 0
    assert best["all_to_one_threshold"] == pytest.approx((0.25 + 0.41) / 2)
    assert fit["by_eps"]["0.75"]["errors"] == 1 and fit["by_eps"]["0.5"]["errors"] == 0
    assert fit["before_refit"]["eps"] == 0.75 and fit["before_refit"]["errors"] == 1
    assert "eps 0.5" in fit["reason"]
    # where another budget does no better, calibrate_scan.py's stays
    same = cal.refit_family({0.75: at_05, 0.3: at_05}, [("l2", 1.0)], shipped)
    assert same["chosen"]["eps"] == 0.75
    # equally many errors and false alarms: the budget whose all-to-one cut lies farther from
    # the nearest score wins, even over calibrate_scan.py's
    narrow = [_scored(None, 0.10, 0.1), _scored("badnets", 0.12, 0.1, target=3)]
    wide = [_scored(None, 0.10, 0.1), _scored("badnets", 0.30, 0.1, target=3)]
    tie = cal.refit_family({0.3: narrow, 0.5: wide}, [("l2", 1.0)], cal.BanCuts(0.2, None, "noisy", 0.3))
    assert tie["chosen"]["eps"] == 0.5 and tie["chosen"]["all_to_one_margin"] == pytest.approx(0.10)


def test_a_refit_can_leave_calibrate_scans_cuts_uncounted_where_their_budget_was_never_scanned(cal):
    """Models scanned only at the offered budget (their folders gone, calibrate_scan.py's budget
    never stored) can still be refitted: the refit says it did not count the original cuts
    instead of failing, and chooses what it chooses with them counted."""
    at_05 = [_scored(None, 0.25, 0.10), _scored("badnets", 0.41, 0.05, target=3)]
    at_075 = [_scored(None, 0.25, 0.10), _scored("badnets", 0.20, 0.05, target=3)]
    shipped = cal.BanCuts(0.45, None, "noisy", 0.75)
    with pytest.raises(KeyError):
        cal.refit_family({0.5: at_05}, [("l2", 1.0)], shipped)
    fit = cal.refit_family({0.5: at_05}, [("l2", 1.0)], shipped, count_original=False)
    assert fit["chosen"]["eps"] == 0.5 and fit["chosen"]["errors"] == 0
    assert fit["chosen"]["all_to_one_threshold"] == pytest.approx((0.25 + 0.41) / 2)
    assert fit["before_refit"]["errors"] is None and fit["before_refit"]["reach"] is None
    assert fit["before_refit"]["eps"] == 0.75 and "not counted" in fit["reason"]
    counted = cal.refit_family({0.5: at_05, 0.75: at_075}, [("l2", 1.0)], shipped)
    assert counted["chosen"] == fit["chosen"]
    assert counted["before_refit"]["errors"] == 1  # 0.45 at eps 0.75 misses the BadNets model
    with pytest.raises(SystemExit, match="give them"):
        cal.parse_args(["m", "--refit-ban", "batchnorm", "--skip-original-count", "batchnorm"])
    args = cal.parse_args(
        ["m", "--refit-ban", "batchnorm", "--ban-eps", "batchnorm:0.5", "--skip-original-count", "batchnorm"]
    )
    assert args.skip_original_count == ["batchnorm"]


def test_the_agreement_condition_only_withdraws_ban_verdicts_at_the_cuts_fitted_without_it(cal):
    """``--agreement``: a clean model whose noisy and masked readings name different classes sits
    above a BadNets backdoor that reads one class both ways. The cuts are still the ones fitted
    without the condition (the clean model costs an error there), then the condition is applied:
    the clean model is no longer flagged, and the record without it is kept beside."""
    odd = _scored(None, 0.50, 0.10)
    odd["ban_statistics"] = {**odd["ban_statistics"], "target": 2, "target_masked": 7}
    rows = [odd, _scored(None, 0.20, 0.12), _scored("badnets", 0.45, 0.05, target=3)]
    plain = cal.refit_family({0.5: rows}, [("l2", 1.0)], cal.BanCuts(0.3, None, "noisy", 0.5))
    gated = cal.refit_family({0.5: rows}, [("l2", 1.0)], cal.BanCuts(0.3, None, "noisy", 0.5, True))
    for key in ("all_to_one_threshold", "all_to_all_threshold", "eps"):
        assert gated["chosen"][key] == plain["chosen"][key]
    assert plain["chosen"]["errors"] == 1 and plain["chosen"]["reliability"]["false_positives"] == 1
    assert gated["chosen"]["errors"] == 0 and gated["chosen"]["reliability"]["false_positives"] == 0
    assert gated["chosen"]["reliability_ban_alone"]["false_positives"] == 0
    assert gated["agreement"] and not plain["agreement"] and plain["without_agreement"] is None
    assert gated["without_agreement"]["errors"] == 1
    assert "noisy and masked targets to agree" in gated["reason"]
    # the condition withdraws a backdoor's verdict too where its readings split (reach may still
    # find it), and never adds one: below the cut, agreeing readings stay unflagged
    split = _scored("badnets", 0.45, 0.05, target=3)
    split["ban_statistics"] = {**split["ban_statistics"], "target_masked": 4}
    cut = cal.BanCuts(0.4, None, "noisy", 0.5)
    assert cal.record([split], None, ban=cut)["detected"] == 1
    assert cal.record([split], None, ban=cal.BanCuts(0.4, None, "noisy", 0.5, True))["detected"] == 0
    assert cal.record([rows[2]], None, ban=cal.BanCuts(0.5, None, "noisy", 0.5, True))["detected"] == 0


def test_fit_under_agreement_lets_a_lower_cut_stand_below_clean_models_with_split_readings(cal):
    """``--fit-under-agreement``: a clean model whose readings split reads 0.50, above a BadNets
    backdoor (0.40) that reads one class both ways. Fitted without the condition the cut must
    clear the clean model and misses the backdoor, and applying the condition afterwards cannot
    bring it back; fitted under it, a cut between the agreeing clean model and the backdoor
    stands and makes no error. The record without the condition is kept beside either way."""
    odd = _scored(None, 0.50, 0.10)
    odd["ban_statistics"] = {**odd["ban_statistics"], "target": 2, "target_masked": 7}
    rows = [odd, _scored(None, 0.30, 0.12), _scored("badnets", 0.40, 0.05, target=3)]
    rows.append(_scored("badnets", 0.60, 0.05, target=1))
    shipped = cal.BanCuts(0.3, None, "noisy", 0.5, True)
    gated = cal.refit_family({0.5: rows}, [("l2", 1.0)], shipped)
    under = cal.refit_family({0.5: rows}, [("l2", 1.0)], shipped, fit_under_agreement=True)
    assert gated["chosen"]["all_to_one_threshold"] == pytest.approx(0.55)
    assert gated["chosen"]["errors"] == 1 and not gated["fitted_under_agreement"]
    assert under["chosen"]["all_to_one_threshold"] == pytest.approx(0.35)
    assert under["chosen"]["errors"] == 0 and under["fitted_under_agreement"]
    # the same cut without the condition flags the clean model with split readings
    assert under["without_agreement"]["reliability"]["false_positives"] == 1
    assert "fitted under that condition" in under["reason"]
    # a family without the condition is fitted as before whatever the option says
    plain = cal.refit_family(
        {0.5: rows}, [("l2", 1.0)], cal.BanCuts(0.3, None, "noisy", 0.5), fit_under_agreement=True
    )
    assert not plain["fitted_under_agreement"] and plain["chosen"]["all_to_one_threshold"] == pytest.approx(
        0.55
    )
    with pytest.raises(SystemExit, match="give --agreement FAMILY"):
        cal.parse_args(["--refit-ban", "other", "--fit-under-agreement", "m"])


def test_agreement_is_set_by_a_refit_of_the_family(cal):
    with pytest.raises(SystemExit, match="add --refit-ban other"):
        cal.parse_args(["--agreement", "other", "m"])
    args = cal.parse_args(["--refit-ban", "other", "--agreement", "other", "m"])
    assert args.agreement == ["other"]
    calibration = {
        "all_to_one_thresholds": {"other": 0.2},
        "all_to_all_threshold": 0.1,
        "target_source_by_family": {"other": "noisy_masked"},
        "eps_by_family": {"other": 0.5},
    }
    rows = [{**_row(None, 0.1), "norm_family": "other", "ban_statistics": {}}]
    assert cal.shipped_cuts(calibration, ["other"], rows, ["other"])["other"].agreement
    assert not cal.shipped_cuts(calibration, ["other"], rows)["other"].agreement
    # once a family has the condition, a refit that would drop it is refused
    conditioned = {**calibration, "all_to_one_agreement_by_family": {"other": True}}
    with pytest.raises(SystemExit, match="--agreement other"):
        cal.shipped_cuts(conditioned, ["other"], rows)
    assert cal.shipped_cuts(conditioned, ["other"], rows, ["other"])["other"].agreement


def _split(row: dict, masked: int = 9) -> dict:
    """``row`` with the noise with the negative mask naming another class than the noise alone."""
    return {**row, "ban_statistics": {**row["ban_statistics"], "target_masked": masked}}


def test_the_split_cut_clears_every_clean_split_reading_and_keeps_the_split_readings_above(cal):
    """``fit_split_cut``: midway between the highest clean model whose readings split and the next
    split reading above it, of any model; agreeing readings play no part."""
    rows = [
        _split(_scored(None, 0.30, 0.1)),
        _split(_scored(None, 0.34, 0.1)),
        _scored(None, 0.60, 0.1),  # agrees: the family's cut deals with it, not the split cut
        _split(_scored("badnets", 0.32, 0.1, target=2)),  # below the clean split reading: given up
        _split(_scored("badnets", 0.50, 0.1, target=2)),
        _split(_scored("wanet", 0.70, 0.1, target=2)),
    ]
    assert cal.fit_split_cut(rows) == pytest.approx((0.34 + 0.50) / 2)
    # nothing above the highest clean split reading: no split reading decides
    assert cal.fit_split_cut(rows[:4]) == pytest.approx(0.34)
    # no clean model reads split: nothing to clear
    assert cal.fit_split_cut([r for r in rows if r["attack"] or cal.agrees(r["ban_statistics"])]) is None


def test_a_split_cut_with_ban_cuts_kept_hands_a_withdrawn_backdoor_to_reach(cal):
    """``--split-cut`` with ``--keep-ban-cuts``: a clean model with split readings (0.40) sits above
    the kept all-to-one cut (0.30). The split cut clears it; it also withdraws a backdoor with
    split readings below it (0.38), which reach, refitted behind the cuts, takes up; the kept
    cuts themselves do not move, and the budget is the kept one."""
    rows = [
        _split(_scored(None, 0.40, 0.10)),
        _scored(None, 0.20, 0.30),
        _split(_scored("wanet", 0.38, 0.60, target=4)),
        _split(_scored("badnets", 0.70, 0.05, target=1)),
        _scored("badnets", 0.35, 0.05, target=3),  # agrees: the kept cut finds it
    ]
    shipped = cal.BanCuts(0.45, None, "noisy", 0.75)  # calibrate_scan.py's, where a refit starts
    kept = cal.BanCuts(0.30, 0.5, "noisy", 0.5)
    fit = cal.refit_family(
        {0.5: rows, 0.75: rows}, [("l2", 1.0)], shipped, fit_split=True, pinned=kept, count_original=False
    )
    best = fit["chosen"]
    assert (best["all_to_one_threshold"], best["all_to_all_threshold"], best["eps"]) == (0.30, 0.5, 0.5)
    assert best["split_threshold"] == pytest.approx((0.40 + 0.70) / 2)
    assert best["fit"]["threshold"] == pytest.approx((0.30 + 0.60) / 2)
    assert best["errors"] == 0 and best["reliability"]["false_positives"] == 0
    assert fit["fitted_split_cut"] and fit["kept_ban_cuts"] and list(fit["by_eps"]) == ["0.5"]
    assert (
        "kept as the calibration had them" in fit["reason"]
        and "0.550 where BAN's two readings" in fit["reason"]
    )
    # without the split cut the clean model with split readings is flagged at the kept cuts
    plain = cal.refit_family({0.5: rows}, [("l2", 1.0)], shipped, pinned=kept, count_original=False)
    assert (
        plain["chosen"]["split_threshold"] is None and plain["chosen"]["reliability"]["false_positives"] == 1
    )
    with pytest.raises(ValueError, match="agreement"):
        cal.refit_family(
            {0.5: rows}, [("l2", 1.0)], cal.BanCuts(0.3, None, "noisy", 0.5, True), fit_split=True
        )


def test_the_split_cut_and_kept_cuts_are_set_by_a_refit_of_the_family(cal):
    for argv, message in (
        (["--split-cut", "batchnorm", "m"], "add --refit-ban batchnorm"),
        (["--refit-ban", "b", "--agreement", "b", "--split-cut", "b", "m"], "give one or the other"),
        (["--keep-ban-cuts", "b", "m"], "add --refit-ban b"),
        (["--refit-ban", "b", "--keep-ban-cuts", "b", "--ban-eps", "b:0.5", "m"], "give one or the other"),
    ):
        with pytest.raises(SystemExit, match=message):
            cal.parse_args(argv)
    args = cal.parse_args(
        ["--refit-ban", "b", "--keep-ban-cuts", "b", "--skip-original-count", "b", "--split-cut", "b", "m"]
    )
    assert (args.keep_ban_cuts, args.skip_original_count, args.split_cut) == (["b"], ["b"], ["b"])
    calibration = {
        "all_to_one_thresholds": {"b": 0.2},
        "all_to_all_threshold": 0.1,
        "target_source_by_family": {"b": "noisy"},
        "eps_by_family": {"b": 0.5},
        "all_to_one_split_thresholds": {"b": 0.4},
    }
    rows = [{**_row(None, 0.1), "norm_family": "b", "ban_statistics": {}}]
    # a refit that would drop the family's split cut is refused
    with pytest.raises(SystemExit, match="--split-cut b"):
        cal.shipped_cuts(calibration, ["b"], rows)
    assert cal.shipped_cuts(calibration, ["b"], rows, split_cut=["b"])["b"].split is None


def test_ban_eps_needs_a_refitted_family_and_budgets_below_one(cal):
    assert cal.parse_ban_eps(["batchnorm:0.5,0.3,0.5"], ["batchnorm"]) == {"batchnorm": [0.3, 0.5]}
    with pytest.raises(SystemExit, match="add --refit-ban batchnorm"):
        cal.parse_ban_eps(["batchnorm:0.5"], [])
    for bad in ("0.5", "batchnorm:", "batchnorm:1.5", "batchnorm:x"):
        with pytest.raises(SystemExit, match="FAMILY:EPS"):
            cal.parse_ban_eps([bad], ["batchnorm"])


def test_refit_is_refused_where_the_stored_verdicts_cannot_be_recomputed(cal):
    calibration = {
        "all_to_one_thresholds": {"batchnorm": 0.3, "other": 0.2},
        "all_to_all_threshold": 0.1,
        "target_source_by_family": {"batchnorm": "noisy", "other": "noisy_masked"},
        "eps_by_family": {"batchnorm": 0.75, "other": 0.5},
    }
    old = {**_row(None, 0.1), "norm_family": "batchnorm"}
    with pytest.raises(SystemExit, match="no BAN statistics"):
        cal.shipped_cuts(calibration, ["batchnorm"], [old])
    with pytest.raises(SystemExit, match="no BAN cut"):
        cal.shipped_cuts(calibration, ["groupnorm"], [])
    with pytest.raises(SystemExit, match="none of the given models"):
        cal.shipped_cuts(calibration, ["batchnorm"], [])
    scanned = [{**old, "ban_statistics": {}}]
    cuts = cal.shipped_cuts(calibration, ["batchnorm"], scanned)
    assert cuts["batchnorm"] == cal.BanCuts(0.3, 0.1, "noisy", 0.75)
    # once refitted, a rerun must refit the family again, from calibrate_scan.py's cuts and
    # budget, since the stored verdicts were taken at those
    refitted = {
        **calibration,
        "all_to_one_thresholds": {"batchnorm": 0.37, "other": 0.2},
        "all_to_all_thresholds": {"batchnorm": None},
        "eps_by_family": {"batchnorm": 0.5, "other": 0.5},
        "refitted_by_family": {
            "batchnorm": {"calibrate_scan_cuts": {"all_to_one": 0.3, "all_to_all": 0.1, "eps": 0.75}}
        },
    }
    with pytest.raises(SystemExit, match="--refit-ban batchnorm again"):
        cal.shipped_cuts(refitted, [], scanned)
    # a run over another family's models leaves the refitted family as it is
    layernorm = [{**old, "norm_family": "other", "ban_statistics": {}}]
    assert cal.shipped_cuts(refitted, ["other"], layernorm) == {
        "other": cal.BanCuts(0.2, 0.1, "noisy_masked", 0.5)
    }
    restart = cal.shipped_cuts(refitted, ["batchnorm"], scanned)["batchnorm"]
    assert restart == cal.BanCuts(0.3, 0.1, "noisy", 0.75)


def test_refit_counts_the_spread_reading_last_where_the_family_runs_it(cal):
    """A family with the spread reading: its stored verdicts include spread, but a refit
    recomputes BAN's from the statistics, so spread is counted from each model's own score; an
    all-to-all backdoor only spread sees is then not a miss that a lower BAN cut must buy."""
    spread = [{"shape": "l2", "rho": 2.0, "steps": 40, "threshold": 0.4}]

    def scored(score: float) -> dict:
        return {"spread_scores": {"l2:2-steps40": score}}

    rows = [
        {**_scored(None, 0.27, 0.10), **scored(0.0)},
        {**_scored(None, 0.10, 0.08), **scored(0.0)},
        {**_scored("badnets", 0.31, 0.10, target=3), **scored(0.0)},
        {**_scored("blended", 0.12, 0.50, target=1), **scored(0.0)},
        # all-to-all: BAN reads it at 0.25, under the clean model at 0.27; only spread sees it
        {**_scored("badnets", 0.25, 0.07), "mode": "all-to-all", **scored(0.8)},
    ]
    shipped = cal.BanCuts(0.176, None, "noisy_masked", 0.5)
    with_spread = cal.refit_family({0.5: rows}, [("l2", 1.0)], shipped, spread)
    best = with_spread["chosen"]
    assert best["all_to_one_threshold"] == pytest.approx((0.27 + 0.31) / 2) and best["errors"] == 0
    assert best["reliability"]["detected"] == 3 and best["reliability"]["false_positives"] == 0
    assert (
        with_spread["spread"] == spread and "spread readings (l2:2-steps40 at 0.400)" in with_spread["reason"]
    )
    # BAN's own record (the BAN section's) leaves spread out
    assert best["reliability_ban_alone"]["detected"] == 1
    # the shipped cut (0.176) flags the clean model at 0.27: one error, spread counted
    assert with_spread["before_refit"]["errors"] == 1
    without = cal.refit_family({0.5: rows}, [("l2", 1.0)], shipped)["chosen"]
    assert without["errors"] == 1  # the all-to-all model is missed without spread
    # spread's own threshold is not refitted: a score at it does not fire
    at = cal.record(
        rows[4:],
        None,
        ban=cal.BanCuts(0.29, None, "noisy_masked", 0.5),
        spread=[{**spread[0], "threshold": 0.8}],
    )
    assert at["detected"] == 0


def _checked(cal, rows, calibration, family):
    """A check's record of ``rows`` (as ``--check`` counts them)."""
    return cal.tally(*cal.check_verdicts(rows, calibration, family))


def test_check_counts_held_out_models_at_the_shipped_cuts(cal):
    """``--check``: both stages' record at the calibration's cuts, BAN's from the stored
    statistics where a refit replaced the cuts the scans were taken at."""
    rows = [
        _scored(None, 0.45, 0.10),
        _scored("badnets", 0.60, 0.05, target=3),
        _scored("blended", 0.30, 0.90, target=1),
    ]
    reach = {"norm": "l2", "rho": 1.0, "threshold": 0.5, "target_when_both": "ban"}
    calibration = {
        "all_to_one_thresholds": {"batchnorm": 0.5},
        "all_to_all_threshold": 0.1,
        "all_to_all_thresholds": {"batchnorm": None},
        "target_source_by_family": {"batchnorm": "noisy"},
        "eps_by_family": {"batchnorm": 0.75},
        "refitted_by_family": {
            "batchnorm": {"calibrate_scan_cuts": {"all_to_one": 0.3, "all_to_all": 0.1, "eps": 0.75}}
        },
        "reach": {"by_family": {"batchnorm": reach}},
    }
    rel = _checked(cal, rows, calibration, "batchnorm")
    assert (rel["false_positives"], rel["detected"], rel["targets_correct"]) == (0, 2, 2)
    # not refitted: the verdicts the scans stored stand (here BAN found nothing), reach adds its one
    plain = {k: v for k, v in calibration.items() if k != "refitted_by_family"}
    assert _checked(cal, rows, plain, "batchnorm")["detected"] == 1
    # no reach stage for the family: BAN alone
    assert _checked(cal, rows, {**calibration, "reach": {}}, "batchnorm")["detected"] == 1
    # a refitted family that runs the spread reading: counted from each model's spread score
    # (a missed all-to-all backdoor it sees), at the calibration's threshold
    a2a = {**_scored("badnets", 0.10, 0.10), "mode": "all-to-all"}
    spread = {**calibration, "spread": {"by_family": {"batchnorm": {"rho": 2.0, "threshold": 0.4}}}}
    spread_rows = [{**r, "spread_scores": {"l2:2-steps40": 0.0}} for r in rows] + [
        {**a2a, "spread_scores": {"l2:2-steps40": 0.6}}
    ]
    assert _checked(cal, spread_rows, spread, "batchnorm")["detected"] == 3
    assert cal.spread_setting(spread, "batchnorm") == [
        {"shape": "l2", "rho": 2.0, "steps": 40, "threshold": 0.4}
    ]
    assert cal.spread_setting(calibration, "batchnorm") is None
    # as the scan runs it, only where BAN and reach found nothing: the rows they flagged need no score
    assert [cal.runs_spread(r, calibration=spread, family="batchnorm") for r in rows] == [True, False, False]
    lazy = [spread_rows[0], rows[1], rows[2], spread_rows[3]]
    assert _checked(cal, lazy, spread, "batchnorm")["detected"] == 3
    with pytest.raises(KeyError, match="spread_scores"):  # a row the reading must see, without its score
        _checked(cal, [rows[0]], spread, "batchnorm")
    # the window shape: its own options and store key; the l2 keys stay those already stored
    entry = {"shape": "window", "window": 8, "steps": 30, "threshold": 0.5}
    (setting,) = cal.spread_setting(
        {**calibration, "spread": {"by_family": {"batchnorm": entry}}}, "batchnorm"
    )
    assert setting == entry
    assert cal.spread_options(setting) == {"spread_shape": "window", "spread_window": 8, "spread_steps": 30}
    assert cal.spread_key("k", setting) == "k|spread-window:8-steps30"
    assert cal.spread_key("k", cal.spread_setting(spread, "batchnorm")[0]) == "k|spread-l2:2-steps40"
    # two readings (window, then blend): either firing flags an all-to-all model; the blend is read
    # only where the window did not fire, as the scan runs them
    blend = {"shape": "blend", "alpha": 0.1, "steps": 30, "threshold": 0.6}
    both = {**calibration, "spread": {"by_family": {"batchnorm": [entry, blend]}}}
    assert cal.spread_setting(both, "batchnorm") == [entry, blend]
    assert cal.spread_key("k", blend) == "k|spread-blend:0.1-steps30"
    assert cal.spread_options(blend) == {"spread_shape": "blend", "spread_alpha": 0.1, "spread_steps": 30}
    window_fired = {**a2a, "spread_scores": {"window:8-steps30": 0.7}}
    blend_fired = {**a2a, "spread_scores": {"window:8-steps30": 0.2, "blend:0.1-steps30": 0.8}}
    neither = {**a2a, "spread_scores": {"window:8-steps30": 0.2, "blend:0.1-steps30": 0.5}}
    assert _checked(cal, [window_fired, blend_fired, neither], both, "batchnorm")["detected"] == 2
    asked = []
    assert cal.spread_scores([entry, blend], lambda s: asked.append(s["shape"]) or 0.7) == {
        "window:8-steps30": 0.7
    }
    assert asked == ["window"]


def _fold_model(tmp_path, stored: dict, name: str, row: dict, *, ban_eps: float) -> tuple[str, str]:
    """A model folder as refit_crossfold.py finds one (its training.json) and ``row`` stored as its
    scan under the key calibrate_reach.py gives it; returns the folder and the key."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "training.json").write_text("{}")
    key = f"{name}|l2:1|steps20|n600|test|s0"
    stored[key] = {
        **row,
        "model": name,
        "ban_eps": ban_eps,
        "acc": 0.9,
        "asr": 0.9 if row["attack"] else None,
    }
    return str(folder), key


def _refitted_from(family: str, source: str, all_to_one: float, eps: float, **extra) -> dict:
    """A calibration whose ``family`` was refitted from calibrate_scan.py's ``all_to_one`` cut at ``eps``."""
    cuts = {"all_to_one": all_to_one, "all_to_all": None, "eps": eps}
    return {
        "target_source_by_family": {family: source},
        "refitted_by_family": {family: {"calibrate_scan_cuts": cuts}},
        **extra,
    }


def test_crossfold_fits_on_one_fold_and_counts_on_the_other(benchmark_script, tmp_path, monkeypatch):
    """``refit_crossfold.py``: each way's refit sees only its fold; the other fold's stored scans
    at the budget it chose are what it is counted on."""
    cross = benchmark_script("refit_crossfold")
    stored, folds = {}, {"a": [], "b": []}

    def add(fold, name, attack, a2o_by_eps, *, target=None):
        base = {**_scored(attack, a2o_by_eps[0.75], 0.05, target=target), "norm_family": "batchnorm"}
        folder, key = _fold_model(tmp_path, stored, name, base, ban_eps=0.75)
        folds[fold].append(folder)
        stored[f"{key}|ban-eps0.5"] = {
            "ban_eps": 0.5,
            "ban_statistics": {**base["ban_statistics"], "all_to_one": a2o_by_eps[0.5]},
        }

    # fold a separates clean from BadNets at 0.75 only by a cut that fold b's clean model exceeds;
    # at 0.5 both folds separate
    add("a", "a-clean", None, {0.75: 0.30, 0.5: 0.10})
    add("a", "a-bad", "badnets", {0.75: 0.50, 0.5: 0.40}, target=2)
    add("b", "b-clean", None, {0.75: 0.45, 0.5: 0.15})
    add("b", "b-bad", "badnets", {0.75: 0.55, 0.5: 0.45}, target=4)
    results = tmp_path / "stored.json"
    results.write_text(json.dumps(stored))
    calibration = _refitted_from("batchnorm", "noisy", 0.3, 0.75)
    monkeypatch.setattr(cross, "load_calibration", lambda: calibration)
    out = tmp_path / "out.json"
    cross.main(
        ["--eps", "0.5,0.75", "--results", str(results), "--out", str(out)]
        + ["--fold-a", *folds["a"], "--fold-b", *folds["b"]]
    )
    ways = {(w["way"], tuple(w["budgets_offered"])): w for w in json.loads(out.read_text())["ways"]}
    at_075 = ways[("a -> b", (0.75,))]
    assert at_075["all_to_one_threshold"] == pytest.approx(0.40)  # midway in fold a
    assert at_075["test"]["false_positives"] == 1 and at_075["errors_on_test"] == 1  # b-clean at 0.45
    # both budgets make no error on fold a; the wider margin (0.15 against 0.10) picks 0.5
    assert ways[("a -> b", (0.5, 0.75))]["chosen_eps"] == 0.5
    assert ways[("a -> b", (0.5, 0.75))]["errors_on_test"] == 0
    assert ways[("b -> a", (0.5,))]["test"]["detected"] == 1


def test_crossfold_checks_the_fit_under_agreement_where_the_family_has_the_condition(
    benchmark_script, tmp_path, monkeypatch
):
    """``refit_crossfold.py --fit-under-agreement`` refits each fold as ``calibrate_reach.py
    --fit-under-agreement`` does and counts the other fold under the condition: fold a's clean
    model with split readings no longer forces the cut above the BadNets backdoor of fold b."""
    cross = benchmark_script("refit_crossfold")
    stored, folds = {}, {"a": [], "b": []}

    def add(fold, name, attack, a2o, *, target=None, split=False):
        row = {**_scored(attack, a2o, 0.05, target=target), "norm_family": "other"}
        if split:
            row["ban_statistics"] = {**row["ban_statistics"], "target_masked": 7}
        folds[fold].append(_fold_model(tmp_path, stored, name, row, ban_eps=0.5)[0])

    add("a", "a-split", None, 0.50, split=True)
    add("a", "a-clean", None, 0.20)
    add("a", "a-bad", "badnets", 0.40, target=2)
    add("a", "a-strong", "badnets", 0.60, target=5)
    add("b", "b-clean", None, 0.25)
    add("b", "b-bad", "badnets", 0.35, target=4)
    results = tmp_path / "stored.json"
    results.write_text(json.dumps(stored))
    calibration = _refitted_from("other", "noisy_masked", 0.2, 0.5)
    monkeypatch.setattr(cross, "load_calibration", lambda: calibration)
    out = tmp_path / "out.json"
    argv = ["--family", "other", "--eps", "0.5", "--results", str(results), "--out", str(out)]
    argv += ["--fold-a", *folds["a"], "--fold-b", *folds["b"]]
    with pytest.raises(SystemExit, match="add --agreement on"):
        cross.main([*argv, "--fit-under-agreement"])
    calibration["all_to_one_agreement_by_family"] = {"other": True}
    cross.main(argv)
    gated = {w["way"]: w for w in json.loads(out.read_text())["ways"]}["a -> b"]
    cross.main([*argv, "--fit-under-agreement"])
    written = json.loads(out.read_text())
    under = {w["way"]: w for w in written["ways"]}["a -> b"]
    assert written["fitted_under_agreement"] and written["agreement"]
    assert gated["all_to_one_threshold"] == pytest.approx(0.55) and gated["test"]["detected"] == 0
    assert under["all_to_one_threshold"] == pytest.approx(0.30) and under["errors_on_test"] == 0
    # the condition can be asked for a family the calibration gives none, and switched off
    calibration["all_to_one_agreement_by_family"] = {}
    cross.main([*argv, "--agreement", "on", "--fit-under-agreement"])
    assert json.loads(out.read_text())["ways"][0]["all_to_one_threshold"] == pytest.approx(0.30)
    cross.main([*argv, "--agreement", "off"])
    plain = json.loads(out.read_text())
    assert not plain["agreement"] and plain["ways"][0]["all_to_one_threshold"] == pytest.approx(0.55)
    # or a split cut instead: the clean split reading is cleared by it and binds the cut no longer
    cross.main([*argv, "--agreement", "off", "--split-cut", "on"])
    split = json.loads(out.read_text())
    way = {w["way"]: w for w in split["ways"]}["a -> b"]
    assert split["fitted_split_cut"] and way["split_threshold"] == pytest.approx(0.50)
    assert way["all_to_one_threshold"] == pytest.approx(0.30) and way["errors_on_test"] == 0
    with pytest.raises(SystemExit, match="add --agreement off"):
        cross.main([*argv, "--agreement", "on", "--split-cut", "on"])


def test_crossfold_counts_the_spread_reading_on_both_folds(benchmark_script, tmp_path, monkeypatch):
    """For a family that runs the spread reading, each fold's models carry the spread scores the
    refit stored, and an all-to-all backdoor only spread sees counts as found on the other fold;
    a model without a stored spread score is refused."""
    cross = benchmark_script("refit_crossfold")
    stored, folds = {}, {"a": [], "b": []}

    def add(fold, name, attack, a2o, spread, *, mode="all-to-one", target=None, with_spread=True):
        base = {**_scored(attack, a2o, 0.05, target=target), "norm_family": "other", "mode": mode}
        folder, key = _fold_model(tmp_path, stored, name, base, ban_eps=0.5)
        folds[fold].append(folder)
        if with_spread:
            stored[f"{key}|spread-l2:2-steps40"] = {"spread_score": spread}

    add("a", "a-clean", None, 0.10, 0.0)
    add("a", "a-bad", "badnets", 0.40, 0.0, target=2)
    add("b", "b-clean", None, 0.15, 0.0)
    add("b", "b-a2a", "badnets", 0.05, 0.7, mode="all-to-all")
    results = tmp_path / "stored.json"
    results.write_text(json.dumps(stored))
    calibration = _refitted_from(
        "other", "noisy_masked", 0.2, 0.5, spread={"by_family": {"other": {"rho": 2.0, "threshold": 0.4}}}
    )
    monkeypatch.setattr(cross, "load_calibration", lambda: calibration)
    out = tmp_path / "out.json"
    argv = ["--family", "other", "--eps", "0.5", "--results", str(results), "--out", str(out)]
    cross.main(argv + ["--fold-a", *folds["a"], "--fold-b", *folds["b"]])
    ways = {w["way"]: w for w in json.loads(out.read_text())["ways"]}
    assert ways["a -> b"]["test"]["detected"] == 1 and ways["a -> b"]["errors_on_test"] == 0
    add("b", "b-unread", "badnets", 0.30, 0.0, target=1, with_spread=False)
    results.write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="no spread score stored"):
        cross.main(argv + ["--fold-a", *folds["a"], "--fold-b", *folds["b"]])


def test_a_run_over_one_familys_models_keeps_the_other_familys_fit(cal, tmp_path):
    """Refitting the LayerNorm family must not need (or drop) the BatchNorm models: their
    entries, models and provenance stay as the earlier run wrote them, each family names the run
    behind its fit, and a later run over the BatchNorm models keeps the LayerNorm fit in turn."""
    stored = {}

    def add(name, family, attack, a2o, reach, *, asr=0.9):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "training.json").write_text("{}")
        row = {**_scored(attack, a2o, reach, target=None if attack is None else 2), "ban_target": None}
        if a2o > 0.3:
            row.update(ban_verdict="backdoored", ban_target=2)
        stored[f"{name}|l2:1|steps20|n600|test|s0"] = {
            **row,
            "model": name,
            "norm_family": family,
            "ban_eps": 0.5,
            "acc": 0.8,
            "asr": None if attack is None else asr,
            "scan_seconds": 1.0,
        }
        results.write_text(json.dumps(stored))
        return str(folder)

    results = tmp_path / "stored.json"
    ln = [
        add("ln-clean", "other", None, 0.05, 0.10),
        add("ln-bad", "other", "badnets", 0.05, 0.60),
        add("ln-blended", "other", "blended", 0.40, 0.20),
    ]
    bn_model = {"model": "bn-bad", "norm_family": "batchnorm", "used": True}
    before = {
        "by_family": {"batchnorm": {"norm": "l2", "rho": 1.0, "threshold": 0.65}},
        "reliability_by_family": {"batchnorm": {"detected": 33}},
        "families": {"batchnorm": {"enabled": True}, "other": {"enabled": False}},
        "ban_refitted": ["batchnorm"],
        "models": [bn_model, {"model": "ln-old", "norm_family": "other", "used": True}],
        "command": "python benchmarks/calibrate_reach.py bn-and-ln-models",
        "date": "2026-11-20",
        "timm_purify_version": "0.0.9",
        "environment": {"torch": "x"},
    }
    out = tmp_path / "calibration.json"
    out.write_text(json.dumps({"eps_by_family": {"batchnorm": 0.5, "other": 0.5}, "reach": before}))
    argv = ["--budgets", "l2:1", "--steps", "20", "--results", str(results), "--out", str(out)]
    cal.main([*argv, *ln])
    reach = json.loads(out.read_text())["reach"]
    assert list(reach["families"]) == ["batchnorm", "other"]
    assert reach["families"]["batchnorm"] == {"enabled": True}
    assert reach["by_family"]["batchnorm"]["threshold"] == 0.65
    assert reach["by_family"]["other"]["threshold"] == pytest.approx(0.35)  # midway 0.10 .. 0.60
    assert reach["reliability_by_family"]["batchnorm"] == {"detected": 33}
    assert reach["ban_refitted"] == ["batchnorm"]
    # the LayerNorm rows are this run's, the BatchNorm ones the earlier run's
    assert sorted(m["model"] for m in reach["models"]) == ["bn-bad", "ln-bad", "ln-blended", "ln-clean"]
    provenance = reach["provenance_by_family"]
    # the earlier section named one run for both families; that run fitted both
    assert provenance["batchnorm"]["command"] == before["command"]
    assert provenance["batchnorm"]["date"] == "2026-11-20"
    assert provenance["batchnorm"]["fitted_families"] == ["batchnorm", "other"]
    assert "--steps 20" in provenance["other"]["command"] and provenance["other"] == {
        key: reach[key] for key in provenance["other"]
    }
    assert provenance["other"]["fitted_families"] == ["other"]
    ln_fit = reach["families"]["other"]

    # a later run over the BatchNorm models (and a LayerNorm backdoor that did not implant)
    bn = [
        add("bn-clean", "batchnorm", None, 0.05, 0.10),
        add("bn-blended", "batchnorm", "blended", 0.05, 0.70),
        add("ln-weak", "other", "badnets", 0.05, 0.05, asr=0.2),
    ]
    cal.main([*argv, *bn])
    later = json.loads(out.read_text())["reach"]
    assert later["families"]["other"] == ln_fit
    assert later["provenance_by_family"]["other"] == provenance["other"]
    assert later["provenance_by_family"]["batchnorm"]["fitted_families"] == ["batchnorm"]
    assert (
        later["provenance_by_family"]["batchnorm"]["command"]
        == later["command"]
        != provenance["other"]["command"]
    )
    assert later["ban_refitted"] == []  # the BatchNorm family was fitted again, without --refit-ban
    # the kept family's models are the run's that fitted it: the stray LayerNorm row is not added
    assert sorted(m["model"] for m in later["models"]) == [
        "bn-blended",
        "bn-clean",
        "ln-bad",
        "ln-blended",
        "ln-clean",
    ]
    # nothing usable: nothing to fit, and nothing written
    with pytest.raises(SystemExit, match="none of the 1 scanned models is usable"):
        cal.main([*argv, str(tmp_path / "ln-weak")])
    assert json.loads(out.read_text())["reach"] == later


def test_a_split_cut_refit_with_kept_ban_cuts_writes_only_the_split_and_reach_cuts(cal, tmp_path):
    """``--refit-ban F --keep-ban-cuts F --skip-original-count F --split-cut F`` end to end: BAN's
    budget and cuts stay as the calibration has them, the split cut and reach's cut are written,
    and the records are counted with them; a later refit without ``--split-cut F`` is refused."""
    stored = {}
    models = []

    def add(name, attack, a2o, reach, *, split=False, target=None):
        row = {**_scored(attack, a2o, reach, target=target), "norm_family": "batchnorm"}
        if split:
            row["ban_statistics"] = {**row["ban_statistics"], "target_masked": 9}
        folder, key = _fold_model(tmp_path, stored, name, row, ban_eps=0.5)
        stored[key] |= {"scan_seconds": 1.0, "ban_verdict": "clean", "ban_target": None, "arch": "resnet18"}
        models.append(folder)

    add("clean-split", None, 0.40, 0.10, split=True)
    add("clean", None, 0.20, 0.30)
    add("wanet", "wanet", 0.38, 0.60, split=True, target=4)
    add("badnets", "badnets", 0.70, 0.05, split=True, target=1)
    results = tmp_path / "stored.json"
    results.write_text(json.dumps(stored))
    out = tmp_path / "calibration.json"
    calibration = {
        "threshold": 0.3,
        "all_to_all_threshold": 0.5,
        "all_to_one_thresholds": {"batchnorm": 0.30},
        "all_to_all_thresholds": {"batchnorm": 0.5},
        "eps_by_family": {"batchnorm": 0.5},
        "target_source_by_family": {"batchnorm": "noisy"},
        "reliability_by_family": {"batchnorm": {}},
        "refitted_by_family": {
            "batchnorm": {"calibrate_scan_cuts": {"all_to_one": 0.45, "all_to_all": None, "eps": 0.75}}
        },
    }
    out.write_text(json.dumps(calibration))
    argv = ["--budgets", "l2:1", "--steps", "20", "--results", str(results), "--out", str(out)]
    flags = ["--refit-ban", "batchnorm", "--keep-ban-cuts", "batchnorm", "--skip-original-count", "batchnorm"]
    cal.main([*argv, *flags, "--split-cut", "batchnorm", *models])
    written = json.loads(out.read_text())
    assert written["all_to_one_thresholds"]["batchnorm"] == 0.30
    assert (
        written["all_to_all_thresholds"]["batchnorm"] == 0.5 and written["eps_by_family"]["batchnorm"] == 0.5
    )
    assert written["all_to_one_split_thresholds"]["batchnorm"] == pytest.approx((0.40 + 0.70) / 2)
    assert written["reach"]["by_family"]["batchnorm"]["threshold"] == pytest.approx((0.30 + 0.60) / 2)
    fit = written["reach"]["families"]["batchnorm"]
    assert fit["kept_ban_cuts"] and fit["fitted_split_cut"] and fit["chosen"]["errors"] == 0
    # BAN alone, with the split cut: the clean split reading cleared, the WaNet withdrawn for reach
    assert written["reliability_by_family"]["batchnorm"]["false_positives"] == 0
    assert written["reliability_by_family"]["batchnorm"]["detected"] == 1
    with pytest.raises(SystemExit, match="--split-cut batchnorm"):
        cal.main([*argv, *flags, *models])


def test_check_out_writes_each_models_verdict_and_record_check_stores_the_record(cal, tmp_path):
    """``--check --check-out FILE``: the held-out record per family, each counted model's scores,
    verdict, reported target and whether it is right, the models left out and why; the checked
    calibration is not touched, and the file is refused where it would overwrite it.
    ``--record-check`` stores the record in the calibration beside the cuts it was counted at,
    and refuses where the check would count other cuts than the scan uses."""
    from timm_purify.detection.ban import family_cuts, heldout_record

    stored = {}

    def add(name, attack, a2o, reach, *, target=None, ban_target=None, asr=0.9):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "training.json").write_text("{}")
        stored[f"{name}|l2:1|steps20|n600|test|s0"] = {
            **_scored(attack, a2o, reach, target=target, ban_target=ban_target),
            "model": name,
            "norm_family": "other",
            "ban_eps": 0.5,
            "acc": 0.8,
            "asr": None if attack is None else asr,
            "scan_seconds": 1.0,
        }
        return str(folder)

    models = [
        add("clean-quiet", None, 0.05, 0.10),
        add("clean-loud", None, 0.40, 0.10),  # BAN's false alarm (its noise names class 0)
        add("blended", "blended", 0.05, 0.60, target=2),  # reach finds it, right target
        add("badnets", "badnets", 0.50, 0.05, target=3, ban_target=7),  # BAN finds it, wrong target
        add("sig", "sig", 0.05, 0.20, target=1),  # missed
        add("weak", "badnets", 0.05, 0.05, target=4, asr=0.2),  # did not implant
    ]
    results = tmp_path / "stored.json"
    results.write_text(json.dumps(stored))
    reach = {"norm": "l2", "rho": 1.0, "steps": 20, "threshold": 0.35, "target_when_both": "ban"}
    calibration = {
        "date": "2026-11-23",
        "threshold": 0.3,
        "all_to_all_threshold": 0.1,
        "all_to_one_thresholds": {"other": 0.3},
        "all_to_all_thresholds": {"other": None},
        "target_source_by_family": {"other": "noisy"},
        "eps_by_family": {"other": 0.5},
        "refitted_by_family": {"other": {"calibrate_scan_cuts": {"all_to_one": 0.2, "all_to_all": 0.1}}},
        "reach": {"by_family": {"other": reach}, "command": "refit", "date": "2026-11-23"},
    }
    out = tmp_path / "calibration.json"
    out.write_text(json.dumps(calibration))
    before = out.read_text()
    report = tmp_path / "check" / "held-out.json"
    argv = ["--budgets", "l2:1", "--steps", "20", "--results", str(results), "--out", str(out)]
    cal.main([*argv, "--check", "--check-out", str(report), *models])

    assert out.read_text() == before
    written = json.loads(report.read_text())
    family = written["families"]["other"]
    assert family["record"] == {
        "archs": ["convnext_atto"],
        "clean_models": 2,
        "false_positives": 1,
        "backdoored_models": 3,
        "detected": 2,
        "all_to_one_models": 3,
        "all_to_one_detected": 2,
        "targets_correct": 1,
    }
    assert family["errors"] == 3
    by_name = {m["model"]: m for m in family["models"]}
    assert {name: (m["verdict"], m["reported_target"], m["right"]) for name, m in by_name.items()} == {
        "clean-quiet": ("clean", None, True),
        "clean-loud": ("backdoored", 0, False),
        "blended": ("backdoored", 2, True),
        "badnets": ("backdoored", 7, False),
        "sig": ("clean", None, False),
    }
    assert (
        by_name["blended"]["reach_score"] == 0.60
        and by_name["blended"]["ban_statistics"]["all_to_one"] == 0.05
    )
    assert written["not_used"] == [
        {
            "model": "weak",
            "acc": 0.8,
            "asr": 0.2,
            "reason": "ASR 0.200 < --min-asr 0.5: the backdoor did not implant",
        }
    ]
    assert written["calibration"]["cuts"] == {"other": family_cuts(calibration, "other")}
    assert written["calibration"]["fit"] == {"other": {"command": "refit", "date": "2026-11-23"}}
    assert "--check-out" in written["command"] and written["environment"]

    # --record-check: the record goes into the calibration's heldout section, tied to the cuts it
    # was counted at (as scan spells them) and the fit behind them, and nothing else changes
    cal.main([*argv, "--check", "--record-check", *models])
    stored_cal = json.loads(out.read_text())
    assert {k: v for k, v in stored_cal.items() if k != "heldout"} == calibration
    entry = stored_cal["heldout"]["by_family"]["other"]
    assert entry["record"] == family["record"] and entry["errors"] == 3
    assert entry["cuts"] == family_cuts(stored_cal, "other") and entry["cuts"]["reach"] == reach
    assert entry["cuts"]["spread"] is None and entry["cuts"]["target_source"] == "noisy"
    assert heldout_record(stored_cal, "other", family_cuts(stored_cal, "other"))["record"] == family["record"]
    # a refit voids it, whether it moves a cut or lands on the same ones (its models may include these)
    moved = {
        **stored_cal,
        "reach": {**stored_cal["reach"], "by_family": {"other": {**reach, "threshold": 0.4}}},
    }
    assert heldout_record(moved, "other", family_cuts(moved, "other")) is None
    again = {**stored_cal, "reach": {**stored_cal["reach"], "command": "refit with the held-out models"}}
    assert heldout_record(again, "other", family_cuts(again, "other")) is None
    # a check of one family keeps another family's record
    stored_cal["heldout"]["by_family"]["batchnorm"] = {"record": {"detected": 1}, "cuts": {}}
    out.write_text(json.dumps(stored_cal))
    cal.main([*argv, "--check", "--record-check", *models])
    assert json.loads(out.read_text())["heldout"]["by_family"]["batchnorm"] == {
        "record": {"detected": 1},
        "cuts": {},
    }

    # refused: reach scores taken at other steps than the scan's; a family counted from stored verdicts
    out.write_text(before)
    steps40 = [a if a != "20" else "40" for a in argv]
    with pytest.raises(SystemExit, match="reach runs 20 steps .* give --steps 20"):
        cal.main([*steps40, "--check", "--record-check", *models])
    plain = {k: v for k, v in calibration.items() if k != "refitted_by_family"}
    out.write_text(json.dumps(plain))
    with pytest.raises(SystemExit, match="were not refitted by calibrate_reach.py"):
        cal.main([*argv, "--check", "--record-check", *models])
    assert json.loads(out.read_text()) == plain
    out.write_text(before)
    with pytest.raises(SystemExit, match="--record-check records a held-out check: give it with --check"):
        cal.main([*argv, "--record-check", *models])
    with pytest.raises(SystemExit, match="--check-out records a held-out check: give it with --check"):
        cal.main([*argv, "--check-out", str(report), *models])
    with pytest.raises(SystemExit, match="is the calibration being checked"):
        cal.main([*argv, "--check", "--check-out", str(out), *models])
    assert out.read_text() == before


def test_a_run_over_stored_scans_needs_no_model_folder(cal, tmp_path):
    """``benchmarks/cache`` is not in the repository: a folder that is not there is accepted where
    ``--results`` holds scans of it, and a scan the store lacks says what to do instead of failing
    on a missing file."""
    gone = tmp_path / "resnet18-none-s3"
    stored = {f"{gone.name}|l2:1|steps20|n600|test|s0": {}}
    assert cal.model_folders([str(gone)], stored) == [gone]
    with pytest.raises(SystemExit, match="no training.json .* and no scan of it stored in --results"):
        cal.model_folders([str(gone)])
    args = cal.parse_args([str(gone)])
    with pytest.raises(SystemExit, match="needs a scan of it that --results does not hold"):
        cal.scan_folder(gone, args)


def _split_cut_calibration() -> dict:
    """BatchNorm cuts for split_cut.py's tests: all-to-one 0.3 at eps 0.5, no all-to-all cut, no reach."""
    return {
        "all_to_one_thresholds": {"batchnorm": 0.3},
        "all_to_all_thresholds": {"batchnorm": None},
        "eps_by_family": {"batchnorm": 0.5},
        "target_source_by_family": {"batchnorm": "noisy"},
    }


def test_split_cut_withdraws_split_readings_below_a_cut_fitted_on_the_other_folds(
    benchmark_script, tmp_path, monkeypatch
):
    """``split_cut.py``: each fold is counted with the split cut fitted on the others (midway
    between the highest clean split reading and the next split reading above it), at the shipped
    cuts otherwise: clean models with split readings just over the shipped cut are cleared,
    split backdoors above the split cut and agreeing ones above the shipped cut still found, and
    a split backdoor between the two cuts is the price."""
    split_cut = benchmark_script("split_cut")
    stored, folds = {}, {}

    def add(fold, name, attack, a2o, *, target=None, split=False):
        row = {**_scored(attack, a2o, 0.05, target=target), "norm_family": "batchnorm"}
        if split:
            row["ban_statistics"] = {**row["ban_statistics"], "target_masked": 7}
        folds.setdefault(fold, []).append(_fold_model(tmp_path, stored, name, row, ban_eps=0.5)[0])

    add("f1", "f1-clean", None, 0.35, split=True)
    add("f1", "f1-bad", "badnets", 0.60, target=2, split=True)
    add("f2", "f2-clean", None, 0.32, split=True)
    add("f2", "f2-bad", "blended", 0.50, target=3, split=True)
    add("f3", "f3-clean", None, 0.10)
    add("f3", "f3-bad", "badnets", 0.40, target=1)
    add("check", "c-bad", "badnets", 0.38, target=4, split=True)
    results = tmp_path / "stored.json"
    results.write_text(json.dumps(stored))
    calibration = _split_cut_calibration()
    monkeypatch.setattr(split_cut, "load_calibration", lambda: calibration)
    out = tmp_path / "out.json"
    argv = ["--results", str(results), "--out", str(out), "--check", *folds.pop("check")]
    for name, members in folds.items():
        argv += ["--fold", name, *members]
    split_cut.main(argv)
    result = json.loads(out.read_text())
    by_fold = {f["counted_on"]: f for f in result["folds"]}
    assert by_fold["f1"]["split_cut"] == pytest.approx((0.32 + 0.50) / 2)
    assert by_fold["f2"]["split_cut"] == pytest.approx((0.35 + 0.60) / 2)
    for name in ("f1", "f2"):
        assert by_fold[name]["two_cuts"]["errors"] == 0
        assert by_fold[name]["shipped"]["false_positives"] == by_fold[name]["shipped"]["errors"] == 1
    assert by_fold["f3"]["two_cuts"]["detected"] == by_fold["f3"]["shipped"]["detected"] == 1
    check = result["check"]
    assert check["split_cut"] == pytest.approx((0.35 + 0.50) / 2)
    assert (check["two_cuts"]["detected"], check["shipped"]["detected"]) == (0, 1)
    assert result["command"].startswith("python benchmarks/split_cut.py")
    with pytest.raises(SystemExit, match="two or more --fold"):
        split_cut.parse_args(["--results", "r", "--out", "o", "--fold", "only", "m"])
    monkeypatch.setattr(
        split_cut,
        "load_calibration",
        lambda: {**calibration, "all_to_one_agreement_by_family": {"batchnorm": True}},
    )
    with pytest.raises(SystemExit, match="already needs agreement"):
        split_cut.main(argv)


def test_split_cut_can_refit_reach_behind_it_over_several_stores(benchmark_script, tmp_path, monkeypatch):
    """``split_cut.py --refit-reach``: reach's cut is fitted on the same folds as the split cut,
    behind BAN's cuts and it, so a backdoor the split cut withdraws from BAN can be reach's; the
    folds' scans may sit in several stores."""
    split_cut = benchmark_script("split_cut")
    stores, folds = {"one": {}, "two": {}}, {"g1": [], "g2": []}

    def add(store, fold, name, attack, a2o, reach, *, target=None, split=False):
        row = {**_scored(attack, a2o, reach, target=target), "norm_family": "batchnorm"}
        if split:
            row["ban_statistics"] = {**row["ban_statistics"], "target_masked": 7}
        folds[fold].append(_fold_model(tmp_path, stores[store], name, row, ban_eps=0.5)[0])

    add("one", "g1", "g1-clean", None, 0.35, 0.1, split=True)
    add("one", "g1", "g1-wanet", "wanet", 0.33, 0.8, target=6, split=True)
    add("two", "g2", "g2-clean", None, 0.10, 0.2)
    add("two", "g2", "g2-bad", "badnets", 0.60, 0.05, target=2)
    paths = []
    for name, store in stores.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(store))
    calibration = _split_cut_calibration()
    monkeypatch.setattr(split_cut, "load_calibration", lambda: calibration)
    out = tmp_path / "out.json"
    argv = ["--results", *map(str, paths), "--out", str(out), "--refit-reach"]
    argv += ["--fold", "g1", *folds["g1"], "--fold", "g2", *folds["g2"]]
    split_cut.main(argv)
    by_fold = {f["counted_on"]: f for f in json.loads(out.read_text())["folds"]}
    # fitted on g1: the split cut clears its clean model and withdraws the WaNet, which reach takes
    assert by_fold["g2"]["split_cut"] == pytest.approx(0.35)
    assert by_fold["g2"]["reach"] == {"threshold": pytest.approx(0.45), "target_when_both": "ban"}
    assert by_fold["g2"]["two_cuts"]["errors"] == 0
    # fitted on g2: no clean split reading, nothing for reach to add
    assert by_fold["g1"]["split_cut"] is None and by_fold["g1"]["reach"] is None
    assert by_fold["g1"]["two_cuts"]["false_positives"] == 1
